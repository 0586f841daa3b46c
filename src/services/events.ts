import { and, asc, eq, gt, inArray, lte, type SQL, type SQLWrapper, sql } from "drizzle-orm";
import type { Db } from "../db/client";
import { apps, clients, type DeliveryState, type EventRow, type EventType, events } from "../db/schema";
import { AppError } from "../errors";

/**
 * The event log: one row per change of a branch's state, written in the same statement (or the same
 * `db.batch`, one transaction) as the change, so an event exists if and only if its change committed.
 * Only transitions are events: a thousand failed refreshes of one branch write one.
 *
 * Statement builders here return SQL to run in place of (or beside, in the same batch as) the state
 * change; the webhook delivery (src/services/webhooks.ts) reads the rows they write.
 */

/** Consecutive transient refresh failures (429, 5xx, timeouts) that make a connection `degraded`. */
export const DEGRADED_AFTER_FAILURES = 3;
export const LIST_MAX_LIMIT = 200;
/** Events deleted per statement when pruning, and statements per cron run. */
export const PRUNE_BATCH_SIZE = 1_000;
export const PRUNE_MAX_BATCHES = 10;

/**
 * What the invocation's state changes need to know to write events. `deliver` is false when no
 * WEBHOOK_URL is configured (events are then logged as `not_sent`); `written` collects the ids of
 * the events its changes wrote (noteEvents), so that the invocation's first delivery attempt sends
 * those and no one else's (a backlog is the cron's).
 */
export interface EventContext {
  deliver: boolean;
  written: number[];
}

export function eventContext(deliver: boolean): EventContext {
  return { deliver, written: [] };
}

/**
 * A connection's status as events name it, from a token row `t` (all columns null when the client
 * has none) and whether the client's credentials stand rejected (`rejected`, a boolean SQL
 * expression). In order of precedence: revoked (an operator's decision, or the user's at Google,
 * outranks the rest), account_disabled (held: Google disabled the account for hijacking, see
 * src/services/risc.ts), credentials_rejected (nothing works until the secret is fixed, not even a
 * new consent), never_connected, needs_reauth, degraded (DEGRADED_AFTER_FAILURES failed refreshes in a row),
 * connected. Events also use deleted, active and inactive.
 */
export function connectionStatusOf(t: string, rejected: string): SQL {
  return sql.raw(`(case
    when ${t}.status = 'revoked' then 'revoked'
    when ${t}.held_at is not null then 'account_disabled'
    when ${rejected} then 'credentials_rejected'
    when ${t}.id is null then 'never_connected'
    when ${t}.status = 'needs_reauth' or not ${t}.is_valid then 'needs_reauth'
    when ${t}.failure_count >= ${DEGRADED_AFTER_FAILURES} then 'degraded'
    else 'connected' end)`);
}

/** Whether the app of row `row` (an alias with an `app_id` column) stands rejected by the provider. */
export function appRejectedSql(row: string): string {
  return `exists (select 1 from apps ra where ra.id = ${row}.app_id and ra.credentials_rejected_at is not null)`;
}

/** The status from grant row `t` and branch row `c` (aliases in the outer query). */
export function connectionStatusSql(t: string, c: string): SQL {
  return connectionStatusOf(t, appRejectedSql(c));
}

/**
 * The connection status of branch `c` (an alias in the outer query) from its grant; `rejected`
 * overrides what its app says (for a statement that is changing it).
 */
export function currentStatusSql(c: string, rejected?: string): SQL {
  const flag = rejected ?? appRejectedSql(c);
  return sql`(select ${connectionStatusOf("t", flag)} from (select 1) one left join ${sql.raw("tokens")} t
      on t.id = ${sql.raw(c)}.grant_id)`;
}

/**
 * The event a change of status is, when a token row's change (a refresh result, a revocation)
 * moved the connection from `before` to `after` (SQL text columns): named by where it went.
 */
export function transitionTypeSql(before: SQL, after: SQL): SQL {
  return sql`(case when ${before} is distinct from ${after} then (case ${after}
    when 'connected' then 'connection.recovered'
    when 'degraded' then 'connection.degraded'
    when 'credentials_rejected' then 'connection.credentials_rejected'
    when 'needs_reauth' then 'connection.needs_reauth'
    when 'revoked' then 'connection.revoked'
    when 'account_disabled' then 'connection.account_disabled' end) end)`;
}

const INSERT_COLUMNS = sql.raw(
  "(type, client_id, branch_id, seq, status_before, status_after, reason, created_at, delivery_state, next_attempt_at)",
);

const GRANT_INSERT_COLUMNS = sql.raw(
  "(type, client_id, branch_id, seq, status_before, status_after, reason, created_at, delivery_state, next_attempt_at, grant_id)",
);

function deliveryValues(context: EventContext, now: Date): SQL {
  const state: DeliveryState = context.deliver ? "pending" : "not_sent";
  return context.deliver ? sql`${now}, ${state}, ${now}` : sql`${now}, ${state}, null`;
}

/**
 * Wraps a state change so that its transitions are recorded in the same statement.
 *
 * `change` is an UPDATE/INSERT/DELETE … RETURNING these columns:
 *   client_id, event_type (null when the row changed without a transition), status_before,
 *   status_after, reason;
 * with `seq: "bump"` (changes to token rows) the client's event_seq is bumped here for each event;
 * with `seq: "returned"` (changes to the client row itself, which cannot be updated twice in one
 * statement) the change bumps `event_seq` itself and also returns `branch_id` and `seq`.
 *
 * The statement answers one row: `changed` (rows the change touched, whether or not they were
 * transitions) and `event_ids`.
 */
export function withEvents(db: Db, context: EventContext, change: SQL, now: Date, seq: "bump" | "returned" = "bump") {
  const source =
    seq === "bump"
      ? sql`, source as (
          update ${clients} set event_seq = ${clients}.event_seq + 1
          from changed
          where ${clients}.id = changed.client_id and changed.event_type is not null
          returning ${clients}.id as client_id, ${clients}.branch_id, ${clients}.event_seq as seq,
            changed.event_type, changed.status_before, changed.status_after, changed.reason
        )`
      : sql`, source as (select * from changed where event_type is not null)`;
  return db.execute<{ changed: number; event_ids: number[] | string }>(sql`
    with changed as (${change})${source},
    inserted as (
      insert into ${events} ${INSERT_COLUMNS}
      select event_type, client_id, branch_id, seq, status_before, status_after, left(reason, 500),
        ${deliveryValues(context, now)}
      from source
      returning id
    )
    select (select count(*) from changed)::int as changed,
      coalesce((select json_agg(id order by id) from inserted), '[]'::json) as event_ids`);
}

/** What a grant's change does to its app's `credentials_rejected_at` in the same statement. */
export type RejectedAfter = "set" | "clear" | "keep";

/**
 * The RETURNING columns of an UPDATE of grant rows (`tokens`) that `tokenChangeWithEvents` wraps:
 * the grant, its app, and the connection's status before (the row as the statement found it, read
 * through a subquery, which sees the statement's snapshot, not its own change) and after the change.
 */
export function tokenChangeReturning(rejected: RejectedAfter) {
  const flag = rejected === "set" ? "true" : rejected === "clear" ? "false" : appRejectedSql('"tokens"');
  return {
    grantId: sql<number>`"tokens".id`.as("grant_id"),
    appId: sql<number | null>`"tokens".app_id`.as("app_id"),
    statusBefore: sql<string>`(select ${connectionStatusSql("p", "p")} from tokens p where p.id = "tokens".id)`.as(
      "status_before",
    ),
    statusAfter: sql<string>`${connectionStatusOf('"tokens"', flag)}`.as("status_after"),
  };
}

/**
 * One statement: `update` (an UPDATE of grant rows RETURNING tokenChangeReturning(rejected)), the
 * app's `credentials_rejected_at` set or cleared as `rejected` says (only for grants the update
 * changed), and for each grant whose change moved the connection to another status
 * (transitionTypeSql) one event per branch served from it (each with its own sequence number and
 * the grant's id), except `exceptBranch` (a consent writes that branch's own event). A change that
 * matches no row (a result whose lease was lost) writes nothing at all. Answers like withEvents:
 * `changed` and `event_ids`.
 */
export function tokenChangeWithEvents(
  db: Db,
  context: EventContext,
  update: SQLWrapper,
  change: { rejected: RejectedAfter; reason: string | null; exceptBranch?: number },
  now: Date,
) {
  const flag =
    change.rejected === "set"
      ? sql`, flagged as (update ${apps} set credentials_rejected_at = ${now} from typed where ${apps}.id = typed.app_id returning ${apps}.id)`
      : change.rejected === "clear"
        ? sql`, flagged as (update ${apps} set credentials_rejected_at = null from typed
            where ${apps}.id = typed.app_id and ${apps}.credentials_rejected_at is not null returning ${apps}.id)`
        : sql``;
  return db.execute<{ changed: number; event_ids: number[] | string }>(sql`
    with changed as (${update.getSQL()}),
    typed as (
      select grant_id, app_id, status_before, status_after,
        ${transitionTypeSql(sql.raw("status_before"), sql.raw("status_after"))} as event_type
      from changed
    )${flag},
    source as (
      update ${clients} set event_seq = ${clients}.event_seq + 1
      from typed
      where ${clients}.grant_id = typed.grant_id and typed.event_type is not null
        and ${clients}.id <> ${change.exceptBranch ?? -1}
      returning ${clients}.id as client_id, ${clients}.branch_id, ${clients}.event_seq as seq, typed.grant_id,
        typed.event_type, typed.status_before, typed.status_after
    ),
    inserted as (
      insert into ${events} ${GRANT_INSERT_COLUMNS}
      select event_type, client_id, branch_id, seq, status_before, status_after, left(${change.reason}::text, 500),
        ${deliveryValues(context, now)}, grant_id
      from source
      returning id
    )
    select (select count(*) from changed)::int as changed,
      coalesce((select json_agg(id order by id) from inserted), '[]'::json) as event_ids`);
}

/**
 * One statement: `update` (an UPDATE of grant rows RETURNING `grant_id`, `status` and `reason`) and,
 * for each grant it changed, one event of `type` per branch served from it, the status unchanged (a
 * notice, such as connection.expiring, not a transition). Answers like withEvents.
 */
export function grantNoticeWithEvents(db: Db, context: EventContext, update: SQLWrapper, type: EventType, now: Date) {
  return db.execute<{ changed: number; event_ids: number[] | string }>(sql`
    with changed as (${update.getSQL()}),
    source as (
      update ${clients} set event_seq = ${clients}.event_seq + 1
      from changed
      where ${clients}.grant_id = changed.grant_id
      returning ${clients}.id as client_id, ${clients}.branch_id, ${clients}.event_seq as seq, changed.grant_id,
        changed.status, changed.reason
    ),
    inserted as (
      insert into ${events} ${GRANT_INSERT_COLUMNS}
      select ${type}, client_id, branch_id, seq, status, status, left(reason, 500), ${deliveryValues(context, now)}, grant_id
      from source
      returning id
    )
    select (select count(*) from changed)::int as changed,
      coalesce((select json_agg(id order by id) from inserted), '[]'::json) as event_ids`);
}

/**
 * After a statement of withEvents (or one built on it) ran, batched or not: the events it wrote
 * are the invocation's to deliver first. Every caller of withEvents passes its result here.
 */
export function noteEvents(context: EventContext, result: unknown): number[] {
  const ids = writtenEventIds(result);
  context.written.push(...ids);
  return ids;
}

/**
 * One event for one client, for a change made by other statements of the same batch. Put it before
 * them when `before` reads the state they change. `type`, `before`, `after` and `reason` may be SQL
 * over `clients` (the client's row) to decide in the database; a null type writes nothing. `lock`
 * locks the client row even when no event is written, so the later statements of the batch see
 * the row this one decided on (no concurrent change slips between them).
 */
export function clientEvent(
  db: Db,
  context: EventContext,
  clientId: number,
  event: { type: EventType | SQL; before: string | SQL; after: string | SQL; reason?: string | SQL | null },
  now: Date,
  options: { lock?: boolean } = {},
) {
  return withEvents(
    db,
    context,
    sql`select ${clients}.id as client_id, (${event.type})::text as event_type,
          (${event.before})::text as status_before, (${event.after})::text as status_after,
          (${event.reason ?? null})::text as reason
        from ${clients} where ${clients}.id = ${clientId}${options.lock ? sql` for update` : sql``}`,
    now,
  );
}

/** The event ids a `withEvents` statement wrote (from its result, batched or not). */
export function writtenEventIds(result: unknown): number[] {
  const row = (result as { rows?: { event_ids?: unknown }[] }).rows?.[0];
  const ids = typeof row?.event_ids === "string" ? JSON.parse(row.event_ids) : row?.event_ids;
  return Array.isArray(ids) ? ids.map(Number) : [];
}

/** How many rows the change itself touched (to tell a conditional write that matched nothing). */
export function changedRows(result: unknown): number {
  return Number((result as { rows?: { changed?: unknown }[] }).rows?.[0]?.changed ?? 0);
}

// ---------------------------------------------------------------------------------------------
// The log.

export interface EventFilters {
  /** Cursor: only events with a larger id (the previous page's `next_cursor`). */
  after?: number | undefined;
  branchId?: string | undefined;
  clientId?: number | undefined;
  type?: EventType | undefined;
  limit: number;
}

/** A page of the log, oldest first: the audit trail of what happened to a branch. */
export async function listEvents(
  db: Db,
  filters: EventFilters,
): Promise<{ events: EventRow[]; nextCursor: number | null }> {
  const limit = Math.min(Math.max(1, filters.limit), LIST_MAX_LIMIT);
  const conditions = [
    filters.after === undefined ? undefined : gt(events.id, filters.after),
    filters.branchId === undefined ? undefined : eq(events.branchId, filters.branchId),
    filters.clientId === undefined ? undefined : eq(events.clientId, filters.clientId),
    filters.type === undefined ? undefined : eq(events.type, filters.type),
  ].filter((c) => c !== undefined);
  const rows = await db
    .select()
    .from(events)
    .where(conditions.length ? and(...conditions) : undefined)
    .orderBy(asc(events.id))
    .limit(limit);
  return { events: rows, nextCursor: rows.length === limit ? rows.at(-1)!.id : null };
}

export async function getEvent(db: Db, id: number): Promise<EventRow> {
  const [row] = await db.select().from(events).where(eq(events.id, id));
  if (!row) throw new AppError("not_found", `No event with id ${id}.`);
  return row;
}

/**
 * Queues an event for delivery again, whatever its state (delivered, failed, stopped, not sent):
 * a fresh ladder starting now. The caller makes the first attempt (the route, with waitUntil).
 */
export async function redeliverEvent(db: Db, id: number, now: Date): Promise<EventRow> {
  const [row] = await db
    .update(events)
    .set({ deliveryState: "pending", attempts: 0, nextAttemptAt: now, deliveredAt: null })
    .where(eq(events.id, id))
    .returning();
  if (!row) throw new AppError("not_found", `No event with id ${id}.`);
  return row;
}

// ---------------------------------------------------------------------------------------------
// The delivery queue (used by src/services/webhooks.ts).

/**
 * Claims up to `limit` due events in one statement: counts the attempt and moves `next_attempt_at`
 * to `claimUntil`, so a concurrent pass skips them and a crashed one gives them back then.
 */
export async function claimDueEvents(
  db: Db,
  now: Date,
  claimUntil: Date,
  limit: number,
  onlyIds?: number[],
): Promise<EventRow[]> {
  const due = db
    .select({ id: events.id })
    .from(events)
    .where(
      and(
        eq(events.deliveryState, "pending"),
        lte(events.nextAttemptAt, now),
        onlyIds ? inArray(events.id, onlyIds) : undefined,
      ),
    )
    .orderBy(asc(events.nextAttemptAt), asc(events.id))
    .limit(limit)
    .for("update", { skipLocked: true });
  const rows = await db
    .update(events)
    .set({ attempts: sql`${events.attempts} + 1`, nextAttemptAt: claimUntil, lastAttemptAt: now })
    .where(inArray(events.id, due))
    .returning();
  return rows.sort((a, b) => a.id - b.id);
}

/**
 * Gives back claims a pass took and did not use (it stopped before sending those events): each is
 * due again at `now`, without the attempt its claim counted. Only events still under that very claim
 * (pending, next_attempt_at the claim's end) change. Returns how many were given back.
 */
export async function releaseClaims(db: Db, claims: ReadonlyMap<number, Date>, now: Date): Promise<number> {
  const byEnd = new Map<number, number[]>();
  for (const [id, claimUntil] of claims) {
    const end = claimUntil.getTime();
    const ids = byEnd.get(end);
    if (ids) ids.push(id);
    else byEnd.set(end, [id]);
  }
  let released = 0;
  for (const [end, ids] of byEnd) {
    const rows = await db
      .update(events)
      .set({ attempts: sql`${events.attempts} - 1`, nextAttemptAt: now })
      .where(
        and(
          inArray(events.id, ids),
          eq(events.deliveryState, "pending"),
          eq(events.nextAttemptAt, new Date(end)),
          gt(events.attempts, 0),
        ),
      )
      .returning({ id: events.id });
    released += rows.length;
  }
  return released;
}

export interface DeliveryOutcome {
  id: number;
  state: "delivered" | "pending" | "failed" | "stopped";
  attemptedAt: Date;
  error: string | null;
  nextAttemptAt: Date | null;
}

/**
 * Records attempts in one statement (one round trip, one plan, however many outcomes: a batch of
 * one UPDATE per event cost the database a statement each).
 */
export async function recordDeliveries(db: Db, outcomes: DeliveryOutcome[]): Promise<void> {
  if (outcomes.length === 0) return;
  const rows = JSON.stringify(
    outcomes.map((outcome) => ({
      id: outcome.id,
      state: outcome.state,
      next_attempt_at: outcome.nextAttemptAt?.toISOString() ?? null,
      last_error: outcome.error,
      delivered_at: outcome.state === "delivered" ? outcome.attemptedAt.toISOString() : null,
    })),
  );
  await db.execute(sql`
    update ${events} set
      delivery_state = v.state,
      next_attempt_at = v.next_attempt_at,
      last_error = v.last_error,
      delivered_at = coalesce(v.delivered_at, ${events.deliveredAt})
    from json_to_recordset(${rows}::json)
      as v(id bigint, state text, next_attempt_at timestamptz, last_error text, delivered_at timestamptz)
    -- A redelivery requested meanwhile (attempts back to 0) wins over this older attempt's outcome.
    where ${events.id} = v.id and ${events.deliveryState} = 'pending' and ${events.attempts} > 0`);
}

/** After a 410 Gone: nothing else pending goes to that receiver. */
export async function stopPendingDeliveries(db: Db, reason: string): Promise<number> {
  const rows = await db
    .update(events)
    .set({ deliveryState: "stopped", nextAttemptAt: null, lastError: reason })
    .where(eq(events.deliveryState, "pending"))
    .returning({ id: events.id });
  return rows.length;
}

/**
 * Retention: deletes events older than `retentionDays`, PRUNE_BATCH_SIZE per statement and at most
 * PRUNE_MAX_BATCHES statements per call (the cron comes back for the rest). Events still pending
 * delivery are kept.
 */
export async function pruneEvents(db: Db, now: Date, retentionDays: number): Promise<number> {
  const cutoff = new Date(now.getTime() - retentionDays * 24 * 3600 * 1000);
  let pruned = 0;
  for (let batch = 0; batch < PRUNE_MAX_BATCHES; batch++) {
    const old = db
      .select({ id: events.id })
      .from(events)
      .where(and(sql`${events.createdAt} < ${cutoff}`, sql`${events.deliveryState} <> 'pending'`))
      .orderBy(asc(events.id))
      .limit(PRUNE_BATCH_SIZE);
    const deleted = await db.delete(events).where(inArray(events.id, old)).returning({ id: events.id });
    pruned += deleted.length;
    if (deleted.length < PRUNE_BATCH_SIZE) break;
  }
  return pruned;
}
