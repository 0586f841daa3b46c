import { and, asc, eq, inArray, isNotNull, isNull, lte, or } from "drizzle-orm";
import { createServices, type Services } from "../context";
import type { Db } from "../db/client";
import { leaseIsFree } from "../db/queries";
import { clients, tokens } from "../db/schema";
import { MAX_OUTBOUND_CONNECTIONS } from "../lib/concurrency";
import { open } from "../lib/crypto";
import { describeError, logError, logInfo, logWarn } from "../lib/log";
import { ProviderError, refreshGrant } from "../oauth/provider";
import { leaseMsFor } from "./refresh-policy";
import {
  appliedOf,
  claimLeases,
  failureStatements,
  holdOf,
  type Leased,
  type LeaseHold,
  PERSIST_ATTEMPTS,
  persistInBackground,
  type ResultWrite,
  recordsDeadGrant,
  refreshedValues,
  successStatement,
} from "./tokens";

/**
 * The Cron Trigger's job: refresh every token that expires within CRON_REFRESH_WINDOW_SECONDS, oldest
 * expiry first, at most CRON_MAX_REFRESHES per run. Provider calls run with bounded concurrency; a
 * lease is claimed for the lanes free at that moment (one statement), and results are written in
 * batches (group commit). What one run may not refresh goes to REFRESH_QUEUE when that binding
 * exists, else to the next run.
 */

export const PROVIDER_CONCURRENCY = MAX_OUTBOUND_CONNECTIONS;
/** Results are written when this many are pending, or FLUSH_INTERVAL_MS after the first one. */
export const FLUSH_BATCH_SIZE = 50;
export const FLUSH_INTERVAL_MS = 250;
/** At most this many tokens beyond the cap are handed to the queue per run. */
export const QUEUE_FANOUT_LIMIT = 10_000;
export const QUEUE_MESSAGE_TOKENS = 50;

export interface RefreshMessage {
  tokenIds: number[];
}

export interface SchedulerEnv extends Env {
  REFRESH_QUEUE?: Queue<RefreshMessage>;
}

/** What refreshing needs of the invocation's services. */
export interface RefreshDeps extends Pick<Services, "db" | "keyring" | "provider" | "events"> {
  /** How long a refresh lease lasts: leaseMsFor(OAUTH_TIMEOUT_MS); tests inject a shorter one. */
  leaseMs: number;
  /** How long a rotated refresh token whose write failed is retried before it is given up. */
  persistBudgetMs: number;
  /** Only what expires within this many seconds is (still) due. */
  windowSeconds: number;
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

export function refreshDeps(d: Services): RefreshDeps {
  return {
    db: d.db,
    keyring: d.keyring,
    provider: d.provider,
    events: d.events,
    leaseMs: leaseMsFor(d.config.OAUTH_TIMEOUT_MS),
    persistBudgetMs: INVOCATION_PERSIST_BUDGET_MS,
    windowSeconds: d.config.CRON_REFRESH_WINDOW_SECONDS,
  };
}

export async function runScheduledRefresh(env: SchedulerEnv, now: Date): Promise<CronSummary> {
  const started = Date.now();
  const d = await createServices(env);
  const max = d.config.CRON_MAX_REFRESHES;
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
  logInfo("scheduled_refresh", { ...summary, now: now.toISOString() });
  return summary;
}

/**
 * The queue consumer: the same refresh code, for the ids a cron run handed over. The claim
 * re-checks each token (still due, not leased, not refreshed meanwhile), so a message delivered
 * twice refreshes nothing twice.
 */
export async function consumeRefreshBatch(env: Env, batch: MessageBatch<RefreshMessage>, now: Date): Promise<void> {
  const started = Date.now();
  const d = refreshDeps(await createServices(env));
  for (const message of batch.messages) {
    try {
      const counts = await refreshTokens(d, message.body.tokenIds, now);
      logInfo("queued_refresh", { ...counts, tokens: message.body.tokenIds.length });
      message.ack();
    } catch (error) {
      logError("queued_refresh_failed", { error: describeError(error) });
      message.retry({ delaySeconds: 30 });
    }
  }
  // One line per invocation, so operators (and the scale bench) can count invocations.
  logInfo("queued_refresh_batch", { messages: batch.messages.length, duration_ms: Date.now() - started });
}

/** Ids of the tokens due for refresh, oldest expiry first. */
export async function selectDue(db: Db, now: Date, windowSeconds: number, limit: number): Promise<number[]> {
  const rows = await db
    .select({ id: tokens.id })
    .from(tokens)
    .innerJoin(clients, eq(clients.id, tokens.clientId))
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
  return and(
    eq(tokens.isValid, true),
    eq(tokens.status, "active"),
    isNotNull(tokens.refreshToken),
    or(isNull(tokens.nextAttemptAt), lte(tokens.nextAttemptAt, now)),
    leaseIsFree(),
    eq(clients.isActive, true),
    isNull(clients.credentialsRejectedAt),
  );
}

/**
 * Refreshes the given tokens (those still due and refreshable when claimed). PROVIDER_CONCURRENCY
 * lanes call the provider; a token is leased only when a lane is free to start on it (one claim
 * statement for all lanes free at that moment), so no lease waits behind other calls. Results are
 * written in batches (group commit), each write conditional on the lease.
 */
export async function refreshTokens(d: RefreshDeps, ids: number[], now: Date): Promise<RefreshCounts> {
  const counts: RefreshCounts = { refreshed: 0, failed: 0, dead: 0, skipped: 0, dropped: 0, unsaved: 0 };
  const started = Date.now();
  const at = () => new Date(now.getTime() + (Date.now() - started));
  const owner = crypto.randomUUID();
  const writer = new BatchWriter(d, counts);
  const claimer = new Claimer(
    ids,
    (batch) =>
      claimLeases(d.db, and(inArray(tokens.id, batch), refreshable(now), due(now, d.windowSeconds)), owner, d.leaseMs),
    counts,
  );
  await forEachLane(PROVIDER_CONCURRENCY, async () => {
    for (let leased = await claimer.next(); leased; leased = await claimer.next()) {
      const { token, clientId, clientSecret } = leased;
      const hold = holdOf(leased, owner);
      const sentAt = at();
      try {
        const issued = await refreshGrant(
          d.provider,
          {
            clientId,
            clientSecret: await open(d.keyring, clientSecret, {
              column: "clients.client_secret",
              clientId: token.clientId,
            }),
          },
          await open(d.keyring, token.refreshToken!, { column: "tokens.refresh_token", clientId: token.clientId }),
        );
        const values = await refreshedValues(d.keyring, token.clientId, issued, sentAt);
        writer.push({
          write: [successStatement(d.db, d.events, hold, values)],
          outcome: "refreshed",
          hold,
          rotated: values.refreshToken !== undefined,
        });
      } catch (error) {
        const failure = error instanceof ProviderError ? error : new ProviderError("network", describeError(error));
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
  return counts;
}

/**
 * Hands leased tokens to lanes as they free up: one claim statement at a time, for as many ids as
 * lanes are waiting when it starts, so every lease taken has a lane about to use it.
 */
class Claimer {
  private readonly ready: Leased[] = [];
  private readonly pending: number[];
  private waiting = 0;
  private claiming: Promise<void> | undefined;

  constructor(
    ids: number[],
    private readonly claim: (ids: number[]) => Promise<Leased[]>,
    private readonly counts: RefreshCounts,
  ) {
    this.pending = [...ids];
  }

  async next(): Promise<Leased | undefined> {
    for (;;) {
      const leased = this.ready.shift();
      if (leased) return leased;
      if (!this.claiming && this.pending.length === 0) return undefined;
      this.claiming ??= this.claimForWaitingLanes();
      this.waiting++;
      try {
        await this.claiming;
      } finally {
        this.waiting--;
      }
    }
  }

  private async claimForWaitingLanes(): Promise<void> {
    // Let every lane that is free right now line up before counting them.
    await Promise.resolve();
    try {
      const ids = this.pending.splice(0, Math.max(1, this.waiting));
      const leased = await this.claim(ids);
      this.counts.skipped += ids.length - leased.length;
      this.ready.push(...leased);
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

async function forEachLane(lanes: number, run: () => Promise<void>): Promise<void> {
  await Promise.all(Array.from({ length: lanes }, run));
}

function chunk<T>(items: T[], size: number): T[][] {
  const out: T[][] = [];
  for (let i = 0; i < items.length; i += size) out.push(items.slice(i, i + size));
  return out;
}
