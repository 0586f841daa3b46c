import { and, asc, eq, inArray, isNotNull, isNull, lte, or } from "drizzle-orm";
import type { BatchItem } from "drizzle-orm/batch";
import { createServices, type Services } from "../context";
import type { Db } from "../db/client";
import { leaseIsFree } from "../db/queries";
import { clients, tokens } from "../db/schema";
import { forEachBounded, MAX_OUTBOUND_CONNECTIONS } from "../lib/concurrency";
import { open } from "../lib/crypto";
import { describeError, logError, logInfo } from "../lib/log";
import { ProviderError, refreshGrant } from "../oauth/provider";
import { LEASE_SECONDS } from "./refresh-policy";
import { failureStatements, type Leased, PERSIST_ATTEMPTS, refreshedValues } from "./tokens";

/**
 * The Cron Trigger's job: refresh every token that expires within CRON_REFRESH_WINDOW_SECONDS, oldest
 * expiry first, at most CRON_MAX_REFRESHES per run. Leases are taken a page at a time in one
 * statement, provider calls run with bounded concurrency, and results are written in batches
 * (group commit), so database round trips grow with pages, not with tokens. What one run may not
 * refresh goes to REFRESH_QUEUE when that binding exists, else to the next run.
 */

export const PROVIDER_CONCURRENCY = MAX_OUTBOUND_CONNECTIONS;
/** Tokens leased per statement. */
export const PAGE_SIZE = 100;
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
export type RefreshDeps = Pick<Services, "db" | "keyring" | "provider">;

export interface RefreshCounts {
  refreshed: number;
  failed: number;
  dead: number;
  skipped: number;
  /** Results that could not be written after every retry (logged). */
  unsaved: number;
}

export interface CronSummary extends RefreshCounts {
  due: number;
  queued: number;
  duration_ms: number;
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
  const counts = await refreshTokens(d, mine, now);
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

/** The queue consumer: the same refresh code, for the ids a cron run handed over. */
export async function consumeRefreshBatch(env: Env, batch: MessageBatch<RefreshMessage>, now: Date): Promise<void> {
  const d = await createServices(env);
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
}

/** Ids of the tokens due for refresh, oldest expiry first. */
export async function selectDue(db: Db, now: Date, windowSeconds: number, limit: number): Promise<number[]> {
  const rows = await db
    .select({ id: tokens.id })
    .from(tokens)
    .innerJoin(clients, eq(clients.id, tokens.clientId))
    .where(and(refreshable(now), lte(tokens.expiresAt, new Date(now.getTime() + windowSeconds * 1000))))
    .orderBy(asc(tokens.expiresAt))
    .limit(limit);
  return rows.map((row) => row.id);
}

/** A token the scheduler may refresh now: current, alive, not in backoff, not leased, client usable. */
function refreshable(now: Date) {
  return and(
    eq(tokens.isValid, true),
    eq(tokens.status, "active"),
    isNotNull(tokens.refreshToken),
    or(isNull(tokens.nextAttemptAt), lte(tokens.nextAttemptAt, now)),
    leaseIsFree(now),
    eq(clients.isActive, true),
    isNull(clients.credentialsRejectedAt),
  );
}

/** Refreshes the given tokens (those still refreshable when leased), a page at a time. */
export async function refreshTokens(d: RefreshDeps, ids: number[], now: Date): Promise<RefreshCounts> {
  const counts: RefreshCounts = { refreshed: 0, failed: 0, dead: 0, skipped: 0, unsaved: 0 };
  const started = Date.now();
  const at = () => new Date(now.getTime() + (Date.now() - started));
  const writer = new BatchWriter(d.db, counts);
  for (const page of chunk(ids, PAGE_SIZE)) {
    const leased = await leasePage(d.db, page, crypto.randomUUID(), at());
    counts.skipped += page.length - leased.length;
    await forEachBounded(leased, PROVIDER_CONCURRENCY, async ({ token, clientId, clientSecret }) => {
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
        writer.push([
          d.db
            .update(tokens)
            .set(await refreshedValues(d.keyring, token.clientId, issued, sentAt))
            .where(eq(tokens.id, token.id)),
        ]);
        counts.refreshed++;
      } catch (error) {
        const failure = error instanceof ProviderError ? error : new ProviderError("network", describeError(error));
        writer.push(failureStatements(d.db, token, failure, at()));
        if (failure.kind === "invalid_grant") counts.dead++;
        else counts.failed++;
      }
    });
  }
  await writer.drain();
  return counts;
}

/** One statement: lease every still-refreshable token of the page and return it with its client. */
async function leasePage(db: Db, ids: number[], owner: string, now: Date): Promise<Leased[]> {
  const leaseExpiresAt = new Date(now.getTime() + LEASE_SECONDS * 1000);
  const rows = await db
    .update(tokens)
    .set({ leaseOwner: owner, leaseExpiresAt })
    .from(clients)
    .where(and(inArray(tokens.id, ids), eq(clients.id, tokens.clientId), refreshable(now)))
    .returning({ token: tokens, clientId: clients.clientId, clientSecret: clients.clientSecret });
  return rows as Leased[];
}

/**
 * Group commit: results wait at most FLUSH_INTERVAL_MS (or until FLUSH_BATCH_SIZE are pending) and
 * are written in one batch; a rotated refresh token is therefore persisted within that delay.
 * Writes are retried because a rotated refresh token exists nowhere else.
 */
class BatchWriter {
  private pending: BatchItem<"pg">[][] = [];
  private chain: Promise<void> = Promise.resolve();
  private timer: ReturnType<typeof setTimeout> | undefined;

  constructor(
    private readonly db: Db,
    private readonly counts: RefreshCounts,
  ) {}

  push(statements: BatchItem<"pg">[]): void {
    this.pending.push(statements);
    if (this.pending.length >= FLUSH_BATCH_SIZE) this.flush();
    else this.timer ??= setTimeout(() => this.flush(), FLUSH_INTERVAL_MS);
  }

  async drain(): Promise<void> {
    this.flush();
    await this.chain;
  }

  private flush(): void {
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
    const results = this.pending.splice(0);
    if (results.length > 0) this.chain = this.chain.then(() => this.write(results));
  }

  private async write(results: BatchItem<"pg">[][]): Promise<void> {
    const statements = results.flat() as [BatchItem<"pg">, ...BatchItem<"pg">[]];
    for (let attempt = 1; attempt <= PERSIST_ATTEMPTS; attempt++) {
      try {
        await this.db.batch(statements);
        return;
      } catch (error) {
        if (attempt === PERSIST_ATTEMPTS) {
          this.counts.unsaved += results.length;
          logError("refresh_results_not_persisted", { results: results.length, error: describeError(error) });
          return;
        }
        await new Promise((resolve) => setTimeout(resolve, 100 * 2 ** (attempt - 1)));
      }
    }
  }
}

function chunk<T>(items: T[], size: number): T[][] {
  const out: T[][] = [];
  for (let i = 0; i < items.length; i += size) out.push(items.slice(i, i + size));
  return out;
}
