import { exportJWK, type JWK, SignJWT } from "jose";
import { RISC_EVENT_TYPES } from "../../src/oauth/risc";
import { type CallOptions, call, testEnv, uniqueId } from "./helpers";

/**
 * Security Event Tokens signed by keys generated in the test. The keys are published in the JWKS of
 * the local authorization server's RISC transmitter (dev/oauth-server/risc.ts) over HTTP, so the
 * receiver fetches them exactly as it fetches Google's.
 */

export const SET_CONTENT_TYPE = "application/secevent+jwt";
export const DAY_SECONDS = 24 * 60 * 60;

export interface TestSigner {
  kid: string;
  privateKey: CryptoKey;
  publicJwk: JWK;
}

export async function newSigner(kid = uniqueId("test-kid")): Promise<TestSigner> {
  const pair = (await crypto.subtle.generateKey(
    { name: "RSASSA-PKCS1-v1_5", modulusLength: 2048, publicExponent: new Uint8Array([1, 0, 1]), hash: "SHA-256" },
    true,
    ["sign", "verify"],
  )) as CryptoKeyPair;
  return {
    kid,
    privateKey: pair.privateKey,
    publicJwk: { ...(await exportJWK(pair.publicKey)), kid, alg: "RS256", use: "sig" },
  };
}

/** Adds the signers' public keys to the transmitter's JWKS. */
export async function publishKeys(...signers: TestSigner[]): Promise<void> {
  const response = await fetch(`${testEnv.OAUTH_SERVER_URL}/admin/risc/keys`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ keys: signers.map((s) => s.publicJwk) }),
  });
  if (response.status !== 201) throw new Error(`publishing keys failed: ${await response.text()}`);
}

/** The transmitter's issuer, from its configuration document. */
export async function transmitterIssuer(): Promise<string> {
  const response = await fetch(`${testEnv.OAUTH_SERVER_URL}/.well-known/risc-configuration`);
  return ((await response.json()) as { issuer: string }).issuer;
}

/**
 * A configuration URL of the test's own (the query is ignored by the server): the receiver caches
 * keys per configuration URL and isolate, so a suite using its own sees only its own fetches.
 */
export function ownConfigurationUrl(suite: string): string {
  return `${testEnv.OAUTH_SERVER_URL}/.well-known/risc-configuration?suite=${encodeURIComponent(suite)}-${crypto.randomUUID()}`;
}

export interface SetClaims {
  iss?: string;
  aud?: string | string[];
  iat?: number;
  exp?: number;
  jti?: string;
  events?: Record<string, unknown>;
  [claim: string]: unknown;
}

export interface SignOptions {
  alg?: string;
  kid?: string | null;
  extraHeader?: Record<string, unknown>;
}

export const nowSeconds = () => Math.floor(Date.now() / 1000);

export async function signSet(signer: TestSigner, claims: SetClaims, options: SignOptions = {}): Promise<string> {
  const { iss, aud, iat, jti, ...rest } = claims;
  const header: Record<string, unknown> = { alg: options.alg ?? "RS256", typ: "secevent+jwt", ...options.extraHeader };
  if (options.kid !== null) header.kid = options.kid ?? signer.kid;
  const jwt = new SignJWT(rest)
    .setProtectedHeader(header as { alg: string })
    .setIssuedAt(iat ?? nowSeconds())
    .setJti(jti ?? crypto.randomUUID());
  if (iss !== undefined) jwt.setIssuer(iss);
  if (aud !== undefined) jwt.setAudience(aud);
  return jwt.sign(signer.privateKey);
}

export const issSub = (iss: string, sub: string) => ({ subject: { subject_type: "iss-sub", iss, sub } });

export const tokensRevoked = (iss: string, sub: string) => ({ [RISC_EVENT_TYPES.tokensRevoked]: issSub(iss, sub) });

export const verification = (state: string) => ({ [RISC_EVENT_TYPES.verification]: { state } });

/** POSTs a token to the receiver as Google does (no API key). */
export function postSet(body: string | ReadableStream<Uint8Array>, options: CallOptions = {}): Promise<Response> {
  return call("/risc", {
    ...options,
    method: "POST",
    headers: { "content-type": SET_CONTENT_TYPE, ...options.headers },
    body,
    ...({ duplex: "half" } as object),
  });
}
