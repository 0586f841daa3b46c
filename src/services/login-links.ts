import { type Keyring, sign, verify } from "../lib/crypto";

/**
 * Signed login links: `/oauth/login/{id}?expires=<unix seconds>&signature=<HMAC>`. Whoever holds a
 * link may start the consent flow for that one client until it expires; nothing else is granted.
 */

export interface LoginLink {
  url: string;
  expiresAt: Date;
}

const message = (clientId: number, expiresUnix: number) => `login:${clientId}:${expiresUnix}`;

export async function createLoginLink(
  keyring: Keyring,
  baseUrl: string,
  clientId: number,
  now: Date,
  ttlSeconds: number,
): Promise<LoginLink> {
  const expiresUnix = Math.floor(now.getTime() / 1000) + ttlSeconds;
  const url = new URL(`${baseUrl}/oauth/login/${clientId}`);
  url.searchParams.set("expires", String(expiresUnix));
  url.searchParams.set("signature", await sign(keyring, message(clientId, expiresUnix)));
  return { url: url.toString(), expiresAt: new Date(expiresUnix * 1000) };
}

export type LinkCheck = "valid" | "missing" | "expired" | "invalid";

export async function checkLoginLink(
  keyring: Keyring,
  clientId: number,
  expires: string | undefined,
  signature: string | undefined,
  now: Date,
): Promise<LinkCheck> {
  if (!expires || !signature) return "missing";
  if (!/^\d{1,12}$/.test(expires)) return "invalid";
  const expiresUnix = Number(expires);
  if (!(await verify(keyring, message(clientId, expiresUnix), signature))) return "invalid";
  return expiresUnix * 1000 > now.getTime() ? "valid" : "expired";
}
