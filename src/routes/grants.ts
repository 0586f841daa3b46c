import { createRoute, z } from "@hono/zod-openapi";
import type { App } from "../app";
import { operatorOf } from "../context";
import { type GrantView as Grant, getGrant, listGrants, TOKEN_LIMIT_WARNING_AT } from "../services/grants";
import { attachToGrant } from "../services/operations";
import { requireKey } from "./api-key";
import { API_KEY_SECURITY, AttachBody, GrantView, IdParam, jsonContent as json, problem } from "./schemas";

/** Grants: a provider account's authorization on an app, shared by its branches. Admin key only. */

const security = API_KEY_SECURITY;
const errors = {
  401: problem("Missing or wrong API key"),
  403: problem("Service key on an admin route"),
  422: problem("Invalid body or parameters"),
};

const list = createRoute({
  method: "get",
  path: "/grants",
  tags: ["grants"],
  summary: "List grants, oldest first, a page at a time",
  security,
  middleware: [requireKey("admin")] as const,
  request: {
    query: z
      .object({
        app_id: z.coerce.number().int().positive().max(2_147_483_647).optional(),
        after: z.coerce.number().int().min(0).max(2_147_483_647).optional(),
        limit: z.coerce.number().int().min(1).max(200).default(50),
      })
      .strict(),
  },
  responses: {
    200: {
      description: "A page of grants; pass next_cursor as `after` for the next one.",
      content: json(
        z.object({
          success: z.literal(true),
          message: z.string(),
          grants: z.array(GrantView),
          next_cursor: z.number().nullable(),
        }),
      ),
    },
    ...errors,
  },
});

const read = createRoute({
  method: "get",
  path: "/grants/{id}",
  tags: ["grants"],
  summary: "One grant and the branches served from it",
  security,
  middleware: [requireKey("admin")] as const,
  request: { params: IdParam },
  responses: {
    200: {
      description: "The grant",
      content: json(GrantView.extend({ success: z.literal(true), message: z.string() })),
    },
    ...errors,
    404: problem("No such grant"),
  },
});

const attach = createRoute({
  method: "put",
  path: "/clients/{id}/grant",
  tags: ["grants"],
  summary: "Serve a branch from an existing connected grant of its app, with no consent",
  security,
  middleware: [requireKey("admin")] as const,
  request: { params: IdParam, body: { required: true, content: json(AttachBody) } },
  responses: {
    200: {
      description: "Attached",
      content: json(GrantView.extend({ success: z.literal(true), message: z.string() })),
    },
    ...errors,
    404: problem("No such client or grant"),
    409: problem("The grant is another app's, or not connected"),
  },
});

export function registerGrantRoutes(app: App): void {
  app.openapi(list, async (c) => {
    const query = c.req.valid("query");
    const page = await listGrants(c.var.db, { appId: query.app_id, after: query.after, limit: query.limit });
    return c.json(
      {
        success: true as const,
        message: `${page.grants.length} grant(s).`,
        grants: page.grants.map(grantView),
        next_cursor: page.nextCursor,
      },
      200,
    );
  });
  app.openapi(read, async (c) => {
    const grant = await getGrant(c.var.db, c.req.valid("param").id);
    return c.json({ success: true as const, message: "Grant found.", ...grantView(grant) }, 200);
  });
  app.openapi(attach, async (c) => {
    const { id } = c.req.valid("param");
    const { grant_id: grantId } = c.req.valid("json");
    await attachToGrant(operatorOf(c), id, grantId, new Date());
    return c.json(
      {
        success: true as const,
        message: `Branch attached to grant ${grantId}.`,
        ...grantView(await getGrant(c.var.db, grantId)),
      },
      200,
    );
  });
}

export function grantView({ grant, appName, status, branches }: Grant) {
  return {
    grant_id: grant.id,
    app_id: grant.appId ?? 0,
    app_name: appName,
    account: { subject: grant.subject, email: grant.email },
    status,
    expires_at: grant.expiresAt.toISOString(),
    last_refreshed_at: grant.lastRefreshedAt?.toISOString() ?? null,
    last_error: grant.lastError,
    consented_at: grant.consentedAt?.toISOString() ?? null,
    access_ends_at: grant.refreshTokenExpiresAt?.toISOString() ?? null,
    refresh_tokens_minted: grant.refreshTokensMinted,
    token_limit_near: grant.refreshTokensMinted >= TOKEN_LIMIT_WARNING_AT,
    held_since: grant.heldAt?.toISOString() ?? null,
    branches: branches.map((branch) => ({ client_id: branch.id, branch_id: branch.branchId })),
  };
}
