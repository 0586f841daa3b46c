// The local authorization server's OpenID Connect side: its RS256 signing key, the JWKS that
// publishes it, and ID tokens as Google mints them (with switches that break them on purpose, so a
// client's validation can be shown to reject each fault).
import { generateKeyPair, type KeyObject, randomBytes, sign } from "node:crypto";
import { promisify } from "node:util";

/** Google's ID tokens live one hour. */
export const ID_TOKEN_TTL_SECONDS = 3600;
export const GOOGLE_EMAIL_SCOPE = "https://www.googleapis.com/auth/userinfo.email";
export const GOOGLE_PROFILE_SCOPE = "https://www.googleapis.com/auth/userinfo.profile";
const RSA_MODULUS_BITS = 2048;

/** `iss` of ID tokens: the issuer, the issuer without its scheme (as Google may send), or a literal value. */
export type IdTokenIssuer = "issuer" | "bare" | (string & {});
export type IdTokenSignature = "valid" | "invalid" | "none";

export interface PublicJwk {
  kty: string;
  n: string;
  e: string;
  kid: string;
  use: "sig";
  alg: "RS256";
}

export interface OidcSigner {
  kid: string;
  jwks(): { keys: PublicJwk[] };
  /** A compact JWT with these claims, signed (or broken) as `signature` says. */
  sign(claims: Record<string, unknown>, signature: IdTokenSignature): string;
}

export async function createOidcSigner(): Promise<OidcSigner> {
  const { privateKey, publicKey } = await promisify(generateKeyPair)("rsa", { modulusLength: RSA_MODULUS_BITS });
  const kid = randomBytes(20).toString("hex");
  const exported = publicKey.export({ format: "jwk" });
  const jwk: PublicJwk = { kty: "RSA", n: String(exported.n), e: String(exported.e), kid, use: "sig", alg: "RS256" };
  return {
    kid,
    jwks: () => ({ keys: [jwk] }),
    sign: (claims, signature) => signJwt(privateKey, kid, claims, signature),
  };
}

const b64url = (value: unknown) => Buffer.from(JSON.stringify(value)).toString("base64url");

function signJwt(key: KeyObject, kid: string, claims: Record<string, unknown>, signature: IdTokenSignature): string {
  if (signature === "none") return `${b64url({ alg: "none", typ: "JWT" })}.${b64url(claims)}.`;
  const input = `${b64url({ alg: "RS256", kid, typ: "JWT" })}.${b64url(claims)}`;
  const sig = sign("sha256", Buffer.from(input), key);
  if (signature === "invalid") {
    // Same length, same key id: only the verification of the bytes can catch it.
    for (let i = 0; i < sig.length; i += 16) sig[i] = (sig[i] ?? 0) ^ 0xff;
  }
  return `${input}.${sig.toString("base64url")}`;
}

/** The `iss` an ID token carries for this behaviour. */
export function idTokenIssuer(issuer: string, setting: IdTokenIssuer): string {
  if (setting === "issuer") return issuer;
  if (setting === "bare") return issuer.replace(/^[a-z][a-z0-9+.-]*:\/\//i, "");
  return setting;
}

/**
 * How Google names a scope in the token response's `scope`: the OpenID Connect shorthands `email`
 * and `profile` come back as the userinfo scopes they stand for; everything else as requested.
 */
export function googleScopeName(scope: string): string {
  if (scope === "email") return GOOGLE_EMAIL_SCOPE;
  if (scope === "profile") return GOOGLE_PROFILE_SCOPE;
  return scope;
}

/** Whether a space-separated scope grants the user's email address (either of its names). */
export function grantsEmail(scope: string): boolean {
  return scope.split(" ").some((s) => googleScopeName(s) === GOOGLE_EMAIL_SCOPE);
}

export interface IdTokenInput {
  issuer: string;
  clientId: string;
  /** `sub`: a pure function of the account (risc.ts accountSubject). */
  subject: string;
  account: string;
  scope: string;
  nonce: string | null;
  /** Seconds since the epoch. */
  issuedAt: number;
  audience: string | null;
}

/** The claims of an ID token for the code flow (with a nonce when one was sent) or a refresh. */
export function idTokenClaims(input: IdTokenInput): Record<string, unknown> {
  const claims: Record<string, unknown> = {
    iss: input.issuer,
    azp: input.clientId,
    aud: input.audience ?? input.clientId,
    sub: input.subject,
  };
  if (grantsEmail(input.scope)) {
    claims.email = input.account;
    claims.email_verified = true;
  }
  if (input.nonce !== null) claims.nonce = input.nonce;
  claims.iat = input.issuedAt;
  claims.exp = input.issuedAt + ID_TOKEN_TTL_SECONDS;
  return claims;
}
