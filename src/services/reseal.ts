import { and, asc, eq, gt, isNotNull, isNull, notLike, or, sql } from "drizzle-orm";
import type { BatchItem } from "drizzle-orm/batch";
import type { Db } from "../db/client";
import { leaseIsFree } from "../db/queries";
import { apps, clients, tokens } from "../db/schema";
import { CryptoError, currentEnvelopePrefix, type Keyring, open, type SealedColumn, seal } from "../lib/crypto";

/**
 * Re-encrypts every sealed value that is not yet a v2 envelope under the current key (a value
 * sealed with a previous key, or a v1 value from before row binding), so that
 * TOKEN_ENCRYPTION_PREVIOUS_KEYS can be emptied and TOKEN_ENCRYPTION_ACCEPT_V1 turned off.
 *
 * - Bounded: rows are read `batchSize` at a time in id order (keyset pagination) and each batch is
 *   written in one transaction, one round trip.
 * - Idempotent and resumable: what is left to do is read from the data itself (the envelope prefix),
 *   so a second run, or a run after an interruption, takes up what is left and nothing else.
 * - Safe beside a running Worker: each write is conditional on the row still holding the value that
 *   was read, so a secret or token the Worker wrote meanwhile (already under the current key) is
 *   never overwritten with an older one. A token row leased by a refresh in flight is not rewritten
 *   at all (the refresh's write is conditional on the sealed refresh token it used, and a reseal
 *   would make it miss and drop a rotated refresh token): the run comes back to such rows once
 *   their lease is released, for up to LEASED_ROWS_WAIT_MS.
 * - A value that does not open (altered, copied from another row, or sealed with a key that is not
 *   configured) is left as it is and reported by its row, never by its content.
 */

export const DEFAULT_RESEAL_BATCH_SIZE = 100;
/** How long a run keeps coming back to token rows a refresh had leased, and how often. */
export const LEASED_ROWS_WAIT_MS = 2 * 60_000;
const LEASED_ROWS_RETRY_MS = 250;

export interface ResealOptions {
  batchSize?: number;
  /** Stop after this many batches (all tables together); the next run continues. */
  maxBatches?: number;
  /** Called after each batch, for progress output. */
  onBatch?: (progress: ResealProgress) => void;
}

export interface TableCounts {
  /** Rows rewritten under the current key. */
  resealed: number;
  /** Rows whose value changed between the read and the write (the newer value was kept). */
  changedMeanwhile: number;
  /** Rows holding a value that does not open: `<table> <id> (client <client id>, <column>)`. */
  unreadable: string[];
}

export interface ResealProgress {
  apps: TableCounts;
  /** Branches registered before apps (migration 0006) still carry their own sealed secret. */
  clients: TableCounts;
  tokens: TableCounts;
  batches: number;
  /** Token rows left alone because a refresh held them (rewritten in a later pass). */
  leasedMeanwhile: number;
}

export interface ResealResult extends ResealProgress {
  /** False when maxBatches stopped the run before the end. */
  complete: boolean;
  /** Sealed values still not v2 under the current key (the unreadable ones among them). */
  remaining: number;
}

export async function resealAll(db: Db, keyring: Keyring, options: ResealOptions = {}): Promise<ResealResult> {
  const batchSize = options.batchSize ?? DEFAULT_RESEAL_BATCH_SIZE;
  const progress: ResealProgress = {
    apps: emptyCounts(),
    clients: emptyCounts(),
    tokens: emptyCounts(),
    batches: 0,
    leasedMeanwhile: 0,
  };
  const prefix = `${currentEnvelopePrefix(keyring)}%`;
  const budgetLeft = () => options.maxBatches === undefined || progress.batches < options.maxBatches;

  let complete = true;
  const started = Date.now();
  for (const table of [resealAppBatch, resealClientBatch, resealTokenBatch]) {
    // A pass over the table; again (only what is left) while the last one met rows a refresh held
    // or changed between read and write (a row the Worker rewrote is under the current key already,
    // so the next pass does not even read it).
    for (let pass = 0; complete; pass++) {
      if (pass > 0) await new Promise((resolve) => setTimeout(resolve, LEASED_ROWS_RETRY_MS));
      const movedBefore = moved(progress);
      let after = 0;
      for (;;) {
        if (!budgetLeft()) {
          complete = false;
          break;
        }
        const batch = await table(db, keyring, prefix, after, batchSize, progress);
        if (batch.lastId === undefined) break;
        progress.batches++;
        options.onBatch?.(progress);
        after = batch.lastId;
        if (batch.rows < batchSize) break;
      }
      if (moved(progress) === movedBefore || Date.now() - started > LEASED_ROWS_WAIT_MS) break;
    }
    if (!complete) break;
  }
  return { ...progress, complete, remaining: await countRemaining(db, prefix) };
}

interface BatchOutcome {
  rows: number;
  lastId: number | undefined;
}

async function resealClientBatch(
  db: Db,
  keyring: Keyring,
  prefix: string,
  after: number,
  batchSize: number,
  progress: ResealProgress,
): Promise<BatchOutcome> {
  const rows = await db
    .select({ id: clients.id, clientSecret: clients.clientSecret })
    .from(clients)
    .where(and(gt(clients.id, after), isNotNull(clients.clientSecret), notLike(clients.clientSecret, prefix)))
    .orderBy(asc(clients.id))
    .limit(batchSize);
  const writes: BatchItem<"pg">[] = [];
  for (const row of rows) {
    const secret = await reseal(keyring, row.clientSecret!, "clients.client_secret", row.id);
    if (secret === undefined) {
      progress.clients.unreadable.push(`clients ${row.id} (client ${row.id}, client_secret)`);
      continue;
    }
    writes.push(
      db
        .update(clients)
        .set({ clientSecret: secret })
        .where(and(eq(clients.id, row.id), eq(clients.clientSecret, row.clientSecret!)))
        .returning({ id: clients.id }),
    );
  }
  await write(db, writes, progress.clients);
  return { rows: rows.length, lastId: rows.at(-1)?.id };
}

async function resealAppBatch(
  db: Db,
  keyring: Keyring,
  prefix: string,
  after: number,
  batchSize: number,
  progress: ResealProgress,
): Promise<BatchOutcome> {
  const rows = await db
    .select({ id: apps.id, clientSecret: apps.clientSecret })
    .from(apps)
    .where(and(gt(apps.id, after), notLike(apps.clientSecret, prefix)))
    .orderBy(asc(apps.id))
    .limit(batchSize);
  const writes: BatchItem<"pg">[] = [];
  for (const row of rows) {
    // An app's secret is bound to the app's id under the label its branches' secrets had.
    const secret = await reseal(keyring, row.clientSecret, "clients.client_secret", row.id);
    if (secret === undefined) {
      progress.apps.unreadable.push(`apps ${row.id} (app ${row.id}, client_secret)`);
      continue;
    }
    writes.push(
      db
        .update(apps)
        .set({ clientSecret: secret })
        .where(and(eq(apps.id, row.id), eq(apps.clientSecret, row.clientSecret)))
        .returning({ id: apps.id }),
    );
  }
  await write(db, writes, progress.apps);
  return { rows: rows.length, lastId: rows.at(-1)?.id };
}

async function resealTokenBatch(
  db: Db,
  keyring: Keyring,
  prefix: string,
  after: number,
  batchSize: number,
  progress: ResealProgress,
): Promise<BatchOutcome> {
  const rows = await db
    .select({
      id: tokens.id,
      clientId: tokens.clientId,
      accessToken: tokens.accessToken,
      refreshToken: tokens.refreshToken,
      leaseFree: sql<boolean>`(${leaseIsFree()})`.mapWith((value: unknown) => value === true || value === "t"),
    })
    .from(tokens)
    .where(
      and(
        gt(tokens.id, after),
        or(
          notLike(tokens.accessToken, prefix),
          and(isNotNull(tokens.refreshToken), notLike(tokens.refreshToken, prefix)),
        ),
      ),
    )
    .orderBy(asc(tokens.id))
    .limit(batchSize);
  const writes: BatchItem<"pg">[] = [];
  for (const row of rows) {
    if (!row.leaseFree) {
      progress.leasedMeanwhile++;
      continue;
    }
    const accessToken = await reseal(keyring, row.accessToken, "tokens.access_token", row.clientId);
    const refreshToken =
      row.refreshToken === null ? null : await reseal(keyring, row.refreshToken, "tokens.refresh_token", row.clientId);
    if (accessToken === undefined || refreshToken === undefined) {
      const column = accessToken === undefined ? "access_token" : "refresh_token";
      progress.tokens.unreadable.push(`tokens ${row.id} (client ${row.clientId}, ${column})`);
      continue;
    }
    writes.push(
      db
        .update(tokens)
        .set({ accessToken, refreshToken })
        .where(
          and(
            eq(tokens.id, row.id),
            eq(tokens.accessToken, row.accessToken),
            row.refreshToken === null ? isNull(tokens.refreshToken) : eq(tokens.refreshToken, row.refreshToken),
            // A refresh that leased the row since the read: leave it to the refresh (next pass).
            leaseIsFree(),
          ),
        )
        .returning({ id: tokens.id }),
    );
  }
  await write(db, writes, progress.tokens);
  return { rows: rows.length, lastId: rows.at(-1)?.id };
}

/** The value sealed anew for its row, or undefined when it does not open. */
async function reseal(
  keyring: Keyring,
  envelope: string,
  column: SealedColumn,
  clientId: number,
): Promise<string | undefined> {
  const binding = { column, clientId };
  let plaintext: string;
  try {
    plaintext = await open(keyring, envelope, binding);
  } catch (error) {
    if (error instanceof CryptoError) return undefined;
    throw error;
  }
  return seal(keyring, plaintext, binding);
}

/** One transaction for the batch's writes; each counts as resealed or, if its row moved on, as changed. */
async function write(db: Db, writes: BatchItem<"pg">[], counts: TableCounts): Promise<void> {
  if (writes.length === 0) return;
  const results = (await db.batch(writes as [BatchItem<"pg">, ...BatchItem<"pg">[]])) as unknown[][];
  for (const updated of results) {
    if (updated.length > 0) counts.resealed++;
    else counts.changedMeanwhile++;
  }
}

async function countRemaining(db: Db, prefix: string): Promise<number> {
  const result = await db.execute<{ remaining: string | number }>(sql`
    select
      (select count(*) from ${apps} where ${apps.clientSecret} not like ${prefix})
      + (select count(*) from ${clients} where ${clients.clientSecret} not like ${prefix})
      + (select count(*) from ${tokens} where ${tokens.accessToken} not like ${prefix})
      + (select count(*) from ${tokens} where ${tokens.refreshToken} not like ${prefix})
      as remaining`);
  return Number(result.rows[0]?.remaining ?? 0);
}

function moved(progress: ResealProgress): number {
  return (
    progress.leasedMeanwhile +
    progress.apps.changedMeanwhile +
    progress.clients.changedMeanwhile +
    progress.tokens.changedMeanwhile
  );
}

function emptyCounts(): TableCounts {
  return { resealed: 0, changedMeanwhile: 0, unreadable: [] };
}
