/**
 * A closed-loop HTTP load generator (like autocannon, but with microsecond latencies: autocannon's
 * histogram rounds to whole milliseconds, too coarse for a 1.25× target on millisecond reads).
 * `connections` loops, each on its own keep-alive socket, send a request as soon as the previous
 * answer is read, for `durationMs`.
 */
import { Agent, request } from "node:http";

export interface LoadOptions {
  url: string;
  headers?: Record<string, string>;
  connections: number;
  durationMs: number;
  warmupMs?: number;
}

export interface LoadResult {
  requests: number;
  non2xx: number;
  errors: number;
  durationMs: number;
  rps: number;
  p50Ms: number;
  p90Ms: number;
  p99Ms: number;
  meanMs: number;
}

function once(agent: Agent, url: URL, headers: Record<string, string>): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = request(url, { agent, method: "GET", headers }, (res) => {
      res.on("data", () => undefined);
      res.on("end", () => resolve(res.statusCode ?? 0));
      res.on("error", reject);
    });
    req.on("error", reject);
    req.end();
  });
}

export async function load(options: LoadOptions): Promise<LoadResult> {
  const url = new URL(options.url);
  const headers = options.headers ?? {};
  const agent = new Agent({ keepAlive: true, maxSockets: options.connections });
  try {
    if (options.warmupMs) await phase(agent, url, headers, options.connections, options.warmupMs);
    return await phase(agent, url, headers, options.connections, options.durationMs);
  } finally {
    agent.destroy();
  }
}

async function phase(
  agent: Agent,
  url: URL,
  headers: Record<string, string>,
  connections: number,
  durationMs: number,
): Promise<LoadResult> {
  const latencies: number[] = [];
  let non2xx = 0;
  let errors = 0;
  const started = performance.now();
  const deadline = started + durationMs;
  const loop = async () => {
    while (performance.now() < deadline) {
      const t0 = performance.now();
      try {
        const status = await once(agent, url, headers);
        latencies.push(performance.now() - t0);
        if (status < 200 || status > 299) non2xx++;
      } catch {
        errors++;
      }
    }
  };
  await Promise.all(Array.from({ length: connections }, loop));
  const elapsed = performance.now() - started;
  latencies.sort((a, b) => a - b);
  const pct = (p: number) => latencies[Math.min(latencies.length - 1, Math.floor((p / 100) * latencies.length))] ?? 0;
  const mean = latencies.reduce((s, v) => s + v, 0) / Math.max(1, latencies.length);
  return {
    requests: latencies.length,
    non2xx,
    errors,
    durationMs: elapsed,
    rps: latencies.length / (elapsed / 1000),
    p50Ms: pct(50),
    p90Ms: pct(90),
    p99Ms: pct(99),
    meanMs: mean,
  };
}
