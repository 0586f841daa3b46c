/**
 * `npm run bench:proxy`: the provider-API proxy's overhead. One connected branch; a local upstream
 * stand-in answering a small JSON body after 0 or 20 ms; sequential calls (one connection). For each
 * latency: p50/p99 of calling the upstream directly (the floor) and through the proxy with the quota
 * Durable Object and without it (no PROXY_QUOTA binding), the ratio of the proxy's p50 to the floor's,
 * and the SQL round trips the warm proxied calls sent (the token comes from the edge cache: 0).
 * Target (issue 19): at most 1.25× the direct p50 at 20 ms upstream latency.
 *
 * Knobs: BENCH_PROXY_CALLS (300 per measurement), BENCH_SMOKE=1 (seconds, results to a temporary file).
 */
import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { cpus, loadavg, tmpdir } from "node:os";
import { join } from "node:path";
import type { Miniflare } from "miniflare";
import * as stack from "../dev/local-stack.ts";

const RESULTS = stack.resultsPath("bench/proxy-results.json");
const CALLS = stack.benchKnob("BENCH_PROXY_CALLS", 300, 20);
const LATENCIES = [0, 20];
const TARGET_RATIO_AT_20MS = 1.25;

const log = (message: string) => console.log(`[bench:proxy] ${message}`);
const round = (value: number, digits = 2) => Math.round(value * 10 ** digits) / 10 ** digits;

/** The upstream stand-in: GET /api/v1/accounts answers a small JSON body after `delay` ms. */
function startUpstream(): Promise<{ server: Server; url: string; setDelay: (ms: number) => void }> {
  let delay = 0;
  const body = JSON.stringify({ accounts: [{ name: "accounts/1", accountName: "Bench" }] });
  const server = createServer((req, res) => {
    req.resume();
    setTimeout(() => {
      res.writeHead(200, { "content-type": "application/json", "content-length": Buffer.byteLength(body) });
      res.end(body);
    }, delay);
  });
  server.keepAliveTimeout = 60_000;
  return new Promise((resolve) =>
    server.listen(0, "127.0.0.1", () =>
      resolve({
        server,
        url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/api`,
        setDelay: (ms) => {
          delay = ms;
        },
      }),
    ),
  );
}

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
}

async function timeCalls(url: string, headers: Record<string, string>): Promise<{ p50: number; p99: number }> {
  const times: number[] = [];
  for (let i = 0; i < CALLS; i++) {
    const started = performance.now();
    const response = await fetch(url, { headers });
    await response.arrayBuffer();
    if (response.status !== 200) throw new Error(`${url}: ${response.status}`);
    times.push(performance.now() - started);
  }
  times.sort((a, b) => a - b);
  return { p50: round(percentile(times, 50), 2), p99: round(percentile(times, 99), 2) };
}

async function sqlRequests(db: stack.LocalDatabase): Promise<number> {
  return ((await (await fetch(`${db.url}/stats`)).json()) as { requests: number }).requests;
}

async function main(): Promise<void> {
  const startedAt = new Date();
  const scratch = mkdtempSync(join(tmpdir(), "tm-bench-proxy-"));
  let backends: stack.Backends | undefined;
  const upstream = await startUpstream();
  const miniflares: Miniflare[] = [];
  try {
    const bundle = await stack.bundleWorker(join(scratch, "app"));
    backends = await stack.startBackends();
    const { db, oauth, adminKey, serviceKey } = backends;
    const bindings = {
      ...backends.bindings,
      PROXY_BASE_URLS: upstream.url,
      PROXY_QUOTA_PER_MINUTE: "1000000",
    };
    const withQuota = await stack.startWorker({
      name: "token-management",
      bundle,
      bindings,
      workerOptions: { durableObjects: { PROXY_QUOTA: { className: "ProxyQuota" } } },
      onLog: () => {},
    });
    miniflares.push(withQuota.mf);
    const withoutQuota = await stack.startWorker({
      name: "token-management-noquota",
      bundle,
      bindings,
      onLog: () => {},
    });
    miniflares.push(withoutQuota.mf);

    const branchId = `proxy-branch-${randomBytes(4).toString("hex")}`;
    await stack.connectBranch(withQuota.url, oauth, adminKey, {
      client_id: `proxy-${branchId}`,
      client_secret: `proxy-secret-${branchId}`,
      branch_id: branchId,
      workspace_email: "bench@example.com",
      workspace_name: "Bench",
    });
    const headers = { authorization: `Bearer ${serviceKey}` };
    const direct = `${upstream.url}/v1/accounts`;
    const proxied = (origin: string) => `${origin}${stack.BASE_PATH}/proxy/${branchId}/v1/accounts`;
    // Warm both Workers' caches (token and app settings) and the connections.
    for (const origin of [withQuota.url, withoutQuota.url]) {
      for (let i = 0; i < 5; i++) await (await fetch(proxied(origin), { headers })).arrayBuffer();
    }

    const figures: Record<string, unknown> = {};
    for (const latency of LATENCIES) {
      upstream.setDelay(latency);
      const floor = await timeCalls(direct, {});
      const before = await sqlRequests(db);
      const quota = await timeCalls(proxied(withQuota.url), headers);
      const noQuota = await timeCalls(proxied(withoutQuota.url), headers);
      const sqlPerCall = (await sqlRequests(db)) - before;
      figures[`${latency}ms`] = {
        directP50: floor.p50,
        directP99: floor.p99,
        withQuota: { ...quota, ratio: round(quota.p50 / floor.p50, 3) },
        withoutQuota: { ...noQuota, ratio: round(noQuota.p50 / floor.p50, 3) },
        sqlRoundTripsPerWarmCall: round(sqlPerCall / (2 * CALLS), 3),
      };
      log(
        `upstream ${latency} ms: direct p50 ${floor.p50} ms; proxy p50 ${quota.p50} ms with the quota object (${round(quota.p50 / floor.p50, 2)}×), ${noQuota.p50} ms without (${round(noQuota.p50 / floor.p50, 2)}×); ${sqlPerCall} SQL round trips over ${2 * CALLS} warm calls`,
      );
    }
    const at20 = figures["20ms"] as { withQuota: { ratio: number }; sqlRoundTripsPerWarmCall: number };
    const report = {
      date: startedAt.toISOString(),
      machine: { cores: cpus().length, loadavgAtEnd: loadavg().map((v) => round(v, 2)), node: process.version },
      callsPerMeasurement: CALLS,
      connections: 1,
      figures,
      target: `proxy p50 ≤ ${TARGET_RATIO_AT_20MS}× direct at 20 ms, 0 SQL per warm call`,
      met: at20.withQuota.ratio <= TARGET_RATIO_AT_20MS && at20.sqlRoundTripsPerWarmCall === 0,
    };
    stack.writeResults(RESULTS, report);
    console.log(JSON.stringify(report, null, 2));
    if (at20.sqlRoundTripsPerWarmCall !== 0) throw new Error("warm proxied calls sent SQL");
  } finally {
    for (const mf of miniflares) await mf.dispose().catch(() => undefined);
    await backends?.stop();
    upstream.server.closeAllConnections();
    upstream.server.close();
    rmSync(scratch, { recursive: true, force: true });
  }
}

main().catch((error: unknown) => {
  console.error(`[bench:proxy] failed: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}`);
  process.exit(1);
});
