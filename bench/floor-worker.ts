/**
 * The token-read floor for `npm run bench`: the least a Worker can do to answer from the database —
 * one `SELECT` through the same driver (`neon()` + `drizzle-orm/neon-http`) to the same local
 * database. Bundled by `wrangler deploy --dry-run` like the real Worker and run in the same workerd.
 *
 * `/trivial` reads nothing: the floor of a cached token read (`npm run bench`'s cache part).
 * `/floor` is the floor of an uncached read. The other routes add the real read path's pieces one at a time, so the
 * benchmark can say where the time between the floor and `GET /tokens/{branch_id}` goes:
 *   /floor-schema   the floor's query through createDb (drizzle with the schema, as the service builds it)
 *   /query          the service's own read query (`findForRead` in src/services/tokens.ts: the client's
 *                   serving columns with its latest token through a LATERAL subquery) via createDb
 *   /query-decrypt  + the keyring (cached per isolate) and AES-GCM open of the access token
 *   /query-full     + parseEnv (zod, cached per env object) and the API-key check (SHA-256 digests)
 * The remainder up to the real route is Hono / zod-openapi routing, validation and the response.
 */
import { neon, neonConfig } from "@neondatabase/serverless";
import { eq } from "drizzle-orm";
import { drizzle } from "drizzle-orm/neon-http";
import { createDb } from "../src/db/client";
import { clients } from "../src/db/schema";
import { parseEnv } from "../src/env";
import { loadKeyring, matchesAny, open } from "../src/lib/crypto";
import { findForRead } from "../src/services/tokens";

interface FloorEnv {
  TOKEN_MANAGEMENT_DATABASE_URL: string;
  NEON_LOCAL_FETCH_ENDPOINT?: string;
  TOKEN_ENCRYPTION_KEY: string;
}

export default {
  async fetch(request: Request, env: FloorEnv): Promise<Response> {
    const url = new URL(request.url);
    const branchId = url.searchParams.get("branch") ?? "";
    switch (url.pathname) {
      case "/trivial":
        // The edge-cache floor: a Worker answering without reading anything.
        return Response.json({ branch_id: branchId, ok: true });
      case "/floor": {
        if (env.NEON_LOCAL_FETCH_ENDPOINT) neonConfig.fetchEndpoint = env.NEON_LOCAL_FETCH_ENDPOINT;
        const db = drizzle({ client: neon(env.TOKEN_MANAGEMENT_DATABASE_URL) });
        const [row] = await db.select({ id: clients.id }).from(clients).where(eq(clients.branchId, branchId));
        return Response.json({ id: row?.id ?? null });
      }
      case "/floor-schema": {
        const db = createDb({
          databaseUrl: env.TOKEN_MANAGEMENT_DATABASE_URL,
          localFetchEndpoint: env.NEON_LOCAL_FETCH_ENDPOINT,
        });
        const [row] = await db.select({ id: clients.id }).from(clients).where(eq(clients.branchId, branchId));
        return Response.json({ id: row?.id ?? null });
      }
      case "/query":
      case "/query-decrypt":
      case "/query-full": {
        const full = url.pathname === "/query-full";
        if (full) {
          const config = parseEnv(env);
          const presented = /^Bearer\s+(\S+)\s*$/i.exec(request.headers.get("authorization") ?? "")?.[1] ?? "";
          const ok =
            (await matchesAny(presented, config.ADMIN_API_KEY)) ||
            (await matchesAny(presented, config.SERVICE_API_KEY));
          if (!ok) return new Response("unauthorized", { status: 401 });
        }
        const db = createDb({
          databaseUrl: env.TOKEN_MANAGEMENT_DATABASE_URL,
          localFetchEndpoint: env.NEON_LOCAL_FETCH_ENDPOINT,
        });
        const row = await findForRead(db, { branchId });
        if (!row.client || !row.token) return new Response("not found", { status: 404 });
        let accessToken = row.token.accessToken;
        if (url.pathname !== "/query") {
          accessToken = await open(await loadKeyring(env.TOKEN_ENCRYPTION_KEY), accessToken, {
            column: "tokens.access_token",
            clientId: row.client.id,
          });
        }
        return Response.json({
          client_id: row.client.id,
          branch_id: row.client.branchId,
          access_token: accessToken,
          expires_at: row.token.expiresAt.toISOString(),
        });
      }
      default:
        return new Response("not found", { status: 404 });
    }
  },
};
