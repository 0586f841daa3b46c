/**
 * Where the time between the floor and `GET /tokens/{branch_id}` goes, without HTTP and database
 * noise: CPU per request measured inside workerd by bench/cpu-worker.ts (database answer replayed),
 * and database time per query — the floor's SQL and the service's SQL as the driver sent them,
 * replayed to neon-local sequentially (p50 of the round trip).
 */

export interface CpuBreakdown {
  /** Microseconds of one request in workerd (median of block means), by route. */
  cpuUs: Record<string, number>;
  /** Median milliseconds of one database round trip for the floor's and the service's SQL. */
  sqlMsP50: { floor: number; service: number };
  iterations: number;
}

interface Recorded {
  url: string;
  body: string;
  headers: [string, string][];
}

export async function cpuBreakdown(options: {
  cpuWorkerUrl: string;
  branchId: string;
  serviceKey: string;
  iterations: number;
}): Promise<CpuBreakdown> {
  const response = await fetch(options.cpuWorkerUrl, {
    method: "POST",
    body: JSON.stringify({
      branchId: options.branchId,
      serviceKey: options.serviceKey,
      iterations: options.iterations,
    }),
  });
  if (!response.ok) throw new Error(`cpu worker: ${response.status} ${await response.text()}`);
  const { cpuUs, sql } = (await response.json()) as { cpuUs: Record<string, number>; sql: Recorded[] };

  // The service's query is the only one joining the tokens table (client + latest token).
  const isServiceQuery = (r: Recorded) => /left join lateral/i.test(r.body);
  const floorSql = sql.find((r) => r.body.includes("clients") && !isServiceQuery(r));
  const serviceSql = sql.find(isServiceQuery);
  const time = async (entry: Recorded | undefined) => {
    if (!entry) return Number.NaN;
    const out: number[] = [];
    for (let i = 0; i < 300; i++) {
      const t0 = performance.now();
      const answer = await fetch(entry.url, { method: "POST", headers: entry.headers, body: entry.body });
      await answer.text();
      if (i >= 50) out.push(performance.now() - t0);
    }
    return p50(out);
  };
  const floorMs: number[] = [];
  const serviceMs: number[] = [];
  for (let r = 0; r < 3; r++) {
    floorMs.push(await time(floorSql));
    serviceMs.push(await time(serviceSql));
  }
  return { cpuUs, sqlMsP50: { floor: p50(floorMs), service: p50(serviceMs) }, iterations: options.iterations };
}

function p50(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)] ?? Number.NaN;
}
