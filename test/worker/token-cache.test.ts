import { afterEach, describe, expect, it, type MockInstance, vi } from "vitest";
import { loadKeyring, tokenCacheKey } from "../../src/lib/crypto";
import { needsRefresh } from "../../src/services/refresh-policy";
import {
  type CacheEntry,
  entryFreshness,
  MemoryLru,
  memoryTierSize,
  parseEntry,
  TOKEN_CACHE_NAME,
} from "../../src/services/token-cache";
import { TEST_ENCRYPTION_KEY } from "./bindings";
import { type CallOptions, call, expectProblem, json, testEnv, uniqueId } from "./helpers";
import { connectBranch, postJson, reconnectBranch, sql } from "./oauth-helpers";

/**
 * The edge read cache in front of GET /tokens/{branch_id}: its freshness rules at each boundary,
 * the two tiers (this isolate's memory, this location's Cache API), invalidation by every change
 * made here, corrupted entries, the LRU bound, single flight of misses, and a database outage.
 * SQL round trips are counted at the local database program per connection-string user, so other
 * test files running at the same time do not disturb the counts. Time is moved with a fake Date.
 */

const SECOND_MS = 1000;
const MAX_AGE_SECONDS = 60; // the default
const REFRESH_AHEAD_SECONDS = 300; // the default

interface TokenBody {
  access_token: string;
  expires_at: string;
  refreshed: boolean;
  branch_id: string;
  client_id: number;
}

/** A view of the database under its own user name: the Worker's SQL round trips through it are counted. */
function countedDatabase() {
  const user = uniqueId("cache").replace(/-/g, "_");
  const url = new URL(testEnv.TOKEN_MANAGEMENT_DATABASE_URL as string);
  url.username = user;
  return {
    envOverrides: { TOKEN_MANAGEMENT_DATABASE_URL: url.toString() },
    async requests(): Promise<number> {
      const response = await fetch(`${testEnv.NEON_LOCAL_URL}/stats?user=${user}`);
      return ((await response.json()) as { requests: number }).requests;
    },
  };
}

/** Nothing listens on the discard port: every query fails to connect. */
const DATABASE_DOWN = { NEON_LOCAL_FETCH_ENDPOINT: "http://127.0.0.1:9/sql" };
const LOCATION_ONLY = { TOKEN_CACHE_MEMORY_ENTRIES: "0" };

function read(branchId: string, envOverrides: CallOptions["envOverrides"] = {}): Promise<Response> {
  return call(`/tokens/${encodeURIComponent(branchId)}`, { key: "service", envOverrides });
}

/** Reads and asserts a 200 answered by the given tier. */
async function readFrom(
  branchId: string,
  tier: "memory" | "location" | "database",
  envOverrides: CallOptions["envOverrides"] = {},
): Promise<TokenBody & { cacheStatus: string }> {
  const response = await read(branchId, envOverrides);
  const text = await response.text();
  expect(response.status, text).toBe(200);
  const cacheStatus = response.headers.get("cache-status") ?? "";
  expect(cacheStatus, text).toContain(`detail=${tier}`);
  expect(response.headers.get("cache-control")).toBe("no-store");
  return { ...(JSON.parse(text) as TokenBody), cacheStatus };
}

function useFakeDate(at: number): (ms: number) => void {
  vi.useFakeTimers({ toFake: ["Date"] });
  vi.setSystemTime(at);
  return (ms) => vi.setSystemTime(ms);
}

afterEach(() => {
  vi.useRealTimers();
  vi.restoreAllMocks();
});

describe("freshness rules (pure)", () => {
  const policy = { maxAgeSeconds: MAX_AGE_SECONDS, refreshAheadSeconds: REFRESH_AHEAD_SECONDS };
  const readAt = Date.UTC(2026, 0, 1, 12, 0, 0);
  const hourLater = readAt + 3600 * SECOND_MS;
  const entry = (expiresAtMs = hourLater, lifetimeSeconds: number | null = 3600) => ({
    readAtMs: readAt,
    expiresAtMs,
    lifetimeSeconds,
  });
  const at = (ms: number) => new Date(ms);

  it("serves an entry younger than half the max age, and re-validates from half the max age on", () => {
    expect(entryFreshness(entry(), at(readAt), policy)).toBe("fresh");
    expect(entryFreshness(entry(), at(readAt + 30 * SECOND_MS - 1), policy)).toBe("fresh");
    expect(entryFreshness(entry(), at(readAt + 30 * SECOND_MS), policy)).toBe("revalidate");
  });

  it("never serves an entry as old as the max age", () => {
    expect(entryFreshness(entry(), at(readAt + 60 * SECOND_MS - 1), policy)).toBe("revalidate");
    expect(entryFreshness(entry(), at(readAt + 60 * SECOND_MS), policy)).toBe("unusable");
    expect(entryFreshness(entry(), at(readAt + 3600 * SECOND_MS), policy)).toBe("unusable");
  });

  it("never serves a token with the refresh-ahead margin or less left (the database path's rule)", () => {
    const expiresAt = readAt + (REFRESH_AHEAD_SECONDS + 10) * SECOND_MS;
    const edge = expiresAt - REFRESH_AHEAD_SECONDS * SECOND_MS;
    expect(entryFreshness(entry(expiresAt), at(edge - 1), policy)).toBe("fresh");
    expect(entryFreshness(entry(expiresAt), at(edge), policy)).toBe("unusable");
    // Exactly where needsRefresh says so, not a copy of it.
    expect(needsRefresh({ expiresAt: at(expiresAt), lifetimeSeconds: 3600 }, at(edge), REFRESH_AHEAD_SECONDS)).toBe(
      true,
    );
    expect(entryFreshness(entry(readAt - 1), at(readAt), policy)).toBe("unusable"); // already expired
  });

  it("uses the short-lifetime window for tokens that live less than the margin", () => {
    // A 120 s token is refreshed with half of its lifetime left (60 s), not 300 s before expiry.
    const expiresAt = readAt + 100 * SECOND_MS;
    const edge = expiresAt - 60 * SECOND_MS;
    expect(entryFreshness(entry(expiresAt, 120), at(edge - 1), policy)).toBe("revalidate");
    expect(entryFreshness(entry(expiresAt, 120), at(edge), policy)).toBe("unusable");
  });

  it("is off with a max age of 0", () => {
    expect(entryFreshness(entry(), at(readAt), { ...policy, maxAgeSeconds: 0 })).toBe("unusable");
  });

  it("reads back only well-formed entries", () => {
    expect(parseEntry("not json")).toBeUndefined();
    expect(parseEntry("null")).toBeUndefined();
    expect(parseEntry(JSON.stringify({ v: 2, readAtMs: 1, expiresAtMs: 2, lifetimeSeconds: 3, sealed: "x" }))).toBe(
      undefined,
    );
    expect(parseEntry(JSON.stringify({ v: 1, readAtMs: "1", expiresAtMs: 2, lifetimeSeconds: 3, sealed: "x" }))).toBe(
      undefined,
    );
    const good = { v: 1, readAtMs: 1, expiresAtMs: 2, lifetimeSeconds: null, sealed: "x" };
    expect(parseEntry(JSON.stringify(good))).toEqual(good);
  });
});

describe("memory tier bound", () => {
  it("keeps at most its capacity, evicting the least recently used", () => {
    const lru = new MemoryLru<number>(3);
    for (const [i, key] of ["a", "b", "c"].entries()) lru.set(key, i);
    expect(lru.get("a")).toBe(0); // a is now the most recent
    lru.set("d", 3);
    expect(lru.size).toBe(3);
    expect(lru.get("b")).toBeUndefined();
    expect([lru.get("a"), lru.get("c"), lru.get("d")]).toEqual([0, 2, 3]);
    lru.resize(1);
    expect(lru.size).toBe(1);
    expect(lru.get("d")).toBe(3);
    lru.resize(0);
    lru.set("e", 4);
    expect(lru.size).toBe(0);
  });

  it("holds no more than TOKEN_CACHE_MEMORY_ENTRIES tokens; an evicted one comes from the location", async () => {
    const branches = await Promise.all([connectBranch(), connectBranch(), connectBranch()]);
    const small = { TOKEN_CACHE_MEMORY_ENTRIES: "2" };
    for (const branch of branches) await readFrom(branch.branchId, "database", small);
    expect(memoryTierSize()).toBe(2);
    await readFrom(branches[2]!.branchId, "memory", small);
    await readFrom(branches[1]!.branchId, "memory", small);
    // The first one was evicted from memory but is still in this location.
    await readFrom(branches[0]!.branchId, "location", small);
    expect(memoryTierSize()).toBe(2);
  });
});

describe("the token_served line (LOG_TOKEN_READS)", () => {
  const servedLines = (log: MockInstance<typeof console.log>) =>
    log.mock.calls.map((args) => String(args[0])).filter((line) => line.includes('"token_served"'));

  it("is off by default (wrangler.toml and unset): reads write no success line, a refresh still logs its own", async () => {
    const branch = await connectBranch();
    const log = vi.spyOn(console, "log");
    for (const value of [undefined, ""]) {
      const overrides = value === undefined ? {} : { LOG_TOKEN_READS: value };
      for (let i = 0; i < 3; i++)
        await readFrom(branch.branchId, i === 0 && value === undefined ? "database" : "memory", overrides);
    }
    expect(servedLines(log)).toEqual([]);
    const forced = await call("/tokens/refresh", {
      key: "admin",
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ branch_id: branch.branchId }),
    });
    expect(forced.status).toBe(200);
    const lines = log.mock.calls.map((args) => String(args[0]));
    expect(lines.some((line) => line.includes('"token_refreshed"'))).toBe(true);
    log.mockRestore();
  });

  it('is written for every read with "all", and for that fraction of reads with a rate', async () => {
    const branch = await connectBranch();
    await readFrom(branch.branchId, "database");
    const log = vi.spyOn(console, "log");
    for (let i = 0; i < 4; i++) await readFrom(branch.branchId, "memory", { LOG_TOKEN_READS: "all" });
    expect(servedLines(log)).toHaveLength(4);
    log.mockClear();
    const random = vi.spyOn(Math, "random");
    for (const draw of [0.05, 0.5, 0.09, 0.95]) {
      random.mockReturnValueOnce(draw);
      await readFrom(branch.branchId, "memory", { LOG_TOKEN_READS: "0.1" });
    }
    random.mockRestore();
    const lines = servedLines(log);
    expect(lines).toHaveLength(2);
    expect(JSON.parse(lines[0]!)).toMatchObject({ tier: "memory", sample_rate: 0.1 });
    log.mockRestore();
  });

  it("refuses anything else as a configuration error naming the variable", async () => {
    for (const value of ["sometimes", "2", "-0.5"]) {
      const response = await call("/health", { key: "admin", envOverrides: { LOG_TOKEN_READS: value } });
      const text = await response.text();
      expect(response.status, value).toBe(500);
      expect(text).toContain("LOG_TOKEN_READS");
    }
  });
});

describe("tiers", () => {
  it("serves a repeated read from memory with no SQL, says so in Cache-Status and the log line", async () => {
    const branch = await connectBranch();
    const db = countedDatabase();
    const log = vi.spyOn(console, "log");
    const envOverrides = { ...db.envOverrides, LOG_TOKEN_READS: "all" };
    const first = await readFrom(branch.branchId, "database", envOverrides);
    expect(first.cacheStatus).toBe("token-management; fwd=miss; stored; detail=database");
    expect(await db.requests()).toBe(1);
    for (let i = 0; i < 5; i++) {
      const again = await readFrom(branch.branchId, "memory", envOverrides);
      expect(again.access_token).toBe(first.access_token);
      expect(again.expires_at).toBe(first.expires_at);
      expect(again.refreshed).toBe(false);
      expect(again.cacheStatus).toMatch(/^token-management; hit; ttl=\d+; detail=memory$/);
    }
    expect(await db.requests()).toBe(1);
    const lines = log.mock.calls.map((args) => String(args[0])).filter((line) => line.includes('"token_served"'));
    expect(lines.map((line) => JSON.parse(line).tier)).toEqual(["database", ...Array(5).fill("memory")]);
    for (const line of lines) expect(line).not.toContain(first.access_token);
  });

  it("answers a memory hit without opening anything sealed; a location hit opens its entry once", async () => {
    const branch = await connectBranch();
    const first = await readFrom(branch.branchId, "database");
    const decrypt = vi.spyOn(crypto.subtle, "decrypt");
    for (let i = 0; i < 3; i++)
      expect((await readFrom(branch.branchId, "memory")).access_token).toBe(first.access_token);
    expect(decrypt).not.toHaveBeenCalled();
    // The location tier leaves the isolate: its entry stays sealed and is opened per hit.
    const located = await readFrom(branch.branchId, "location", LOCATION_ONLY);
    expect(located.access_token).toBe(first.access_token);
    expect(decrypt).toHaveBeenCalledTimes(1);
  });

  it("serves from the location tier alone when the memory tier is off", async () => {
    const branch = await connectBranch();
    const db = countedDatabase();
    const env = { ...db.envOverrides, ...LOCATION_ONLY };
    const first = await readFrom(branch.branchId, "database", env);
    const second = await readFrom(branch.branchId, "location", env);
    expect(second.access_token).toBe(first.access_token);
    expect(await db.requests()).toBe(1);
  });

  it("does not make an entry younger when a location hit fills memory", async () => {
    const branch = await connectBranch();
    const t0 = Date.now();
    const setTime = useFakeDate(t0);
    await readFrom(branch.branchId, "database", LOCATION_ONLY); // stored in the location only, read at t0
    setTime(t0 + 10 * SECOND_MS);
    await readFrom(branch.branchId, "location"); // fills memory with the entry read at t0
    setTime(t0 + 20 * SECOND_MS);
    await readFrom(branch.branchId, "memory");
    // At t0 + max age the entry is too old in every tier, though memory got it at t0 + 10 s.
    setTime(t0 + MAX_AGE_SECONDS * SECOND_MS);
    const stale = await readFrom(branch.branchId, "database");
    expect(stale.cacheStatus).toBe("token-management; fwd=stale; stored; detail=database");
  });

  it("is off with TOKEN_CACHE_MAX_AGE_SECONDS=0: every read goes to the database", async () => {
    const branch = await connectBranch();
    const db = countedDatabase();
    const env = { ...db.envOverrides, TOKEN_CACHE_MAX_AGE_SECONDS: "0" };
    for (let i = 0; i < 3; i++) {
      const body = await readFrom(branch.branchId, "database", env);
      expect(body.cacheStatus).toBe("token-management; fwd=bypass; detail=database");
    }
    expect(await db.requests()).toBe(3);
  });
});

describe("freshness at the route", () => {
  it("serves a hit until half the max age; from then on serves it and re-reads in the background", async () => {
    const branch = await connectBranch();
    const db = countedDatabase();
    const t0 = Date.now();
    const setTime = useFakeDate(t0);
    await readFrom(branch.branchId, "database", db.envOverrides);
    setTime(t0 + 30 * SECOND_MS - 1);
    await readFrom(branch.branchId, "memory", db.envOverrides);
    expect(await db.requests()).toBe(1);
    setTime(t0 + 30 * SECOND_MS);
    await readFrom(branch.branchId, "memory", db.envOverrides);
    expect(await db.requests()).toBe(2); // the background re-read (waitUntil) ran
    // The re-read restarted the entry's age: at t0 + 50 s it is 20 s old, a plain hit.
    setTime(t0 + 50 * SECOND_MS);
    await readFrom(branch.branchId, "memory", db.envOverrides);
    expect(await db.requests()).toBe(2);
    // And still a hit past t0 + max age (31 s old: served, and re-read again).
    setTime(t0 + (MAX_AGE_SECONDS + 1) * SECOND_MS);
    await readFrom(branch.branchId, "memory", db.envOverrides);
    expect(await db.requests()).toBe(3);
  });

  it("never serves an entry as old as the max age", async () => {
    const branch = await connectBranch();
    const db = countedDatabase();
    const t0 = Date.now();
    const setTime = useFakeDate(t0);
    await readFrom(branch.branchId, "database", db.envOverrides);
    // An entry the background re-read never renewed (the location tier, read at t0).
    setTime(t0 + MAX_AGE_SECONDS * SECOND_MS - 1);
    await readFrom(branch.branchId, "memory", { ...db.envOverrides, ...DATABASE_DOWN });
    setTime(t0 + MAX_AGE_SECONDS * SECOND_MS);
    await readFrom(branch.branchId, "database", db.envOverrides);
  });

  it("stops serving a cached token when only the refresh-ahead margin is left, and refreshes it", async () => {
    const branch = await connectBranch();
    const long = { TOKEN_CACHE_MAX_AGE_SECONDS: "3600" };
    const first = await readFrom(branch.branchId, "database", long);
    const expiresAt = new Date(first.expires_at).getTime();
    const edge = expiresAt - REFRESH_AHEAD_SECONDS * SECOND_MS;
    const setTime = useFakeDate(edge - 1);
    const before = await readFrom(branch.branchId, "memory", long);
    expect(before.access_token).toBe(first.access_token);
    setTime(edge);
    const after = await readFrom(branch.branchId, "database", long);
    expect(after.refreshed).toBe(true);
    expect(after.access_token).not.toBe(first.access_token);
    // The refreshed token is what the cache holds now.
    expect((await readFrom(branch.branchId, "memory", long)).access_token).toBe(after.access_token);
  });
});

describe("invalidation in this location", () => {
  /** Caches the branch's token in both tiers and checks that the location holds it too. */
  async function cached(branchId: string): Promise<TokenBody> {
    const body = await readFrom(branchId, "database");
    await readFrom(branchId, "memory");
    await readFrom(branchId, "location", LOCATION_ONLY);
    return body;
  }

  it("refresh (POST /tokens/refresh) replaces the entry in both tiers", async () => {
    const branch = await connectBranch();
    const old = await cached(branch.branchId);
    const refreshed = await postJson("/tokens/refresh", { branch_id: branch.branchId });
    expect(refreshed.status).toBe(200);
    expect(refreshed.headers.get("cache-status")).toBe("token-management; fwd=request; stored; detail=database");
    const fresh = await json<TokenBody>(refreshed);
    expect(fresh.access_token).not.toBe(old.access_token);
    expect((await readFrom(branch.branchId, "memory")).access_token).toBe(fresh.access_token);
    expect((await readFrom(branch.branchId, "location", LOCATION_ONLY)).access_token).toBe(fresh.access_token);
  });

  it("revoke (DELETE /tokens) drops it at once and says how long other locations may serve it", async () => {
    const branch = await connectBranch();
    await cached(branch.branchId);
    const revoked = await call(`/tokens/${branch.branchId}`, { key: "admin", method: "DELETE" });
    expect(revoked.status).toBe(200);
    const body = await json<{ cache_max_age_seconds: number; message: string }>(revoked);
    expect(body.cache_max_age_seconds).toBe(MAX_AGE_SECONDS);
    expect(body.message).toContain(`${MAX_AGE_SECONDS} s`);
    await expectProblem(await read(branch.branchId, LOCATION_ONLY), 409, "not_connected");
    await expectProblem(await read(branch.branchId), 409, "not_connected");
  });

  it("delete (DELETE /clients) drops it at once and says the bound", async () => {
    const branch = await connectBranch();
    await cached(branch.branchId);
    const deleted = await call(`/clients/${branch.clientId}`, { key: "admin", method: "DELETE" });
    expect(deleted.status).toBe(200);
    expect((await json<{ cache_max_age_seconds: number }>(deleted)).cache_max_age_seconds).toBe(MAX_AGE_SECONDS);
    await expectProblem(await read(branch.branchId, LOCATION_ONLY), 404, "not_found");
    await expectProblem(await read(branch.branchId), 404, "not_found");
  });

  it("deactivation (PATCH is_active=false) drops it at once", async () => {
    const branch = await connectBranch();
    await cached(branch.branchId);
    const patched = await postJson(`/clients/${branch.clientId}`, { is_active: false }, { method: "PATCH" });
    expect(patched.status).toBe(200);
    await expectProblem(await read(branch.branchId, LOCATION_ONLY), 404, "not_found");
    await expectProblem(await read(branch.branchId), 404, "not_found");
  });

  it("needs_reauth (the provider refuses the grant) drops it at once", async () => {
    const branch = await connectBranch();
    await cached(branch.branchId);
    await fetch(`${testEnv.OAUTH_SERVER_URL}/admin/refresh-tokens/${branch.oauthClientId}/revoke-all`, {
      method: "POST",
    });
    await expectProblem(
      await postJson("/tokens/refresh", { branch_id: branch.branchId }),
      409,
      "reauthorization_required",
    );
    await expectProblem(await read(branch.branchId, LOCATION_ONLY), 409, "reauthorization_required");
    await expectProblem(await read(branch.branchId), 409, "reauthorization_required");
  });

  it("a new consent drops it at once: the next read serves the new token", async () => {
    const branch = await connectBranch();
    const old = await cached(branch.branchId);
    await reconnectBranch(branch);
    const next = await readFrom(branch.branchId, "database");
    expect(next.access_token).not.toBe(old.access_token);
  });

  it("secret rotation (PATCH client_secret) drops it at once", async () => {
    const branch = await connectBranch();
    await cached(branch.branchId);
    const patched = await postJson(
      `/clients/${branch.clientId}`,
      { client_secret: `rotated-${crypto.randomUUID()}` },
      { method: "PATCH" },
    );
    expect(patched.status).toBe(200);
    await readFrom(branch.branchId, "database");
  });

  it("a change made elsewhere is noticed by the background re-read within the max age", async () => {
    const branch = await connectBranch();
    const t0 = Date.now();
    const setTime = useFakeDate(t0);
    await readFrom(branch.branchId, "database");
    // Revoked by another location: this one's cache is not told.
    await sql("update tokens set status = 'revoked', is_valid = false where client_id = $1", [branch.clientId]);
    setTime(t0 + 30 * SECOND_MS);
    await readFrom(branch.branchId, "memory"); // still served, and re-read in the background
    await expectProblem(await read(branch.branchId), 409, "not_connected");
  });
});

describe("corrupted entries", () => {
  async function locationKeyOf(branchId: string): Promise<string> {
    const keyring = await loadKeyring(TEST_ENCRYPTION_KEY);
    return `https://token-cache.token-management.invalid/v1/${await tokenCacheKey(keyring, branchId)}`;
  }

  async function putRaw(branchId: string, body: string): Promise<void> {
    const location = await caches.open(TOKEN_CACHE_NAME);
    await location.put(
      await locationKeyOf(branchId),
      new Response(body, { headers: { "Cache-Control": "max-age=60" } }),
    );
  }

  async function entryOf(branchId: string): Promise<CacheEntry> {
    const location = await caches.open(TOKEN_CACHE_NAME);
    const stored = await location.match(await locationKeyOf(branchId));
    expect(stored, "the location holds an entry").toBeDefined();
    return parseEntry(await stored!.text())!;
  }

  it("keeps branch ids out of the Cache API key and the token out of the entry", async () => {
    const branch = await connectBranch();
    const body = await readFrom(branch.branchId, "database", LOCATION_ONLY);
    const key = await locationKeyOf(branch.branchId);
    expect(key).not.toContain(branch.branchId);
    const raw = JSON.stringify(await entryOf(branch.branchId));
    expect(raw).not.toContain(body.access_token);
    expect(raw).not.toContain(branch.branchId);
  });

  it("ignores garbage, a tampered entry and another branch's entry, re-reads, and never answers 500", async () => {
    const [branch, other] = await Promise.all([connectBranch(), connectBranch()]);
    const otherBody = await readFrom(other.branchId, "database", LOCATION_ONLY);
    await readFrom(branch.branchId, "database", LOCATION_ONLY);
    const good = await entryOf(branch.branchId);
    const otherEntry = await entryOf(other.branchId);
    const corruptions: [string, string][] = [
      ["not JSON", "\u0000garbage{"],
      ["wrong shape", JSON.stringify({ v: 1, sealed: 42 })],
      ["ciphertext flipped", JSON.stringify({ ...good, sealed: `${good.sealed.slice(0, -2)}AA` })],
      ["made younger", JSON.stringify({ ...good, readAtMs: good.readAtMs + 1 })],
      ["expiry moved", JSON.stringify({ ...good, expiresAtMs: good.expiresAtMs + 3600 * SECOND_MS })],
      ["another branch's entry", JSON.stringify(otherEntry)],
      ["not sealed", JSON.stringify({ ...good, sealed: "v1.deadbeef.AAAA.AAAA" })],
    ];
    for (const [label, body] of corruptions) {
      await putRaw(branch.branchId, body);
      const response = await read(branch.branchId, LOCATION_ONLY);
      expect(response.status, label).toBe(200);
      expect(response.headers.get("cache-status"), label).toContain("detail=database");
      const served = await json<TokenBody>(response);
      expect(served.branch_id, label).toBe(branch.branchId);
      expect(served.access_token, label).not.toBe(otherBody.access_token);
      // Replaced by a good entry.
      await readFrom(branch.branchId, "location", LOCATION_ONLY);
    }
  });
});

describe("single flight", () => {
  it("makes one database query for 25 concurrent misses of one branch", async () => {
    const branch = await connectBranch();
    const db = countedDatabase();
    const responses = await Promise.all(Array.from({ length: 25 }, () => read(branch.branchId, db.envOverrides)));
    expect(responses.map((r) => r.status)).toEqual(Array(25).fill(200));
    const bodies = await Promise.all(responses.map((r) => json<TokenBody>(r)));
    expect(new Set(bodies.map((b) => b.access_token)).size).toBe(1);
    expect(await db.requests()).toBe(1);
  });

  it("also with the cache off", async () => {
    const branch = await connectBranch();
    const db = countedDatabase();
    const env = { ...db.envOverrides, TOKEN_CACHE_MAX_AGE_SECONDS: "0" };
    const responses = await Promise.all(Array.from({ length: 10 }, () => read(branch.branchId, env)));
    expect(responses.map((r) => r.status)).toEqual(Array(10).fill(200));
    expect(await db.requests()).toBe(1);
  });
});

describe("database outage", () => {
  it("serves a cached valid token from memory and from the location; a branch without one gets 503", async () => {
    const [cachedBranch, uncachedBranch] = await Promise.all([connectBranch(), connectBranch()]);
    const before = await readFrom(cachedBranch.branchId, "database");
    const fromMemory = await readFrom(cachedBranch.branchId, "memory", DATABASE_DOWN);
    expect(fromMemory.access_token).toBe(before.access_token);
    const fromLocation = await readFrom(cachedBranch.branchId, "location", { ...DATABASE_DOWN, ...LOCATION_ONLY });
    expect(fromLocation.access_token).toBe(before.access_token);

    const down = await read(uncachedBranch.branchId, DATABASE_DOWN);
    await expectProblem(down.clone(), 503, "database_unavailable");
    expect(Number(down.headers.get("retry-after"))).toBeGreaterThan(0);
  });

  it("keeps serving an old entry while the background re-read fails, until the max age", async () => {
    const branch = await connectBranch();
    const t0 = Date.now();
    const setTime = useFakeDate(t0);
    await readFrom(branch.branchId, "database");
    setTime(t0 + 45 * SECOND_MS);
    await readFrom(branch.branchId, "memory", DATABASE_DOWN); // the re-read fails in the background
    setTime(t0 + 50 * SECOND_MS);
    await readFrom(branch.branchId, "memory", DATABASE_DOWN); // the entry was kept
    setTime(t0 + MAX_AGE_SECONDS * SECOND_MS);
    const expired = await read(branch.branchId, DATABASE_DOWN);
    await expectProblem(expired, 503, "database_unavailable");
    // Back up: served again, and cached again.
    await readFrom(branch.branchId, "database");
    await readFrom(branch.branchId, "memory");
  });
});
