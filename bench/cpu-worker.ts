/**
 * CPU time per token read, measured inside workerd for `npm run bench` (bench/cpu.ts drives it).
 * It runs the real Worker (src/index.ts) and the floor Worker's steps (bench/floor-worker.ts) in a
 * loop, in this isolate, with the database answer replayed from memory (`neonConfig.fetchFunction`),
 * so what is left is the Worker's own work: routing, env, crypto, query building and row mapping.
 * (Locally workerd's clock advances during CPU work; in production it would not.)
 */
import { neonConfig } from "@neondatabase/serverless";
import app from "../src/index";
import floor from "./floor-worker";

type Handler = { fetch(request: Request, env: never, ctx: ExecutionContext): Promise<Response> | Response };

interface Recorded {
  url: string;
  body: string;
  headers: [string, string][];
  status: number;
  response: string;
  responseHeaders: [string, string][];
}

/** A Headers object as name/value pairs (forEach: the DOM typings used here give Headers no iterator). */
function pairs(headers: Headers): [string, string][] {
  const out: [string, string][] = [];
  headers.forEach((value, name) => {
    out.push([name, value]);
  });
  return out;
}

export default {
  async fetch(request: Request, env: never, ctx: ExecutionContext): Promise<Response> {
    const { branchId, serviceKey, iterations } = (await request.json()) as {
      branchId: string;
      serviceKey: string;
      iterations: number;
    };
    const recorded = new Map<string, Recorded>();
    neonConfig.fetchFunction = async (url: string, init: RequestInit) => {
      const body = String(init.body);
      const key = `${url} ${body}`;
      let hit = recorded.get(key);
      if (!hit) {
        const response = await fetch(url, init);
        hit = {
          url,
          body,
          headers: pairs(new Headers(init.headers)),
          status: response.status,
          response: await response.text(),
          responseHeaders: pairs(response.headers),
        };
        recorded.set(key, hit);
      }
      return new Response(hit.response, { status: hit.status, headers: hit.responseHeaders });
    };
    const headers = { authorization: `Bearer ${serviceKey}` };
    const routes: Record<string, [Handler, string]> = {
      floor: [floor as Handler, `http://floor/floor?branch=${branchId}`],
      "floor-schema": [floor as Handler, `http://floor/floor-schema?branch=${branchId}`],
      query: [floor as Handler, `http://floor/query?branch=${branchId}`],
      "query-decrypt": [floor as Handler, `http://floor/query-decrypt?branch=${branchId}`],
      "query-full": [floor as Handler, `http://floor/query-full?branch=${branchId}`],
      app: [app as unknown as Handler, `http://worker/token-management/tokens/${branchId}`],
    };
    const once = async ([handler, url]: [Handler, string]) => {
      const response = await handler.fetch(new Request(url, { headers }), env, ctx);
      await response.text();
      if (response.status !== 200) throw new Error(`${url}: ${response.status}`);
    };
    try {
      for (const route of Object.values(routes)) for (let i = 0; i < 100; i++) await once(route);
      // Blocks of 200, interleaved across routes; per route, the median of the block means.
      const block = 200;
      const means: Record<string, number[]> = Object.fromEntries(Object.keys(routes).map((k) => [k, []]));
      for (let done = 0; done < iterations; done += block) {
        for (const [name, route] of Object.entries(routes)) {
          const t0 = performance.now();
          for (let i = 0; i < block; i++) await once(route);
          means[name]!.push(((performance.now() - t0) * 1000) / block);
        }
      }
      const cpuUs = Object.fromEntries(
        Object.entries(means).map(([name, values]) => {
          const sorted = values.sort((a, b) => a - b);
          return [name, Math.round(sorted[Math.floor(sorted.length / 2)]!)];
        }),
      );
      return Response.json({ cpuUs, sql: [...recorded.values()] });
    } finally {
      neonConfig.fetchFunction = undefined;
    }
  },
};
