import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { Agent, request } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import * as stack from "../../dev/local-stack.ts";
import { type OAuthServer, startOAuthServer } from "../../dev/oauth-server/server.ts";
import { applyMigrations } from "../../scripts/migrate.ts";

/**
 * Single flight of database reads across requests, in workerd as a deployment runs it: the bundled
 * Worker in Miniflare, each read a request of its own (the Worker tests call the handler inside one
 * test's context, where this cannot show). A request that joins another request's read waits on
 * that request's I/O; with nothing of its own pending, workerd cancels it as hung (a 500), and
 * whatever it leaves behind (a timer) must not act after it ended ("Cannot perform I/O on behalf of
 * a different request"). With the cache off every read goes through the shared load, so 16
 * connections on one branch join often.
 */

/** OAUTH_TIMEOUT_MS here: a joining read waits at most leaseMsFor(it) = 5.3 s before loading itself. */
const OAUTH_TIMEOUT_MS = 300;
/** Connections per phase: 16 on one branch join each other's reads; 1 joins none. */
const PHASES = [16, 1, 16, 1, 16];
const PHASE_MS = 4_000;

let scratch: string;
let db: stack.LocalDatabase | undefined;
let oauth: OAuthServer | undefined;
let worker: stack.RunningWorker | undefined;
const serviceKey = stack.randomApiKey();

beforeAll(async () => {
  scratch = mkdtempSync(join(tmpdir(), "tm-single-flight-"));
  const bundle = await stack.bundleWorker(join(scratch, "app"));
  db = await stack.startDatabase();
  await applyMigrations(db.connectionString, db.sqlEndpoint);
  oauth = await startOAuthServer({ port: 0 });
  const adminKey = stack.randomApiKey();
  worker = await stack.startWorker({
    name: "token-management",
    bundle,
    bindings: {
      ...stack.localBindings(db, oauth, { adminKey, serviceKey }),
      TOKEN_CACHE_MAX_AGE_SECONDS: "0",
      OAUTH_TIMEOUT_MS: String(OAUTH_TIMEOUT_MS),
    },
    onLog: () => {},
  });
  await stack.connectBranch(worker.url, oauth, adminKey, {
    client_id: `single-flight-${randomBytes(4).toString("hex")}`,
    client_secret: "single-flight-secret",
    branch_id: "single-flight-branch",
    workspace_email: "test@example.com",
    workspace_name: "Test",
  });
}, 120_000);

afterAll(async () => {
  await worker?.mf.dispose().catch(() => undefined);
  await oauth?.close().catch(() => undefined);
  if (db) await stack.stopDatabase(db);
  rmSync(scratch, { recursive: true, force: true });
});

describe("reads that join another request's database read", () => {
  it("all answer 200 with the same token, none canceled as hung or failed on another request's I/O", async () => {
    const url = new URL(`${worker!.url}${stack.BASE_PATH}/tokens/single-flight-branch`);
    const statuses = new Map<number, number>();
    const tokens = new Set<string>();
    let reads = 0;
    let failure = "";
    const once = (agent: Agent) =>
      new Promise<void>((resolve, reject) => {
        const req = request(url, { agent, headers: { authorization: `Bearer ${serviceKey}` } }, (res) => {
          let body = "";
          res.on("data", (chunk: Buffer) => {
            body += chunk.toString();
          });
          res.on("end", () => {
            reads++;
            statuses.set(res.statusCode ?? 0, (statuses.get(res.statusCode ?? 0) ?? 0) + 1);
            if (res.statusCode === 200) tokens.add((JSON.parse(body) as { access_token: string }).access_token);
            else failure ||= body.slice(0, 200);
            resolve();
          });
        });
        req.on("error", reject);
        req.end();
      });
    // Phases of many joins and of none, for longer than a join's wait: what a joining request
    // leaves behind (a timer, a continuation) gets its chance to act after that request ended.
    for (const [i, connections] of PHASES.entries()) {
      const agent = new Agent({ keepAlive: true, maxSockets: connections });
      const started = Date.now();
      await Promise.all(
        Array.from({ length: connections }, async () => {
          while (Date.now() - started < PHASE_MS) await once(agent);
        }),
      );
      agent.destroy();
      expect(Object.fromEntries(statuses), `phase ${i} (${connections} connections): ${failure}`).toEqual({
        200: reads,
      });
    }
    expect(tokens.size).toBe(1);
  }, 60_000);
});
