import { fromBase64Url, toBase64Url, utf8 } from "./encoding";

/**
 * How Cross-Account Protection's token-revoked event names a refresh token (Google's
 * `token_identifier_alg`), and what is stored to match it: digests only, never the token.
 */

/** `prefix`: the event carries the token's first 16 characters. */
export const TOKEN_PREFIX_LENGTH = 16;

export interface RefreshTokenDigests {
  /** base64url SHA-256 of the first TOKEN_PREFIX_LENGTH characters. */
  prefixDigest: string;
  /** base64url SHA-512 of SHA-512 of the token: Google's `hash_base64_sha512_sha512`, in base64url. */
  digest: string;
}

async function sha(algorithm: "SHA-256" | "SHA-512", bytes: Uint8Array<ArrayBuffer>): Promise<Uint8Array<ArrayBuffer>> {
  return new Uint8Array(await crypto.subtle.digest(algorithm, bytes));
}

export async function refreshTokenDigests(token: string): Promise<RefreshTokenDigests> {
  return {
    prefixDigest: await prefixDigestOf(token.slice(0, TOKEN_PREFIX_LENGTH)),
    digest: toBase64Url(await sha("SHA-512", await sha("SHA-512", utf8(token)))),
  };
}

/** The stored form of an event's `prefix` identifier. */
export async function prefixDigestOf(prefix: string): Promise<string> {
  return toBase64Url(await sha("SHA-256", utf8(prefix)));
}

/**
 * The stored form of an event's `hash_base64_sha512_sha512` identifier: base64 or base64url, padded
 * or not, read as the 64 bytes of a SHA-512 digest; null when it is not one (matches nothing).
 */
export function digestOfEventHash(hash: string): string | null {
  const url = hash.trim().replaceAll("+", "-").replaceAll("/", "_").replace(/=+$/, "");
  if (!/^[A-Za-z0-9_-]{86}$/.test(url)) return null;
  try {
    const bytes = fromBase64Url(url);
    return bytes.length === 64 ? toBase64Url(bytes) : null;
  } catch {
    return null;
  }
}
