import { sql } from "drizzle-orm";
import type { Db } from "../db/client";
import { type BranchListRow, listBranches } from "./branch-list";
import { DEGRADED_AFTER_FAILURES } from "./events";
import { selectDue } from "./scheduled";

/**
 * The console's health page, from the database alone (the METRICS dataset has every refresh and
 * webhook attempt; this page must work without it). What each number is:
 *
 *   - refreshes: grants whose current token was refreshed within the period (tokens.last_refreshed_at:
 *     a grant refreshed twelve times counts once), grants failing right now (failure_count > 0,
 *     still active: in backoff), and the connection.* transitions of the period from the event log
 *     (lost, credentials rejected, degraded, recovered); not every refresh writes an event, only a
 *     change of status does;
 *   - grants needing consent: branches whose connection status is needs_reauth, from the branch list;
 *   - webhook failures: events whose delivery ladder ran out in the period (delivery_state failed)
 *     and events still being retried (pending after at least one attempt);
 *   - the oldest token still due: what the cron would take first (the scheduler's own selectDue),
 *     with its expiry and its last failure.
 */

/** The period the page covers. */
export const HEALTH_PERIOD_HOURS = 24;
/** Rows listed per section (the counts cover all). */
export const HEALTH_LIST_LIMIT = 10;

export interface HealthReport {
  since: Date;
  refreshes: {
    grantsRefreshed: number;
    grantsFailing: number;
    grantsDegraded: number;
    transitions: Record<"needs_reauth" | "credentials_rejected" | "degraded" | "recovered", number>;
  };
  consent: { needsReauth: number; credentialsRejected: number; branches: BranchListRow[] };
  webhooks: {
    failed: number;
    retrying: number;
    events: WebhookFailure[];
  };
  oldestDue: OldestDue | null;
}

export interface WebhookFailure {
  id: number;
  type: string;
  clientId: number;
  branchId: string;
  deliveryState: string;
  attempts: number;
  lastError: string | null;
  lastAttemptAt: Date | null;
  nextAttemptAt: Date | null;
}

export interface OldestDue {
  tokenId: number;
  clientId: number;
  branchId: string;
  expiresAt: Date;
  lastRefreshedAt: Date | null;
  failureCount: number;
  lastError: string | null;
  nextAttemptAt: Date | null;
}

const date = (value: unknown) => (value === null || value === undefined ? null : new Date(String(value)));
const count = (value: unknown) => Number(value ?? 0);

export async function healthReport(db: Db, now: Date, dueWindowSeconds: number): Promise<HealthReport> {
  const since = new Date(now.getTime() - HEALTH_PERIOD_HOURS * 3600 * 1000);
  const sinceIso = since.toISOString();
  const [counts, failures] = await db.batch([
    db.execute(sql`select
        (select count(*) from tokens where is_valid and last_refreshed_at >= ${sinceIso}::timestamptz) as refreshed,
        (select count(*) from tokens where is_valid and status = 'active' and failure_count > 0) as failing,
        (select count(*) from tokens where is_valid and status = 'active'
           and failure_count >= ${DEGRADED_AFTER_FAILURES}) as degraded,
        (select count(*) from events where created_at >= ${sinceIso}::timestamptz
           and type = 'connection.needs_reauth') as lost,
        (select count(*) from events where created_at >= ${sinceIso}::timestamptz
           and type = 'connection.credentials_rejected') as rejected,
        (select count(*) from events where created_at >= ${sinceIso}::timestamptz
           and type = 'connection.degraded') as went_degraded,
        (select count(*) from events where created_at >= ${sinceIso}::timestamptz
           and type = 'connection.recovered') as recovered,
        (select count(*) from events where delivery_state = 'failed'
           and last_attempt_at >= ${sinceIso}::timestamptz) as webhooks_failed,
        (select count(*) from events where delivery_state = 'pending' and attempts > 0) as webhooks_retrying`),
    db.execute(sql`select id, type, client_id, branch_id, delivery_state, attempts, last_error, last_attempt_at,
        next_attempt_at from events
      where (delivery_state = 'failed' and last_attempt_at >= ${sinceIso}::timestamptz)
         or (delivery_state = 'pending' and attempts > 0)
      order by last_attempt_at desc nulls last, id desc limit ${HEALTH_LIST_LIMIT}`),
  ]);
  const c = (counts.rows[0] ?? {}) as Record<string, unknown>;
  const consent = await listBranches(db, { status: "needs_reauth", limit: HEALTH_LIST_LIMIT });
  const [dueId] = await selectDue(db, now, dueWindowSeconds, 1);
  let oldestDue: OldestDue | null = null;
  if (dueId !== undefined) {
    const result = await db.execute(sql`select t.id, t.client_id, c.branch_id, t.expires_at, t.last_refreshed_at,
        t.failure_count, t.last_error, t.next_attempt_at
      from tokens t join lateral (select * from clients c where c.grant_id = t.id order by c.id limit 1) c on true
      where t.id = ${dueId}`);
    const row = result.rows[0] as Record<string, unknown> | undefined;
    if (row) {
      oldestDue = {
        tokenId: Number(row.id),
        clientId: Number(row.client_id),
        branchId: String(row.branch_id),
        expiresAt: date(row.expires_at)!,
        lastRefreshedAt: date(row.last_refreshed_at),
        failureCount: Number(row.failure_count),
        lastError: (row.last_error as string | null) ?? null,
        nextAttemptAt: date(row.next_attempt_at),
      };
    }
  }
  return {
    since,
    refreshes: {
      grantsRefreshed: count(c.refreshed),
      grantsFailing: count(c.failing),
      grantsDegraded: count(c.degraded),
      transitions: {
        needs_reauth: count(c.lost),
        credentials_rejected: count(c.rejected),
        degraded: count(c.went_degraded),
        recovered: count(c.recovered),
      },
    },
    consent: {
      needsReauth: consent.counts.needs_reauth,
      credentialsRejected: consent.counts.credentials_rejected,
      branches: consent.rows,
    },
    webhooks: {
      failed: count(c.webhooks_failed),
      retrying: count(c.webhooks_retrying),
      events: (failures.rows as Record<string, unknown>[]).map((row) => ({
        id: Number(row.id),
        type: String(row.type),
        clientId: Number(row.client_id),
        branchId: String(row.branch_id),
        deliveryState: String(row.delivery_state),
        attempts: Number(row.attempts),
        lastError: (row.last_error as string | null) ?? null,
        lastAttemptAt: date(row.last_attempt_at),
        nextAttemptAt: date(row.next_attempt_at),
      })),
    },
    oldestDue,
  };
}
