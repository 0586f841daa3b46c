/**
 * A closed-loop HTTP load generator (like autocannon, but with microsecond latencies: autocannon's
 * histogram rounds to whole milliseconds, too coarse for a 1.25× target on millisecond reads).
 * `connections` loops, each on its own keep-alive socket, send a request as soon as the previous
 * answer is read, for `durationMs`.
 */
import { Agent, request } from "node:http";

export interface LoadOptions {
  /** One URL, or several taken in turn (request i goes to urls[i % n]). */
  url: string | string[];
  headers?: Record<string, string>;
  connections: number;
  durationMs: number;
  warmupMs?: number;
  /** Count the values of this response header (e.g. Cache-Status) over the measured requests. */
  tally?: string;
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
  /** Values of the tallied header and how often each came back. */
  tally: Record<string, number>;
}

function once(
  agent: Agent,
  url: URL,
  headers: Record<string, string>,
  tally: string | undefined,
): Promise<{ status: number; tallied: string | undefined }> {
  return new Promise((resolve, reject) => {
    const req = request(url, { agent, method: "GET", headers }, (res) => {
      const value = tally ? res.headers[tally] : undefined;
      const tallied = Array.isArray(value) ? value.join(", ") : value;
      res.on("data", () => undefined);
      res.on("end", () => resolve({ status: res.statusCode ?? 0, tallied }));
      res.on("error", reject);
    });
    req.on("error", reject);
    req.end();
  });
}

export async function load(options: LoadOptions): Promise<LoadResult> {
  const urls = (Array.isArray(options.url) ? options.url : [options.url]).map((u) => new URL(u));
  const headers = options.headers ?? {};
  const agent = new Agent({ keepAlive: true, maxSockets: options.connections });
  const tally = options.tally?.toLowerCase();
  try {
    if (options.warmupMs) await phase(agent, urls, headers, options.connections, options.warmupMs, tally);
    return await phase(agent, urls, headers, options.connections, options.durationMs, tally);
  } finally {
    agent.destroy();
  }
}

async function phase(
  agent: Agent,
  urls: URL[],
  headers: Record<string, string>,
  connections: number,
  durationMs: number,
  tally: string | undefined,
): Promise<LoadResult> {
  const latencies: number[] = [];
  const tallied: Record<string, number> = {};
  let sent = 0;
  let non2xx = 0;
  let errors = 0;
  const started = performance.now();
  const deadline = started + durationMs;
  const loop = async () => {
    while (performance.now() < deadline) {
      const t0 = performance.now();
      try {
        const { status, tallied: value } = await once(agent, urls[sent++ % urls.length]!, headers, tally);
        latencies.push(performance.now() - t0);
        if (status < 200 || status > 299) non2xx++;
        if (tally) tallied[value ?? "(none)"] = (tallied[value ?? "(none)"] ?? 0) + 1;
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
    tally: tallied,
  };
}
