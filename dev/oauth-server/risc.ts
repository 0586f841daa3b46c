// The local authorization server's Cross-Account Protection side (Google profile): a RISC transmitter
// and a stand-in of Google's RISC management API, so the receiver (POST /token-management/risc) and
// `npm run risc:*` work offline and tests fail the way production would.
//
//   GET  /.well-known/risc-configuration   issuer (the OAuth issuer with a trailing slash, as Google's
//                                           "https://accounts.google.com/"), jwks_uri, delivery methods
//   GET  /risc/jwks                         the transmitter's public keys (plus keys tests add)
//   GET  /account?account=EMAIL             the account page: apps with access, each with "Remove access"
//   POST /account/remove                    form {account, client_id}: revokes every token of that account
//                                           and client, then pushes a signed tokens-revoked SET
//   POST /v1beta/stream:update, GET /v1beta/stream, POST /v1beta/stream:verify
//                                           the management API, authenticated like Google's: a service
//                                           account's self-signed RS256 JWT with audience RISC_MANAGEMENT_AUDIENCE
//   POST /admin/risc/keys                   {keys: [public JWK]}: keys tests sign with (added to the JWKS)
//   POST /admin/risc/service-accounts       → a service account key file (JSON, Google's format)
//   GET  /admin/risc/deliveries             what was pushed, and how the receiver answered
import { createHash, randomBytes, randomUUID } from "node:crypto";
import type { IncomingMessage, ServerResponse } from "node:http";
import { decodeProtectedHeader, exportJWK, exportPKCS8, generateKeyPair, type JWK, jwtVerify, SignJWT } from "jose";

export const RISC_MANAGEMENT_AUDIENCE = "https://risc.googleapis.com/google.identity.risc.v1beta.RiscManagementService";
export const RISC_PUSH_DELIVERY = "https://schemas.openid.net/secevent/risc/delivery-method/push";
const OAUTH_EVENT = "https://schemas.openid.net/secevent/oauth/event-type/";
const RISC_EVENT = "https://schemas.openid.net/secevent/risc/event-type/";
/** The event types Google's stream:update accepts, each in its namespace. */
export const KNOWN_EVENT_TYPES = new Set([
  `${OAUTH_EVENT}tokens-revoked`,
  `${OAUTH_EVENT}token-revoked`,
  `${RISC_EVENT}sessions-revoked`,
  `${RISC_EVENT}account-disabled`,
  `${RISC_EVENT}account-enabled`,
  `${RISC_EVENT}account-purged`,
  `${RISC_EVENT}account-credential-change-required`,
  `${RISC_EVENT}verification`,
]);
const PUSH_TIMEOUT_MS = 10_000;
const MAX_BODY_BYTES = 64 * 1024;
const MAX_DELIVERIES_KEPT = 200;

/**
 * The OpenID Connect `sub` the local server gives an account: stable, opaque, digits only like
 * Google's. Tests and the receiver's effects match grants on it.
 */
export function accountSubject(account: string): string {
  const digest = createHash("sha256").update(`local-account:${account}`).digest();
  return `1${digest.readBigUInt64BE(0).toString().padStart(20, "0")}`;
}

/** What the transmitter needs of the authorization server. */
export interface RiscHost {
  /** The OAuth issuer (the RISC issuer is it with a trailing slash). */
  issuer(): string;
  /** Where the server listens (for jwks_uri). */
  url(): string;
  /** Client ids with live tokens for the account. */
  clientsOf(account: string): string[];
  /** Every registered client id (a verification event is addressed to all of them). */
  clientIds(): string[];
  /** Revokes every token of the account on the client (Google's "Remove access"). */
  revokeAccount(clientId: string, account: string): void;
  allowInsecureReceiver: boolean;
}

export interface RiscOptions {
  /** Where SETs go until a stream:update sets another receiver (npm run dev sets the Worker's). */
  receiverUrl?: string | undefined;
}

export interface Delivery {
  jti: string;
  eventType: string;
  url: string;
  status: number | null;
  error: string | null;
}

interface Stream {
  deliveryUrl: string | null;
  eventsRequested: string[];
}

class RiscHttpError extends Error {
  constructor(
    readonly status: number,
    readonly body: Record<string, unknown>,
  ) {
    super(String(body.error ?? status));
  }
}

/** Google's API error shape: {error: {code, message, status}}. */
const apiError = (code: number, status: string, message: string) =>
  new RiscHttpError(code, { error: { code, message, status } });

export interface RiscTransmitter {
  /** Handles the request when the path is one of the transmitter's; false otherwise. */
  handle(req: IncomingMessage, res: ServerResponse, url: URL): Promise<boolean>;
  /** Pushes a signed SET with these events to the stream's receiver (tests and the account page). */
  push(audience: string | string[], events: Record<string, unknown>): Promise<Delivery>;
  reset(): void;
}

export async function createRiscTransmitter(host: RiscHost, options: RiscOptions = {}): Promise<RiscTransmitter> {
  const { privateKey, publicKey } = await generateKeyPair("RS256", { extractable: true });
  const kid = `local-${randomBytes(6).toString("hex")}`;
  const ownJwk: JWK = { ...(await exportJWK(publicKey)), kid, alg: "RS256", use: "sig" };
  let extraKeys: JWK[] = [];
  let stream: Stream = { deliveryUrl: options.receiverUrl ?? null, eventsRequested: [] };
  const serviceAccounts = new Map<string, { email: string; key: CryptoKey }>();
  let deliveries: Delivery[] = [];

  const riscIssuer = () => `${host.issuer().replace(/\/+$/, "")}/`;

  async function push(audience: string | string[], events: Record<string, unknown>): Promise<Delivery> {
    const jti = randomUUID().replaceAll("-", "");
    const eventType = Object.keys(events)[0] ?? "";
    const url = stream.deliveryUrl;
    const delivery: Delivery = { jti, eventType, url: url ?? "", status: null, error: null };
    deliveries = [delivery, ...deliveries].slice(0, MAX_DELIVERIES_KEPT);
    if (!url) {
      delivery.error = "no receiver configured (stream:update)";
      return delivery;
    }
    const token = await new SignJWT({ events })
      .setProtectedHeader({ alg: "RS256", kid, typ: "secevent+jwt" })
      .setIssuer(riscIssuer())
      .setAudience(audience)
      .setIssuedAt()
      .setJti(jti)
      .sign(privateKey);
    try {
      const response = await fetch(url, {
        method: "POST",
        headers: { "content-type": "application/secevent+jwt", accept: "application/json" },
        body: token,
        signal: AbortSignal.timeout(PUSH_TIMEOUT_MS),
      });
      delivery.status = response.status;
      if (response.status !== 202) delivery.error = (await response.text()).slice(0, 500);
      else await response.body?.cancel();
    } catch (error) {
      delivery.error = error instanceof Error ? error.message : String(error);
    }
    return delivery;
  }

  // ---------- the management API ----------
  async function authenticateServiceAccount(req: IncomingMessage): Promise<void> {
    const header = req.headers.authorization ?? "";
    const match = /^Bearer (\S+)$/.exec(header);
    if (!match?.[1]) throw apiError(401, "UNAUTHENTICATED", "Request is missing a valid bearer token.");
    const token = match[1];
    let keyId: unknown;
    try {
      keyId = decodeProtectedHeader(token).kid;
    } catch {
      throw apiError(401, "UNAUTHENTICATED", "Malformed bearer token.");
    }
    const account = typeof keyId === "string" ? serviceAccounts.get(keyId) : undefined;
    if (!account) throw apiError(401, "UNAUTHENTICATED", "Unknown service account key (kid).");
    try {
      await jwtVerify(token, account.key, {
        algorithms: ["RS256"],
        audience: RISC_MANAGEMENT_AUDIENCE,
        issuer: account.email,
        subject: account.email,
        requiredClaims: ["iat", "exp"],
      });
    } catch (error) {
      throw apiError(401, "UNAUTHENTICATED", `Invalid self-signed JWT: ${(error as Error).message}`);
    }
  }

  function validReceiverUrl(value: unknown): value is string {
    if (typeof value !== "string" || !URL.canParse(value)) return false;
    const u = new URL(value);
    return u.protocol === "https:" || (u.protocol === "http:" && host.allowInsecureReceiver);
  }

  async function streamUpdate(req: IncomingMessage, res: ServerResponse) {
    await authenticateServiceAccount(req);
    const body = await readJson(req);
    const delivery = body.delivery as Record<string, unknown> | undefined;
    if (delivery?.delivery_method !== RISC_PUSH_DELIVERY) {
      throw apiError(400, "INVALID_ARGUMENT", `delivery.delivery_method must be ${RISC_PUSH_DELIVERY}.`);
    }
    if (!validReceiverUrl(delivery.url)) {
      throw apiError(400, "INVALID_ARGUMENT", "delivery.url must be an https URL on an authorized domain.");
    }
    const requested = body.events_requested;
    if (!Array.isArray(requested) || requested.length === 0) {
      throw apiError(400, "INVALID_ARGUMENT", "events_requested must be a non-empty array of event type URIs.");
    }
    const unknown = requested.filter((type) => typeof type !== "string" || !KNOWN_EVENT_TYPES.has(type));
    if (unknown.length > 0) {
      throw apiError(400, "INVALID_ARGUMENT", `Unknown event types: ${unknown.map(String).join(", ")}.`);
    }
    stream = { deliveryUrl: delivery.url, eventsRequested: [...new Set(requested as string[])] };
    sendJson(res, 200, {});
  }

  async function streamVerify(req: IncomingMessage, res: ServerResponse) {
    await authenticateServiceAccount(req);
    const body = await readJson(req);
    if (body.state !== undefined && typeof body.state !== "string") {
      throw apiError(400, "INVALID_ARGUMENT", "state must be a string.");
    }
    if (!stream.deliveryUrl) throw apiError(400, "FAILED_PRECONDITION", "No stream is configured (stream:update).");
    sendJson(res, 200, {});
    // Google pushes the verification token after answering.
    void push(host.clientIds(), {
      [`${RISC_EVENT}verification`]: body.state === undefined ? {} : { state: body.state },
    });
  }

  // ---------- the account page ----------
  function accountPage(res: ServerResponse, account: string) {
    const apps = host.clientsOf(account);
    const rows = apps
      .map(
        (clientId) =>
          `<li><b>${escapeHtml(clientId)}</b> <form method="post" action="/account/remove" style="display:inline">` +
          `<input type="hidden" name="account" value="${escapeHtml(account)}">` +
          `<input type="hidden" name="client_id" value="${escapeHtml(clientId)}">` +
          `<button>Remove access</button></form></li>`,
      )
      .join("");
    sendHtml(
      res,
      200,
      `Third-party apps with access to ${account}`,
      `<p>Account ${escapeHtml(account)} (sub ${accountSubject(account)}).</p>` +
        (rows ? `<ul>${rows}</ul>` : "<p>No app has access to this account.</p>") +
        `<form method="get" action="/account"><label>Account <input name="account" value="${escapeHtml(account)}"></label> <button>Show</button></form>`,
    );
  }

  async function removeAccess(req: IncomingMessage, res: ServerResponse) {
    const form = new URLSearchParams(await readBody(req));
    const account = form.get("account") ?? "";
    const clientId = form.get("client_id") ?? "";
    if (account === "" || clientId === "")
      throw new RiscHttpError(400, { error: "account and client_id are required" });
    host.revokeAccount(clientId, account);
    const delivery = await push(clientId, {
      [`${OAUTH_EVENT}tokens-revoked`]: {
        subject: { subject_type: "iss-sub", iss: riscIssuer(), sub: accountSubject(account) },
      },
    });
    const outcome =
      delivery.status === 202
        ? `the receiver at ${delivery.url} accepted the tokens-revoked event (202).`
        : `pushing the tokens-revoked event failed: ${delivery.error ?? `HTTP ${delivery.status}`}.`;
    sendHtml(
      res,
      200,
      "Access removed",
      `<p>${escapeHtml(clientId)} no longer has access to ${escapeHtml(account)}; ${escapeHtml(outcome)}</p>` +
        `<p><a href="/account?account=${encodeURIComponent(account)}">Back to the account</a></p>`,
    );
  }

  // ---------- admin ----------
  async function addKeys(req: IncomingMessage, res: ServerResponse) {
    const body = await readJson(req);
    const keys = body.keys;
    if (!Array.isArray(keys) || keys.length === 0)
      throw new RiscHttpError(400, { error: "keys must be a non-empty array" });
    for (const key of keys as JWK[]) {
      if (typeof key !== "object" || key === null || typeof key.kid !== "string" || "d" in key) {
        throw new RiscHttpError(400, { error: "each key must be a public JWK with a kid" });
      }
    }
    const added = keys as JWK[];
    extraKeys = [...extraKeys.filter((k) => !added.some((a) => a.kid === k.kid)), ...added];
    sendJson(res, 201, { keys: extraKeys.length + 1 });
  }

  async function createServiceAccount(req: IncomingMessage, res: ServerResponse) {
    await readBody(req);
    const pair = await generateKeyPair("RS256", { extractable: true });
    const privateKeyId = randomBytes(20).toString("hex");
    const email = `risc-admin-${randomBytes(3).toString("hex")}@local-project.iam.gserviceaccount.com`;
    serviceAccounts.set(privateKeyId, { email, key: pair.publicKey });
    sendJson(res, 201, {
      type: "service_account",
      project_id: "local-project",
      private_key_id: privateKeyId,
      private_key: await exportPKCS8(pair.privateKey),
      client_email: email,
      client_id: String(BigInt(`0x${randomBytes(8).toString("hex")}`)),
      token_uri: `${host.url()}/token`,
    });
  }

  async function handle(req: IncomingMessage, res: ServerResponse, url: URL): Promise<boolean> {
    const path = url.pathname;
    const method = req.method ?? "GET";
    const only = (allowed: string) => {
      if (method !== allowed) throw new RiscHttpError(405, { error: `use ${allowed}` });
    };
    try {
      switch (path) {
        case "/.well-known/risc-configuration":
          only("GET");
          sendJson(res, 200, {
            issuer: riscIssuer(),
            jwks_uri: `${host.url()}/risc/jwks`,
            delivery_methods_supported: [RISC_PUSH_DELIVERY],
            add_subject_endpoint: `${host.url()}/v1beta/subjects:add`,
            remove_subject_endpoint: `${host.url()}/v1beta/subjects:remove`,
          });
          return true;
        case "/risc/jwks":
          only("GET");
          sendJson(res, 200, { keys: [ownJwk, ...extraKeys] });
          return true;
        case "/account":
          only("GET");
          accountPage(res, url.searchParams.get("account") || "user@example.com");
          return true;
        case "/account/remove":
          only("POST");
          await removeAccess(req, res);
          return true;
        case "/v1beta/stream:update":
          only("POST");
          await streamUpdate(req, res);
          return true;
        case "/v1beta/stream":
          only("GET");
          await authenticateServiceAccount(req);
          sendJson(res, 200, {
            delivery: stream.deliveryUrl ? { delivery_method: RISC_PUSH_DELIVERY, url: stream.deliveryUrl } : {},
            events_requested: stream.eventsRequested,
          });
          return true;
        case "/v1beta/stream:verify":
          only("POST");
          await streamVerify(req, res);
          return true;
        case "/admin/risc/keys":
          only("POST");
          await addKeys(req, res);
          return true;
        case "/admin/risc/service-accounts":
          only("POST");
          await createServiceAccount(req, res);
          return true;
        case "/admin/risc/deliveries":
          only("GET");
          sendJson(res, 200, { deliveries });
          return true;
        default:
          return false;
      }
    } catch (error) {
      if (!(error instanceof RiscHttpError)) throw error;
      sendJson(res, error.status, error.body);
      return true;
    }
  }

  return {
    handle,
    push,
    reset() {
      extraKeys = [];
      stream = { deliveryUrl: options.receiverUrl ?? null, eventsRequested: [] };
      serviceAccounts.clear();
      deliveries = [];
    },
  };
}

// ---------- HTTP helpers ----------
async function readBody(req: IncomingMessage): Promise<string> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > MAX_BODY_BYTES) throw new RiscHttpError(413, { error: "request body too large" });
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString("utf8");
}

async function readJson(req: IncomingMessage): Promise<Record<string, unknown>> {
  const text = await readBody(req);
  try {
    const body: unknown = text.trim() === "" ? {} : JSON.parse(text);
    if (typeof body === "object" && body !== null && !Array.isArray(body)) return body as Record<string, unknown>;
  } catch {
    // answered below
  }
  throw apiError(400, "INVALID_ARGUMENT", "The body must be a JSON object.");
}

function sendJson(res: ServerResponse, status: number, body: unknown) {
  const text = JSON.stringify(body);
  res.writeHead(status, {
    "content-type": "application/json; charset=utf-8",
    "content-length": Buffer.byteLength(text),
    "cache-control": "no-store",
  });
  res.end(text);
}

function sendHtml(res: ServerResponse, status: number, title: string, inner: string) {
  const html = `<!doctype html><html><head><meta charset="utf-8"><title>${escapeHtml(title)}</title></head><body><h1>${escapeHtml(title)}</h1>${inner}</body></html>`;
  res.writeHead(status, {
    "content-type": "text/html; charset=utf-8",
    "content-length": Buffer.byteLength(html),
    "cache-control": "no-store",
  });
  res.end(html);
}

const escapeHtml = (s: string) =>
  s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c] ?? c);
