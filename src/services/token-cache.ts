import type { Services } from "../context";
import { AppError } from "../errors";
import { type Keyring, open, seal, tokenCacheKey } from "../lib/crypto";
import { describeError, logWarn } from "../lib/log";
import { leaseMsFor, needsRefresh } from "./refresh-policy";
import type { ServedToken } from "./tokens";

/**
 * The edge read cache of served tokens. Three tiers: a bounded LRU in the isolate's memory, the
 * location's Workers Cache API, then the database (through a loader, single-flight per isolate).
 * An entry keeps the time the database answered, so a hit in a lower tier fills the higher ones
 * without making the entry any younger: TOKEN_CACHE_MAX_AGE_SECONDS bounds, in every location, how
 * long a revoked or replaced token can still be served. Changes made here drop or replace the
 * entry in this isolate and this location at once; other locations converge within the max age.
 */

export const DEFAULT_TOKEN_CACHE_MAX_AGE_SECONDS = 60;
export const DEFAULT_TOKEN_CACHE_MEMORY_ENTRIES = 10_000;
/** After this share of the max age a hit is still served, and re-read from the database in the background. */
export const REVALIDATE_AFTER_FRACTION = 0.5;
export const TOKEN_CACHE_NAME = "token-management:tokens";
/** Cache API keys are URLs; the path is an HMAC of the branch id, never the id itself. */
const CACHE_KEY_PREFIX = "https://token-cache.token-management.invalid/v1/";
const ENTRY_VERSION = 1;
/** How many recent invalidations the isolate remembers to refuse fills from loads that began before them. */
const INVALIDATION_MEMORY = 10_000;
const MS_PER_SECOND = 1000;

/** A served token, as much as a token response needs. */
export interface CachedToken {
  clientId: number;
  branchId: string;
  accessToken: string;
  tokenType: string;
  scope: string | null;
  expiresAt: Date;
  lifetimeSeconds: number | null;
  refreshed: boolean;
  /** What the branch stands for at the provider (e.g. a Business Profile location). */
  providerResource: string | null;
  /** The branch's app (the proxy's allowlist and quota are the app's). */
  appId: number | null;
}

export function cachedTokenOf(served: ServedToken): CachedToken {
  return {
    clientId: served.client.id,
    branchId: served.client.branchId,
    accessToken: served.accessToken,
    tokenType: served.token.tokenType,
    scope: served.token.scope,
    expiresAt: served.token.expiresAt,
    lifetimeSeconds: served.token.lifetimeSeconds,
    refreshed: served.refreshed,
    providerResource: served.client.providerResource,
    appId: served.client.appId,
  };
}

/**
 * What a tier holds for a branch. `sealed` (AES-GCM with the cache sub-key) carries the token and
 * what the response shows; the clear fields are bound to it as additional data with the branch id,
 * so an entry moved to another branch, or with a changed age or expiry, does not open.
 */
export interface CacheEntry {
  v: typeof ENTRY_VERSION;
  /** When the database answered (ms since the epoch): the entry's age counts from here in every tier. */
  readAtMs: number;
  expiresAtMs: number;
  lifetimeSeconds: number | null;
  sealed: string;
}

/**
 * What the memory tier holds: the entry's clear fields and its token already opened. The isolate's
 * memory is where the encryption key and every served token live anyway, so sealing there would
 * protect nothing; keeping the token open spares each memory hit an AES-GCM open and a JSON parse
 * (bench/cache-cpu-worker.ts measures both). Only the location tier, which leaves the isolate,
 * holds sealed entries.
 */
export interface MemoryEntry extends Pick<CacheEntry, "readAtMs" | "expiresAtMs" | "lifetimeSeconds"> {
  token: CachedToken;
}

export interface FreshnessPolicy {
  maxAgeSeconds: number;
  refreshAheadSeconds: number;
}

/**
 * - `fresh`: serve it.
 * - `revalidate`: serve it, and re-read it in the background (older than half the max age).
 * - `unusable`: too old, or the token is within its refresh window (never served from a cache), or
 *   the cache is off.
 */
export type Freshness = "fresh" | "revalidate" | "unusable";

/** The freshness rules, pure: the refresh window is the one the database path uses (`needsRefresh`). */
export function entryFreshness(
  entry: Pick<CacheEntry, "readAtMs" | "expiresAtMs" | "lifetimeSeconds">,
  now: Date,
  policy: FreshnessPolicy,
): Freshness {
  if (policy.maxAgeSeconds <= 0) return "unusable";
  const ageMs = now.getTime() - entry.readAtMs;
  const maxAgeMs = policy.maxAgeSeconds * MS_PER_SECOND;
  if (ageMs >= maxAgeMs) return "unusable";
  const token = { expiresAt: new Date(entry.expiresAtMs), lifetimeSeconds: entry.lifetimeSeconds };
  if (needsRefresh(token, now, policy.refreshAheadSeconds)) return "unusable";
  return ageMs >= maxAgeMs * REVALIDATE_AFTER_FRACTION ? "revalidate" : "fresh";
}

/** Seconds the entry may still be served (RFC 9211 `ttl`), at least 0. */
export function entryTtlSeconds(entry: Pick<CacheEntry, "readAtMs">, now: Date, maxAgeSeconds: number): number {
  return Math.max(0, Math.floor((entry.readAtMs + maxAgeSeconds * MS_PER_SECOND - now.getTime()) / MS_PER_SECOND));
}

/** A bounded least-recently-used map: a hit moves the key to the young end, an insert evicts the oldest. */
export class MemoryLru<V> {
  private readonly entries = new Map<string, V>();

  constructor(private capacity: number) {}

  get size(): number {
    return this.entries.size;
  }

  resize(capacity: number): void {
    this.capacity = capacity;
    this.evict();
  }

  get(key: string): V | undefined {
    const value = this.entries.get(key);
    if (value === undefined) return undefined;
    this.entries.delete(key);
    this.entries.set(key, value);
    return value;
  }

  set(key: string, value: V): void {
    if (this.capacity <= 0) return;
    this.entries.delete(key);
    this.entries.set(key, value);
    this.evict();
  }

  delete(key: string): void {
    this.entries.delete(key);
  }

  clear(): void {
    this.entries.clear();
  }

  private evict(): void {
    while (this.entries.size > this.capacity) {
      const oldest = this.entries.keys().next().value as string;
      this.entries.delete(oldest);
    }
  }
}

// Per isolate: the memory tier, the database reads in flight, and the recent invalidations.
const memory = new MemoryLru<MemoryEntry>(DEFAULT_TOKEN_CACHE_MEMORY_ENTRIES);
const inFlight = new Map<string, Flight>();
const invalidations = new Map<string, number>();
let invalidationSeq = 0;

/** Entries in this isolate's memory tier (for the memory benchmark and the LRU test). */
export function memoryTierSize(): number {
  return memory.size;
}

export type Tier = "memory" | "location" | "database";

export interface CacheRead {
  token: CachedToken;
  tier: Tier;
  /** RFC 9211 Cache-Status value. */
  cacheStatus: string;
  /** A hit older than half the max age: a re-read was started in the background. */
  revalidating: boolean;
}

export interface TokenCacheDeps {
  keyring: Keyring;
  maxAgeSeconds: number;
  memoryEntries: number;
  refreshAheadSeconds: number;
  /**
   * How long a read waits for the same branch's load begun by another request before loading
   * itself: the refresh lease's length (leaseMsFor(OAUTH_TIMEOUT_MS)), the longest a read that
   * refreshes should take.
   */
  joinWaitMs: number;
  /** The location tier; resolves to undefined where the Cache API is not available. */
  location: () => Promise<Cache | undefined>;
  waitUntil: (promise: Promise<unknown>) => void;
}

let locationTier: Promise<Cache> | undefined;

/** The cache's dependencies for an invocation: its configuration, its keys, and where background work goes. */
export function tokenCacheDeps(
  services: Pick<Services, "config" | "keyring">,
  waitUntil: (promise: Promise<unknown>) => void,
): TokenCacheDeps {
  return {
    keyring: services.keyring,
    maxAgeSeconds: services.config.TOKEN_CACHE_MAX_AGE_SECONDS,
    memoryEntries: services.config.TOKEN_CACHE_MEMORY_ENTRIES,
    refreshAheadSeconds: services.config.REFRESH_AHEAD_SECONDS,
    joinWaitMs: leaseMsFor(services.config.OAUTH_TIMEOUT_MS),
    location: () => {
      locationTier ??= caches.open(TOKEN_CACHE_NAME).catch((error: unknown) => {
        locationTier = undefined;
        throw error;
      });
      return locationTier;
    },
    waitUntil,
  };
}

interface Loaded {
  token: CachedToken;
  readAtMs: number;
}

const CACHE_STATUS_PREFIX = "token-management";

function cacheStatusOf(tier: Tier, detail: { ttl?: number; fwd?: string; stored?: boolean }): string {
  if (tier !== "database") return `${CACHE_STATUS_PREFIX}; hit; ttl=${detail.ttl ?? 0}; detail=${tier}`;
  return `${CACHE_STATUS_PREFIX}; fwd=${detail.fwd ?? "miss"}${detail.stored ? "; stored" : ""}; detail=database`;
}

/**
 * A token for the branch: from memory, else the location, else `load` (the database read, which may
 * refresh). `now` decides freshness; the load's own clock stamps the entry.
 */
export async function readThrough(
  deps: TokenCacheDeps,
  branchId: string,
  now: Date,
  load: () => Promise<CachedToken>,
): Promise<CacheRead> {
  if (deps.maxAgeSeconds <= 0) {
    const { token } = await loadOnce(deps, branchId, load);
    return { token, tier: "database", cacheStatus: cacheStatusOf("database", { fwd: "bypass" }), revalidating: false };
  }
  memory.resize(deps.memoryEntries);
  const policy = { maxAgeSeconds: deps.maxAgeSeconds, refreshAheadSeconds: deps.refreshAheadSeconds };
  const key = memoryKey(deps.keyring, branchId);
  let sawEntry = false;

  const inMemory = memory.get(key);
  if (inMemory) {
    sawEntry = true;
    const hit = serveIfFresh(deps, branchId, inMemory, inMemory.token, now, policy, load);
    if (hit) return { ...hit, tier: "memory", cacheStatus: cacheStatusOf("memory", { ttl: hit.ttl }) };
    memory.delete(key);
  }

  const location = await openLocation(deps);
  if (location) {
    const url = await locationKey(deps.keyring, branchId);
    const entry = await matchEntry(location, url);
    if (entry) {
      sawEntry = true;
      const usable = entryFreshness(entry, now, policy) !== "unusable";
      const token = usable ? await openEntry(deps.keyring, branchId, entry) : undefined;
      const hit = token && serveIfFresh(deps, branchId, entry, token, now, policy, load);
      if (hit) {
        memory.set(key, memoryEntryOf(entry, hit.token));
        return { ...hit, tier: "location", cacheStatus: cacheStatusOf("location", { ttl: hit.ttl }) };
      }
      deps.waitUntil(location.delete(url).catch(() => false));
    }
  }

  const started = invalidationSeq;
  const loaded = await loadOnce(deps, branchId, load);
  const stored = await fill(deps, loaded, started, now, policy);
  return {
    token: loaded.token,
    tier: "database",
    cacheStatus: cacheStatusOf("database", { fwd: sawEntry ? "stale" : "miss", stored }),
    revalidating: false,
  };
}

/** Serves the entry's token when the rules allow; starts a background re-read when it is old. */
function serveIfFresh(
  deps: TokenCacheDeps,
  branchId: string,
  entry: Pick<CacheEntry, "readAtMs" | "expiresAtMs" | "lifetimeSeconds">,
  token: CachedToken,
  now: Date,
  policy: FreshnessPolicy,
  load: () => Promise<CachedToken>,
): { token: CachedToken; ttl: number; revalidating: boolean } | undefined {
  const freshness = entryFreshness(entry, now, policy);
  if (freshness === "unusable") return undefined;
  const revalidating = freshness === "revalidate";
  if (revalidating) deps.waitUntil(revalidate(deps, branchId, now, policy, load));
  return { token, ttl: entryTtlSeconds(entry, now, policy.maxAgeSeconds), revalidating };
}

async function revalidate(
  deps: TokenCacheDeps,
  branchId: string,
  now: Date,
  policy: FreshnessPolicy,
  load: () => Promise<CachedToken>,
): Promise<void> {
  const started = invalidationSeq;
  try {
    await fill(deps, await loadOnce(deps, branchId, load), started, now, policy);
  } catch (error) {
    // The grant is gone (revoked, dead, deleted, deactivated): stop serving it here.
    if (error instanceof AppError && (error.status === 404 || error.status === 409)) {
      await dropToken(deps, branchId);
      return;
    }
    // The database is down or slow: keep serving the entry until its max age.
    logWarn("token_cache_revalidation_failed", { error: describeError(error) });
  }
}

/**
 * A database read of one branch under way in this isolate, and its outcome once known: plain data
 * that other requests look at, never a promise they await (see join).
 */
interface Flight {
  outcome?: { loaded: Loaded } | { error: unknown };
}

/** A joining read first looks again after this long, doubling up to the maximum. */
const JOIN_FIRST_POLL_MS = 1;
const JOIN_MAX_POLL_MS = 10;

/** Concurrent database reads of one branch in this isolate share one load. */
function loadOnce(deps: TokenCacheDeps, branchId: string, load: () => Promise<CachedToken>): Promise<Loaded> {
  const key = memoryKey(deps.keyring, branchId);
  const running = inFlight.get(key);
  if (running) return join(running, deps.joinWaitMs, () => startLoad(deps, branchId, key, load));
  return startLoad(deps, branchId, key, load);
}

/**
 * Waits for a load another request started, on timers of this request's own, looking at the
 * flight's outcome between them. The Workers runtime does not let requests share promises safely:
 * a request awaiting another request's I/O with nothing of its own pending is canceled as hung,
 * and work continued from one request's context on behalf of another fails ("Cannot perform I/O
 * on behalf of a different request"); both were measured here under load (test/node/single-flight).
 * A poll costs no I/O; the wait adds at most JOIN_MAX_POLL_MS to a joined read. If the other load
 * has not settled after `waitMs` (its request was canceled, say), this request loads for itself.
 */
async function join(flight: Flight, waitMs: number, loadItself: () => Promise<Loaded>): Promise<Loaded> {
  const deadline = Date.now() + waitMs;
  for (let pollMs = JOIN_FIRST_POLL_MS; ; pollMs = Math.min(2 * pollMs, JOIN_MAX_POLL_MS)) {
    await new Promise((resolve) => setTimeout(resolve, pollMs));
    const outcome = flight.outcome;
    if (outcome) {
      if ("error" in outcome) throw outcome.error;
      return outcome.loaded;
    }
    if (Date.now() >= deadline) return loadItself();
  }
}

function startLoad(
  deps: TokenCacheDeps,
  branchId: string,
  key: string,
  load: () => Promise<CachedToken>,
): Promise<Loaded> {
  const readAtMs = Date.now();
  const flight: Flight = {};
  const promise = load().then(
    (token) => ({ token, readAtMs }),
    async (error: unknown) => {
      if (error instanceof AppError && (error.status === 404 || error.status === 409)) {
        await dropToken(deps, branchId).catch(() => undefined);
      }
      throw error;
    },
  );
  inFlight.set(key, flight);
  promise.then(
    (loaded) => {
      flight.outcome = { loaded };
    },
    (error: unknown) => {
      flight.outcome = { error };
    },
  );
  const forget = () => {
    if (inFlight.get(key) === flight) inFlight.delete(key);
  };
  promise.then(forget, forget);
  return promise;
}

/**
 * Stores a token just read (or refreshed) in both tiers, unless the branch was invalidated since
 * the read began or the token may not be served from a cache. The location write runs after the
 * response (waitUntil). Returns whether it was stored.
 */
async function fill(
  deps: TokenCacheDeps,
  loaded: Loaded,
  startedAtSeq: number,
  now: Date,
  policy: FreshnessPolicy,
): Promise<boolean> {
  const { token, readAtMs } = loaded;
  const key = memoryKey(deps.keyring, token.branchId);
  if ((invalidations.get(key) ?? -1) > startedAtSeq) return false;
  const clear = clearFieldsOf(token, readAtMs);
  if (entryFreshness(clear, now, policy) === "unusable") return false;
  memory.set(key, memoryEntryOf(clear, token));
  const invalidatedSince = () => (invalidations.get(key) ?? -1) > startedAtSeq;
  deps.waitUntil(
    sealEntry(deps.keyring, token, readAtMs).then(async (entry) => {
      // Sealing yielded: a change made meanwhile must not see the old token put back in the location.
      if (!invalidatedSince()) await putLocation(deps, token.branchId, entry, now);
    }),
  );
  return true;
}

/** Replaces the branch's entry in this isolate and this location (after a refresh made here). */
export async function storeToken(deps: TokenCacheDeps, token: CachedToken, readAt: Date): Promise<void> {
  if (deps.maxAgeSeconds <= 0) return;
  memory.resize(deps.memoryEntries);
  const key = memoryKey(deps.keyring, token.branchId);
  invalidate(key);
  const clear = clearFieldsOf(token, readAt.getTime());
  const policy = { maxAgeSeconds: deps.maxAgeSeconds, refreshAheadSeconds: deps.refreshAheadSeconds };
  if (entryFreshness(clear, readAt, policy) === "unusable") {
    await dropToken(deps, token.branchId);
    return;
  }
  memory.set(key, memoryEntryOf(clear, token));
  await putLocation(deps, token.branchId, await sealEntry(deps.keyring, token, clear.readAtMs), readAt);
}

/**
 * Drops the branch's entry from this isolate and this location, at once; a load already running
 * will not put the old token back. Called on revoke, delete, deactivation, needs_reauth, new
 * consent and secret rotation.
 */
export async function dropToken(deps: Pick<TokenCacheDeps, "keyring" | "location">, branchId: string): Promise<void> {
  const key = memoryKey(deps.keyring, branchId);
  invalidate(key);
  memory.delete(key);
  inFlight.delete(key);
  const location = await openLocation(deps);
  if (location) await location.delete(await locationKey(deps.keyring, branchId));
}

function invalidate(key: string): void {
  invalidationSeq++;
  invalidations.delete(key);
  invalidations.set(key, invalidationSeq);
  if (invalidations.size > INVALIDATION_MEMORY) {
    const oldest = invalidations.keys().next().value as string;
    invalidations.delete(oldest);
  }
}

/** The memory tier is keyed by key id too, so a rotated key never meets entries sealed with the old one. */
function memoryKey(keyring: Keyring, branchId: string): string {
  return `${keyring.current.id}:${branchId}`;
}

async function locationKey(keyring: Keyring, branchId: string): Promise<string> {
  return `${CACHE_KEY_PREFIX}${await tokenCacheKey(keyring, branchId)}`;
}

async function openLocation(deps: Pick<TokenCacheDeps, "location">): Promise<Cache | undefined> {
  try {
    return await deps.location();
  } catch (error) {
    logWarn("token_cache_location_unavailable", { error: describeError(error) });
    return undefined;
  }
}

async function matchEntry(location: Cache, url: string): Promise<CacheEntry | undefined> {
  try {
    const response = await location.match(url);
    if (!response) return undefined;
    return parseEntry(await response.text());
  } catch (error) {
    logWarn("token_cache_location_read_failed", { error: describeError(error) });
    return undefined;
  }
}

async function putLocation(deps: TokenCacheDeps, branchId: string, entry: CacheEntry, now: Date): Promise<void> {
  const location = await openLocation(deps);
  if (!location) return;
  const ttl = entryTtlSeconds(entry, now, deps.maxAgeSeconds);
  if (ttl <= 0) return;
  try {
    const response = new Response(JSON.stringify(entry), {
      headers: { "Content-Type": "application/json", "Cache-Control": `max-age=${ttl}` },
    });
    await location.put(await locationKey(deps.keyring, branchId), response);
  } catch (error) {
    logWarn("token_cache_location_write_failed", { error: describeError(error) });
  }
}

/** An entry from the location tier, or undefined when it is not one (corrupted, another version). */
export function parseEntry(text: string): CacheEntry | undefined {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    return undefined;
  }
  if (typeof value !== "object" || value === null) return undefined;
  const entry = value as Record<string, unknown>;
  if (
    entry.v !== ENTRY_VERSION ||
    !Number.isFinite(entry.readAtMs) ||
    !Number.isFinite(entry.expiresAtMs) ||
    !(entry.lifetimeSeconds === null || Number.isFinite(entry.lifetimeSeconds)) ||
    typeof entry.sealed !== "string"
  ) {
    return undefined;
  }
  return entry as unknown as CacheEntry;
}

interface SealedPayload {
  accessToken: string;
  tokenType: string;
  scope: string | null;
  clientId: number;
  /** Absent in entries written before apps and grants. */
  providerResource?: string | null;
  appId?: number | null;
}

function binding(branchId: string, entry: Pick<CacheEntry, "readAtMs" | "expiresAtMs" | "lifetimeSeconds">): string {
  return JSON.stringify([branchId, entry.readAtMs, entry.expiresAtMs, entry.lifetimeSeconds]);
}

function clearFieldsOf(
  token: CachedToken,
  readAtMs: number,
): Pick<CacheEntry, "readAtMs" | "expiresAtMs" | "lifetimeSeconds"> {
  return { readAtMs, expiresAtMs: token.expiresAt.getTime(), lifetimeSeconds: token.lifetimeSeconds };
}

/** The memory tier's copy: a cached token is served as not refreshed by this read. */
function memoryEntryOf(
  clear: Pick<CacheEntry, "readAtMs" | "expiresAtMs" | "lifetimeSeconds">,
  token: CachedToken,
): MemoryEntry {
  return {
    readAtMs: clear.readAtMs,
    expiresAtMs: clear.expiresAtMs,
    lifetimeSeconds: clear.lifetimeSeconds,
    token: { ...token, refreshed: false },
  };
}

async function sealEntry(keyring: Keyring, token: CachedToken, readAtMs: number): Promise<CacheEntry> {
  const clear = clearFieldsOf(token, readAtMs);
  const payload: SealedPayload = {
    accessToken: token.accessToken,
    tokenType: token.tokenType,
    scope: token.scope,
    clientId: token.clientId,
    providerResource: token.providerResource,
    appId: token.appId,
  };
  const sealed = await seal(keyring, JSON.stringify(payload), { tokenCache: binding(token.branchId, clear) });
  return { v: ENTRY_VERSION, ...clear, sealed };
}

/** The entry's token, or undefined when it does not open (tampered, another key, another branch). */
async function openEntry(keyring: Keyring, branchId: string, entry: CacheEntry): Promise<CachedToken | undefined> {
  try {
    const payload = JSON.parse(
      await open(keyring, entry.sealed, { tokenCache: binding(branchId, entry) }),
    ) as SealedPayload;
    return {
      clientId: payload.clientId,
      branchId,
      accessToken: payload.accessToken,
      tokenType: payload.tokenType,
      scope: payload.scope,
      expiresAt: new Date(entry.expiresAtMs),
      lifetimeSeconds: entry.lifetimeSeconds,
      refreshed: false,
      providerResource: payload.providerResource ?? null,
      appId: payload.appId ?? null,
    };
  } catch (error) {
    logWarn("token_cache_entry_unreadable", { error: describeError(error) });
    return undefined;
  }
}
