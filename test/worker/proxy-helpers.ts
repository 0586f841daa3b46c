import { inject } from "vitest";
import type { ProxyQuota } from "../../src/proxy/quota";
import { type CallOptions, call, testEnv, uniqueId } from "./helpers";

declare module "vitest" {
  export interface ProvidedContext {
    /** test/worker/upstream.ts: the provider API stand-in (see global-setup.ts). */
    upstreamUrl: string;
  }
}

/** Mirrors test/worker/upstream.ts's types (that module is Node code, not importable into workerd types). */
export interface ScriptedResponse {
  status?: number;
  headers?: Record<string, string | string[]>;
  body?: string;
  bodyBytes?: number;
  hold?: boolean;
  delayMs?: number;
}

export interface RecordedRequest {
  method: string;
  url: string;
  headers: Record<string, string | string[] | undefined>;
  bodyBytes: number;
  bodySha256: string;
}

export function upstreamUrl(): string {
  return inject("upstreamUrl");
}

/** One test's corner of the upstream stand-in: its own base URL, script and record of requests. */
export class Upstream {
  readonly name = uniqueId("api");
  readonly base = `${upstreamUrl()}/${this.name}`;

  async script(settings: { responses?: ScriptedResponse[]; rejectTokens?: string[] }): Promise<void> {
    const response = await fetch(`${upstreamUrl()}/_control/${this.name}`, {
      method: "POST",
      body: JSON.stringify(settings),
    });
    if (response.status !== 204) throw new Error(`scripting the upstream failed: ${response.status}`);
  }

  async received(): Promise<{ requests: RecordedRequest[]; bytesReceived: number }> {
    const response = await fetch(`${upstreamUrl()}/_control/${this.name}`);
    return (await response.json()) as { requests: RecordedRequest[]; bytesReceived: number };
  }

  async requests(): Promise<RecordedRequest[]> {
    return (await this.received()).requests;
  }

  async release(): Promise<void> {
    await fetch(`${upstreamUrl()}/_control/${this.name}/release`, { method: "POST" });
  }
}

/** Bytes i % 251 from `offset`, as the upstream stand-in generates them. */
export function generatedBytes(length: number, offset = 0): Uint8Array {
  const bytes = new Uint8Array(length);
  for (let i = 0; i < length; i++) bytes[i] = (offset + i) % 251;
  return bytes;
}

export async function sha256Hex(bytes: Uint8Array | ArrayBuffer): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", bytes);
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * The real PROXY_QUOTA namespace under a prefix of its own: the same Durable Object class, but the
 * test's app key names an object no other test shares (so budgets and pauses stay the test's).
 */
export function isolatedQuota(): DurableObjectNamespace<ProxyQuota> {
  const real = testEnv.PROXY_QUOTA;
  const prefix = uniqueId("quota");
  return {
    idFromName: (name: string) => real.idFromName(`${prefix}:${name}`),
    get: (id: DurableObjectId) => real.get(id),
  } as unknown as DurableObjectNamespace<ProxyQuota>;
}

export type ProxyOptions = CallOptions & {
  /** Bindings and variables for this call beside PROXY_BASE_URLS. */
  overrides?: Record<string, unknown>;
};

/** Sends a request through the proxy to `path` under the test's upstream base. */
export function proxy(upstream: Upstream, branchId: string, path: string, options: ProxyOptions = {}) {
  const { overrides, envOverrides, key = "service", ...init } = options;
  return call(`/proxy/${encodeURIComponent(branchId)}/${path}`, {
    key,
    ...init,
    envOverrides: {
      PROXY_BASE_URLS: upstream.base,
      ...envOverrides,
      ...(overrides as CallOptions["envOverrides"]),
    },
  });
}
