/**
 * Where a warm (memory-hit) token read spends its time, measured inside workerd for
 * `npm run bench:cache` (bench/cache.ts drives it). Each step runs in a loop in this isolate, with
 * no HTTP in between, and reports microseconds per iteration (median of block means). Locally
 * workerd's clock advances during CPU work; in production it would not.
 *
 *   trivial          the floor route's work: Response.json of two fields
 *   app              the real Worker (src/index.ts), GET /tokens/{branch_id}, answered from memory
 *   app-404          the real Worker on an unknown path: middleware (services, request id), not found
 *   app-401          the real Worker, GET /tokens/{branch_id} without a key: routing, then the key check refuses
 *   services         createServices(env): parseEnv (cached), createDb, keyring (cached), provider
 *   api-key          the service-key check as requireKey does it (SHA-256 digests, admin then service)
 *   read-through     readThrough() answered from the memory tier, alone
 *   cache-key-hmac   tokenCacheKey(): the location tier's key (HMAC-SHA-256 of the branch id)
 *   entry-open       opening a sealed cache entry (AES-GCM) and JSON.parse of its payload
 *   log-line         logInfo() of a token_served line
 */

import { createServices } from "../src/context";
import { parseEnv } from "../src/env";
import app from "../src/index";
import { matchesAny, open, seal, tokenCacheKey } from "../src/lib/crypto";
import { logInfo } from "../src/lib/log";
import { readThrough, tokenCacheDeps } from "../src/services/token-cache";

/** A request as the Worker's fetch handler receives it (the runtime adds `cf`; types want it said). */
const incoming = (url: string, init?: RequestInit) =>
  new Request(url, init) as unknown as Request<unknown, IncomingRequestCfProperties>;

type Step = () => Promise<unknown>;

export default {
  async fetch(request: Request, env: Env, ctx: ExecutionContext): Promise<Response> {
    const { branchId, serviceKey, iterations, only } = (await request.json()) as {
      branchId: string;
      serviceKey: string;
      iterations: number;
      only?: string;
    };
    const headers = { authorization: `Bearer ${serviceKey}` };
    const services = await createServices(env);
    const config = parseEnv(env);
    const deps = tokenCacheDeps(services, (task) => ctx.waitUntil(task));
    const sealed = await seal(
      services.keyring,
      JSON.stringify({ accessToken: `ya29.${"x".repeat(200)}`, tokenType: "Bearer", scope: "s", clientId: 1 }),
      { tokenCache: JSON.stringify([branchId, 1, 2, 3599]) },
    );
    const noLoad = async (): Promise<never> => {
      throw new Error("a memory hit must not load");
    };
    const appRead = async (warming = false) => {
      const response = await app.fetch(
        incoming(`http://worker/token-management/tokens/${branchId}`, { headers }),
        env,
        ctx,
      );
      await response.text();
      if (response.status !== 200) throw new Error(`app: ${response.status}`);
      if (!warming && !/detail=memory/.test(response.headers.get("cache-status") ?? "")) {
        throw new Error(`app: not a memory hit (${response.headers.get("cache-status")})`);
      }
    };
    const steps: Record<string, Step> = {
      trivial: async () => Response.json({ branch_id: branchId, ok: true }).text(),
      app: () => appRead(),
      "app-404": async () => (await app.fetch(incoming("http://worker/token-management/nothing"), env, ctx)).text(),
      "app-401": async () =>
        (await app.fetch(incoming(`http://worker/token-management/tokens/${branchId}`), env, ctx)).text(),
      services: () => createServices(env),
      "api-key": async () =>
        (await matchesAny(serviceKey, config.ADMIN_API_KEY)) || (await matchesAny(serviceKey, config.SERVICE_API_KEY)),
      "read-through": () => readThrough(deps, branchId, new Date(), noLoad),
      "cache-key-hmac": () => tokenCacheKey(services.keyring, branchId),
      "entry-open": async () =>
        JSON.parse(await open(services.keyring, sealed, { tokenCache: JSON.stringify([branchId, 1, 2, 3599]) })),
      "log-line": async () =>
        logInfo("token_served", { request_id: "r", client: 1, tier: "memory", refreshed: false, revalidating: false }),
    };
    if (only) for (const name of Object.keys(steps)) if (!only.split(",").includes(name)) delete steps[name];
    // Warm: the branch's entry in the memory tier (the app's own read fills it), JITs warmed.
    for (let i = 0; i < 50; i++) await appRead(true);
    for (const step of Object.values(steps)) for (let i = 0; i < 100; i++) await step();
    // Blocks long enough for the local clock (1 ms steps) to resolve a microsecond per iteration.
    const block = 1000;
    const means: Record<string, number[]> = Object.fromEntries(Object.keys(steps).map((k) => [k, []]));
    for (let done = 0; done < iterations; done += block) {
      for (const [name, step] of Object.entries(steps)) {
        const t0 = performance.now();
        for (let i = 0; i < block; i++) await step();
        means[name]!.push(((performance.now() - t0) * 1000) / block);
      }
    }
    const cpuUs = Object.fromEntries(
      Object.entries(means).map(([name, values]) => {
        const sorted = values.sort((a, b) => a - b);
        return [name, Math.round(sorted[Math.floor(sorted.length / 2)]! * 10) / 10];
      }),
    );
    return Response.json({ cpuUs, iterations });
  },
};
