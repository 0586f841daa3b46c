import { compactVerify, decodeProtectedHeader } from "jose";

/**
 * Cross-Account Protection (Google's RISC): the Security Event Tokens (RFC 8417) Google pushes, and
 * their validation as Google documents it (developers.google.com/identity/protocols/risc). Pure: the
 * key and the issuer come from the caller (src/oauth/risc-keys.ts fetches them), and nothing here
 * touches the database.
 */

/** Event type URIs, in their namespaces: the two token events are OAuth's, the others RISC's. */
export const RISC_EVENT_TYPES = {
  tokensRevoked: "https://schemas.openid.net/secevent/oauth/event-type/tokens-revoked",
  tokenRevoked: "https://schemas.openid.net/secevent/oauth/event-type/token-revoked",
  sessionsRevoked: "https://schemas.openid.net/secevent/risc/event-type/sessions-revoked",
  accountDisabled: "https://schemas.openid.net/secevent/risc/event-type/account-disabled",
  accountEnabled: "https://schemas.openid.net/secevent/risc/event-type/account-enabled",
  accountCredentialChangeRequired:
    "https://schemas.openid.net/secevent/risc/event-type/account-credential-change-required",
  verification: "https://schemas.openid.net/secevent/risc/event-type/verification",
} as const;

/** What `npm run risc:register` asks Google to send (every type this receiver acts on). */
export const REQUESTED_EVENT_TYPES: readonly string[] = Object.values(RISC_EVENT_TYPES);

export const RISC_DELIVERY_METHOD_PUSH = "https://schemas.openid.net/secevent/risc/delivery-method/push";
export const DEFAULT_RISC_CONFIGURATION_URL = "https://accounts.google.com/.well-known/risc-configuration";

/** A Security Event Token is small (one event, a subject); anything bigger is not one. */
export const MAX_SET_BYTES = 16 * 1024;
/** Events may arrive late (Google retries), but not older than this: also bounds how long a jti is kept. */
export const MAX_SET_AGE_SECONDS = 7 * 24 * 60 * 60;
/** Clocks differ: an `iat` this far in the future is still accepted. */
export const IAT_FUTURE_SKEW_SECONDS = 5 * 60;
const MAX_JTI_LENGTH = 256;
const MAX_STATE_LENGTH = 1024;
const MAX_CLAIM_LENGTH = 2048;

/** RFC 8935 §2.3 error codes, sent in the 400 body as `err`. */
export type SetErrorCode = "invalid_request" | "invalid_key" | "invalid_issuer" | "invalid_audience";

/** A token refused: the receiver answers 400 and changes nothing. The description is safe to echo. */
export class SetRejected extends Error {
  override readonly name = "SetRejected";
  constructor(
    readonly err: SetErrorCode,
    readonly description: string,
  ) {
    super(description);
  }
}

export interface IssSubSubject {
  subjectType: "iss-sub";
  iss: string;
  sub: string;
}

export type TokenIdentifierAlg = "prefix" | "hash_base64_sha512_sha512";

export interface OAuthTokenSubject {
  subjectType: "oauth_token";
  /** `refresh_token` or `access_token`. */
  tokenType: string;
  tokenIdentifierAlg: TokenIdentifierAlg;
  /** The first 16 characters of the token, or base64(sha512(sha512(token))). */
  token: string;
}

export type RiscEvent =
  | { kind: "tokens-revoked"; subject: IssSubSubject }
  | { kind: "token-revoked"; subject: OAuthTokenSubject }
  | { kind: "sessions-revoked"; subject: IssSubSubject }
  | { kind: "account-disabled"; subject: IssSubSubject; reason: string | null }
  | { kind: "account-enabled"; subject: IssSubSubject }
  | { kind: "account-credential-change-required"; subject: IssSubSubject }
  | { kind: "verification"; state: string | null }
  /** A type this receiver does not act on: accepted, logged. */
  | { kind: "unknown"; type: string };

export type RiscEventKind = RiscEvent["kind"];

export interface SecurityEventToken {
  jti: string;
  iss: string;
  /** Every `aud` value (one of them must be an app's client id; the caller checks). */
  audiences: string[];
  issuedAt: Date;
  events: RiscEvent[];
}

const KIND_OF_TYPE = new Map<string, Exclude<RiscEventKind, "unknown">>([
  [RISC_EVENT_TYPES.tokensRevoked, "tokens-revoked"],
  [RISC_EVENT_TYPES.tokenRevoked, "token-revoked"],
  [RISC_EVENT_TYPES.sessionsRevoked, "sessions-revoked"],
  [RISC_EVENT_TYPES.accountDisabled, "account-disabled"],
  [RISC_EVENT_TYPES.accountEnabled, "account-enabled"],
  [RISC_EVENT_TYPES.accountCredentialChangeRequired, "account-credential-change-required"],
  [RISC_EVENT_TYPES.verification, "verification"],
]);

export const RISC_TYPE_OF_KIND = Object.fromEntries([...KIND_OF_TYPE].map(([type, kind]) => [kind, type])) as Record<
  Exclude<RiscEventKind, "unknown">,
  string
>;

const COMPACT_JWS = /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$/;

/**
 * The header's `kid`, after the checks that need no key: a compact JWS, RS256 only (no `none`, no
 * HMAC, no key carried in the header), a `kid` to look the key up by.
 */
export function readSetHeader(jwt: string): { kid: string } {
  if (!COMPACT_JWS.test(jwt))
    throw new SetRejected("invalid_request", "The body is not a compact JWS (three base64url parts).");
  let header: Record<string, unknown>;
  try {
    header = decodeProtectedHeader(jwt) as Record<string, unknown>;
  } catch {
    throw new SetRejected("invalid_request", "The token's header is not base64url-encoded JSON.");
  }
  if (header.alg !== "RS256") throw new SetRejected("invalid_request", "Only RS256-signed tokens are accepted.");
  for (const embedded of ["jwk", "jku", "x5u", "x5c", "crit"]) {
    if (embedded in header)
      throw new SetRejected("invalid_request", `The header parameter ${embedded} is not accepted.`);
  }
  const kid = header.kid;
  if (typeof kid !== "string" || kid === "" || kid.length > MAX_CLAIM_LENGTH) {
    throw new SetRejected("invalid_key", "The token's header names no key (kid).");
  }
  return { kid };
}

export interface VerifyOptions {
  /** The configuration document's `issuer`: `iss` must equal it. */
  issuer: string;
  now: Date;
}

/**
 * Verifies the signature with `key` (RS256) and reads the claims Google documents. `exp` is not
 * checked on purpose (events may be delivered late); `iat` bounds the age instead. The audience is
 * left to the caller (it is a lookup of the apps).
 */
export async function verifySecurityEventToken(
  jwt: string,
  key: CryptoKey,
  options: VerifyOptions,
): Promise<SecurityEventToken> {
  let payloadBytes: Uint8Array;
  try {
    ({ payload: payloadBytes } = await compactVerify(jwt, key, { algorithms: ["RS256"] }));
  } catch {
    throw new SetRejected("invalid_key", "The signature does not verify with the transmitter's key.");
  }
  let claims: unknown;
  try {
    claims = JSON.parse(new TextDecoder("utf-8", { fatal: true, ignoreBOM: false }).decode(payloadBytes));
  } catch {
    throw new SetRejected("invalid_request", "The token's payload is not JSON.");
  }
  if (!isObject(claims)) throw new SetRejected("invalid_request", "The token's payload is not a JSON object.");

  if (claims.iss !== options.issuer) {
    throw new SetRejected("invalid_issuer", "The token's iss is not the transmitter's issuer.");
  }
  const audiences = readAudiences(claims.aud);
  const jti = claims.jti;
  if (typeof jti !== "string" || jti === "" || jti.length > MAX_JTI_LENGTH) {
    throw new SetRejected("invalid_request", `The token needs a jti (a string of 1 to ${MAX_JTI_LENGTH} characters).`);
  }
  const iat = claims.iat;
  if (typeof iat !== "number" || !Number.isFinite(iat)) {
    throw new SetRejected("invalid_request", "The token needs an iat (seconds since the epoch).");
  }
  const nowSeconds = options.now.getTime() / 1000;
  if (iat > nowSeconds + IAT_FUTURE_SKEW_SECONDS)
    throw new SetRejected("invalid_request", "The token's iat is in the future.");
  if (iat < nowSeconds - MAX_SET_AGE_SECONDS) {
    throw new SetRejected("invalid_request", "The token is older than 7 days (iat).");
  }
  return { jti, iss: options.issuer, audiences, issuedAt: new Date(iat * 1000), events: readEvents(claims.events) };
}

function readAudiences(aud: unknown): string[] {
  const values = typeof aud === "string" ? [aud] : Array.isArray(aud) ? aud : [];
  const audiences = values.filter((value): value is string => typeof value === "string" && value !== "");
  if (
    audiences.length === 0 ||
    audiences.length !== values.length ||
    audiences.some((a) => a.length > MAX_CLAIM_LENGTH)
  ) {
    throw new SetRejected("invalid_audience", "The token needs an aud (a client id, or an array of them).");
  }
  return audiences;
}

function readEvents(events: unknown): RiscEvent[] {
  if (!isObject(events) || Object.keys(events).length === 0) {
    throw new SetRejected("invalid_request", "The token carries no events claim (it is not a Security Event Token).");
  }
  return Object.entries(events).map(([type, body]) => {
    if (!isObject(body))
      throw new SetRejected("invalid_request", "Each event of the events claim must be a JSON object.");
    const kind = KIND_OF_TYPE.get(type);
    switch (kind) {
      case undefined:
        return { kind: "unknown", type: type.slice(0, MAX_CLAIM_LENGTH) };
      case "verification": {
        const state = body.state;
        if (state !== undefined && (typeof state !== "string" || state.length > MAX_STATE_LENGTH)) {
          throw new SetRejected(
            "invalid_request",
            `A verification event's state must be a string of at most ${MAX_STATE_LENGTH} characters.`,
          );
        }
        return { kind, state: state ?? null };
      }
      case "token-revoked":
        return { kind, subject: readTokenSubject(body.subject) };
      case "account-disabled": {
        const reason = body.reason;
        if (reason !== undefined && (typeof reason !== "string" || reason.length > MAX_CLAIM_LENGTH)) {
          throw new SetRejected("invalid_request", "An account-disabled event's reason must be a string.");
        }
        return { kind, subject: readIssSubSubject(body.subject, type), reason: reason ?? null };
      }
      default:
        return { kind, subject: readIssSubSubject(body.subject, type) };
    }
  });
}

function readIssSubSubject(subject: unknown, type: string): IssSubSubject {
  if (
    !isObject(subject) ||
    subject.subject_type !== "iss-sub" ||
    !isShortString(subject.iss) ||
    !isShortString(subject.sub)
  ) {
    throw new SetRejected("invalid_request", `The ${eventName(type)} event needs an iss-sub subject (iss and sub).`);
  }
  return { subjectType: "iss-sub", iss: subject.iss, sub: subject.sub };
}

function readTokenSubject(subject: unknown): OAuthTokenSubject {
  if (
    !isObject(subject) ||
    subject.subject_type !== "oauth_token" ||
    !isShortString(subject.token_type) ||
    (subject.token_identifier_alg !== "prefix" && subject.token_identifier_alg !== "hash_base64_sha512_sha512") ||
    !isShortString(subject.token)
  ) {
    throw new SetRejected(
      "invalid_request",
      "The token-revoked event needs an oauth_token subject (token_type, token_identifier_alg prefix or hash_base64_sha512_sha512, token).",
    );
  }
  return {
    subjectType: "oauth_token",
    tokenType: subject.token_type,
    tokenIdentifierAlg: subject.token_identifier_alg,
    token: subject.token,
  };
}

const eventName = (type: string) => type.slice(type.lastIndexOf("/") + 1);

function isShortString(value: unknown): value is string {
  return typeof value === "string" && value !== "" && value.length <= MAX_CLAIM_LENGTH;
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}
