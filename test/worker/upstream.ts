import { createHash } from "node:crypto";
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";

/**
 * A provider API stand-in for the proxy's tests (Node, started by the global setup). Every path's
 * first segment names a scenario, so each test proxies to a base URL of its own
 * (`${url}/${scenario}`) and sees only its own requests. Per scenario, a test scripts the answers
 * (taken in order; then the default) and reads back what arrived, through /_control/{scenario}.
 * The default answer is 200 with a JSON description of the request (never its Authorization).
 */

export interface ScriptedResponse {
  status?: number;
  headers?: Record<string, string | string[]>;
  body?: string;
  /** A generated body of this many bytes (bytes i % 251), sent in 64 KiB chunks. */
  bodyBytes?: number;
  /** Send the headers and the first chunk, then wait for POST /_control/{scenario}/release. */
  hold?: boolean;
  /** Wait this long before answering (after the request body arrived). */
  delayMs?: number;
}

export interface ScenarioSettings {
  responses?: ScriptedResponse[];
  /** Bearer tokens answered with 401 (before any scripted response is taken). */
  rejectTokens?: string[];
}

export interface RecordedRequest {
  method: string;
  /** Path and query as received. */
  url: string;
  headers: Record<string, string | string[] | undefined>;
  bodyBytes: number;
  bodySha256: string;
}

interface Scenario {
  responses: ScriptedResponse[];
  rejectTokens: Set<string>;
  requests: RecordedRequest[];
  /** Bytes of request bodies received so far, including requests still arriving. */
  bytesReceived: number;
  release: (() => void)[];
  released: boolean;
}

const CHUNK_BYTES = 64 * 1024;

export function generatedBytes(length: number, offset = 0): Uint8Array {
  const bytes = new Uint8Array(length);
  for (let i = 0; i < length; i++) bytes[i] = (offset + i) % 251;
  return bytes;
}

export async function startUpstream(): Promise<{ url: string; close: () => Promise<void> }> {
  const scenarios = new Map<string, Scenario>();
  const scenario = (name: string): Scenario => {
    let found = scenarios.get(name);
    if (!found) {
      found = { responses: [], rejectTokens: new Set(), requests: [], bytesReceived: 0, release: [], released: false };
      scenarios.set(name, found);
    }
    return found;
  };

  const server = createServer((req, res) => {
    handle(req, res).catch((error: unknown) => {
      if (!res.headersSent) res.writeHead(500).end(String(error));
      else res.destroy();
    });
  });

  async function handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = new URL(req.url ?? "/", "http://upstream.invalid");
    const control = /^\/_control\/([^/]+)(\/release)?$/.exec(url.pathname);
    if (control) {
      const s = scenario(control[1]!);
      if (control[2]) {
        s.released = true;
        for (const release of s.release.splice(0)) release();
        res.writeHead(204).end();
      } else if (req.method === "POST") {
        const settings = JSON.parse(await text(req)) as ScenarioSettings;
        s.responses = [...(settings.responses ?? [])];
        s.rejectTokens = new Set(settings.rejectTokens ?? []);
        res.writeHead(204).end();
      } else {
        res.writeHead(200, { "content-type": "application/json" });
        res.end(JSON.stringify({ requests: s.requests, bytesReceived: s.bytesReceived }));
      }
      return;
    }

    const s = scenario(url.pathname.split("/")[1] ?? "");
    const hash = createHash("sha256");
    let bodyBytes = 0;
    for await (const chunk of req as AsyncIterable<Buffer>) {
      hash.update(chunk);
      bodyBytes += chunk.length;
      s.bytesReceived += chunk.length;
    }
    const recorded: RecordedRequest = {
      method: req.method ?? "",
      url: req.url ?? "",
      headers: { ...req.headers },
      bodyBytes,
      bodySha256: hash.digest("hex"),
    };
    s.requests.push(recorded);

    const bearer = /^Bearer (.+)$/.exec(req.headers.authorization ?? "")?.[1];
    if (bearer !== undefined && s.rejectTokens.has(bearer)) {
      res.writeHead(401, { "content-type": "application/json", "www-authenticate": 'Bearer error="invalid_token"' });
      res.end(JSON.stringify({ error: { code: 401, status: "UNAUTHENTICATED" } }));
      return;
    }
    const scripted = s.responses.shift();
    if (!scripted) {
      const { authorization: _never, ...shown } = recorded.headers;
      res.writeHead(200, { "content-type": "application/json" });
      res.end(JSON.stringify({ ...recorded, headers: shown }));
      return;
    }
    if (scripted.delayMs) await new Promise((resolve) => setTimeout(resolve, scripted.delayMs));
    res.writeHead(scripted.status ?? 200, scripted.headers ?? {});
    if (scripted.bodyBytes === undefined) {
      res.end(scripted.body ?? "");
      return;
    }
    for (let sent = 0; sent < scripted.bodyBytes; sent += CHUNK_BYTES) {
      const chunk = generatedBytes(Math.min(CHUNK_BYTES, scripted.bodyBytes - sent), sent);
      if (!res.write(chunk)) await new Promise((resolve) => res.once("drain", resolve));
      if (sent === 0 && scripted.hold && !s.released) await new Promise<void>((resolve) => s.release.push(resolve));
    }
    res.end();
  }

  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}`,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

async function text(req: IncomingMessage): Promise<string> {
  let out = "";
  for await (const chunk of req as AsyncIterable<Buffer>) out += chunk.toString("utf8");
  return out;
}
