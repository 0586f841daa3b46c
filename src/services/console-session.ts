import { createRemoteJWKSet, type JWTVerifyGetKey, jwtVerify } from "jose";
import { accessTeamOrigin, isLoopback } from "../env";
import { type Keyring, matchesAny, sign, verify } from "../lib/crypto";
import { fromBase64Url, fromUtf8, toBase64Url, utf8 } from "../lib/encoding";
import { describeError, logWarn } from "../lib/log";

/**
 * The operator console's sessions, CSRF tokens and Cloudflare Access check.
 *
 * A session is a signed cookie, nothing stored: `<payload>.<HMAC>`, the payload (base64url JSON)
 * holding a random session id, its expiry and a binding to the admin key that opened it (an HMAC of
 * the key, so the cookie reveals nothing an offline guess could test). Each request recomputes the
 * binding against the configured ADMIN_API_KEY list: removing a key from it ends every session that
 * key opened, at once. Signatures use the keyring's signing sub-key with a purpose prefix of their
 * own, so a session can never pass for a login link, a CSRF token or a flash message (or back).
 *
 * Behind Cloudflare Access (CF_ACCESS_TEAM_DOMAIN and CF_ACCESS_AUD set) the Access JWT of each
 * request is the session instead: RS256 against the team's JWKS, its audience, issuer and expiry.
 */

/** How long a flash message waits for the page the redirect leads to. */
export const FLASH_TTL_SECONDS = 60;
/** The sign-in form's own CSRF cookie (there is no session yet to bind its token to). */
export const SIGN_IN_TTL_SECONDS = 30 * 60;

const SESSION_PURPOSE = "token-management/console-session/v1";
const KEY_BINDING_PURPOSE = "token-management/console-session-key/v1";
const CSRF_PURPOSE = "token-management/console-csrf/v1";
const FLASH_PURPOSE = "token-management/console-flash/v1";
const SESSION_ID_BYTES = 16;
const COOKIE_BASE = "tm_console";

export interface ConsoleCookies {
  session: string;
  flash: string;
  signIn: string;
  secure: boolean;
}

/**
 * On https `__Host-` prefixed and Secure (the browser then refuses them from a subdomain or without
 * Secure, and they are Path=/); on plain http (local development) the plain names, as the OAuth
 * binding cookie does (src/services/authorization.ts).
 */
export function consoleCookies(origin: string): ConsoleCookies {
  const secure = new URL(origin).protocol === "https:";
  const prefix = secure ? "__Host-" : "";
  return {
    session: `${prefix}${COOKIE_BASE}`,
    flash: `${prefix}${COOKIE_BASE}_flash`,
    signIn: `${prefix}${COOKIE_BASE}_signin`,
    secure,
  };
}

/**
 * Whether the console may answer a request at this URL: always on https; on plain http only on a
 * loopback host (local development and tests). Elsewhere the admin key would cross the network in
 * clear and the session cookie could not be Secure, so the console refuses before reading either.
 * No setting relaxes this: a development flag left on in production must not (issue 20).
 */
export function consoleTransportAllowed(url: string): boolean {
  const { protocol, hostname } = new URL(url);
  return protocol === "https:" || isLoopback(hostname);
}

export interface ConsoleSession {
  /**
   * What the CSRF token is bound to: random per sign-in (key sessions), or `access:<sub>:<iat>`
   * (a new Access login issues a new JWT, so its forms' tokens are new too).
   */
  id: string;
  kind: "key" | "access";
  /** Shown in the header: "admin key" or the Access identity's email. */
  who: string;
  expiresAt: Date;
}

interface SessionPayload {
  /** Session id. */
  s: string;
  /** HMAC of the admin key that signed in. */
  k: string;
  /** Expiry, Unix milliseconds. */
  e: number;
}

/** A new key session (the caller has checked the key is an admin key). Returns the cookie value. */
export async function createKeySession(
  keyring: Keyring,
  adminKey: string,
  now: Date,
  ttlSeconds: number,
): Promise<{ value: string; session: ConsoleSession }> {
  const id = toBase64Url(crypto.getRandomValues(new Uint8Array(SESSION_ID_BYTES)));
  const payload: SessionPayload = {
    s: id,
    k: await keyBinding(keyring, adminKey),
    e: now.getTime() + ttlSeconds * 1000,
  };
  const encoded = toBase64Url(utf8(JSON.stringify(payload)));
  const value = `${encoded}.${await sign(keyring, `${SESSION_PURPOSE}|${encoded}`)}`;
  return { value, session: { id, kind: "key", who: "admin key", expiresAt: new Date(payload.e) } };
}

/**
 * The session a cookie value stands for, or null: a bad signature (forged, or signed with a key no
 * longer configured), an expired session, or one whose admin key is no longer in ADMIN_API_KEY.
 */
export async function readKeySession(
  keyring: Keyring,
  value: string | undefined,
  adminKeys: readonly string[],
  now: Date,
): Promise<ConsoleSession | null> {
  const payload = await openSigned<SessionPayload>(keyring, SESSION_PURPOSE, value);
  if (!payload || typeof payload.s !== "string" || typeof payload.k !== "string" || typeof payload.e !== "number") {
    return null;
  }
  if (payload.e <= now.getTime()) return null;
  if (!(await boundToAnyKey(keyring, payload.k, adminKeys))) return null;
  return { id: payload.s, kind: "key", who: "admin key", expiresAt: new Date(payload.e) };
}

/** The signed-in key must still be configured: its binding matches one of the current keys. */
async function boundToAnyKey(keyring: Keyring, binding: string, adminKeys: readonly string[]): Promise<boolean> {
  let found = false;
  // Every key is tried, match or not, so timing does not say which one matched.
  for (const key of adminKeys) if (await verify(keyring, `${KEY_BINDING_PURPOSE}|${key}`, binding)) found = true;
  return found;
}

function keyBinding(keyring: Keyring, adminKey: string): Promise<string> {
  return sign(keyring, `${KEY_BINDING_PURPOSE}|${adminKey}`);
}

/** Which role a key presented at sign-in has: only an admin key opens the console. */
export async function keyRole(
  presented: string,
  keys: { admin: readonly string[]; service: readonly string[] },
): Promise<"admin" | "service" | null> {
  if (await matchesAny(presented, keys.admin)) return "admin";
  if (await matchesAny(presented, keys.service)) return "service";
  return null;
}

// ---------------------------------------------------------------------------------------------
// CSRF tokens and flash messages.

/** The hidden `csrf` field of every form: an HMAC of the session id (or the sign-in cookie's nonce). */
export function csrfToken(keyring: Keyring, sessionId: string): Promise<string> {
  return sign(keyring, `${CSRF_PURPOSE}|${sessionId}`);
}

export async function checkCsrfToken(keyring: Keyring, sessionId: string, token: unknown): Promise<boolean> {
  return typeof token === "string" && token.length > 0 && verify(keyring, `${CSRF_PURPOSE}|${sessionId}`, token);
}

/** A fresh nonce for the sign-in form's cookie (the form's token is csrfToken of it). */
export function signInNonce(): string {
  return toBase64Url(crypto.getRandomValues(new Uint8Array(SESSION_ID_BYTES)));
}

export interface Flash {
  tone: "ok" | "error";
  message: string;
  /**
   * A login link just issued, shown once on its branch's page after the redirect (Post/Redirect/Get:
   * a reload then neither re-posts nor shows it again). It is a capability: the flash cookie is
   * HttpOnly, SameSite=Strict, Secure and __Host- on https, lives FLASH_TTL_SECONDS and is cleared
   * by the page that shows it.
   */
  link?: FlashLink | undefined;
}

export interface FlashLink {
  /** The branch (internal client id) whose page shows it: any other page ignores it. */
  clientId: number;
  url: string;
  expiresAt: Date;
}

/** A flash message for the page a redirect leads to; signed so nobody else can put words there. */
export async function sealFlash(keyring: Keyring, flash: Flash, now: Date): Promise<string> {
  const link = flash.link && { c: flash.link.clientId, u: flash.link.url, x: flash.link.expiresAt.getTime() };
  const encoded = toBase64Url(
    utf8(JSON.stringify({ t: flash.tone, m: flash.message, e: now.getTime() + FLASH_TTL_SECONDS * 1000, l: link })),
  );
  return `${encoded}.${await sign(keyring, `${FLASH_PURPOSE}|${encoded}`)}`;
}

export async function openFlash(keyring: Keyring, value: string | undefined, now: Date): Promise<Flash | null> {
  const payload = await openSigned<{ t: unknown; m: unknown; e: unknown; l?: { c: unknown; u: unknown; x: unknown } }>(
    keyring,
    FLASH_PURPOSE,
    value,
  );
  if (!payload || typeof payload.m !== "string" || typeof payload.e !== "number" || payload.e <= now.getTime()) {
    return null;
  }
  const flash: Flash = { tone: payload.t === "error" ? "error" : "ok", message: payload.m };
  const link = payload.l;
  if (link && typeof link.c === "number" && typeof link.u === "string" && typeof link.x === "number") {
    flash.link = { clientId: link.c, url: link.u, expiresAt: new Date(link.x) };
  }
  return flash;
}

async function openSigned<T>(keyring: Keyring, purpose: string, value: string | undefined): Promise<T | null> {
  if (!value) return null;
  const dot = value.indexOf(".");
  if (dot <= 0) return null;
  const encoded = value.slice(0, dot);
  if (!(await verify(keyring, `${purpose}|${encoded}`, value.slice(dot + 1)))) return null;
  try {
    const parsed: unknown = JSON.parse(fromUtf8(fromBase64Url(encoded)));
    return parsed && typeof parsed === "object" ? (parsed as T) : null;
  } catch {
    return null;
  }
}

// ---------------------------------------------------------------------------------------------
// Cloudflare Access.

export interface AccessSettings {
  /** `https://<team>.cloudflareaccess.com`: the issuer of the team's tokens. */
  issuer: string;
  /** The Access application's AUD tag. */
  audience: string;
  /** The team's signing keys: `<issuer>/cdn-cgi/access/certs` unless configured (tests). */
  certsUrl: string;
}

/**
 * The Access settings, when both bindings are set. The team domain may be given as
 * `myteam.cloudflareaccess.com` or as its https URL.
 */
export function accessSettings(config: {
  CF_ACCESS_TEAM_DOMAIN?: string | undefined;
  CF_ACCESS_AUD?: string | undefined;
  CF_ACCESS_CERTS_URL?: string | undefined;
}): AccessSettings | undefined {
  if (!config.CF_ACCESS_TEAM_DOMAIN || !config.CF_ACCESS_AUD) return undefined;
  const issuer = accessTeamOrigin(config.CF_ACCESS_TEAM_DOMAIN);
  return {
    issuer,
    audience: config.CF_ACCESS_AUD,
    certsUrl: config.CF_ACCESS_CERTS_URL ?? `${issuer}/cdn-cgi/access/certs`,
  };
}

/** jose caches the key set (and refetches on an unknown `kid`); one per URL and isolate. */
const keySets = new Map<string, JWTVerifyGetKey>();

function keySetOf(certsUrl: string): JWTVerifyGetKey {
  let keySet = keySets.get(certsUrl);
  if (!keySet) {
    keySet = createRemoteJWKSet(new URL(certsUrl));
    keySets.set(certsUrl, keySet);
  }
  return keySet;
}

/**
 * The session an Access JWT (`Cf-Access-Jwt-Assertion`) stands for, or null: a missing token, a
 * signature that is not the team's (RS256 only), another audience or issuer, an expired token, or
 * one without a person: Access service tokens carry an empty `sub` (their `common_name` names the
 * token), and the console is for people, so they are refused (automation uses the API's keys).
 */
export async function readAccessSession(
  settings: AccessSettings,
  token: string | undefined,
  now: Date,
): Promise<ConsoleSession | null> {
  if (!token) return null;
  try {
    const { payload } = await jwtVerify(token, keySetOf(settings.certsUrl), {
      algorithms: ["RS256"],
      audience: settings.audience,
      issuer: settings.issuer,
      currentDate: now,
      requiredClaims: ["exp", "iat", "sub"],
    });
    const sub = payload.sub;
    if (typeof sub !== "string" || sub === "") return null;
    const who = typeof payload.email === "string" ? payload.email : sub;
    // Bound to the login too (iat), not only the identity: a token leaked from one Access session
    // does not work in the next. JSON-encoded so no sub can end with another's `:<iat>`.
    const id = `access:${JSON.stringify([sub, payload.iat])}`;
    return { id, kind: "access", who, expiresAt: new Date((payload.exp as number) * 1000) };
  } catch (error) {
    // A bad token is the visitor's problem; keys that cannot be fetched are the operator's: logged.
    const code = (error as { code?: unknown }).code;
    if (
      code === undefined ||
      code === "ERR_JWKS_TIMEOUT" ||
      code === "ERR_JOSE_GENERIC" ||
      code === "ERR_JWKS_INVALID"
    ) {
      logWarn("access_keys_unavailable", { certs_url: settings.certsUrl, error: describeError(error) });
    }
    return null;
  }
}
