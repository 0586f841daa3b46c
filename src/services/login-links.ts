import { and, eq, inArray, sql } from "drizzle-orm";
import type { Db } from "../db/client";
import { latestTokenOfClient } from "../db/queries";
import { clients } from "../db/schema";
import { type Keyring, sign, verify } from "../lib/crypto";
import { clientNotFound } from "./clients";

/**
 * Signed login links: `/oauth/login/{id}?issued=<unix ms>&expires=<unix s>&signature=<HMAC>`.
 * Whoever holds a link may start the consent flow for that one client; nothing else is granted.
 * A link is a capability, so it ends: at its expiry, when a consent made with it (or with any link
 * of the client) has stored tokens, or when the client's links are revoked. The last two are one
 * column, `clients.login_links_valid_after`: a link works only if it was issued at or after it.
 *
 * Links of the first format (`?expires&signature`, no issue time) cannot be checked against that
 * column, so they are refused ("outdated"): the upgrade invalidated them.
 */

export interface LoginLink {
  url: string;
  issuedAt: Date;
  expiresAt: Date;
}

/** What a link signs; a link bound to an account signs it too (`account`, an email or a `sub`). */
const message = (clientId: number, issuedMs: number, expiresUnix: number, account?: string) =>
  `login:v2:${clientId}:${issuedMs}:${expiresUnix}${account === undefined ? "" : `:account:${account}`}`;

/**
 * A new link for the client, issued now (or at the client's `login_links_valid_after` if a clock
 * of another isolate put it slightly ahead, so the new link is never born revoked). With
 * `revokePrevious`, every earlier link stops working in the same statement.
 */
export async function issueLoginLink(
  db: Db,
  keyring: Keyring,
  baseUrl: string,
  clientId: number,
  now: Date,
  ttlSeconds: number,
  revokePrevious = false,
  account?: string,
): Promise<LoginLink> {
  const [row] = revokePrevious
    ? await db
        .update(clients)
        .set({ loginLinksValidAfter: sql`greatest(coalesce(${clients.loginLinksValidAfter}, ${now}), ${now})` })
        .where(eq(clients.id, clientId))
        .returning({ validAfter: clients.loginLinksValidAfter })
    : await db.select({ validAfter: clients.loginLinksValidAfter }).from(clients).where(eq(clients.id, clientId));
  if (!row) throw clientNotFound(clientId);
  const issuedAt = row.validAfter && row.validAfter > now ? row.validAfter : now;
  return signLoginLink(keyring, baseUrl, clientId, issuedAt, ttlSeconds, account);
}

/** Revokes every link issued so far (and consents begun with them but not finished). */
export async function revokeLoginLinks(db: Db, clientId: number, now: Date): Promise<Date> {
  const [row] = await db
    .update(clients)
    .set({ loginLinksValidAfter: sql`greatest(coalesce(${clients.loginLinksValidAfter}, ${now}), ${now})` })
    .where(eq(clients.id, clientId))
    .returning({ validAfter: clients.loginLinksValidAfter });
  if (!row?.validAfter) throw clientNotFound(clientId);
  return row.validAfter;
}

/** Signs a link; the issue time is part of the signed message. */
export async function signLoginLink(
  keyring: Keyring,
  baseUrl: string,
  clientId: number,
  issuedAt: Date,
  ttlSeconds: number,
  account?: string,
): Promise<LoginLink> {
  const issuedMs = issuedAt.getTime();
  const expiresUnix = Math.floor(issuedMs / 1000) + ttlSeconds;
  const url = new URL(`${baseUrl}/oauth/login/${clientId}`);
  url.searchParams.set("issued", String(issuedMs));
  url.searchParams.set("expires", String(expiresUnix));
  if (account !== undefined) url.searchParams.set("account", account);
  url.searchParams.set("signature", await sign(keyring, message(clientId, issuedMs, expiresUnix, account)));
  return { url: url.toString(), issuedAt, expiresAt: new Date(expiresUnix * 1000) };
}

export type LinkCheck =
  | { result: "valid"; issuedAt: Date; account: string | undefined }
  | { result: "missing" | "expired" | "invalid" | "outdated" };

/** Checks the signature and expiry; whether the link was used or revoked needs the client row. */
export async function checkLoginLink(
  keyring: Keyring,
  clientId: number,
  link: {
    issued?: string | undefined;
    expires?: string | undefined;
    signature?: string | undefined;
    account?: string | undefined;
  },
  now: Date,
): Promise<LinkCheck> {
  const { issued, expires, signature, account } = link;
  if (!expires || !signature) return { result: "missing" };
  if (!issued) return { result: "outdated" };
  if (!/^\d{1,15}$/.test(issued) || !/^\d{1,12}$/.test(expires)) return { result: "invalid" };
  const issuedMs = Number(issued);
  const expiresUnix = Number(expires);
  if (!(await verify(keyring, message(clientId, issuedMs, expiresUnix, account), signature))) {
    return { result: "invalid" };
  }
  if (expiresUnix * 1000 <= now.getTime()) return { result: "expired" };
  return { result: "valid", issuedAt: new Date(issuedMs), account };
}

/** A link (or an admin-started consent) begun at `authorityAt` is still good for this client. */
export function linkStillValid(client: { loginLinksValidAfter: Date | null }, authorityAt: Date): boolean {
  return client.loginLinksValidAfter === null || authorityAt.getTime() >= client.loginLinksValidAfter.getTime();
}

/**
 * Which of these clients still need a consent now: their current token is needs_reauth (the grant
 * died and nobody connected since). A login link is handed out unasked (in a webhook) only to these.
 */
export async function clientsAwaitingConsent(db: Db, clientIds: readonly number[]): Promise<Set<number>> {
  const ids = [...new Set(clientIds)];
  if (ids.length === 0) return new Set();
  const latest = latestTokenOfClient(db);
  const rows = await db
    .select({ id: clients.id })
    .from(clients)
    .leftJoinLateral(latest, sql`true`)
    .where(and(inArray(clients.id, ids), eq(latest.status, "needs_reauth")));
  return new Set(rows.map((row) => row.id));
}
