import { createExecutionContext, waitOnExecutionContext } from "cloudflare:test";
import { env } from "cloudflare:workers";
import worker from "../../src/index";
import { TEST_ADMIN_KEY, TEST_SERVICE_KEY } from "./bindings";

/** A loopback host: the only plain-http host the console answers on (as under `npm run dev`). */
export const BASE = "http://localhost/token-management";

export interface TestEnv extends Env {
  NEON_LOCAL_URL: string;
  OAUTH_SERVER_URL: string;
  WEBHOOK_RECEIVER_URL: string;
}
export const testEnv = env as TestEnv;

export interface CallOptions extends RequestInit {
  /** Bindings to replace for this one call. */
  envOverrides?: Partial<Record<keyof TestEnv, string | undefined>>;
  key?: "admin" | "service" | string | null;
}

/** Sends a request through the Worker's fetch handler, as the runtime would. */
export async function call(path: string, options: CallOptions = {}): Promise<Response> {
  const { envOverrides, key = null, ...init } = options;
  const headers = new Headers(init.headers);
  const token = key === "admin" ? TEST_ADMIN_KEY : key === "service" ? TEST_SERVICE_KEY : key;
  if (token) headers.set("Authorization", `Bearer ${token}`);
  const url = path.startsWith("http") ? path : `${BASE}${path}`;
  const ctx = createExecutionContext();
  const callEnv = envOverrides ? ({ ...testEnv, ...envOverrides } as TestEnv) : testEnv;
  const response = await worker.fetch(
    new Request(url, { ...init, headers, redirect: "manual" }) as Request<unknown, IncomingRequestCfProperties>,
    callEnv,
    ctx,
  );
  await waitOnExecutionContext(ctx);
  return response;
}

export async function json<T = Record<string, unknown>>(response: Response): Promise<T> {
  return (await response.json()) as T;
}

/** Asserts an RFC 9457 problem response with the old service's `success`/`message` fields. */
export async function expectProblem(response: Response, status: number, code?: string) {
  const body = await json<{
    status: number;
    code: string;
    success: boolean;
    message: string;
    detail: string;
    title: string;
    errors?: { field: string; message: string }[];
  }>(response);
  if (response.status !== status || (code && body.code !== code)) {
    throw new Error(`expected ${status} ${code ?? ""}, got ${response.status}: ${JSON.stringify(body)}`);
  }
  if (!response.headers.get("content-type")?.startsWith("application/problem+json")) {
    throw new Error(`expected application/problem+json, got ${response.headers.get("content-type")}`);
  }
  if (body.success !== false || typeof body.message !== "string" || body.status !== status) {
    throw new Error(`malformed problem body: ${JSON.stringify(body)}`);
  }
  return body;
}

export function uniqueId(prefix: string): string {
  return `${prefix}-${crypto.randomUUID().slice(0, 12)}`;
}

/** An Analytics Engine dataset that keeps what is written (Miniflare's local one keeps nothing). */
export function recordingDataset(): { points: AnalyticsEngineDataPoint[]; dataset: AnalyticsEngineDataset } {
  const points: AnalyticsEngineDataPoint[] = [];
  return { points, dataset: { writeDataPoint: (point) => void points.push(point ?? {}) } };
}
