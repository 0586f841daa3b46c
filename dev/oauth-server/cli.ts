// Runs the local OAuth 2.0 authorization server until SIGINT/SIGTERM.
//   npx tsx dev/oauth-server/cli.ts [--port N] [--host H] [--manual-consent] [--profile google|textbook] [--issuer URL] [--client id:secret:redirect_uri ...]
import { type Profile, startOAuthServer } from "./server.ts";

function usage(message: string): never {
  console.error(`${message}
usage: npx tsx dev/oauth-server/cli.ts [--port N] [--host H] [--manual-consent] [--profile google|textbook] [--issuer URL] [--client id:secret:redirect_uri ...]`);
  process.exit(2);
}

const args = process.argv.slice(2);
let port = Number(process.env.OAUTH_SERVER_PORT ?? 0);
let host = "127.0.0.1";
let autoApprove = true;
let profile: Profile = "textbook";
let issuer: string | undefined;
const clients = new Map<string, { secret: string; redirectUris: string[] }>();

for (let i = 0; i < args.length; i++) {
  const arg = args[i];
  const value = () => args[++i] ?? usage(`${arg} needs a value`);
  if (arg === "--port") port = Number(value());
  else if (arg === "--host") host = value();
  else if (arg === "--manual-consent") autoApprove = false;
  else if (arg === "--profile") {
    const v = value();
    if (v !== "google" && v !== "textbook") usage(`bad --profile ${v}: expected google or textbook`);
    profile = v;
  } else if (arg === "--issuer") issuer = value();
  else if (arg === "--client") {
    // The redirect URI contains colons itself: split on the first two only.
    const spec = value();
    const m = /^([^:]+):([^:]+):(.+)$/.exec(spec);
    if (!m) usage(`bad --client ${spec}: expected id:secret:redirect_uri`);
    const [, id = "", secret = "", uri = ""] = m;
    const existing = clients.get(id);
    if (existing && existing.secret !== secret) usage(`client ${id} given twice with different secrets`);
    clients.set(id, { secret, redirectUris: [...(existing?.redirectUris ?? []), uri] });
  } else if (arg === "--help" || arg === "-h") usage("");
  else usage(`unknown argument ${arg}`);
}
if (!Number.isInteger(port) || port < 0 || port > 65535) usage(`bad port ${port}`);

const server = await startOAuthServer({ host, port, autoApprove, profile, ...(issuer ? { issuer } : {}) });
for (const [client_id, c] of clients) {
  const res = await fetch(`${server.url}/admin/clients`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ client_id, client_secret: c.secret, redirect_uris: c.redirectUris }),
  });
  if (res.status !== 201) {
    await server.close();
    usage(`could not register client ${client_id}: ${await res.text()}`);
  }
  console.log(`registered client ${client_id} -> ${c.redirectUris.join(", ")}`);
}
console.log(`oauth-server listening on ${server.url} (profile ${profile}, issuer ${server.issuer})`);

let stopping = false;
const stop = () => {
  if (stopping) return;
  stopping = true;
  server.close().then(() => process.exit(0));
};
process.on("SIGINT", stop);
process.on("SIGTERM", stop);
