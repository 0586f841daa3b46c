// A stand-in for a Cloudflare Access team's signing-key endpoint (`/cdn-cgi/access/certs`), for the
// console's tests: nothing reaches the internet. Each test stores the public keys of its own
// "team" and points CF_ACCESS_CERTS_URL at them:
//   PUT /teams/<team>/certs   {"keys": [JWK, ...]}   store the team's public keys
//   GET /teams/<team>/certs   the stored key set, as Access serves it (404 for an unknown team)
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { readBody } from "../read-body.ts";

export interface AccessJwksServer {
  url: string;
  close(): Promise<void>;
}

const MAX_BODY_BYTES = 64 * 1024;

export async function startAccessJwksServer(options: { host?: string; port?: number } = {}): Promise<AccessJwksServer> {
  const teams = new Map<string, string>();
  const server = createServer((request, response) => {
    handle(request, response).catch((error: unknown) => {
      if (!response.headersSent) send(response, 500, JSON.stringify({ error: String(error) }));
    });
  });

  async function handle(request: IncomingMessage, response: ServerResponse): Promise<void> {
    const url = new URL(request.url ?? "/", "http://localhost");
    const team = /^\/teams\/([\w.-]{1,100})\/certs$/.exec(url.pathname)?.[1];
    if (!team) return send(response, 404, JSON.stringify({ error: "not found" }));
    if (request.method === "PUT") {
      const body = await readBody(request, MAX_BODY_BYTES);
      const parsed = JSON.parse(body) as { keys?: unknown };
      if (!Array.isArray(parsed.keys)) return send(response, 400, JSON.stringify({ error: "expected {keys: [...]}" }));
      teams.set(team, JSON.stringify({ keys: parsed.keys }));
      return send(response, 204, "");
    }
    const keys = teams.get(team);
    return keys ? send(response, 200, keys) : send(response, 404, JSON.stringify({ error: "unknown team" }));
  }

  await new Promise<void>((resolve) => server.listen(options.port ?? 0, options.host ?? "127.0.0.1", resolve));
  const { address, port } = server.address() as AddressInfo;
  return {
    url: `http://${address}:${port}`,
    close: () => new Promise((resolve) => server.close(() => resolve())),
  };
}

function send(response: ServerResponse, status: number, body: string): void {
  response.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(body) });
  response.end(body);
}
