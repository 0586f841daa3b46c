/**
 * `npm run dev:seed` (with `npm run dev` running): registers a demo client at the local OAuth server
 * and at the Worker, and prints the login link to open in a browser. Running it again re-registers the
 * client at the OAuth server (whose state is in memory) and prints a fresh link.
 */
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname } from "node:path";
import { readDevVars } from "../scripts/migrate.ts";
import { devPaths, devStack } from "./dev.ts";

// The same configuration and ports as `npm run dev` (DEV_VARS_FILE, DEV_DATA_DIR, PORT, OAUTH_SERVER_PORT).
const paths = devPaths();
const SEEDED_OAUTH_CLIENTS = paths.seededClients;
const vars = readDevVars(paths.varsFile);
const stack = devStack(vars);
const worker = `http://127.0.0.1:${stack.workerPort}/token-management`;
const adminKey = vars.ADMIN_API_KEY?.split(",")[0]?.trim();
if (!adminKey) {
  console.error(`ADMIN_API_KEY missing from ${paths.varsFile}: run \`npm run dev\` first.`);
  process.exit(1);
}
if (stack.oauthServerPort === undefined) {
  console.error(
    `OAUTH_TOKEN_URL (${vars.OAUTH_TOKEN_URL ?? "unset"}) is not the built-in OAuth server: register your client at that provider and at the Worker (POST /clients) yourself.`,
  );
  process.exit(1);
}

const demo = {
  client_id: process.env.DEMO_CLIENT_ID || "demo-client",
  client_secret: "demo-secret-0123456789",
  redirect_uri: `${worker}/auth/callback`,
  branch_id: process.env.DEMO_BRANCH_ID || "demo-branch",
  workspace_email: "demo@example.com",
  workspace_name: "Demo workspace",
};

interface Answer {
  login_url?: string;
  client_id?: number;
  clients?: { client_id: number; client_oauth_id: string; branch_id: string }[];
}

async function call(
  method: string,
  url: string,
  body?: unknown,
): Promise<{ status: number; json: Answer | undefined }> {
  const response = await fetch(url, {
    method,
    headers: { authorization: `Bearer ${adminKey}`, "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  try {
    return { status: response.status, json: JSON.parse(text) as Answer };
  } catch {
    return { status: response.status, json: { detail: text } as Answer };
  }
}

// 1. The authorization server (and remember the client so `npm run dev` registers it again after a restart).
const oauthClient = {
  client_id: demo.client_id,
  client_secret: demo.client_secret,
  redirect_uris: [demo.redirect_uri],
};
const asUrl = `http://127.0.0.1:${stack.oauthServerPort}`;
const registered = await call("POST", `${asUrl}/admin/clients`, oauthClient);
if (registered.status !== 201) {
  console.error(`OAuth server ${asUrl}: ${registered.status} ${JSON.stringify(registered.json)}`);
  process.exit(1);
}
const seeded = existsSync(SEEDED_OAUTH_CLIENTS)
  ? (JSON.parse(readFileSync(SEEDED_OAUTH_CLIENTS, "utf8")) as (typeof oauthClient)[])
  : [];
mkdirSync(dirname(SEEDED_OAUTH_CLIENTS), { recursive: true });
writeFileSync(
  SEEDED_OAUTH_CLIENTS,
  JSON.stringify([...seeded.filter((c) => c.client_id !== demo.client_id), oauthClient], null, 2),
);
console.log(`registered ${demo.client_id} at the OAuth server ${asUrl}`);

// 2. The Worker: two branches of the one app (one OAuth client for every location, as with Google).
// The same account consenting for both ends with both served from one grant: the second consent
// brings no new refresh token and joins the first one's grant.
const branches = [demo.branch_id, `${demo.branch_id}-2`];
const links: string[] = [];
for (const branchId of branches) {
  let created = await call("POST", `${worker}/clients`, { ...demo, branch_id: branchId });
  let loginUrl: string | undefined = created.json?.login_url;
  if (created.status === 409) {
    const list = await call("GET", `${worker}/clients?limit=200`);
    const existing = (list.json?.clients ?? []).find((c) => c.branch_id === branchId);
    if (!existing) {
      console.error(`Worker: 409 for ${branchId}: ${JSON.stringify(created.json)}`);
      process.exit(1);
    }
    created = await call("GET", `${worker}/clients/${existing.client_id}/login-url`);
    loginUrl = created.json?.login_url;
    console.log(`${branchId} already registered at the Worker (id ${existing.client_id})`);
  } else if (created.status === 201) {
    console.log(`registered ${branchId} on app ${demo.client_id} at the Worker (id ${created.json?.client_id})`);
  }
  if (!loginUrl) {
    console.error(`Worker ${worker}: ${created.status} ${JSON.stringify(created.json)}`);
    process.exit(1);
  }
  links.push(loginUrl);
}
console.log(`\nOpen in a browser to connect the demo branch:\n  ${links[0]}\n`);
console.log(
  `Then its sibling (same app, same account: it joins the first branch's grant, no new refresh token):\n  ${links[1]}\n`,
);
