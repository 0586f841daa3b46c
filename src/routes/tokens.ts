import { createRoute, z } from "@hono/zod-openapi";
import type { TypedResponse } from "hono";
import type { App } from "../app";
import { operatorOf } from "../context";
import { logInfo, sampled } from "../lib/log";
import { type Operator, readToken, refreshNow, revokeToken } from "../services/operations";
import type { CachedToken } from "../services/token-cache";
import { type KeyRole, requireKey } from "./api-key";
import { API_KEY_SECURITY, BranchParam, jsonContent as json, problem } from "./schemas";

const TokenView = z
  .object({
    success: z.literal(true),
    message: z.string(),
    client_id: z.number().int(),
    branch_id: z.string(),
    access_token: z.string(),
    expires_at: z.string(),
    expires_in: z.number().int(),
    token_type: z.string(),
    scope: z.string().nullable(),
    refreshed: z.boolean(),
    provider_resource: z
      .string()
      .nullable()
      .describe("What the branch stands for at the provider (Google Business Profile: accounts/…/locations/…)."),
  })
  .openapi("AccessToken");

const RefreshBody = z
  .union([
    z.object({ client_id: z.number().int().positive().max(2_147_483_647) }).strict(),
    z.object({ branch_id: z.string().min(1).max(128) }).strict(),
  ])
  .openapi("RefreshTarget", { description: "The internal client id (as before) or the branch id." });

const security = API_KEY_SECURITY;
/** RFC 9211 Cache-Status of a token read or refresh: which tier answered. */
const cacheStatusHeader = {
  "Cache-Status": z.string().openapi({ example: "token-management; hit; ttl=42; detail=memory" }),
};
const tokenErrors = {
  401: problem("Missing or wrong API key"),
  404: problem("Unknown branch"),
  409: problem("Never connected, revoked, reauthorization_required, or client credentials rejected"),
  502: problem("The provider refused the refresh"),
  503: problem("The provider or database is unavailable (see Retry-After)"),
};

/** The token routes' path (GET and DELETE /tokens/{branch_id}; fastTokenRead in src/app.ts matches it too). */
export const TOKENS_PATH = "/tokens";

/** Who may read a token: the service key (and the admin key, which opens every route). */
export const TOKEN_READ_ROLE: KeyRole = "service";

const get = createRoute({
  method: "get",
  path: `${TOKENS_PATH}/{branch_id}`,
  tags: ["tokens"],
  summary: "A valid access token for the branch, refreshed first when close to expiry",
  security,
  middleware: [requireKey(TOKEN_READ_ROLE)] as const,
  request: { params: BranchParam },
  responses: {
    200: { description: "The token", content: json(TokenView), headers: z.object(cacheStatusHeader) },
    ...tokenErrors,
  },
});

const refresh = createRoute({
  method: "post",
  path: `${TOKENS_PATH}/refresh`,
  tags: ["tokens"],
  summary: "Refresh a branch's token now",
  security,
  middleware: [requireKey("admin")] as const,
  request: { body: { required: true, content: json(RefreshBody) } },
  responses: {
    200: { description: "The refreshed token", content: json(TokenView), headers: z.object(cacheStatusHeader) },
    ...tokenErrors,
    403: problem("Service key on an admin route"),
    422: problem("Invalid body"),
  },
});

const revoke = createRoute({
  method: "delete",
  path: `${TOKENS_PATH}/{branch_id}`,
  tags: ["tokens"],
  summary: "Revoke the branch's grant at the provider (best effort) and here",
  security,
  middleware: [requireKey("admin")] as const,
  request: { params: BranchParam },
  responses: {
    200: {
      description: "Revoked",
      content: json(
        z.object({
          success: z.literal(true),
          message: z.string(),
          client_id: z.number(),
          branch_id: z.string(),
          revoked_at_provider: z.boolean(),
          cache_max_age_seconds: z.number().int().openapi({
            description:
              "Other Cloudflare locations may still serve the old token from their cache for at most this many seconds.",
          }),
        }),
      ),
    },
    ...tokenErrors,
    403: problem("Service key on an admin route"),
  },
});

export function registerTokenRoutes(app: App): void {
  // A plain read with a key already seen valid is served by fastTokenRead (src/app.ts), which calls
  // serveTokenRead too; this route answers the rest and documents both.
  app.openapi(get, (c) => serveTokenRead(operatorOf(c), c.req.valid("param").branch_id, c.get("requestId")));

  app.openapi(refresh, async (c) => {
    const body = c.req.valid("json");
    const target = "client_id" in body ? { clientId: body.client_id } : { branchId: body.branch_id };
    const token = await refreshNow(operatorOf(c), target, new Date());
    logInfo("token_served", { request_id: c.var.requestId, client: token.clientId, tier: "database", refreshed: true });
    return jsonOk(tokenView(token, new Date()), "token-management; fwd=request; stored; detail=database");
  });

  app.openapi(revoke, async (c) => {
    const { branch_id: branchId } = c.req.valid("param");
    const result = await revokeToken(operatorOf(c), branchId, new Date());
    const maxAge = result.cacheMaxAgeSeconds;
    return c.json(
      {
        success: true as const,
        message: `${
          result.revokedAtProvider
            ? "Token revoked at the provider and here."
            : "Token revoked here; the provider could not be reached or had nothing to revoke."
        } Other locations may serve it from their cache for up to ${maxAge} s.`,
        client_id: result.client.id,
        branch_id: result.client.branchId,
        revoked_at_provider: result.revokedAtProvider,
        cache_max_age_seconds: maxAge,
      },
      200,
    );
  });
}

/** GET /tokens/{branch_id}: the branch's token, from the cache tiers or the database. */
export async function serveTokenRead(op: Operator, branchId: string, requestId: string) {
  const read = await readToken(op, branchId, new Date());
  // A success line per read is sampled (LOG_TOKEN_READS); refreshes and failures log their own.
  if (sampled(op.config.LOG_TOKEN_READS)) {
    logInfo("token_served", {
      request_id: requestId,
      client: read.token.clientId,
      tier: read.tier,
      refreshed: read.token.refreshed,
      revalidating: read.revalidating,
      sample_rate: op.config.LOG_TOKEN_READS,
    });
  }
  return jsonOk(tokenView(read.token, new Date()), read.cacheStatus);
}

/**
 * The token read's response, built in one step: the hottest response of the service, and c.json's
 * header merging (a runtime call per header) cost more than the rest of a memory hit. The same
 * body, status and headers c.json sends, no-store included; typed as c.json's.
 */
function jsonOk<T>(body: T, cacheStatus: string): Response & TypedResponse<T, 200, "json"> {
  return new Response(JSON.stringify(body), {
    headers: { "Content-Type": "application/json", "Cache-Control": "no-store", "Cache-Status": cacheStatus },
  }) as Response & TypedResponse<T, 200, "json">;
}

function tokenView(token: CachedToken, now: Date): z.infer<typeof TokenView> {
  const expiresIn = Math.max(0, Math.floor((token.expiresAt.getTime() - now.getTime()) / 1000));
  return {
    success: true as const,
    message: token.refreshed ? "Token refreshed." : "Token is valid.",
    client_id: token.clientId,
    branch_id: token.branchId,
    access_token: token.accessToken,
    expires_at: token.expiresAt.toISOString(),
    expires_in: expiresIn,
    token_type: token.tokenType,
    scope: token.scope,
    refreshed: token.refreshed,
    provider_resource: token.providerResource,
  };
}
