import { and, asc, eq, gt, isNotNull, lte, sql } from "drizzle-orm";
import type { Db } from "../db/client";
import { leaseIsFree } from "../db/queries";
import { apps, clients, type TokenRow, tokens } from "../db/schema";
import { AppError } from "../errors";
import { clientNotFound } from "./clients";
import {
  clientEvent,
  connectionStatusSql,
  currentStatusSql,
  type EventContext,
  grantNoticeWithEvents,
  noteEvents,
  tokenChangeReturning,
  tokenChangeWithEvents,
} from "./events";

/**
 * Grants: a provider account's authorization on an app (the `tokens` table). The tokens, status,
 * refresh lease and failure record live on the grant; branches point at it (`clients.grant_id`),
 * and many branches may share one. With OpenID Connect a grant is one account's (the ID token's
 * `sub`), so a consent by an account that already holds one joins it (src/services/authorization.ts).
 */

/**
 * Google keeps 100 live refresh tokens per account and OAuth client; the 101st silently kills the
 * oldest. A grant that has had this many minted through this service warns (grant.token_limit_near).
 */
export const GOOGLE_REFRESH_TOKEN_LIMIT = 100;
export const TOKEN_LIMIT_WARNING_AT = 90;

export interface GrantView {
  grant: TokenRow;
  appName: string;
  appClientId: string;
  status: string;
  branches: { id: number; branchId: string }[];
}

const LIST_MAX = 200;

/** The grants of the deployment (or of one app), oldest first, with the branches served from each. */
export async function listGrants(
  db: Db,
  options: { appId?: number | undefined; after?: number | undefined; limit: number },
): Promise<{ grants: GrantView[]; nextCursor: number | null }> {
  const limit = Math.min(Math.max(options.limit, 1), LIST_MAX);
  const rows = await db
    .select(GRANT_SELECT)
    .from(tokens)
    .innerJoin(apps, eq(apps.id, tokens.appId))
    .where(
      and(
        // Grants a branch is served from, or that an account holds (a grant nobody uses and no account
        // names is a replaced consent's leftover).
        sql`(${tokens.subject} is not null or exists (select 1 from ${clients} where ${clients.grantId} = ${tokens.id}))`,
        options.appId === undefined ? undefined : eq(tokens.appId, options.appId),
        options.after === undefined ? undefined : gt(tokens.id, options.after),
      ),
    )
    .orderBy(asc(tokens.id))
    .limit(limit);
  return { grants: rows.map(toView), nextCursor: rows.length === limit ? rows.at(-1)!.grant.id : null };
}

export async function getGrant(db: Db, id: number): Promise<GrantView> {
  const [row] = await db
    .select(GRANT_SELECT)
    .from(tokens)
    .innerJoin(apps, eq(apps.id, tokens.appId))
    .where(eq(tokens.id, id));
  if (!row) throw new AppError("not_found", `No grant with id ${id}.`);
  return toView(row);
}

const GRANT_SELECT = {
  grant: tokens,
  appName: apps.name,
  appClientId: apps.clientId,
  status: sql<string>`${connectionStatusSql('"tokens"', '"tokens"')}`,
  branches: sql<
    { id: number; branchId: string }[] | string
  >`(select coalesce(json_agg(json_build_object('id', c.id, 'branchId', c.branch_id) order by c.id), '[]'::json)
    from ${clients} c where c.grant_id = ${tokens.id})`,
};

function toView(row: {
  grant: TokenRow;
  appName: string;
  appClientId: string;
  status: string;
  branches: { id: number; branchId: string }[] | string;
}): GrantView {
  return { ...row, branches: typeof row.branches === "string" ? JSON.parse(row.branches) : row.branches };
}

/**
 * An operator attaches a branch to an existing grant of the same app, with no consent: the branch is
 * served from it at once. One transaction: the branch's event (connection.created or
 * connection.reauthorized, to the grant's status), then the pointer.
 */
export async function attachBranch(
  db: Db,
  events: EventContext,
  branchId: number,
  grantId: number,
  now: Date,
): Promise<{ branchId: string; previousGrantId: number | null }> {
  const [target] = await db
    .select({ branch: clients, grantApp: tokens.appId, grantValid: tokens.isValid, status: tokens.status })
    .from(clients)
    .leftJoin(tokens, eq(tokens.id, grantId))
    .where(eq(clients.id, branchId));
  if (!target) throw clientNotFound(branchId);
  if (target.grantApp === null) throw new AppError("not_found", `No grant with id ${grantId}.`);
  if (target.grantApp !== target.branch.appId) {
    throw new AppError("conflict", `Grant ${grantId} belongs to another app than branch ${branchId}'s.`, {
      errors: [{ field: "grant_id", message: "belongs to another app" }],
    });
  }
  if (!target.grantValid || target.status !== "active") {
    throw new AppError(
      "conflict",
      `Grant ${grantId} is not connected (${target.status}); attach the branch to a connected grant, or send it a login link.`,
      { errors: [{ field: "grant_id", message: "not connected" }] },
    );
  }
  if (target.branch.grantId === grantId) return { branchId: target.branch.branchId, previousGrantId: grantId };
  const after = sql`(select ${connectionStatusSql("t", "clients")} from ${tokens} t where t.id = ${grantId})`;
  const [written] = await db.batch([
    clientEvent(
      db,
      events,
      branchId,
      {
        type: sql`case when ${clients.grantId} is null then 'connection.created' else 'connection.reauthorized' end`,
        before: currentStatusSql("clients"),
        after,
        reason: `attached to grant ${grantId} by an administrator`,
      },
      now,
      { lock: true },
    ),
    db.update(clients).set({ grantId, updatedAt: now }).where(eq(clients.id, branchId)),
  ]);
  noteEvents(events, written);
  return { branchId: target.branch.branchId, previousGrantId: target.branch.grantId };
}

/**
 * grant.token_limit_near for the branch whose consent minted the grant's latest refresh token, when
 * the grant has had TOKEN_LIMIT_WARNING_AT or more minted: the reason names the app and the account.
 * Runs after the grant's update in the same batch (it reads the new count).
 */
export function tokenLimitEvent(db: Db, events: EventContext, clientId: number, grantId: number, now: Date) {
  const count = sql`(select refresh_tokens_minted from ${tokens} where id = ${grantId})`;
  return clientEvent(
    db,
    events,
    clientId,
    {
      type: sql`case when ${count} >= ${TOKEN_LIMIT_WARNING_AT} then 'grant.token_limit_near' end`,
      before: "connected",
      after: "connected",
      reason: sql`(select format('%s refresh tokens minted for account %s on app %s (%s); Google keeps %s per account and client and silently revokes the oldest past that: stop forcing the consent screen for this account',
          t.refresh_tokens_minted, coalesce(t.email, t.subject, 'unknown'), a.name, a.client_id, ${GOOGLE_REFRESH_TOKEN_LIMIT}::int)
        from ${tokens} t join ${apps} a on a.id = t.app_id where t.id = ${grantId})`,
    },
    now,
  );
}

/**
 * The cron's pass over time-limited access (Google's `refresh_token_expires_in`): a grant whose
 * access ends within `leadSeconds` writes connection.expiring once per branch (once per end of
 * access: a new consent clears the mark); a grant whose access has ended moves to needs_reauth,
 * with connection.needs_reauth per branch, without a provider call that could only fail.
 */
export async function sweepTimeLimitedGrants(
  db: Db,
  events: EventContext,
  now: Date,
  leadSeconds: number,
): Promise<{ warned: number; ended: number }> {
  const horizon = new Date(now.getTime() + leadSeconds * 1000);
  const live = and(eq(tokens.isValid, true), eq(tokens.status, "active"), isNotNull(tokens.refreshTokenExpiresAt));
  const [warned, ended] = await db.batch([
    grantNoticeWithEvents(
      db,
      events,
      db
        .update(tokens)
        .set({ expiryWarnedAt: now })
        .where(
          and(
            live,
            gt(tokens.refreshTokenExpiresAt, now),
            lte(tokens.refreshTokenExpiresAt, horizon),
            sql`${tokens.expiryWarnedAt} is null`,
          ),
        )
        .returning({
          grantId: sql<number>`${tokens.id}`.as("grant_id"),
          status: sql<string>`'connected'`.as("status"),
          reason:
            sql<string>`format('the account granted access for a limited time: it ends at %s; someone must sign in again with a login link before then to keep the connection', to_char(${tokens.refreshTokenExpiresAt} at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'))`.as(
              "reason",
            ),
        }),
      "connection.expiring",
      now,
    ),
    tokenChangeWithEvents(
      db,
      events,
      db
        .update(tokens)
        .set({
          isValid: false,
          status: "needs_reauth",
          lastError: "the access the account granted for a limited time ended",
          leaseOwner: null,
          leaseExpiresAt: null,
        })
        .where(and(live, lte(tokens.refreshTokenExpiresAt, now), leaseIsFree()))
        .returning(tokenChangeReturning("keep")),
      { rejected: "keep", reason: "the access the account granted for a limited time ended" },
      now,
    ),
  ]);
  const warnedIds = noteEvents(events, warned);
  const endedIds = noteEvents(events, ended);
  return { warned: warnedIds.length, ended: endedIds.length };
}

/**
 * A google grant that dies (invalid_grant) about 7 days after its consent: the app is probably in
 * Testing publishing status, whose refresh tokens Google expires after 7 days. Marks the app (once)
 * in the same batch as the failure's write, before it (the grant is still ours to read).
 */
export function testingSuspicion(db: Db, grantId: number, owner: string, now: Date) {
  const day = 24 * 3600 * 1000;
  return db.execute(sql`update ${apps} set testing_suspected_at = ${now}
    where ${apps}.profile = 'google' and ${apps}.testing_suspected_at is null and ${apps}.id = (
      select t.app_id from ${tokens} t where t.id = ${grantId} and t.lease_owner = ${owner}
        and t.consented_at between ${new Date(now.getTime() - 8 * day)} and ${new Date(now.getTime() - 6.5 * day)})`);
}
