/**
 * `npm run smoke`: the check after a deployment (the main workflow runs it; it works against
 * `npm run dev` too). Two requests, retried for a while because a new version takes some seconds
 * to reach every location:
 *   1. `GET {SMOKE_BASE_URL}/health` answers 200 with the database reachable;
 *   2. `GET {SMOKE_BASE_URL}/tokens/{SMOKE_BRANCH_ID}` with SMOKE_API_KEY (a service key) answers 200
 *      with an access token that has time left. The branch is a dedicated smoke branch, connected
 *      once to a test account, so this exercises the database, decryption, and refreshing if due.
 * Exit 0 when both pass, 1 otherwise. Prints statuses and problem types, never the token or the key.
 * Plain TypeScript that Node runs without a loader.
 */
import { resolve } from "node:path";

/** How long a new version may take to answer everywhere before the smoke check gives up. */
const SMOKE_DEADLINE_MS = 60_000;
const RETRY_INTERVAL_MS = 5_000;
const REQUEST_TIMEOUT_MS = 15_000;

export interface SmokeTarget {
  /** The API root, e.g. https://tokens.example.com/token-management */
  baseUrl: string;
  branchId: string;
  apiKey: string;
}

export interface SmokeResult {
  ok: boolean;
  lines: string[];
}

async function problemOf(response: Response): Promise<string> {
  const text = await response.text().catch(() => "");
  try {
    const body = JSON.parse(text) as { type?: string; title?: string; code?: string };
    return [body.code ?? body.type, body.title].filter(Boolean).join(": ") || "no problem details";
  } catch {
    return "not JSON";
  }
}

/** One pass of both checks. */
export async function smokeOnce(target: SmokeTarget, fetcher: typeof fetch = fetch): Promise<SmokeResult> {
  const lines: string[] = [];
  const base = target.baseUrl.replace(/\/+$/, "");
  let ok = true;

  const health = await fetcher(`${base}/health`, { signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS) });
  if (health.status === 200) {
    const body = (await health.json()) as { database?: string };
    lines.push(`health: 200, database ${body.database ?? "?"}`);
    ok &&= body.database === "reachable";
  } else {
    lines.push(`health: ${health.status} (${await problemOf(health)})`);
    ok = false;
  }

  const read = await fetcher(`${base}/tokens/${encodeURIComponent(target.branchId)}`, {
    headers: { authorization: `Bearer ${target.apiKey}` },
    signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS),
  });
  if (read.status === 200) {
    const body = (await read.json()) as { access_token?: string; expires_in?: number; refreshed?: boolean };
    const usable = typeof body.access_token === "string" && body.access_token.length > 0 && (body.expires_in ?? 0) > 0;
    lines.push(
      `token read: 200, ${usable ? "an access token" : "NO usable access token"}, expires_in ${body.expires_in ?? "?"} s, refreshed ${body.refreshed ?? "?"}, ${read.headers.get("cache-status") ?? "no Cache-Status"}`,
    );
    ok &&= usable;
  } else {
    lines.push(`token read: ${read.status} (${await problemOf(read)})`);
    ok = false;
  }
  return { ok, lines };
}

/** Retries until both checks pass or the deadline passes; returns the last pass. */
export async function smoke(
  target: SmokeTarget,
  { deadlineMs = SMOKE_DEADLINE_MS, intervalMs = RETRY_INTERVAL_MS, fetcher = fetch } = {},
): Promise<SmokeResult> {
  const end = Date.now() + deadlineMs;
  for (let attempt = 1; ; attempt++) {
    let result: SmokeResult;
    try {
      result = await smokeOnce(target, fetcher);
    } catch (error) {
      result = { ok: false, lines: [`request failed: ${error instanceof Error ? error.message : String(error)}`] };
    }
    if (result.ok || Date.now() + intervalMs > end) return result;
    console.log(`attempt ${attempt}: ${result.lines.join("; ")}; retrying in ${intervalMs / 1000} s`);
    await new Promise((done) => setTimeout(done, intervalMs));
  }
}

async function main(): Promise<void> {
  const missing = ["SMOKE_BASE_URL", "SMOKE_BRANCH_ID", "SMOKE_API_KEY"].filter((name) => !process.env[name]);
  if (missing.length > 0) {
    console.error(`smoke: set ${missing.join(", ")}`);
    process.exit(1);
  }
  const result = await smoke({
    baseUrl: process.env.SMOKE_BASE_URL!,
    branchId: process.env.SMOKE_BRANCH_ID!,
    apiKey: process.env.SMOKE_API_KEY!,
  });
  for (const line of result.lines) console.log(line);
  console.log(result.ok ? "smoke: passed" : "smoke: FAILED");
  process.exitCode = result.ok ? 0 : 1;
}

if (process.argv[1] && import.meta.filename === resolve(process.argv[1])) {
  await main();
}
