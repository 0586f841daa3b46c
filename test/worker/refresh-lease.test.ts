import { createExecutionContext, createMessageBatch, getQueueResult } from "cloudflare:test";
import { afterEach, describe, expect, it, vi } from "vitest";
import { createServices } from "../../src/context";
import worker from "../../src/index";
import { LEASE_WRITE_ALLOWANCE_MS, leaseMsFor } from "../../src/services/refresh-policy";
import { refreshDeps, refreshTokens, type SchedulerEnv } from "../../src/services/scheduled";
import { getBranchToken, type ServedToken, type TokenDeps } from "../../src/services/tokens";
import { neonFault } from "./event-helpers";
import { call, json, testEnv } from "./helpers";
import {
  type ConnectedBranch,
  connectBranch,
  currentTokens,
  introspect,
  type ProviderBehavior,
  postJson,
  providerStats,
  setProviderBehavior,
  sql,
  tokenRows,
} from "./oauth-helpers";

/**
 * The refresh lease: taken just before the provider call, on the database's clock, long enough
 * for the call and the write; every write of a result conditional on it; waiting on another's
 * refresh with few reads; duplicated queue messages; a rotated refresh token whose write fails.
 */

/** Shorter than the provider's answer in these tests, as if the holder had stalled. */
const SHORT_LEASE_MS = 300;
const SLOW_PROVIDER_MS = 1_200;

interface TokenBody {
  access_token: string;
  refreshed: boolean;
}

async function expireIn(clientId: number, seconds: number): Promise<void> {
  await sql("update tokens set expires_at = now() + make_interval(secs => $2) where client_id = $1 and is_valid", [
    clientId,
    seconds,
  ]);
}

/** The current row's lease: its owner and how many ms it still runs on the database's clock. */
async function leaseOf(clientId: number): Promise<{ owner: string | null; remainingMs: number | null }> {
  const [row] = await sql(
    "select lease_owner, (extract(epoch from lease_expires_at - now()) * 1000)::int from tokens where client_id = $1 and is_valid",
    [clientId],
  );
  return { owner: row![0] ?? null, remainingMs: row![1] === null ? null : Number(row![1]) };
}

/** Waits until someone holds the lease on the branch's token, and returns the owner. */
async function leaseTaken(clientId: number): Promise<string> {
  return vi.waitFor(
    async () => {
      const { owner } = await leaseOf(clientId);
      if (!owner) throw new Error("not leased yet");
      return owner;
    },
    { timeout: 10_000, interval: 20 },
  );
}

const pause = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** The service's dependencies as a request builds them, with a lease shorter than the provider's answer. */
async function shortLeaseDeps(background: Promise<unknown>[] = []): Promise<TokenDeps> {
  const d = await createServices(testEnv);
  return {
    db: d.db,
    keyring: d.keyring,
    providers: d.providers,
    refreshAheadSeconds: d.config.REFRESH_AHEAD_SECONDS,
    leaseMs: SHORT_LEASE_MS,
    background: { defer: (task) => background.push(task), budgetMs: 1_500 },
    events: d.events,
  };
}

/** Nothing in the branch's history was ever marked dead, and its current row is clean. */
async function expectHealthyGrant(branch: ConnectedBranch): Promise<void> {
  const rows = await tokenRows(branch.clientId);
  expect(rows.map((row) => row.status)).not.toContain("needs_reauth");
  expect(rows.at(-1)).toMatchObject({ status: "active", is_valid: true });
  expect(await leaseOf(branch.clientId)).toEqual({ owner: null, remainingMs: null });
}

/** The stored refresh token is the newest: the provider knows it, and a refresh with it works. */
async function expectNewestRefreshTokenStored(branch: ConnectedBranch, replaced: string): Promise<void> {
  const stored = await currentTokens(branch.clientId);
  expect(stored.refreshToken).not.toBe(replaced);
  expect((await introspect(stored.refreshToken!, branch)).active).toBe(true);
  const grants = (await providerStats(branch.oauthClientId)).refreshGrants;
  const again = await postJson("/tokens/refresh", { branch_id: branch.branchId });
  expect(again.status, await again.clone().text()).toBe(200);
  expect((await providerStats(branch.oauthClientId)).refreshGrants).toBe(grants + 1);
}

/**
 * A connected branch whose provider then answers token requests after `delayMs` (connecting first,
 * so the code exchange is not slowed down past OAUTH_TIMEOUT_MS).
 */
async function slowBranch(delayMs: number, behavior: Partial<ProviderBehavior> = {}): Promise<ConnectedBranch> {
  const branch = await connectBranch({ providerBehavior: behavior });
  await setProviderBehavior(branch.oauthClientId, { tokenDelayMs: delayMs });
  return branch;
}

describe("the refresh lease", () => {
  it("lasts OAUTH_TIMEOUT_MS plus the write allowance from the database's clock, on demand and in the cron", async () => {
    const expectedMs = leaseMsFor(Number(testEnv.OAUTH_TIMEOUT_MS));
    expect(expectedMs).toBe(Number(testEnv.OAUTH_TIMEOUT_MS) + LEASE_WRITE_ALLOWANCE_MS);

    const onDemand = await slowBranch(600);
    await expireIn(onDemand.clientId, -10);
    const read = call(`/tokens/${onDemand.branchId}`, { key: "service" });
    await leaseTaken(onDemand.clientId);
    const { remainingMs } = await leaseOf(onDemand.clientId);
    expect(remainingMs).toBeGreaterThan(expectedMs - 2_000);
    expect(remainingMs).toBeLessThanOrEqual(expectedMs);
    expect((await read).status).toBe(200);

    // A cron run whose scheduled time is off the real clock (here by ten minutes) still leases on
    // the database's clock. (Real-time expiries: the scheduled tests' past eras never see them.)
    const scheduled = await slowBranch(600);
    const scheduledTime = new Date(Date.now() + 10 * 60_000);
    await expireIn(scheduled.clientId, 15 * 60);
    const d = refreshDeps(await createServices(testEnv));
    const run = refreshTokens(d, [(await currentTokens(scheduled.clientId)).row.id], scheduledTime);
    await leaseTaken(scheduled.clientId);
    const cronLease = await leaseOf(scheduled.clientId);
    expect(cronLease.remainingMs).toBeGreaterThan(expectedMs - 2_000);
    expect(cronLease.remainingMs).toBeLessThanOrEqual(expectedMs);
    expect(await run).toMatchObject({ refreshed: 1, dropped: 0 });
    expect(await leaseOf(scheduled.clientId)).toEqual({ owner: null, remainingMs: null });
  });

  it("keeps a rotating grant alive when a slow holder's lease is taken over on demand", async () => {
    const branch = await slowBranch(SLOW_PROVIDER_MS, { rotateRefreshTokens: true });
    const original = (await currentTokens(branch.clientId)).refreshToken!;
    await expireIn(branch.clientId, -10);
    const deps = await shortLeaseDeps();

    const first = getBranchToken(deps, branch.branchId, new Date());
    await leaseTaken(branch.clientId);
    await pause(SHORT_LEASE_MS + 200);
    // The first holder's lease ran out mid-call: a second request takes it over and refreshes with
    // the same refresh token, which the provider rotates away when it answers the first.
    const second = getBranchToken(deps, branch.branchId, new Date());
    const [a, b] = (await Promise.all([first, second])) as [ServedToken, ServedToken];

    expect(a.refreshed).toBe(true);
    expect(b.accessToken).toBe(a.accessToken);
    expect((await introspect(a.accessToken, branch)).active).toBe(true);
    expect((await providerStats(branch.oauthClientId)).refreshGrants).toBe(1);
    expect((await currentTokens(branch.clientId)).accessToken).toBe(a.accessToken);
    await expectHealthyGrant(branch);
    await expectNewestRefreshTokenStored(branch, original);
  });

  it("keeps a rotating grant alive when an on-demand read takes over a slow cron lease", async () => {
    const branch = await slowBranch(SLOW_PROVIDER_MS, { rotateRefreshTokens: true });
    const original = (await currentTokens(branch.clientId)).refreshToken!;
    await expireIn(branch.clientId, -10);
    const d = { ...refreshDeps(await createServices(testEnv)), leaseMs: SHORT_LEASE_MS };

    const cron = refreshTokens(d, [(await currentTokens(branch.clientId)).row.id], new Date());
    await leaseTaken(branch.clientId);
    await pause(SHORT_LEASE_MS + 200);
    const read = call(`/tokens/${branch.branchId}`, { key: "service" });
    const [counts, response] = await Promise.all([cron, read]);

    // The cron's rotated token replaced the one it was issued for, so it was kept although the
    // lease was lost; the reader's invalid_grant (its token had been rotated away) killed nothing.
    expect(counts).toMatchObject({ refreshed: 1, dead: 0, failed: 0 });
    expect(response.status, await response.clone().text()).toBe(200);
    const body = await json<TokenBody>(response);
    expect(body.access_token).toBe((await currentTokens(branch.clientId)).accessToken);
    expect((await providerStats(branch.oauthClientId)).refreshGrants).toBe(1);
    await expectHealthyGrant(branch);
    await expectNewestRefreshTokenStored(branch, original);
  });

  it("drops the result of a holder that lost its lease: the taker's token is the one stored", async () => {
    const branch = await slowBranch(SLOW_PROVIDER_MS);
    await expireIn(branch.clientId, -10);
    const d = { ...refreshDeps(await createServices(testEnv)), leaseMs: SHORT_LEASE_MS };

    const cron = refreshTokens(d, [(await currentTokens(branch.clientId)).row.id], new Date());
    await leaseTaken(branch.clientId);
    await pause(SHORT_LEASE_MS + 200);
    const read = call(`/tokens/${branch.branchId}`, { key: "service" });
    const [counts, response] = await Promise.all([cron, read]);

    expect(counts).toMatchObject({ refreshed: 0, dropped: 1 });
    expect((await providerStats(branch.oauthClientId)).refreshGrants).toBe(2);
    const body = await json<TokenBody>(response);
    expect(body.refreshed).toBe(true);
    // The cron's answer came first and would have landed first; the stored token is the taker's.
    expect((await currentTokens(branch.clientId)).accessToken).toBe(body.access_token);
    await expectHealthyGrant(branch);
  });

  it("never records a dead grant from a refresher that lost its lease", async () => {
    const branch = await slowBranch(SLOW_PROVIDER_MS);
    await expireIn(branch.clientId, 120);
    const d = { ...refreshDeps(await createServices(testEnv)), leaseMs: SHORT_LEASE_MS };
    const cron = refreshTokens(d, [(await currentTokens(branch.clientId)).row.id], new Date());
    await leaseTaken(branch.clientId);
    // The slow holder's lease runs out and another refresher takes it (a crashed isolate's lease,
    // as far as anyone can tell). Then the provider refuses the grant to the first holder.
    await pause(SHORT_LEASE_MS + 100);
    await sql(
      "update tokens set lease_owner = 'another-refresher', lease_expires_at = now() + interval '1 minute' where client_id = $1 and is_valid",
      [branch.clientId],
    );
    await fetch(`${testEnv.OAUTH_SERVER_URL}/admin/refresh-tokens/${branch.oauthClientId}/revoke-all`, {
      method: "POST",
    });
    expect(await cron).toMatchObject({ dead: 0, dropped: 1 });
    const rows = await tokenRows(branch.clientId);
    expect(rows.at(-1)).toMatchObject({ status: "active", is_valid: true, failure_count: 0 });
    const { owner } = await leaseOf(branch.clientId);
    expect(owner).toBe("another-refresher");
  });
  it("confirms invalid_grant after taking over a lapsed lease on the next clean attempt before marking the grant dead", async () => {
    const branch = await connectBranch();
    await expireIn(branch.clientId, -10);
    // A holder's lease lapsed without a release: it may still be in flight, and may have rotated
    // the refresh token, so an invalid_grant now proves nothing yet.
    await sql(
      "update tokens set lease_owner = 'stalled-isolate', lease_expires_at = now() - interval '1 second' where client_id = $1 and is_valid",
      [branch.clientId],
    );
    await fetch(`${testEnv.OAUTH_SERVER_URL}/admin/refresh-tokens/${branch.oauthClientId}/revoke-all`, {
      method: "POST",
    });
    const first = await call(`/tokens/${branch.branchId}`, { key: "service" });
    expect(first.status).toBe(503);
    expect((await tokenRows(branch.clientId)).at(-1)).toMatchObject({ status: "active", is_valid: true });
    expect(await leaseOf(branch.clientId)).toEqual({ owner: null, remainingMs: null });

    // The next attempt (after the backoff) holds a clean lease: now the grant is dead.
    await sql("update tokens set next_attempt_at = null where client_id = $1 and is_valid", [branch.clientId]);
    const second = await call(`/tokens/${branch.branchId}`, { key: "service" });
    expect(second.status).toBe(409);
    expect((await json<{ code: string }>(second)).code).toBe("reauthorization_required");
    expect((await tokenRows(branch.clientId)).at(-1)).toMatchObject({ status: "needs_reauth", is_valid: false });
  });
});

describe("waiting on another isolate's refresh", () => {
  it("costs a waiter at most 15 SQL round trips while a refresh takes 3 s", async () => {
    const slow = { OAUTH_TIMEOUT_MS: "6000" };
    const branch = await slowBranch(3_000);
    await expireIn(branch.clientId, -10);
    const holder = call(`/tokens/${branch.branchId}`, { key: "service", envOverrides: slow });
    await leaseTaken(branch.clientId);

    // The waiter stands for another isolate (this one would join the holder's read in memory): it
    // calls the service with its own database handle, whose SQL goes under its own user name,
    // which neon-local counts separately.
    const user = `waiter-${crypto.randomUUID().slice(0, 8)}`;
    const url = new URL(testEnv.TOKEN_MANAGEMENT_DATABASE_URL as string);
    url.username = user;
    const d = await createServices({ ...testEnv, ...slow, TOKEN_MANAGEMENT_DATABASE_URL: url.toString() } as Env);
    const deps: TokenDeps = {
      db: d.db,
      keyring: d.keyring,
      providers: d.providers,
      refreshAheadSeconds: d.config.REFRESH_AHEAD_SECONDS,
      leaseMs: leaseMsFor(d.config.OAUTH_TIMEOUT_MS),
      background: { defer: () => undefined, budgetMs: 0 },
      events: d.events,
    };
    const started = Date.now();
    const waited = await getBranchToken(deps, branch.branchId, new Date());
    const waitedMs = Date.now() - started;
    const held = await holder;

    expect(held.status, await held.clone().text()).toBe(200);
    const h = await json<TokenBody>(held);
    expect(waited).toMatchObject({ refreshed: true, accessToken: h.access_token });
    expect((await providerStats(branch.oauthClientId)).refreshGrants).toBe(1);
    expect(waitedMs).toBeGreaterThan(1_500);
    const stats = (await (await fetch(`${testEnv.NEON_LOCAL_URL}/stats?user=${user}`)).json()) as {
      requests: number;
    };
    // The read, one claim, then plain reads at 50, 100, 200 … 1000 ms intervals.
    expect(stats.requests).toBeGreaterThanOrEqual(4);
    expect(stats.requests).toBeLessThanOrEqual(15);
  });
});

describe("the queue consumer", () => {
  it("re-checks each token before refreshing: a message delivered twice causes one refresh grant", async () => {
    const branch = await connectBranch();
    await expireIn(branch.clientId, 60); // due: inside CRON_REFRESH_WINDOW_SECONDS
    const body = { tokenIds: [(await currentTokens(branch.clientId)).row.id] };
    const deliver = async (ids: string[]) => {
      const batch = createMessageBatch(
        "token-refresh",
        ids.map((id) => ({ id, timestamp: new Date(), attempts: 1, body })),
      );
      const ctx = createExecutionContext();
      await worker.queue(batch, { ...testEnv, REFRESH_QUEUE: undefined } as SchedulerEnv);
      return getQueueResult(batch, ctx);
    };

    // The same message twice in one batch, then once more in a later batch.
    expect((await deliver(["dup-1", "dup-2"])).explicitAcks).toEqual(["dup-1", "dup-2"]);
    expect((await deliver(["dup-3"])).explicitAcks).toEqual(["dup-3"]);
    expect((await providerStats(branch.oauthClientId)).refreshGrants).toBe(1);
    const { row } = await currentTokens(branch.clientId);
    expect(new Date(row.expires_at).getTime()).toBeGreaterThan(Date.now() + 3_000_000);
  });
});

describe("a rotated refresh token whose write fails", () => {
  afterEach(async () => {
    await neonFault({ mode: "ok" });
  });

  it("is written in the background once the database answers again, and the lease is released", async () => {
    const branch = await slowBranch(800, { rotateRefreshTokens: true });
    const original = (await currentTokens(branch.clientId)).refreshToken!;
    await expireIn(branch.clientId, -10);
    const errors = vi.spyOn(console, "error");
    const logs = vi.spyOn(console, "log");
    try {
      const read = call(`/tokens/${branch.branchId}`, { key: "service" });
      const owner = await leaseTaken(branch.clientId);
      // Only this refresher's result write fails: the database is down for it alone.
      await neonFault({ mode: "down", match: [owner, 'set "access_token"'] });
      const recovered = pause(2_500).then(() => neonFault({ mode: "ok" }));
      // call() returns once the request's waitUntil work is done.
      const [response] = await Promise.all([read, recovered]);
      expect(response.status, await response.clone().text()).toBe(200);
      const served = await json<TokenBody>(response);
      expect(served.refreshed).toBe(true);

      const stored = await currentTokens(branch.clientId);
      expect(stored.accessToken).toBe(served.access_token);
      const lines = (spy: typeof logs) => spy.mock.calls.map((args) => String(args[0]));
      expect(lines(logs).filter((l) => l.includes('"rotated_refresh_token_persisted_late"'))).toHaveLength(1);
      expect(lines(errors).filter((l) => l.includes("rotated_refresh_token_lost"))).toEqual([]);
    } finally {
      errors.mockRestore();
      logs.mockRestore();
    }
    await expectHealthyGrant(branch);
    await expectNewestRefreshTokenStored(branch, original);
  });

  it("in a cron run, is retried on its own after the batch fails, and counted refreshed once it lands", async () => {
    const branch = await slowBranch(800, { rotateRefreshTokens: true });
    const original = (await currentTokens(branch.clientId)).refreshToken!;
    await expireIn(branch.clientId, 60);
    const d = { ...refreshDeps(await createServices(testEnv)), persistBudgetMs: 10_000 };
    const run = refreshTokens(d, [(await currentTokens(branch.clientId)).row.id], new Date());
    const owner = await leaseTaken(branch.clientId);
    await neonFault({ mode: "down", match: [owner, 'set "access_token"'] });
    // The batch's four attempts take about 0.7 s; the database comes back during the background retries.
    const recovered = pause(2_000).then(() => neonFault({ mode: "ok" }));
    const [counts] = await Promise.all([run, recovered]);
    expect(counts).toMatchObject({ refreshed: 1, unsaved: 0, dropped: 0 });
    await expectHealthyGrant(branch);
    await expectNewestRefreshTokenStored(branch, original);
  });

  it("is retried until the background budget ends, then logs one error line and releases the lease", async () => {
    const branch = await slowBranch(800, { rotateRefreshTokens: true });
    const before = await currentTokens(branch.clientId);
    await expireIn(branch.clientId, -10);
    const background: Promise<unknown>[] = [];
    const deps = { ...(await shortLeaseDeps(background)), leaseMs: leaseMsFor(Number(testEnv.OAUTH_TIMEOUT_MS)) };
    const errors = vi.spyOn(console, "error");
    try {
      const read = getBranchToken(deps, branch.branchId, new Date());
      const owner = await leaseTaken(branch.clientId);
      await neonFault({ mode: "down", match: [owner, 'set "access_token"'] });
      const served = await read;
      expect(served.refreshed).toBe(true);
      expect(background).toHaveLength(1);
      expect(await background[0]).toBe("lost");

      const lines = errors.mock.calls.map((args) => String(args[0]));
      expect(lines).toHaveLength(1);
      const line = JSON.parse(lines[0]!) as Record<string, unknown>;
      expect(line).toMatchObject({ level: "error", event: "rotated_refresh_token_lost", token: before.row.id });
      expect(String(line.message)).toContain("re-consent");
      expect(lines[0]).not.toContain(served.accessToken);
    } finally {
      errors.mockRestore();
      await neonFault({ mode: "ok" });
    }
    // The lease is given back; the old refresh token stays stored (the provider rotated it away).
    expect(await leaseOf(branch.clientId)).toEqual({ owner: null, remainingMs: null });
    expect((await currentTokens(branch.clientId)).refreshToken).toBe(before.refreshToken);
  });
});

describe("claims for several lanes (the cron and the queue)", () => {
  /** A view of the database under its own user name, so its SQL round trips are counted alone. */
  function countedEnv() {
    const user = `claims_${crypto.randomUUID().slice(0, 8)}`;
    const url = new URL(testEnv.TOKEN_MANAGEMENT_DATABASE_URL as string);
    url.username = user;
    return {
      env: { ...testEnv, TOKEN_MANAGEMENT_DATABASE_URL: url.toString() },
      async requests(): Promise<number> {
        const response = await fetch(`${testEnv.NEON_LOCAL_URL}/stats?user=${user}`);
        return ((await response.json()) as { requests: number }).requests;
      },
    };
  }

  it("claims the tokens several lanes will start in one statement: 30 tokens in a handful of round trips", async () => {
    const branches = await Promise.all(Array.from({ length: 30 }, () => connectBranch()));
    // Uneven provider times, so the lanes come free one by one (as they do at scale).
    await Promise.all(
      branches.map((b, i) => setProviderBehavior(b.oauthClientId, { tokenDelayMs: 30 + (i % 6) * 15 })),
    );
    for (const b of branches) await expireIn(b.clientId, -10);
    const ids = await Promise.all(branches.map(async (b) => (await currentTokens(b.clientId)).row.id));
    const counted = countedEnv();
    const d = refreshDeps(await createServices(counted.env));

    const counts = await refreshTokens(d, ids, new Date());

    expect(counts).toMatchObject({ refreshed: 30, failed: 0, skipped: 0, dropped: 0 });
    // One claim per free lane (the previous rule) took about one statement per token here.
    expect(await counted.requests()).toBeLessThanOrEqual(8);
    for (const b of branches) expect((await providerStats(b.oauthClientId)).refreshGrants).toBe(1);
    for (const b of branches) expect(await leaseOf(b.clientId)).toEqual({ owner: null, remainingMs: null });
  });

  it("runs a queue batch's messages as one pool of lanes: six 2-token messages in a handful of round trips", async () => {
    const branches = await Promise.all(Array.from({ length: 12 }, () => connectBranch()));
    await Promise.all(branches.map((b) => setProviderBehavior(b.oauthClientId, { tokenDelayMs: 40 })));
    for (const b of branches) await expireIn(b.clientId, 60);
    const ids = await Promise.all(branches.map(async (b) => (await currentTokens(b.clientId)).row.id));
    // Six messages of two tokens; the last one repeats a token of the first (a redelivered id).
    const messages = Array.from({ length: 6 }, (_, i) => ({
      id: `pool-${i}`,
      timestamp: new Date(),
      attempts: 1,
      body: { tokenIds: i === 5 ? [ids[10]!, ids[11]!, ids[0]!] : [ids[2 * i]!, ids[2 * i + 1]!] },
    }));
    const counted = countedEnv();
    const batch = createMessageBatch("token-refresh", messages);
    const ctx = createExecutionContext();
    await worker.queue(batch, { ...counted.env, REFRESH_QUEUE: undefined } as SchedulerEnv);

    expect((await getQueueResult(batch, ctx)).explicitAcks).toEqual(messages.map((m) => m.id));
    for (const b of branches) expect((await providerStats(b.oauthClientId)).refreshGrants).toBe(1);
    // One message after the other took a claim and a write each at least (12 and more here).
    expect(await counted.requests()).toBeLessThanOrEqual(6);
  });

  it("claims a token waiting past the window again before its call, so the call starts with a full lease", async () => {
    const claimAheadMs = 150;
    const d = { ...refreshDeps(await createServices(testEnv)), claimAheadMs };
    // Lane 1 comes free after 50 ms, claims the last two tokens ahead, and starts one of them; the
    // other waits ~900 ms for the next free lane, far past the window.
    const branches = await Promise.all(Array.from({ length: 8 }, () => connectBranch()));
    await Promise.all(
      branches.map((b, i) => setProviderBehavior(b.oauthClientId, { tokenDelayMs: i === 0 ? 50 : 900 })),
    );
    for (const b of branches) await expireIn(b.clientId, -10);
    const ids = await Promise.all(branches.map(async (b) => (await currentTokens(b.clientId)).row.id));
    const lastTwo = branches.slice(6);
    // The code exchange counted one token request each.
    const started = async (b: ConnectedBranch) => (await providerStats(b.oauthClientId)).tokenRequests > 1;

    const run = refreshTokens(d, ids, new Date());
    const first = await vi.waitFor(
      async () => {
        for (const b of lastTwo) if (await started(b)) return b;
        throw new Error("neither started yet");
      },
      { timeout: 10_000, interval: 5 },
    );
    const late = lastTwo.find((b) => b !== first)!;
    expect(await started(late)).toBe(false);
    await vi.waitFor(
      async () => {
        if (!(await started(late))) throw new Error("not started yet");
      },
      { timeout: 10_000, interval: 5 },
    );
    // Its provider call has just started (it takes 900 ms): the lease ahead is (about) a full one,
    // not what was left of the claim made ~850 ms before.
    const { owner, remainingMs } = await leaseOf(late.clientId);
    expect(owner).not.toBeNull();
    expect(remainingMs).toBeGreaterThan(d.leaseMs - 300);

    expect(await run).toMatchObject({ refreshed: 8, failed: 0, skipped: 0, dropped: 0 });
    for (const b of branches) expect((await providerStats(b.oauthClientId)).refreshGrants).toBe(1);
  });
});
