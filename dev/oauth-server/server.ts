// A real, strict OAuth 2.0 authorization server for local development, tests and benchmarks.
// RFC 6749 (authorization code + refresh token grants), RFC 7636 (PKCE, S256 only),
// RFC 7009 (revocation), RFC 7662 (introspection), RFC 8414 (metadata), RFC 9207 (`iss` in the
// authorization response), OpenID Connect (ID tokens, discovery, JWKS: oidc.ts), and a small
// Business Profile API checking the bearer tokens it issued (business-profile.ts). Two profiles:
// `textbook` (the RFCs as written) and `google` (Google's documented behaviours, see README.md).
// State lives in memory; everything tests need is also reachable over HTTP under /admin.
import { createHash, randomBytes, timingSafeEqual } from "node:crypto";
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { type BusinessProfileApi, createBusinessProfileApi } from "./business-profile.ts";
import {
  createOidcSigner,
  GOOGLE_EMAIL_SCOPE,
  GOOGLE_PROFILE_SCOPE,
  googleScopeName,
  type IdTokenIssuer,
  type IdTokenSignature,
  idTokenClaims,
  idTokenIssuer,
} from "./oidc.ts";
import { accountSubject, createRiscTransmitter, type RiscTransmitter } from "./risc.ts";

export type Profile = "google" | "textbook";

export interface OAuthServerOptions {
  host?: string;
  port?: number;
  autoApprove?: boolean;
  /** The profile of clients that do not choose one (behaviour field `profile`). Default `textbook`. */
  profile?: Profile;
  /**
   * The issuer sent as `iss` in authorization responses and in the metadata. Default
   * `http://localhost:PORT`: another origin than the endpoints (127.0.0.1), as Google's issuer
   * (https://accounts.google.com) is another origin than its token endpoint (oauth2.googleapis.com).
   */
  issuer?: string;
  /** Where the RISC transmitter pushes Security Event Tokens until a stream:update says otherwise. */
  riscReceiverUrl?: string;
}

export interface OAuthServer {
  url: string;
  issuer: string;
  authorizationEndpoint: string;
  tokenEndpoint: string;
  revocationEndpoint: string;
  /** The JWKS with the key ID tokens are signed with (`${url}/oauth2/v3/certs`). */
  jwksUri: string;
  close(): Promise<void>;
}

export interface FailNext {
  status: number;
  error?: string;
  count?: number;
}

export interface Behavior {
  profile: Profile;
  accessTokenTtlSeconds: number;
  rotateRefreshTokens: boolean;
  issueRefreshToken: boolean;
  tokenDelayMs: number;
  hang: boolean;
  failNext: FailNext | null;
  authorizeError: string | null;
  /** The account that signs in at /authorize (Google: grants are per account and client). */
  account: string;
  /** Granular consent: scopes the user unticks on the consent screen (left out of the grant). */
  untickedScopes: string[];
  /** `iss` in authorization responses: the issuer by default, another value, or null to leave it out. */
  issParameter: string | null;
  /** Google: live refresh tokens per account and client; past it the oldest dies silently. 0 = no limit. */
  maxRefreshTokensPerAccount: number;
  /** `iss` of ID tokens: "issuer" (default), "bare" (without the scheme, as Google may send), or that string. */
  idTokenIssuer: IdTokenIssuer;
  /** `aud` of ID tokens: null = the client id, or this string instead. */
  idTokenAudience: string | null;
  /** "valid" (default), "invalid" (signature bytes flipped) or "none" (alg none, no signature). */
  idTokenSignature: IdTokenSignature;
  /** Time-based access: refresh tokens issued from now on die this many seconds after issue (null = never). */
  refreshTokenLifetimeSeconds: number | null;
  /** The app is in "Testing" publishing status: refresh tokens die 7 days after issue, unannounced. */
  testingPublishingStatus: boolean;
}

export interface ClientStats {
  tokenRequests: number;
  authorizationCodeGrants: number;
  refreshGrants: number;
  failedRequests: number;
  revocations: number;
  activeAccessTokens: number;
  activeRefreshTokens: number;
}

const DEFAULT_BEHAVIOR: Omit<Behavior, "profile" | "issParameter"> = {
  accessTokenTtlSeconds: 3600,
  rotateRefreshTokens: false,
  issueRefreshToken: true,
  tokenDelayMs: 0,
  hang: false,
  failNext: null,
  authorizeError: null,
  account: "user@example.com",
  untickedScopes: [],
  maxRefreshTokensPerAccount: 0,
  idTokenIssuer: "issuer",
  idTokenAudience: null,
  idTokenSignature: "valid",
  refreshTokenLifetimeSeconds: null,
  testingPublishingStatus: false,
};

/** What each profile changes (explicit behaviour fields still win). */
const PROFILE_DEFAULTS: Record<Profile, Partial<Behavior>> = {
  textbook: {},
  // Google answers `expires_in: 3599` and keeps at most 100 refresh tokens per account and client.
  google: { accessTokenTtlSeconds: 3599, maxRefreshTokensPerAccount: 100 },
};

/** Google's wording of its token endpoint errors. */
const GOOGLE_REFRESH_INVALID = "Token has been expired or revoked.";
const GOOGLE_CODE_INVALID = "Bad Request";
const GOOGLE_REVOKE_INVALID = "Token expired or revoked";

/** Where Google serves its ID token keys (www.googleapis.com/oauth2/v3/certs). */
const JWKS_PATH = "/oauth2/v3/certs";
const SCOPES_SUPPORTED = [
  "openid",
  "email",
  "profile",
  "https://www.googleapis.com/auth/userinfo.email",
  "https://www.googleapis.com/auth/userinfo.profile",
  "https://www.googleapis.com/auth/business.manage",
];
/** Google: refresh tokens of apps in "Testing" publishing status expire after 7 days. */
const TESTING_REFRESH_TOKEN_TTL_SECONDS = 7 * 24 * 60 * 60;
/** ... unless the grant asks for nothing but the user's identity. */
const IDENTITY_SCOPES = new Set(["openid", GOOGLE_EMAIL_SCOPE, GOOGLE_PROFILE_SCOPE]);
const CODE_TTL_MS = 60_000;
const USED_CODE_RETENTION_MS = 10 * 60_000;
const MAX_BODY_BYTES = 1 << 20;
/** Entries per POST /admin/import (each about 250 bytes: well inside MAX_BODY_BYTES). */
const MAX_IMPORT_GRANTS = 2_000;
const PKCE_RE = /^[A-Za-z0-9\-._~]{43,128}$/;
const S256_CHALLENGE_RE = /^[A-Za-z0-9_-]{43}$/;

interface Client {
  id: string;
  secret: string;
  redirectUris: string[];
  behavior: Partial<Behavior>;
  stats: Counters;
}

type Counters = Omit<ClientStats, "activeAccessTokens" | "activeRefreshTokens">;

interface AuthorizationCode {
  clientId: string;
  account: string;
  accessType: string | null;
  prompt: string | null;
  redirectUri: string;
  codeChallenge: string;
  scope: string;
  /** The OpenID Connect `nonce` of the authorization request, echoed in the ID token. */
  nonce: string | null;
  expiresAt: number;
  used: boolean;
  grantId: string;
}

interface Grant {
  clientId: string;
  account: string;
  scope: string;
  accessType: string | null;
  prompt: string | null;
  accessTokens: Set<string>;
  refreshTokens: Set<string>;
}

interface AccessToken {
  clientId: string;
  grantId: string;
  scope: string;
  issuedAt: number;
  expiresAt: number;
}

interface RefreshToken {
  clientId: string;
  grantId: string;
  scope: string;
  issuedAt: number;
  /** Issue order, to find the oldest when two share a millisecond. */
  serial: number;
  /** When it dies on its own (time-based access, Testing status); null = only by revocation or the cap. */
  expiresAt: number | null;
  /** Whether token responses announce that end (`refresh_token_expires_in`): time-based access does, Testing not. */
  announcesExpiry: boolean;
}

interface PendingConsent {
  clientId: string;
  account: string;
  redirectUri: string;
  state: string | null;
  codeChallenge: string;
  scope: string;
  nonce: string | null;
  accessType: string | null;
  prompt: string | null;
}

class HttpError extends Error {
  constructor(
    readonly status: number,
    readonly body: Record<string, unknown>,
    readonly headers: Record<string, string> = {},
  ) {
    super(String(body.error ?? status));
  }
}

const oauthError = (status: number, error: string, description: string, headers: Record<string, string> = {}) =>
  new HttpError(status, { error, error_description: description }, headers);

const zeroCounters = (): Counters => ({
  tokenRequests: 0,
  authorizationCodeGrants: 0,
  refreshGrants: 0,
  failedRequests: 0,
  revocations: 0,
});

const randomToken = (prefix: string) => `${prefix}${randomBytes(24).toString("base64url")}`;

const scopeList = (scope: string) => scope.split(" ").filter(Boolean);

const s256 = (verifier: string) => createHash("sha256").update(verifier).digest("base64url");

function safeEqual(a: string, b: string): boolean {
  const ab = Buffer.from(a);
  const bb = Buffer.from(b);
  return ab.length === bb.length && timingSafeEqual(ab, bb);
}

const escapeHtml = (s: string) =>
  s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c] ?? c);

/** Waits for a timer or for a behaviour change; resolves false when the request or server is gone. */
interface Waiter {
  resolve(ok: boolean): void;
  timer?: NodeJS.Timeout;
  forBehaviorChange: boolean;
}

export async function startOAuthServer(opts: OAuthServerOptions = {}): Promise<OAuthServer> {
  const host = opts.host ?? "127.0.0.1";
  const autoApprove = opts.autoApprove ?? true;
  const serverProfile = opts.profile ?? "textbook";
  let issuer = opts.issuer ?? "";
  let refreshSerial = 0;

  const clients = new Map<string, Client>();
  let defaultBehavior: Partial<Behavior> = {};
  let codes = new Map<string, AuthorizationCode>();
  let grants = new Map<string, Grant>();
  let accessTokens = new Map<string, AccessToken>();
  let refreshTokens = new Map<string, RefreshToken>();
  let pending = new Map<string, PendingConsent>();
  let totals = zeroCounters();
  let issuedSinceSweep = 0;
  /** How far POST /admin/clock moved the server's time ahead of the wall clock. */
  let clockOffsetMs = 0;
  let closed = false;
  const waiters = new Set<Waiter>();
  let listeningUrl = "";
  const oidc = await createOidcSigner();
  const businessProfile: BusinessProfileApi = createBusinessProfileApi({
    accessToken(token) {
      const at = accessTokens.get(token);
      const grant = at && at.expiresAt > now() ? grants.get(at.grantId) : undefined;
      return at && grant ? { account: grant.account, scope: at.scope } : null;
    },
    now: () => now(),
  });
  const risc: RiscTransmitter = await createRiscTransmitter(
    {
      issuer: () => issuer,
      url: () => listeningUrl,
      clientsOf: (account) => [...new Set(liveAccountGrants(account).map((g) => g.clientId))],
      clientIds: () => [...clients.keys()],
      revokeAccount: (clientId, account) => revokeAccount(clientId, account),
      allowInsecureReceiver: true,
    },
    { receiverUrl: opts.riscReceiverUrl },
  );

  // ---------- waiting (delay / hang) without leaking timers ----------
  function wait(res: ServerResponse, ms: number | null): Promise<boolean> {
    if (closed) return Promise.resolve(false);
    return new Promise<boolean>((resolve) => {
      const onClose = () => finish(false);
      const waiter: Waiter = { resolve: (ok) => finish(ok), forBehaviorChange: ms === null };
      function finish(ok: boolean) {
        if (!waiters.delete(waiter)) return;
        if (waiter.timer) clearTimeout(waiter.timer);
        res.off("close", onClose);
        resolve(ok);
      }
      waiters.add(waiter);
      if (ms !== null) waiter.timer = setTimeout(() => finish(true), ms);
      res.on("close", onClose);
    });
  }

  function behaviorChanged() {
    for (const w of [...waiters]) if (w.forBehaviorChange) w.resolve(true);
  }

  // ---------- behaviour ----------
  function effectiveBehavior(client: Client | undefined): Behavior {
    const profile = client?.behavior.profile ?? defaultBehavior.profile ?? serverProfile;
    return {
      ...DEFAULT_BEHAVIOR,
      issParameter: issuer,
      ...PROFILE_DEFAULTS[profile],
      ...defaultBehavior,
      ...(client?.behavior ?? {}),
      profile,
    };
  }

  /** Consumes one failNext from whichever layer (client override or default) provides it. */
  function takeFailNext(client: Client | undefined): FailNext | null {
    const layer = client && "failNext" in client.behavior ? client.behavior : defaultBehavior;
    const f = layer.failNext;
    if (!f) return null;
    if (f.count !== undefined) {
      const left = f.count - 1;
      layer.failNext = left > 0 ? { ...f, count: left } : null;
    }
    return f;
  }

  function parseBehavior(input: unknown): Partial<Behavior> {
    if (typeof input !== "object" || input === null || Array.isArray(input)) {
      throw oauthError(400, "invalid_request", "behavior must be a JSON object");
    }
    const out: Partial<Behavior> = {};
    for (const [key, value] of Object.entries(input)) {
      const bad = (what: string) => oauthError(400, "invalid_request", `${key} must be ${what}`);
      switch (key) {
        case "accessTokenTtlSeconds":
        case "tokenDelayMs":
          if (typeof value !== "number" || !Number.isFinite(value) || value < 0) throw bad("a non-negative number");
          out[key] = value;
          break;
        case "maxRefreshTokensPerAccount":
          if (typeof value !== "number" || !Number.isInteger(value) || value < 0) throw bad("a non-negative integer");
          out[key] = value;
          break;
        case "profile":
          if (value !== "google" && value !== "textbook") throw bad('"google" or "textbook"');
          out.profile = value;
          break;
        case "account":
          if (typeof value !== "string" || value === "") throw bad("a non-empty string");
          out.account = value;
          break;
        case "untickedScopes":
          if (!Array.isArray(value) || !value.every((v) => typeof v === "string" && v !== "")) {
            throw bad("an array of scopes");
          }
          out.untickedScopes = [...value] as string[];
          break;
        case "issParameter":
          if (value !== null && (typeof value !== "string" || value === "")) throw bad("null or a non-empty string");
          out.issParameter = value;
          break;
        case "refreshTokenLifetimeSeconds":
          if (value !== null && (typeof value !== "number" || !Number.isInteger(value) || value <= 0)) {
            throw bad("null or a positive integer");
          }
          out.refreshTokenLifetimeSeconds = value;
          break;
        case "rotateRefreshTokens":
        case "issueRefreshToken":
        case "testingPublishingStatus":
        case "hang":
          if (typeof value !== "boolean") throw bad("a boolean");
          out[key] = value;
          break;
        case "authorizeError":
          if (value !== null && (typeof value !== "string" || value === "")) throw bad("null or a non-empty string");
          out.authorizeError = value;
          break;
        case "idTokenIssuer":
          if (typeof value !== "string" || value === "") throw bad('"issuer", "bare" or another non-empty string');
          out.idTokenIssuer = value;
          break;
        case "idTokenAudience":
          if (value !== null && (typeof value !== "string" || value === "")) throw bad("null or a non-empty string");
          out.idTokenAudience = value;
          break;
        case "idTokenSignature":
          if (value !== "valid" && value !== "invalid" && value !== "none") throw bad('"valid", "invalid" or "none"');
          out.idTokenSignature = value;
          break;
        case "failNext": {
          if (value === null) {
            out.failNext = null;
            break;
          }
          if (typeof value !== "object" || Array.isArray(value)) throw bad("null or {status, error?, count?}");
          const v = value as Record<string, unknown>;
          if (typeof v.status !== "number" || !Number.isInteger(v.status) || v.status < 200 || v.status > 599) {
            throw bad("an object whose status is an HTTP status code");
          }
          if (v.error !== undefined && typeof v.error !== "string") throw bad("an object whose error is a string");
          if (v.count !== undefined && (typeof v.count !== "number" || !Number.isInteger(v.count) || v.count < 1)) {
            throw bad("an object whose count is a positive integer");
          }
          const f: FailNext = { status: v.status };
          if (v.error !== undefined) f.error = v.error as string;
          if (v.count !== undefined) f.count = v.count as number;
          out.failNext = f;
          break;
        }
        default:
          throw oauthError(400, "invalid_request", `unknown behavior field: ${key}`);
      }
    }
    return out;
  }

  function clockView() {
    return { now: new Date(now()).toISOString(), offsetSeconds: clockOffsetMs / 1000 };
  }

  // ---------- tokens ----------
  /** The server's time: the wall clock moved forward by POST /admin/clock (expiry of codes and tokens). */
  function now() {
    return Date.now() + clockOffsetMs;
  }

  function refreshTokenAlive(rt: RefreshToken): boolean {
    return rt.expiresAt === null || rt.expiresAt > now();
  }

  /** The end a refresh token issued at `issuedAt` for this grant gets under the behaviour (null = none). */
  function refreshTokenExpiry(
    b: Behavior,
    grantScope: string,
    issuedAt: number,
  ): Pick<RefreshToken, "expiresAt" | "announcesExpiry"> {
    const lifetimes: number[] = [];
    if (b.refreshTokenLifetimeSeconds !== null) lifetimes.push(b.refreshTokenLifetimeSeconds);
    const identityOnly = scopeList(grantScope).every((s) => IDENTITY_SCOPES.has(googleScopeName(s)));
    if (b.testingPublishingStatus && !identityOnly) lifetimes.push(TESTING_REFRESH_TOKEN_TTL_SECONDS);
    if (lifetimes.length === 0) return { expiresAt: null, announcesExpiry: false };
    return {
      expiresAt: issuedAt + Math.min(...lifetimes) * 1000,
      // Google announces time-based access, and sends nothing for Testing apps.
      announcesExpiry: b.refreshTokenLifetimeSeconds !== null && !b.testingPublishingStatus,
    };
  }

  function sweep() {
    if (++issuedSinceSweep < 1000) return;
    issuedSinceSweep = 0;
    const t = now();
    for (const [token, at] of accessTokens) if (at.expiresAt <= t) deleteAccessToken(token);
    for (const [token, rt] of refreshTokens) if (!refreshTokenAlive(rt)) deleteRefreshToken(token);
    for (const [code, c] of codes) if (c.expiresAt + USED_CODE_RETENTION_MS <= t) codes.delete(code);
    // A grant holds no tokens yet between /authorize and its code exchange: that one is kept, or the
    // exchange of a code issued just before a sweep found its grant gone and answered 500.
    const awaitingExchange = new Set<string>();
    for (const c of codes.values()) if (!c.used) awaitingExchange.add(c.grantId);
    for (const [id, g] of grants) {
      if (g.accessTokens.size === 0 && g.refreshTokens.size === 0 && !awaitingExchange.has(id)) grants.delete(id);
    }
  }

  function deleteAccessToken(token: string) {
    const at = accessTokens.get(token);
    if (!at) return;
    accessTokens.delete(token);
    grants.get(at.grantId)?.accessTokens.delete(token);
  }

  function deleteRefreshToken(token: string) {
    const rt = refreshTokens.get(token);
    if (!rt) return;
    refreshTokens.delete(token);
    grants.get(rt.grantId)?.refreshTokens.delete(token);
  }

  function revokeGrant(grantId: string) {
    const g = grants.get(grantId);
    if (!g) return;
    for (const t of [...g.accessTokens]) deleteAccessToken(t);
    for (const t of [...g.refreshTokens]) deleteRefreshToken(t);
  }

  /** Google: one authorization per account and client; revoking any of its tokens revokes all of them. */
  function revokeAccount(clientId: string, account: string) {
    for (const [id, g] of grants) if (g.clientId === clientId && g.account === account) revokeGrant(id);
  }

  /** Grants of the account that still hold a live token (the account page's "apps with access"). */
  function liveAccountGrants(account: string): Grant[] {
    const t = now();
    const live = (g: Grant) =>
      [...g.refreshTokens].some((token) => {
        const rt = refreshTokens.get(token);
        return rt !== undefined && refreshTokenAlive(rt);
      }) || [...g.accessTokens].some((token) => (accessTokens.get(token)?.expiresAt ?? 0) > t);
    return [...grants.values()].filter((g) => g.account === account && live(g));
  }

  function liveRefreshTokensOf(clientId: string, account: string): [string, RefreshToken][] {
    const out: [string, RefreshToken][] = [];
    for (const [token, rt] of refreshTokens) {
      if (rt.clientId === clientId && refreshTokenAlive(rt) && grants.get(rt.grantId)?.account === account) {
        out.push([token, rt]);
      }
    }
    return out;
  }

  /** Google keeps at most N refresh tokens per account and client: the oldest die silently. */
  function enforceRefreshTokenLimit(clientId: string, account: string, limit: number) {
    if (limit <= 0) return;
    const live = liveRefreshTokensOf(clientId, account).sort((a, b) => a[1].serial - b[1].serial);
    for (const [token] of live.slice(0, Math.max(0, live.length - limit))) deleteRefreshToken(token);
  }

  /**
   * Mints the tokens of a token response. `openid` is null for a plain OAuth response, else it asks
   * for an ID token (with the authorization request's nonce in the code flow, none on a refresh).
   * `presented` is the refresh token of a refresh grant: a rotated one keeps its end.
   */
  function issueTokens(
    client: Client,
    grantId: string,
    scope: string,
    b: Behavior,
    o: { withRefresh: boolean; openid: { nonce: string | null } | null; presented?: RefreshToken },
  ) {
    const { withRefresh, openid, presented } = o;
    const grant = grants.get(grantId);
    if (!grant) throw new Error("grant disappeared");
    const t = now();
    const access = randomToken("at_");
    accessTokens.set(access, {
      clientId: client.id,
      grantId,
      scope,
      issuedAt: t,
      expiresAt: t + b.accessTokenTtlSeconds * 1000,
    });
    grant.accessTokens.add(access);
    const body: Record<string, unknown> = {
      access_token: access,
      token_type: "Bearer",
      expires_in: b.accessTokenTtlSeconds,
    };
    // The refresh token whose end the response announces: the new one, the one presented, or (a
    // consent that brought none) the account's newest live one.
    let ending = presented;
    if (withRefresh) {
      const refresh = randomToken("rt_");
      const minted: RefreshToken = {
        clientId: client.id,
        grantId,
        scope: grant.scope,
        issuedAt: t,
        serial: ++refreshSerial,
        ...(presented
          ? { expiresAt: presented.expiresAt, announcesExpiry: presented.announcesExpiry }
          : refreshTokenExpiry(b, grant.scope, t)),
      };
      refreshTokens.set(refresh, minted);
      grant.refreshTokens.add(refresh);
      body.refresh_token = refresh;
      enforceRefreshTokenLimit(client.id, grant.account, b.maxRefreshTokensPerAccount);
      ending = minted;
    }
    ending ??= liveRefreshTokensOf(client.id, grant.account).sort((x, y) => y[1].serial - x[1].serial)[0]?.[1];
    if (ending?.announcesExpiry && ending.expiresAt !== null) {
      body.refresh_token_expires_in = Math.max(0, Math.ceil((ending.expiresAt - t) / 1000));
    }
    // Google names `email` and `profile` by the userinfo scopes they stand for; the textbook echoes them.
    body.scope = b.profile === "google" ? scopeList(scope).map(googleScopeName).join(" ") : scope;
    if (openid) {
      // ID token times are on the wall clock (not the /admin/clock offset): clients check them against theirs.
      const claims = idTokenClaims({
        issuer: idTokenIssuer(issuer, b.idTokenIssuer),
        clientId: client.id,
        subject: accountSubject(grant.account),
        account: grant.account,
        scope: grant.scope,
        nonce: openid.nonce,
        issuedAt: Math.floor(Date.now() / 1000),
        audience: b.idTokenAudience,
      });
      body.id_token = oidc.sign(claims, b.idTokenSignature);
    }
    // After the new tokens are attached: a sweep before would drop a brand-new grant (no tokens yet).
    sweep();
    return body;
  }

  function statsFor(clientId: string | null, counters: Counters): ClientStats {
    const t = now();
    let activeAccessTokens = 0;
    let activeRefreshTokens = 0;
    for (const at of accessTokens.values()) {
      if ((clientId === null || at.clientId === clientId) && at.expiresAt > t) activeAccessTokens++;
    }
    for (const rt of refreshTokens.values()) {
      if ((clientId === null || rt.clientId === clientId) && refreshTokenAlive(rt)) activeRefreshTokens++;
    }
    return { ...counters, activeAccessTokens, activeRefreshTokens };
  }

  function count(client: Client | undefined, key: keyof Counters) {
    totals[key]++;
    if (client) client.stats[key]++;
  }

  // ---------- request helpers ----------
  async function readBody(req: IncomingMessage): Promise<string> {
    const chunks: Buffer[] = [];
    let size = 0;
    for await (const chunk of req as AsyncIterable<Buffer>) {
      size += chunk.length;
      if (size > MAX_BODY_BYTES) throw oauthError(413, "invalid_request", "request body too large");
      chunks.push(chunk);
    }
    return Buffer.concat(chunks).toString("utf8");
  }

  async function readForm(req: IncomingMessage): Promise<Map<string, string>> {
    const type = (req.headers["content-type"] ?? "").split(";")[0]?.trim().toLowerCase();
    if (type !== "application/x-www-form-urlencoded") {
      await readBody(req);
      throw oauthError(400, "invalid_request", "content-type must be application/x-www-form-urlencoded");
    }
    return uniqueParams(new URLSearchParams(await readBody(req)));
  }

  /** RFC 6749 §3.1: parameters MUST NOT be included more than once; empty values count as absent. */
  function uniqueParams(params: URLSearchParams): Map<string, string> {
    const out = new Map<string, string>();
    for (const [k, v] of params) {
      if (out.has(k)) throw oauthError(400, "invalid_request", `parameter ${k} included more than once`);
      out.set(k, v);
    }
    for (const [k, v] of out) if (v === "") out.delete(k);
    return out;
  }

  async function readJson(req: IncomingMessage): Promise<unknown> {
    const text = await readBody(req);
    if (text.trim() === "") return {};
    try {
      return JSON.parse(text);
    } catch {
      throw oauthError(400, "invalid_request", "body must be JSON");
    }
  }

  function send(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}) {
    if (res.headersSent || res.destroyed) return;
    const text = JSON.stringify(body);
    res.writeHead(status, {
      "content-type": "application/json; charset=utf-8",
      "content-length": Buffer.byteLength(text),
      ...headers,
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

  function redirect(res: ServerResponse, target: string, params: Record<string, string | null>) {
    const u = new URL(target);
    for (const [k, v] of Object.entries(params)) if (v !== null) u.searchParams.append(k, v);
    res.writeHead(302, { location: u.toString(), "cache-control": "no-store", "content-length": 0 });
    res.end();
  }

  function methodNotAllowed(allow: string): never {
    throw new HttpError(405, { error: "method_not_allowed", error_description: `use ${allow}` }, { allow });
  }

  /** Client authentication: client_secret_basic or client_secret_post (exactly one). */
  function identifyClient(req: IncomingMessage, form: Map<string, string>) {
    const header = req.headers.authorization;
    let basic: { id: string; secret: string } | null = null;
    let malformedBasic = false;
    if (header && /^basic /i.test(header)) {
      const decoded = Buffer.from(header.slice(6).trim(), "base64").toString("utf8");
      const i = decoded.indexOf(":");
      try {
        if (i < 0) throw new Error("no colon");
        const dec = (s: string) => decodeURIComponent(s.replace(/\+/g, " "));
        basic = { id: dec(decoded.slice(0, i)), secret: dec(decoded.slice(i + 1)) };
      } catch {
        malformedBasic = true;
      }
    }
    const usedBasic = basic !== null || malformedBasic;
    const claimedId = basic?.id ?? form.get("client_id") ?? null;
    return { basic, usedBasic, malformedBasic, claimedId };
  }

  function authenticate(req: IncomingMessage, form: Map<string, string>): Client {
    const { basic, usedBasic, malformedBasic } = identifyClient(req, form);
    const fail = (why: string) =>
      oauthError(401, "invalid_client", why, usedBasic ? { "www-authenticate": 'Basic realm="oauth-server"' } : {});
    if (malformedBasic) throw fail("malformed Basic credentials");
    let id: string;
    let secret: string;
    if (basic) {
      if (form.has("client_secret")) {
        throw oauthError(400, "invalid_request", "more than one client authentication method used");
      }
      const bodyId = form.get("client_id");
      if (bodyId !== undefined && bodyId !== basic.id) throw fail("client_id does not match the authenticated client");
      id = basic.id;
      secret = basic.secret;
    } else {
      const bodyId = form.get("client_id");
      const bodySecret = form.get("client_secret");
      if (bodyId === undefined || bodySecret === undefined) throw fail("client authentication required");
      id = bodyId;
      secret = bodySecret;
    }
    const client = clients.get(id);
    if (!client || !safeEqual(client.secret, secret)) throw fail("client authentication failed");
    return client;
  }

  // ---------- /authorize ----------
  function handleAuthorize(req: IncomingMessage, res: ServerResponse, url: URL) {
    if (req.method !== "GET") methodNotAllowed("GET");
    let params: Map<string, string>;
    try {
      params = uniqueParams(url.searchParams);
    } catch (e) {
      return sendHtml(res, 400, "Invalid request", `<p>${escapeHtml((e as Error).message)}</p>`);
    }
    const clientId = params.get("client_id");
    const client = clientId === undefined ? undefined : clients.get(clientId);
    if (!client) return sendHtml(res, 400, "Invalid request", "<p>unknown or missing client_id</p>");
    const redirectUri = params.get("redirect_uri");
    if (redirectUri === undefined || !client.redirectUris.includes(redirectUri)) {
      return sendHtml(res, 400, "Invalid request", "<p>redirect_uri missing or not registered for this client</p>");
    }
    const state = params.get("state") ?? null;
    const b = effectiveBehavior(client);
    const back = (error: string, description: string) =>
      redirect(res, redirectUri, { error, error_description: description, state, iss: b.issParameter });
    if (params.get("response_type") !== "code") {
      return back("unsupported_response_type", "response_type must be code");
    }
    const challenge = params.get("code_challenge");
    if (challenge === undefined) return back("invalid_request", "code_challenge is required (PKCE)");
    if (params.get("code_challenge_method") !== "S256") {
      return back("invalid_request", "code_challenge_method must be S256");
    }
    if (!S256_CHALLENGE_RE.test(challenge)) return back("invalid_request", "malformed code_challenge");
    if (b.authorizeError) return back(b.authorizeError, "simulated by the test authorization server");
    const consent: PendingConsent = {
      clientId: client.id,
      account: b.account,
      redirectUri,
      state,
      codeChallenge: challenge,
      scope: (params.get("scope") ?? "").split(" ").filter(Boolean).join(" "),
      nonce: params.get("nonce") ?? null,
      accessType: params.get("access_type") ?? null,
      prompt: params.get("prompt") ?? null,
    };
    if (autoApprove) return approve(res, consent);
    const requestId = randomToken("req_");
    pending.set(requestId, consent);
    sendHtml(
      res,
      200,
      "Authorize access",
      `<p>Client <b>${escapeHtml(client.id)}</b> requests scope <code>${escapeHtml(consent.scope || "(none)")}</code>.</p>` +
        `<form method="post" action="/authorize/decision"><input type="hidden" name="request_id" value="${requestId}">` +
        `<button name="decision" value="approve">Approve</button> <button name="decision" value="deny">Deny</button></form>`,
    );
  }

  function approve(res: ServerResponse, c: PendingConsent) {
    const b = effectiveBehavior(clients.get(c.clientId));
    // Granular consent: what the user left ticked is what is granted (Google: either name of a scope).
    const named = (s: string) => (b.profile === "google" ? googleScopeName(s) : s);
    const unticked = new Set(b.untickedScopes.map(named));
    const scope = scopeList(c.scope)
      .filter((s) => !unticked.has(named(s)))
      .join(" ");
    const grantId = randomToken("g_");
    grants.set(grantId, {
      clientId: c.clientId,
      account: c.account,
      scope,
      accessType: c.accessType,
      prompt: c.prompt,
      accessTokens: new Set(),
      refreshTokens: new Set(),
    });
    const code = randomToken("code_");
    codes.set(code, {
      clientId: c.clientId,
      account: c.account,
      accessType: c.accessType,
      prompt: c.prompt,
      redirectUri: c.redirectUri,
      codeChallenge: c.codeChallenge,
      scope,
      nonce: c.nonce,
      expiresAt: now() + CODE_TTL_MS,
      used: false,
      grantId,
    });
    redirect(res, c.redirectUri, { code, state: c.state, iss: b.issParameter });
  }

  async function handleDecision(req: IncomingMessage, res: ServerResponse) {
    if (req.method !== "POST") methodNotAllowed("POST");
    const form = await readForm(req);
    const id = form.get("request_id") ?? "";
    const c = pending.get(id);
    if (!c) return sendHtml(res, 400, "Invalid request", "<p>unknown or already decided request</p>");
    pending.delete(id);
    if (form.get("decision") === "approve") return approve(res, c);
    redirect(res, c.redirectUri, {
      error: "access_denied",
      error_description: "the user denied access",
      state: c.state,
      iss: effectiveBehavior(clients.get(c.clientId)).issParameter,
    });
  }

  // ---------- /token ----------
  async function handleToken(req: IncomingMessage, res: ServerResponse) {
    if (req.method !== "POST") methodNotAllowed("POST");
    const noStore = { "cache-control": "no-store", pragma: "no-cache" };
    let client: Client | undefined;
    let counted = false;
    try {
      const form = await readForm(req);
      const claimed = identifyClient(req, form).claimedId;
      client = claimed === null ? undefined : clients.get(claimed);
      count(client, "tokenRequests");
      counted = true;
      // Fault injection: hang, then delay, then failNext.
      while (effectiveBehavior(client).hang) {
        if (!(await wait(res, null))) return;
        if (client && clients.get(client.id) !== client) client = clients.get(client.id);
      }
      const delay = effectiveBehavior(client).tokenDelayMs;
      if (delay > 0 && !(await wait(res, delay))) return;
      const fail = takeFailNext(client);
      if (fail) {
        const error =
          fail.error ??
          (fail.status === 429 || fail.status === 503
            ? "temporarily_unavailable"
            : fail.status >= 500
              ? "server_error"
              : "invalid_request");
        const headers: Record<string, string> = {};
        if (fail.status === 429) headers["retry-after"] = "1";
        if (fail.status === 401) headers["www-authenticate"] = 'Basic realm="oauth-server"';
        throw oauthError(fail.status, error, "simulated failure (failNext)", headers);
      }
      const authed = authenticate(req, form);
      client = authed;
      const b = effectiveBehavior(authed);
      const grantType = form.get("grant_type");
      let body: Record<string, unknown>;
      if (grantType === "authorization_code") body = codeGrant(authed, form, b);
      else if (grantType === "refresh_token") body = refreshGrant(authed, form, b);
      else if (grantType === undefined) throw oauthError(400, "invalid_request", "grant_type is required");
      else throw oauthError(400, "unsupported_grant_type", `grant_type ${grantType} is not supported`);
      send(res, 200, body, noStore);
    } catch (e) {
      if (!(e instanceof HttpError)) throw e;
      if (!counted) count(client, "tokenRequests");
      count(client, "failedRequests");
      send(res, e.status, e.body, { ...noStore, ...e.headers });
    }
  }

  function codeGrant(client: Client, form: Map<string, string>, b: Behavior) {
    const google = b.profile === "google";
    const badCode = (why: string) => oauthError(400, "invalid_grant", google ? GOOGLE_CODE_INVALID : why);
    const code = form.get("code");
    if (code === undefined) throw oauthError(400, "invalid_request", "code is required");
    const redirectUri = form.get("redirect_uri");
    if (redirectUri === undefined) throw oauthError(400, "invalid_request", "redirect_uri is required");
    const record = codes.get(code);
    if (!record || record.clientId !== client.id) throw badCode("unknown authorization code");
    if (record.used) {
      // RFC 6749 §4.1.2: a replayed code revokes the tokens previously issued from it.
      revokeGrant(record.grantId);
      throw badCode("authorization code already used");
    }
    record.used = true; // single use, whatever the outcome
    if (record.expiresAt <= now()) throw badCode("authorization code expired");
    if (record.redirectUri !== redirectUri) {
      throw oauthError(400, "invalid_grant", "redirect_uri does not match the authorization request");
    }
    const verifier = form.get("code_verifier");
    if (verifier === undefined) throw oauthError(400, "invalid_request", "code_verifier is required");
    if (!PKCE_RE.test(verifier) || !safeEqual(s256(verifier), record.codeChallenge)) {
      throw oauthError(400, "invalid_grant", "PKCE verification failed");
    }
    // Google issues a refresh token only for access_type=offline, and only on the account's first
    // consent to this client (while it holds no live one) or when prompt=consent forced the screen.
    const withRefresh =
      b.issueRefreshToken &&
      (!google ||
        (record.accessType === "offline" &&
          ((record.prompt ?? "").split(" ").includes("consent") ||
            liveRefreshTokensOf(client.id, record.account).length === 0)));
    const openid = scopeList(record.scope).includes("openid") ? { nonce: record.nonce } : null;
    const body = issueTokens(client, record.grantId, record.scope, b, { withRefresh, openid });
    count(client, "authorizationCodeGrants");
    return body;
  }

  function refreshGrant(client: Client, form: Map<string, string>, b: Behavior) {
    const token = form.get("refresh_token");
    if (token === undefined) throw oauthError(400, "invalid_request", "refresh_token is required");
    const rt = refreshTokens.get(token);
    if (!rt || rt.clientId !== client.id || !refreshTokenAlive(rt)) {
      if (rt && !refreshTokenAlive(rt)) deleteRefreshToken(token);
      const why = b.profile === "google" ? GOOGLE_REFRESH_INVALID : "refresh token is invalid, expired or revoked";
      throw oauthError(400, "invalid_grant", why);
    }
    let scope = rt.scope;
    const requested = form.get("scope");
    if (requested !== undefined) {
      const named = (s: string) => (b.profile === "google" ? googleScopeName(s) : s);
      const granted = new Set(scopeList(rt.scope).map(named));
      const wanted = scopeList(requested);
      if (wanted.some((s) => !granted.has(named(s)))) {
        throw oauthError(400, "invalid_scope", "requested scope exceeds the scope originally granted");
      }
      scope = [...new Set(wanted)].join(" ");
    }
    if (b.rotateRefreshTokens) deleteRefreshToken(token);
    // Google sends a fresh ID token (without nonce) on refreshes of an `openid` grant.
    const openid = scopeList(grants.get(rt.grantId)?.scope ?? "").includes("openid") ? { nonce: null } : null;
    const body = issueTokens(client, rt.grantId, scope, b, {
      withRefresh: b.rotateRefreshTokens,
      openid,
      presented: rt,
    });
    count(client, "refreshGrants");
    return body;
  }

  // ---------- /revoke and /introspect ----------
  async function handleRevoke(req: IncomingMessage, res: ServerResponse, url: URL) {
    if (req.method !== "POST" && req.method !== "GET") methodNotAllowed("POST");
    const query = uniqueParams(url.searchParams);
    // Google also takes the token in the query string (POST with no body, or GET).
    const hasBody = req.method === "POST" && req.headers["content-type"] !== undefined;
    const form = hasBody ? await readForm(req) : new Map<string, string>();
    if (!hasBody) await readBody(req);
    const token = form.get("token") ?? query.get("token");
    const known = token === undefined ? undefined : (refreshTokens.get(token) ?? accessTokens.get(token));
    const profileClient = clients.get(known?.clientId ?? identifyClient(req, form).claimedId ?? "");
    if (effectiveBehavior(profileClient).profile === "google") return googleRevoke(res, token, profileClient);
    // Textbook RFC 7009: POST, form body, client authentication.
    if (req.method !== "POST") methodNotAllowed("POST");
    if (!hasBody) throw oauthError(400, "invalid_request", "content-type must be application/x-www-form-urlencoded");
    const client = authenticate(req, form);
    if (form.get("token") === undefined || token === undefined) {
      throw oauthError(400, "invalid_request", "token is required");
    }
    const hint = form.get("token_type_hint");
    if (hint !== undefined && hint !== "access_token" && hint !== "refresh_token") {
      throw oauthError(400, "unsupported_token_type", `token_type_hint ${hint} is not supported`);
    }
    const rt = refreshTokens.get(token);
    const at = accessTokens.get(token);
    // RFC 7009 §2.1: revoking a refresh token also invalidates the access tokens of the same grant.
    if (rt && rt.clientId === client.id) revokeGrant(rt.grantId);
    else if (at && at.clientId === client.id) deleteAccessToken(token);
    count(client, "revocations");
    res.writeHead(200, { "cache-control": "no-store", "content-length": 0 });
    res.end();
  }

  /**
   * Google's revocation endpoint: the token as a query or form parameter, no client authentication;
   * an access or refresh token revokes every token of that account and client; 200 `{}`, or 400
   * `invalid_token` for a token it does not know (or no longer knows).
   */
  function googleRevoke(res: ServerResponse, token: string | undefined, client: Client | undefined) {
    const noStore = { "cache-control": "no-store" };
    const rt = token === undefined ? undefined : refreshTokens.get(token);
    const at = token === undefined ? undefined : accessTokens.get(token);
    const grant = grants.get(rt?.grantId ?? at?.grantId ?? "");
    if (!grant || (at && !rt && at.expiresAt <= now()) || (rt && !refreshTokenAlive(rt))) {
      if (client) count(client, "failedRequests");
      return send(res, 400, { error: "invalid_token", error_description: GOOGLE_REVOKE_INVALID }, noStore);
    }
    revokeAccount(grant.clientId, grant.account);
    count(clients.get(grant.clientId), "revocations");
    send(res, 200, {}, noStore);
  }

  async function handleIntrospect(req: IncomingMessage, res: ServerResponse) {
    if (req.method !== "POST") methodNotAllowed("POST");
    const form = await readForm(req);
    authenticate(req, form);
    const token = form.get("token");
    if (token === undefined) throw oauthError(400, "invalid_request", "token is required");
    const noStore = { "cache-control": "no-store" };
    const at = accessTokens.get(token);
    if (at && at.expiresAt > now()) {
      return send(
        res,
        200,
        {
          active: true,
          client_id: at.clientId,
          scope: at.scope,
          exp: Math.floor(at.expiresAt / 1000),
          iat: Math.floor(at.issuedAt / 1000),
          token_type: "Bearer",
        },
        noStore,
      );
    }
    const rt = refreshTokens.get(token);
    if (rt && refreshTokenAlive(rt)) {
      return send(
        res,
        200,
        {
          active: true,
          client_id: rt.clientId,
          scope: rt.scope,
          iat: Math.floor(rt.issuedAt / 1000),
          token_type: "refresh_token",
        },
        noStore,
      );
    }
    send(res, 200, { active: false }, noStore);
  }

  // ---------- /admin ----------
  async function handleAdmin(req: IncomingMessage, res: ServerResponse, path: string) {
    const parts = path.split("/").slice(2).map(decodeURIComponent); // after "/admin"
    const method = req.method ?? "GET";
    const needClient = (id: string) => {
      const c = clients.get(id);
      if (!c) throw new HttpError(404, { error: "not_found", error_description: `unknown client ${id}` });
      return c;
    };
    const route = parts.join("/");
    if (route === "clients") {
      if (method !== "POST") methodNotAllowed("POST");
      const body = (await readJson(req)) as Record<string, unknown> | null;
      const id = body?.client_id;
      const secret = body?.client_secret;
      const uris = body?.redirect_uris;
      if (typeof id !== "string" || id === "" || typeof secret !== "string" || secret === "") {
        throw oauthError(400, "invalid_request", "client_id and client_secret must be non-empty strings");
      }
      if (!Array.isArray(uris) || uris.length === 0 || !uris.every(validRedirectUri)) {
        throw oauthError(
          400,
          "invalid_request",
          "redirect_uris must be a non-empty array of absolute URLs without fragment",
        );
      }
      const existing = clients.get(id);
      const client: Client = {
        id,
        secret,
        redirectUris: [...uris],
        behavior: {},
        stats: existing?.stats ?? zeroCounters(),
      };
      clients.set(id, client);
      if (existing) behaviorChanged();
      return send(res, 201, { client_id: id, redirect_uris: client.redirectUris, replaced: existing !== undefined });
    }
    if (parts[0] === "clients" && parts.length === 3 && parts[2] === "behavior") {
      const client = needClient(parts[1] ?? "");
      if (method === "GET") return send(res, 200, effectiveBehavior(client));
      if (method === "DELETE") {
        client.behavior = {};
        behaviorChanged();
        return send(res, 200, effectiveBehavior(client));
      }
      if (method !== "PUT") methodNotAllowed("GET, PUT, DELETE");
      client.behavior = { ...client.behavior, ...parseBehavior(await readJson(req)) };
      behaviorChanged();
      return send(res, 200, effectiveBehavior(client));
    }
    if (route === "behavior") {
      if (method === "GET") return send(res, 200, effectiveBehavior(undefined));
      if (method !== "PUT") methodNotAllowed("GET, PUT");
      defaultBehavior = { ...defaultBehavior, ...parseBehavior(await readJson(req)) };
      behaviorChanged();
      return send(res, 200, effectiveBehavior(undefined));
    }
    if (parts[0] === "clients" && parts.length === 3 && parts[2] === "stats") {
      if (method !== "GET") methodNotAllowed("GET");
      const client = needClient(parts[1] ?? "");
      return send(res, 200, statsFor(client.id, client.stats));
    }
    if (route === "stats") {
      if (method !== "GET") methodNotAllowed("GET");
      return send(res, 200, statsFor(null, totals));
    }
    if (route === "reset") {
      if (method !== "POST") methodNotAllowed("POST");
      await readBody(req);
      clients.clear();
      defaultBehavior = {};
      codes = new Map();
      grants = new Map();
      accessTokens = new Map();
      refreshTokens = new Map();
      pending = new Map();
      totals = zeroCounters();
      clockOffsetMs = 0;
      risc.reset();
      businessProfile.reset();
      behaviorChanged();
      return send(res, 200, { reset: true });
    }
    if (route === "clock") {
      if (method === "POST") {
        const body = (await readJson(req)) as Record<string, unknown> | null;
        const advance = body?.advanceSeconds;
        if (typeof advance !== "number" || !Number.isFinite(advance) || advance < 0) {
          throw oauthError(400, "invalid_request", "advanceSeconds must be a non-negative number of seconds");
        }
        clockOffsetMs += advance * 1000;
      } else if (method !== "GET") methodNotAllowed("GET, POST");
      return send(res, 200, clockView());
    }
    if (route === "import") {
      if (method !== "POST") methodNotAllowed("POST");
      return send(res, 201, importGrants(await readJson(req)));
    }
    if (parts[0] === "refresh-tokens" && parts.length === 3 && parts[2] === "revoke-all") {
      if (method !== "POST") methodNotAllowed("POST");
      await readBody(req);
      const client = needClient(parts[1] ?? "");
      let revoked = 0;
      for (const [id, g] of grants) {
        if (g.clientId !== client.id) continue;
        revoked += g.refreshTokens.size;
        revokeGrant(id);
      }
      return send(res, 200, { revoked });
    }
    throw new HttpError(404, { error: "not_found", error_description: `no such path ${path}` });
  }

  /**
   * POST /admin/import: registers clients and gives each a grant holding the refresh token given, as
   * if the consent had happened (benchmarks seed thousands of branches this way in seconds). All or
   * nothing: every entry is checked before any is stored.
   */
  function importGrants(input: unknown): { imported: number } {
    const entries = (input as { grants?: unknown } | null)?.grants;
    if (!Array.isArray(entries) || entries.length === 0 || entries.length > MAX_IMPORT_GRANTS) {
      throw oauthError(400, "invalid_request", `grants must be an array of 1..${MAX_IMPORT_GRANTS} entries`);
    }
    const seen = new Set<string>();
    const checked = entries.map((entry: unknown, i) => {
      const e = (typeof entry === "object" && entry !== null ? entry : {}) as Record<string, unknown>;
      const bad = (what: string) => oauthError(400, "invalid_request", `grants[${i}]: ${what}`);
      const nonEmpty = (v: unknown): v is string => typeof v === "string" && v !== "";
      if (!nonEmpty(e.client_id) || !nonEmpty(e.client_secret)) {
        throw bad("client_id and client_secret must be non-empty strings");
      }
      if (!Array.isArray(e.redirect_uris) || e.redirect_uris.length === 0 || !e.redirect_uris.every(validRedirectUri)) {
        throw bad("redirect_uris must be a non-empty array of absolute URLs without fragment");
      }
      if (!nonEmpty(e.refresh_token)) throw bad("refresh_token must be a non-empty string");
      if (refreshTokens.has(e.refresh_token) || seen.has(e.refresh_token)) throw bad("refresh_token is already known");
      seen.add(e.refresh_token);
      if (e.scope !== undefined && typeof e.scope !== "string") throw bad("scope must be a string");
      if (e.account !== undefined && !nonEmpty(e.account)) throw bad("account must be a non-empty string");
      return {
        clientId: e.client_id,
        secret: e.client_secret,
        redirectUris: [...e.redirect_uris] as string[],
        refreshToken: e.refresh_token,
        scope: (e.scope ?? "").split(" ").filter(Boolean).join(" "),
        account: e.account as string | undefined,
      };
    });
    const touched = new Map<string, Set<string>>();
    for (const e of checked) {
      const existing = clients.get(e.clientId);
      const client: Client = existing ?? {
        id: e.clientId,
        secret: e.secret,
        redirectUris: e.redirectUris,
        behavior: {},
        stats: zeroCounters(),
      };
      client.secret = e.secret;
      client.redirectUris = [...new Set([...client.redirectUris, ...e.redirectUris])];
      clients.set(client.id, client);
      const account = e.account ?? effectiveBehavior(client).account;
      const grantId = randomToken("g_");
      grants.set(grantId, {
        clientId: client.id,
        account,
        scope: e.scope,
        accessType: "offline",
        prompt: null,
        accessTokens: new Set(),
        refreshTokens: new Set([e.refreshToken]),
      });
      const issuedAt = now();
      refreshTokens.set(e.refreshToken, {
        clientId: client.id,
        grantId,
        scope: e.scope,
        issuedAt,
        serial: ++refreshSerial,
        ...refreshTokenExpiry(effectiveBehavior(client), e.scope, issuedAt),
      });
      touched.set(client.id, (touched.get(client.id) ?? new Set()).add(account));
    }
    // Google's per-account limit holds for imported tokens too (once per client and account).
    for (const [clientId, accounts] of touched) {
      const limit = effectiveBehavior(clients.get(clientId)).maxRefreshTokensPerAccount;
      for (const account of accounts) enforceRefreshTokenLimit(clientId, account, limit);
    }
    return { imported: checked.length };
  }

  function validRedirectUri(u: unknown): boolean {
    if (typeof u !== "string") return false;
    try {
      const parsed = new URL(u);
      return parsed.hash === "" && !u.includes("#");
    } catch {
      return false;
    }
  }

  // ---------- dispatch ----------
  async function handle(req: IncomingMessage, res: ServerResponse) {
    const url = new URL(req.url ?? "/", "http://localhost");
    const path = url.pathname;
    try {
      if (path === "/authorize") return handleAuthorize(req, res, url);
      if (path === "/authorize/decision") return await handleDecision(req, res);
      if (path === "/token") return await handleToken(req, res);
      if (path === "/revoke") return await handleRevoke(req, res, url);
      if (path === "/introspect") return await handleIntrospect(req, res);
      if (path === "/.well-known/oauth-authorization-server") {
        if (req.method !== "GET") methodNotAllowed("GET");
        return send(res, 200, metadata);
      }
      if (path === "/.well-known/openid-configuration") {
        if (req.method !== "GET") methodNotAllowed("GET");
        return send(res, 200, openidConfiguration);
      }
      if (path === JWKS_PATH) {
        if (req.method !== "GET") methodNotAllowed("GET");
        return send(res, 200, oidc.jwks(), { "cache-control": "no-store" });
      }
      if (await risc.handle(req, res, url)) return;
      if (await businessProfile.handle(req, res, url)) return;
      if (path === "/admin" || path.startsWith("/admin/")) return await handleAdmin(req, res, path);
      throw new HttpError(404, { error: "not_found", error_description: `no such path ${path}` });
    } catch (e) {
      if (e instanceof HttpError) {
        const headers = { ...e.headers };
        if (e.status === 401 || path === "/revoke" || path === "/introspect") headers["cache-control"] = "no-store";
        return send(res, e.status, e.body, headers);
      }
      send(res, 500, { error: "server_error", error_description: String(e) });
    }
  }

  const server = createServer((req, res) => {
    handle(req, res).catch(() => {
      if (!res.headersSent) res.destroy();
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(opts.port ?? 0, host, () => {
      server.off("error", reject);
      resolve();
    });
  });
  const { port } = server.address() as AddressInfo;
  const url = `http://${host.includes(":") ? `[${host}]` : host}:${port}`;
  issuer ||= `http://localhost:${port}`;
  listeningUrl = url;
  const metadata = {
    issuer,
    authorization_endpoint: `${url}/authorize`,
    token_endpoint: `${url}/token`,
    revocation_endpoint: `${url}/revoke`,
    introspection_endpoint: `${url}/introspect`,
    response_types_supported: ["code"],
    grant_types_supported: ["authorization_code", "refresh_token"],
    code_challenge_methods_supported: ["S256"],
    authorization_response_iss_parameter_supported: true,
    token_endpoint_auth_methods_supported: ["client_secret_basic", "client_secret_post"],
    revocation_endpoint_auth_methods_supported: ["client_secret_basic", "client_secret_post"],
    introspection_endpoint_auth_methods_supported: ["client_secret_basic", "client_secret_post"],
    jwks_uri: `${url}${JWKS_PATH}`,
    scopes_supported: SCOPES_SUPPORTED,
  };
  // OpenID Connect Discovery 1.0: the same server, as Google's accounts.google.com document describes.
  const openidConfiguration = {
    issuer,
    authorization_endpoint: metadata.authorization_endpoint,
    token_endpoint: metadata.token_endpoint,
    jwks_uri: metadata.jwks_uri,
    revocation_endpoint: metadata.revocation_endpoint,
    introspection_endpoint: metadata.introspection_endpoint,
    response_types_supported: ["code"],
    grant_types_supported: ["authorization_code", "refresh_token"],
    subject_types_supported: ["public"],
    id_token_signing_alg_values_supported: ["RS256"],
    scopes_supported: SCOPES_SUPPORTED,
    claims_supported: ["aud", "azp", "email", "email_verified", "exp", "iat", "iss", "nonce", "sub"],
    code_challenge_methods_supported: ["S256"],
    token_endpoint_auth_methods_supported: metadata.token_endpoint_auth_methods_supported,
    authorization_response_iss_parameter_supported: true,
  };

  let closing: Promise<void> | null = null;
  return {
    url,
    issuer,
    authorizationEndpoint: metadata.authorization_endpoint,
    tokenEndpoint: metadata.token_endpoint,
    revocationEndpoint: metadata.revocation_endpoint,
    jwksUri: metadata.jwks_uri,
    close() {
      closing ??= new Promise<void>((resolve) => {
        closed = true;
        for (const w of [...waiters]) w.resolve(false);
        server.close(() => resolve());
        server.closeAllConnections();
      });
      return closing;
    },
  };
}
