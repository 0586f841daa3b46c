import { and, asc, eq, gt, inArray, isNotNull, isNull, lt, lte, or, sql } from "drizzle-orm";
import { createServices, type Services } from "../context";
import type { Db } from "../db/client";
import { leaseIsFree } from "../db/queries";
import { apps, clients, tokens } from "../db/schema";
import { forEachLane, MAX_OUTBOUND_CONNECTIONS } from "../lib/concurrency";
import { open, SealedValueError } from "../lib/crypto";
import { describeError, logError, logInfo, logWarn } from "../lib/log";
import { type MetricSource, type RefreshRecorder, refreshRecorder } from "../lib/metrics";
import { ProviderError, refreshGrant } from "../oauth/provider";
import { appCredentials } from "./apps";
import { sweepTimeLimitedGrants } from "./grants";
import { leaseMsFor } from "./refresh-policy";
import {
  appliedOf,
  claimLeases,
  failureStatements,
  holdOf,
  type Leased,
  type LeaseHold,
  PERSIST_ATTEMPTS,
  parkedStatements,
  persistInBackground,
  REQUEST_BACKGROUND_BUDGET_MS,
  type ResultWrite,
  recordsDeadGrant,
  refreshedValues,
  successStatement,
} from "./tokens";

/**
 * The Cron Trigger's job: refresh every token that expires within CRON_REFRESH_WINDOW_SECONDS, oldest
 * expiry first, at most CRON_MAX_REFRESHES per run. Provider calls run with bounded concurrency;
 * leases are claimed for several lanes in one statement, at most CLAIM_AHEAD_MS ahead of the calls
 * (see Claimer), and results are written in batches (group commit). What one run may not refresh
 * goes to REFRESH_QUEUE when that binding exists, else to the next run.
 */

export const PROVIDER_CONCURRENCY = MAX_OUTBOUND_CONNECTIONS;
/** Results are written when this many are pending, or FLUSH_INTERVAL_MS after the first one. */
export const FLUSH_BATCH_SIZE = 50;
export const FLUSH_INTERVAL_MS = 250;
/** At most this many tokens beyond the cap are handed to the queue per run. */
export const QUEUE_FANOUT_LIMIT = 10_000;
export const QUEUE_MESSAGE_TOKENS = 50;
/**
 * How far ahead of its provider call a token may be claimed. A claim statement covers the lanes
 * free now plus what the lanes will start within this window at the pace of the calls so far, and
 * its lease is longer by this much, so the lease still outlives the wait, the call and the write.
 * A token claimed ahead that is still waiting when the window ends is claimed again (renewing our
 * lease) before its call starts.
 */
export const CLAIM_AHEAD_MS = 1_000;
/** At most this many tokens per claim statement. */
export const CLAIM_BATCH_MAX = 100;

export interface RefreshMessage {
  tokenIds: number[];
  /**
   * A check rather than a due refresh (the proxy's second 401 with a fresh token): refreshed
   * whatever their expiry, so the provider's token endpoint says whether the grant still lives.
   */
  check?: boolean;
  /**
   * A check (Cross-Account Protection's sessions-revoked, src/services/risc.ts): refresh these
   * grants whatever their expiry, unless one was refreshed at or after this instant (ISO 8601).
   */
  checkSince?: string;
}

/** A check message refreshes its tokens if they expire within this window: any live token. */
const CHECK_WINDOW_SECONDS = 366 * 24 * 60 * 60;

export interface SchedulerEnv extends Env {
  REFRESH_QUEUE?: Queue<RefreshMessage>;
}

/** What refreshing needs of the invocation's services. */
export interface RefreshDeps extends Pick<Services, "db" | "keyring" | "providers" | "events"> {
  /** How long a refresh lease lasts: leaseMsFor(OAUTH_TIMEOUT_MS); tests inject a shorter one. */
  leaseMs: number;
  /** How long a rotated refresh token whose write failed is retried before it is given up. */
  persistBudgetMs: number;
  /** Only what expires within this many seconds is (still) due. */
  windowSeconds: number;
  /** CLAIM_AHEAD_MS; tests inject other windows. */
  claimAheadMs: number;
  /** One data point per provider refresh (src/lib/metrics.ts). */
  onRefreshOutcome?: RefreshRecorder;
}

export interface RefreshCounts {
  refreshed: number;
  failed: number;
  dead: number;
  skipped: number;
  /** Results not written because the lease was lost to another refresher (logged). */
  dropped: number;
  /** Results that could not be written after every retry (logged). */
  unsaved: number;
}

export interface CronSummary extends RefreshCounts {
  due: number;
  queued: number;
  duration_ms: number;
}

/**
 * Cron and queue invocations may run for minutes (15 min of wall-clock time), unlike a request's
 * waitUntil (30 s after the response): a rotated refresh token whose write failed is retried for
 * this long, inside the invocation, and stays well short of the next cron run.
 */
export const INVOCATION_PERSIST_BUDGET_MS = 2 * 60_000;

export function refreshDeps(d: Services, source: MetricSource = "cron"): RefreshDeps {
  return {
    db: d.db,
    keyring: d.keyring,
    providers: d.providers,
    events: d.events,
    leaseMs: leaseMsFor(d.config.OAUTH_TIMEOUT_MS),
    persistBudgetMs: INVOCATION_PERSIST_BUDGET_MS,
    windowSeconds: d.config.CRON_REFRESH_WINDOW_SECONDS,
    claimAheadMs: CLAIM_AHEAD_MS,
    onRefreshOutcome: refreshRecorder(d.metrics, source),
  };
}

export async function runScheduledRefresh(env: SchedulerEnv, now: Date): Promise<CronSummary> {
  const started = Date.now();
  const d = await createServices(env);
  const max = d.config.CRON_MAX_REFRESHES;
  // Time-limited access: warn ahead of its end, and stop serving (needs_reauth) once it ended.
  const timeLimited = await sweepTimeLimitedGrants(d.db, d.events, now, d.config.GRANT_EXPIRY_WARNING_SECONDS);
  const dueIds = await selectDue(d.db, now, d.config.CRON_REFRESH_WINDOW_SECONDS, max + QUEUE_FANOUT_LIMIT);
  const mine = dueIds.slice(0, max);
  const rest = dueIds.slice(max);
  let queued = 0;
  if (rest.length > 0 && env.REFRESH_QUEUE) {
    const messages = chunk(rest, QUEUE_MESSAGE_TOKENS).map((tokenIds) => ({ body: { tokenIds } }));
    for (const group of chunk(messages, 100)) await env.REFRESH_QUEUE.sendBatch(group);
    queued = rest.length;
  }
  const counts = await refreshTokens(refreshDeps(d), mine, now);
  const summary: CronSummary = {
    due: dueIds.length,
    ...counts,
    skipped: counts.skipped + (rest.length - queued),
    queued,
    duration_ms: Date.now() - started,
  };
  logInfo("scheduled_refresh", {
    ...summary,
    access_ending: timeLimited.warned,
    access_ended: timeLimited.ended,
    now: now.toISOString(),
  });
  return summary;
}

/**
 * The queue consumer: the same refresh code, for the ids a cron run handed over. The claim
 * re-checks each token (still due, not leased, not refreshed meanwhile), so a message delivered
 * twice refreshes nothing twice. Messages that ask the same thing (due refreshes, or checks since
 * the same instant) share one run of the lanes: a batch of ten 50-token messages is one pool of 500,
 * not ten pools that each ramp up and drain. A run that fails retries its messages; the others are acked.
 */
export async function consumeRefreshBatch(env: Env, batch: MessageBatch<RefreshMessage>, now: Date): Promise<void> {
  const started = Date.now();
  const d = refreshDeps(await createServices(env), "queue");
  const runs = new Map<string, Message<RefreshMessage>[]>();
  for (const message of batch.messages) {
    const { check, checkSince } = message.body;
    const kind = `${check === true}|${checkSince ?? ""}`;
    runs.set(kind, [...(runs.get(kind) ?? []), message]);
  }
  for (const messages of runs.values()) {
    const { check, checkSince } = messages[0]!.body;
    const tokenIds = [...new Set(messages.flatMap((message) => message.body.tokenIds))];
    try {
      const deps = check ? { ...d, windowSeconds: CHECK_WINDOW_SECONDS } : d;
      const since = checkSince === undefined ? undefined : { refreshedBefore: new Date(checkSince) };
      const counts = await refreshTokens(deps, tokenIds, now, since);
      logInfo("queued_refresh", {
        ...counts,
        tokens: tokenIds.length,
        messages: messages.length,
        ...(check || since ? { check: true } : {}),
      });
      for (const message of messages) message.ack();
    } catch (error) {
      logError("queued_refresh_failed", { messages: messages.length, error: describeError(error) });
      for (const message of messages) message.retry({ delaySeconds: 30 });
    }
  }
  // One line per invocation, so operators (and the scale bench) can count invocations.
  logInfo("queued_refresh_batch", { messages: batch.messages.length, duration_ms: Date.now() - started });
}

/**
 * Cross-Account Protection's sessions-revoked: the grants are checked by a refresh (a dead one moves
 * to needs_reauth as any failed refresh would; nothing is marked dead on the event alone). Through
 * REFRESH_QUEUE when it is bound, else in the invocation's background (`defer`).
 */
export async function requestGrantCheck(
  env: SchedulerEnv,
  services: Services,
  tokenIds: number[],
  now: Date,
  defer: (task: Promise<unknown>) => void,
): Promise<void> {
  if (tokenIds.length === 0) return;
  const checkSince = now.toISOString();
  if (env.REFRESH_QUEUE) {
    try {
      for (const ids of chunk(tokenIds, QUEUE_MESSAGE_TOKENS)) {
        await env.REFRESH_QUEUE.send({ tokenIds: ids, checkSince });
      }
      logInfo("grant_check_queued", { tokens: tokenIds.length });
      return;
    } catch (error) {
      // The event is recorded (a redelivery will not ask again): check here rather than not at all.
      // A message sent before the failure makes no second refresh (checkSince).
      logWarn("grant_check_queue_failed", { tokens: tokenIds.length, error: describeError(error) });
    }
  }
  defer(
    refreshTokens(
      { ...refreshDeps(services, "request"), persistBudgetMs: REQUEST_BACKGROUND_BUDGET_MS },
      tokenIds,
      now,
      {
        refreshedBefore: now,
      },
    ).then(
      (counts) => logInfo("grant_check", { ...counts, tokens: tokenIds.length }),
      (error) => logError("grant_check_failed", { error: describeError(error) }),
    ),
  );
}

/** Ids of the tokens due for refresh, oldest expiry first. */
export async function selectDue(db: Db, now: Date, windowSeconds: number, limit: number): Promise<number[]> {
  const rows = await db
    .select({ id: tokens.id })
    .from(tokens)
    .innerJoin(apps, eq(apps.id, tokens.appId))
    .where(and(refreshable(now), due(now, windowSeconds)))
    .orderBy(asc(tokens.expiresAt))
    .limit(limit);
  return rows.map((row) => row.id);
}

function due(now: Date, windowSeconds: number) {
  return lte(tokens.expiresAt, new Date(now.getTime() + windowSeconds * 1000));
}

/** A token the scheduler may refresh now: current, alive, not in backoff, not leased, client usable. */
function refreshable(now: Date) {
  return and(eligible(now), leaseIsFree());
}

/** refreshable() but for the lease, which claimLeases checks itself. */
function eligible(now: Date) {
  return and(
    eq(tokens.isValid, true),
    eq(tokens.status, "active"),
    // Held by Cross-Account Protection (the account was hijacked): refreshes pause until released.
    isNull(tokens.heldAt),
    isNotNull(tokens.refreshToken),
    or(isNull(tokens.nextAttemptAt), lte(tokens.nextAttemptAt, now)),
    // Time-limited access that has ended is not refreshed (the sweep moves it to needs_reauth).
    or(isNull(tokens.refreshTokenExpiresAt), gt(tokens.refreshTokenExpiresAt, now)),
    // Some active branch is served from the grant, and its app's credentials are not rejected.
    sql`exists (select 1 from ${clients} where ${clients.grantId} = ${tokens.id} and ${clients.isActive})`,
    isNull(apps.credentialsRejectedAt),
  );
}

/**
 * Refreshes the given tokens (those still due and refreshable when claimed). PROVIDER_CONCURRENCY
 * lanes call the provider; leases are claimed for several lanes per statement, never more than
 * CLAIM_AHEAD_MS before a call starts (Claimer). Results are written in batches (group commit),
 * each write conditional on the lease.
 */
export async function refreshTokens(
  d: RefreshDeps,
  ids: number[],
  now: Date,
  check?: { refreshedBefore: Date },
): Promise<RefreshCounts> {
  // Due by expiry, or (a check) not refreshed since it was asked for: a redelivered check refreshes nothing twice.
  const wanted = check
    ? or(isNull(tokens.lastRefreshedAt), lt(tokens.lastRefreshedAt, check.refreshedBefore))
    : due(now, d.windowSeconds);
  const counts: RefreshCounts = { refreshed: 0, failed: 0, dead: 0, skipped: 0, dropped: 0, unsaved: 0 };
  const started = Date.now();
  const at = () => new Date(now.getTime() + (Date.now() - started));
  const owner = crypto.randomUUID();
  const writer = new BatchWriter(d, counts);
  const claimer = new Claimer(
    ids,
    (batch, ahead, renewOwn) =>
      claimLeases(
        d.db,
        and(inArray(tokens.id, batch), eligible(now), wanted),
        owner,
        d.leaseMs + (ahead ? d.claimAheadMs : 0),
        { renewOwn },
      ),
    counts,
    PROVIDER_CONCURRENCY,
    d.claimAheadMs,
  );
  // A claim that fails (the database) stops every lane from starting another call, but the calls
  // already started finish and their results are written before the failure is rethrown: the
  // invocation must not end with a rotated refresh token awaited by nothing.
  let claimFailed: { error: unknown } | undefined;
  const nextClaimed = async (): Promise<Leased | undefined> => {
    if (claimFailed) return undefined;
    try {
      return await claimer.next();
    } catch (error) {
      claimFailed ??= { error };
      return undefined;
    }
  };
  await forEachLane(PROVIDER_CONCURRENCY, async () => {
    for (let leased = await nextClaimed(); leased; leased = await nextClaimed()) {
      const { token, app } = leased;
      const hold = holdOf(leased, owner);
      const sentAt = at();
      const callStarted = Date.now();
      try {
        const issued = await refreshGrant(
          d.providers.of(app),
          await appCredentials(d.keyring, app),
          await open(d.keyring, token.refreshToken!, { column: "tokens.refresh_token", clientId: token.clientId }),
        );
        claimer.observe(Date.now() - callStarted);
        d.onRefreshOutcome?.(token, "refreshed", undefined, Date.now() - callStarted);
        const values = await refreshedValues(d.keyring, token.clientId, issued, sentAt);
        writer.push({
          write: [successStatement(d.db, d.events, hold, values)],
          outcome: "refreshed",
          hold,
          rotated: values.refreshToken !== undefined,
        });
      } catch (error) {
        claimer.observe(Date.now() - callStarted);
        if (error instanceof SealedValueError) {
          // A stored value that does not open: no retry can help. Parked until an operator fixes it.
          logError("sealed_value_unreadable", { grant: token.id, error: describeError(error) });
          writer.push({
            write: parkedStatements(d.db, d.events, hold, error, at()),
            outcome: "failed",
            hold,
            rotated: false,
          });
          continue;
        }
        const failure = error instanceof ProviderError ? error : new ProviderError("network", describeError(error));
        d.onRefreshOutcome?.(
          token,
          recordsDeadGrant(failure, hold) ? "dead" : "failed",
          failure.kind,
          Date.now() - callStarted,
        );
        writer.push({
          write: failureStatements(d.db, d.events, token, hold, failure, at()),
          outcome: recordsDeadGrant(failure, hold) ? "dead" : "failed",
          hold,
          rotated: false,
        });
      }
    }
  });
  await writer.drain();
  if (claimFailed) throw claimFailed.error;
  return counts;
}

/**
 * Hands leased tokens to lanes. One claim statement covers the lanes waiting now plus what the
 * lanes will start within `aheadMs` at the pace of the calls so far (none before the first call
 * ends), up to CLAIM_BATCH_MAX; the next one is sent while half of that is still ready, so lanes
 * rarely wait on a claim. A claim that includes tokens for later is leased `aheadMs` longer. A
 * token still unstarted `aheadMs` after its claim was sent is not handed out: it is claimed again
 * (our lease renewed from the database's clock), so every call starts with a full lease ahead.
 */
class Claimer {
  private readonly ready: { leased: Leased; claimSentAt: number }[] = [];
  private readonly pending: number[];
  /** Our own claims that went stale before a lane took them. */
  private readonly stale: number[] = [];
  private waiting = 0;
  private claiming: Promise<void> | undefined;
  /** Running mean of a provider call's duration (ms), once one has ended. */
  private callMs: number | undefined;

  constructor(
    ids: number[],
    private readonly claim: (ids: number[], ahead: boolean, renewOwn: boolean) => Promise<Leased[]>,
    private readonly counts: RefreshCounts,
    private readonly lanes: number,
    private readonly aheadMs: number,
  ) {
    this.pending = [...ids];
  }

  /** A provider call took this long: the size of later claims follows the pace. */
  observe(ms: number): void {
    this.callMs = this.callMs === undefined ? ms : 0.8 * this.callMs + 0.2 * ms;
  }

  async next(): Promise<Leased | undefined> {
    for (;;) {
      const now = Date.now();
      for (let item = this.ready.shift(); item; item = this.ready.shift()) {
        if (now - item.claimSentAt <= this.aheadMs) {
          this.refill();
          return item.leased;
        }
        this.stale.push(item.leased.token.id);
      }
      if (!this.claiming && this.pending.length === 0 && this.stale.length === 0) return undefined;
      this.waiting++;
      try {
        this.claiming ??= this.claimBatch();
        await this.claiming;
      } finally {
        this.waiting--;
      }
    }
  }

  /** How many tokens the lanes start within the window at the current pace (0 before any call ended). */
  private perWindow(): number {
    if (this.callMs === undefined) return 0;
    return Math.floor((this.lanes * this.aheadMs) / Math.max(1, this.callMs));
  }

  /** Claims ahead in the background while less than half a window's worth is ready. */
  private refill(): void {
    if (this.claiming || this.pending.length + this.stale.length === 0) return;
    if (this.ready.length * 2 >= this.perWindow()) return;
    this.claiming = this.claimBatch();
    // A failure surfaces to the lane that awaits the next claim.
    this.claiming.catch(() => undefined);
  }

  private async claimBatch(): Promise<void> {
    // Let every lane that is free right now line up before counting them.
    await Promise.resolve();
    try {
      const wanted = Math.min(CLAIM_BATCH_MAX, Math.max(this.waiting, 1) + this.perWindow() - this.ready.length);
      const renewed = this.stale.splice(0, wanted);
      const ids = [...renewed, ...this.pending.splice(0, Math.max(0, wanted - renewed.length))];
      const claimSentAt = Date.now();
      let leased: Leased[];
      try {
        leased = await this.claim(ids, ids.length > this.waiting, renewed.length > 0);
      } catch (error) {
        // Nothing is lost: the ids go back, and the lane that awaits this claim sees the failure.
        this.stale.unshift(...renewed);
        this.pending.unshift(...ids.slice(renewed.length));
        throw error;
      }
      this.counts.skipped += ids.length - leased.length;
      for (const one of leased) this.ready.push({ leased: one, claimSentAt });
    } finally {
      this.claiming = undefined;
    }
  }
}

interface PendingResult {
  write: ResultWrite;
  outcome: "refreshed" | "failed" | "dead";
  hold: LeaseHold;
  rotated: boolean;
}

/**
 * Group commit: results wait at most FLUSH_INTERVAL_MS (or until FLUSH_BATCH_SIZE are pending) and
 * are written in one batch, well inside the lease (LEASE_WRITE_ALLOWANCE_MS). A batch that keeps
 * failing is retried; after that, each rotated refresh token in it is retried on its own for
 * persistBudgetMs (it exists nowhere else), and the rest is counted unsaved.
 */
class BatchWriter {
  private pending: PendingResult[] = [];
  private chain: Promise<void> = Promise.resolve();
  private timer: ReturnType<typeof setTimeout> | undefined;
  private readonly late: Promise<void>[] = [];

  constructor(
    private readonly d: RefreshDeps,
    private readonly counts: RefreshCounts,
  ) {}

  push(result: PendingResult): void {
    this.pending.push(result);
    if (this.pending.length >= FLUSH_BATCH_SIZE) this.flush();
    else this.timer ??= setTimeout(() => this.flush(), FLUSH_INTERVAL_MS);
  }

  async drain(): Promise<void> {
    this.flush();
    await this.chain;
    await Promise.all(this.late);
  }

  private flush(): void {
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
    const results = this.pending.splice(0);
    if (results.length > 0) this.chain = this.chain.then(() => this.write(results));
  }

  private async write(results: PendingResult[]): Promise<void> {
    const statements = results.flatMap((r) => r.write) as ResultWrite;
    for (let attempt = 1; attempt <= PERSIST_ATTEMPTS; attempt++) {
      try {
        const written = (await this.d.db.batch(statements)) as unknown[];
        let end = 0;
        for (const result of results) {
          end += result.write.length;
          this.record(result, appliedOf(written[end - 1]).written);
        }
        return;
      } catch (error) {
        if (attempt === PERSIST_ATTEMPTS) {
          // A result without a rotated refresh token loses nothing (the stored one still works);
          // a rotated one is retried on its own, and logs an error only if it never lands.
          const rotated = results.filter((r) => r.rotated);
          logWarn("refresh_results_not_persisted", {
            results: results.length,
            retried_in_background: rotated.length,
            error: describeError(error),
          });
          for (const result of rotated) this.late.push(this.persistLate(result));
          this.counts.unsaved += results.length - rotated.length;
          return;
        }
        await new Promise((resolve) => setTimeout(resolve, 100 * 2 ** (attempt - 1)));
      }
    }
  }

  private async persistLate(result: PendingResult): Promise<void> {
    const outcome = await persistInBackground(this.d.db, result.write, result.hold, this.d.persistBudgetMs);
    if (outcome === "lost") this.counts.unsaved++;
    else this.record(result, outcome === "stored");
  }

  private record(result: PendingResult, written: boolean): void {
    if (written) {
      this.counts[result.outcome]++;
      return;
    }
    this.counts.dropped++;
    logWarn("refresh_result_dropped", {
      token: result.hold.tokenId,
      outcome: result.outcome,
      rotated: result.rotated,
      reason: "superseded",
    });
  }
}

function chunk<T>(items: T[], size: number): T[][] {
  const out: T[][] = [];
  for (let i = 0; i < items.length; i += size) out.push(items.slice(i, i + size));
  return out;
}
