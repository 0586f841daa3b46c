import { createRoute, z } from "@hono/zod-openapi";
import type { App } from "../app";
import { operatorOf } from "../context";
import type { TokenRow } from "../db/schema";
import { type BranchRow, type ClientWithToken, connectionStatus, getClient, listClients } from "../services/clients";
import { changeClient, newLoginLink, registerBranch, removeClient, revokeLoginLinks } from "../services/operations";
import { requireKey } from "./api-key";
import {
  API_KEY_SECURITY,
  ClientBody,
  ClientPatch,
  clientChangesOf,
  IdParam,
  jsonContent as json,
  newClientOf,
  problem,
} from "./schemas";

const Connection = z.object({
  status: z.enum(["never_connected", "connected", "needs_reauth", "revoked", "account_disabled"]),
  expires_at: z.string().nullable(),
  last_refreshed_at: z.string().nullable(),
  last_error: z.string().nullable(),
  credentials_rejected: z.boolean(),
  consent_problem: z
    .object({
      code: z.enum(["scopes_not_granted", "no_refresh_token"]),
      detail: z.string(),
      at: z.string(),
    })
    .nullable()
    .describe(
      "Why the last consent stored nothing: the user did not grant every scope, or the provider issued no refresh token (the next sign-in then forces the consent screen). Cleared when a consent stores tokens.",
    ),
});

const ClientView = z
  .object({
    client_id: z.number().int().describe("Internal id (the old service's client_id)."),
    client_oauth_id: z.string().describe("The OAuth client id of the branch's app."),
    app_id: z.number().int().nullable().describe("The app the branch uses (GET /apps/{id})."),
    grant_id: z.number().int().nullable().describe("The grant the branch is served from; null until connected."),
    provider_resource: z.string().nullable(),
    branch_id: z.string(),
    branch_identifier: z.string(),
    email: z.string(),
    workspace_name: z.string(),
    redirect_uri: z.string(),
    scopes: z.string().nullable(),
    is_active: z.boolean(),
    created_at: z.string(),
    updated_at: z.string(),
    connection: Connection,
  })
  .openapi("Client");

const security = API_KEY_SECURITY;
const errors = {
  400: problem("Malformed request"),
  401: problem("Missing or wrong API key"),
  403: problem("Service key on an admin route"),
  422: problem("Invalid fields"),
};

const create = createRoute({
  method: "post",
  path: "/clients",
  tags: ["clients"],
  summary: "Register a branch's OAuth client",
  security,
  middleware: [requireKey("admin")] as const,
  request: { body: { required: true, content: json(ClientBody) } },
  responses: {
    201: {
      description: "Registered. The secret is never returned.",
      content: json(
        ClientView.extend({
          success: z.literal(true),
          message: z.string(),
          login_url: z.string(),
          login_url_expires_at: z.string(),
        }),
      ),
    },
    ...errors,
    409: problem("client_id or branch_id already registered"),
  },
});

const list = createRoute({
  method: "get",
  path: "/clients",
  tags: ["clients"],
  summary: "List clients, a page at a time",
  security,
  middleware: [requireKey("admin")] as const,
  request: {
    query: z
      .object({
        is_active: z.enum(["true", "false"]).optional(),
        limit: z.coerce.number().int().min(1).max(100).default(50),
        cursor: z.coerce.number().int().min(0).max(2_147_483_647).optional(),
      })
      .strict(),
  },
  responses: {
    200: {
      description: "A page of clients; pass next_cursor as cursor for the next one.",
      content: json(
        z.object({
          success: z.literal(true),
          message: z.string(),
          clients: z.array(ClientView),
          next_cursor: z.number().nullable(),
        }),
      ),
    },
    ...errors,
  },
});

const show = createRoute({
  method: "get",
  path: "/clients/{id}",
  tags: ["clients"],
  summary: "A client and its connection status",
  security,
  middleware: [requireKey("admin")] as const,
  request: { params: IdParam },
  responses: {
    200: {
      description: "The client",
      content: json(ClientView.extend({ success: z.literal(true), message: z.string() })),
    },
    ...errors,
    404: problem("No such client"),
  },
});

const patch = createRoute({
  method: "patch",
  path: "/clients/{id}",
  tags: ["clients"],
  summary: "Rotate the secret, change redirect URI, scopes or names, (de)activate",
  security,
  middleware: [requireKey("admin")] as const,
  request: { params: IdParam, body: { required: true, content: json(ClientPatch) } },
  responses: {
    200: {
      description: "Updated",
      content: json(ClientView.extend({ success: z.literal(true), message: z.string() })),
    },
    ...errors,
    404: problem("No such client"),
  },
});

const remove = createRoute({
  method: "delete",
  path: "/clients/{id}",
  tags: ["clients"],
  summary: "Revoke the client's tokens at the provider (best effort) and delete it",
  security,
  middleware: [requireKey("admin")] as const,
  request: { params: IdParam },
  responses: {
    200: {
      description: "Deleted",
      content: json(
        z.object({
          success: z.literal(true),
          message: z.string(),
          client_id: z.number(),
          tokens_revoked: z.number(),
          revocation_failures: z.number(),
          cache_max_age_seconds: z.number().int().openapi({
            description:
              "Other Cloudflare locations may still serve the branch's token from their cache for at most this many seconds.",
          }),
        }),
      ),
    },
    ...errors,
    404: problem("No such client"),
  },
});

const loginUrl = createRoute({
  method: "get",
  path: "/clients/{id}/login-url",
  tags: ["clients"],
  summary: "A fresh signed login link to send to the branch",
  description:
    "A link works until it expires (LOGIN_LINK_TTL_SECONDS), until a consent made with any link of the client has stored tokens, or until the client's links are revoked. With revoke_previous=true every earlier link stops working at once.",
  security,
  middleware: [requireKey("admin")] as const,
  request: {
    params: IdParam,
    query: z
      .object({
        revoke_previous: z.enum(["true", "false"]).optional(),
        account: z
          .string()
          .trim()
          .min(1)
          .max(320)
          .optional()
          .describe(
            "Bind the link to the account expected to consent (its email or OpenID Connect sub): a consent by another account stores nothing. Sent to the provider as login_hint.",
          ),
      })
      .strict(),
  },
  responses: {
    200: {
      description: "The link (Cache-Control: no-store)",
      content: json(
        z.object({
          success: z.literal(true),
          message: z.string(),
          client_id: z.number(),
          login_url: z.string(),
          expires_at: z.string(),
        }),
      ),
    },
    ...errors,
    404: problem("No such client"),
  },
});

const revokeLinks = createRoute({
  method: "post",
  path: "/clients/{id}/login-links/revoke",
  tags: ["clients"],
  summary: "Revoke every outstanding login link of the client",
  description:
    "Links issued so far stop working, and so do consents begun with them but not finished (their callback answers 409). Links issued afterwards work. The current connection, if any, is kept.",
  security,
  middleware: [requireKey("admin")] as const,
  request: { params: IdParam },
  responses: {
    200: {
      description: "Revoked",
      content: json(
        z.object({
          success: z.literal(true),
          message: z.string(),
          client_id: z.number(),
          revoked_before: z.string().describe("Links issued before this instant no longer work."),
        }),
      ),
    },
    ...errors,
    404: problem("No such client"),
  },
});

export function registerClientRoutes(app: App): void {
  app.openapi(create, async (c) => {
    const body = c.req.valid("json");
    const { client, link } = await registerBranch(operatorOf(c), newClientOf(body), new Date());
    // The body carries a login link, a capability: never cached.
    return c.json(
      {
        success: true as const,
        message: "Client registered. Send login_url to the branch to connect it.",
        ...clientView({ client, token: null }),
        login_url: link.url,
        login_url_expires_at: link.expiresAt.toISOString(),
      },
      201,
    );
  });

  app.openapi(list, async (c) => {
    const query = c.req.valid("query");
    const rows = await listClients(c.var.db, {
      isActive: query.is_active === undefined ? undefined : query.is_active === "true",
      limit: query.limit,
      after: query.cursor,
    });
    const last = rows.at(-1);
    return c.json(
      {
        success: true as const,
        message: `${rows.length} client(s).`,
        clients: rows.map(clientView),
        next_cursor: rows.length === query.limit && last ? last.client.id : null,
      },
      200,
    );
  });

  app.openapi(show, async (c) => {
    const found = await getClient(c.var.db, c.req.valid("param").id);
    return c.json({ success: true as const, message: "Client found.", ...clientView(found) }, 200);
  });

  app.openapi(patch, async (c) => {
    const { id } = c.req.valid("param");
    const body = c.req.valid("json");
    const updated = await changeClient(operatorOf(c), id, clientChangesOf(body), new Date());
    return c.json({ success: true as const, message: "Client updated.", ...clientView(updated) }, 200);
  });

  app.openapi(remove, async (c) => {
    const { id } = c.req.valid("param");
    const result = await removeClient(operatorOf(c), id, new Date());
    const maxAge = result.cacheMaxAgeSeconds;
    return c.json(
      {
        success: true as const,
        message: `Client deleted. Other locations may serve its token from their cache for up to ${maxAge} s.`,
        client_id: id,
        tokens_revoked: result.revoked,
        revocation_failures: result.revocationFailures,
        cache_max_age_seconds: maxAge,
      },
      200,
    );
  });

  app.openapi(loginUrl, async (c) => {
    const { id } = c.req.valid("param");
    const query = c.req.valid("query");
    const revokePrevious = query.revoke_previous === "true";
    const link = await newLoginLink(operatorOf(c), id, revokePrevious, new Date(), query.account);
    return c.json(
      {
        success: true as const,
        message: revokePrevious ? "Login link created; earlier links no longer work." : "Login link created.",
        client_id: id,
        login_url: link.url,
        expires_at: link.expiresAt.toISOString(),
      },
      200,
    );
  });

  app.openapi(revokeLinks, async (c) => {
    const { id } = c.req.valid("param");
    const revokedBefore = await revokeLoginLinks(operatorOf(c), id, new Date());
    return c.json(
      {
        success: true as const,
        message: "Every login link issued so far, and any consent begun with one, no longer works.",
        client_id: id,
        revoked_before: revokedBefore.toISOString(),
      },
      200,
    );
  });
}

export function clientView({ client, token }: { client: BranchRow; token: TokenRow | null }) {
  return {
    client_id: client.id,
    client_oauth_id: client.clientId,
    app_id: client.appId,
    grant_id: client.grantId,
    provider_resource: client.providerResource,
    branch_id: client.branchId,
    branch_identifier: client.branchId,
    email: client.workspaceEmail,
    workspace_name: client.workspaceName,
    redirect_uri: client.redirectUri,
    scopes: client.scopes,
    is_active: client.isActive,
    created_at: client.createdAt.toISOString(),
    updated_at: client.updatedAt.toISOString(),
    connection: {
      status: connectionStatus(token),
      expires_at: token?.expiresAt.toISOString() ?? null,
      last_refreshed_at: token?.lastRefreshedAt?.toISOString() ?? null,
      last_error: token?.lastError ?? null,
      credentials_rejected: client.credentialsRejectedAt !== null,
      consent_problem:
        client.consentProblem && client.consentProblemAt
          ? {
              code: client.consentProblem,
              detail: client.consentProblemDetail ?? "",
              at: client.consentProblemAt.toISOString(),
            }
          : null,
    },
  };
}

export type { ClientWithToken };
