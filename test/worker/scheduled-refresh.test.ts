import { createExecutionContext, createMessageBatch, createScheduledController, getQueueResult } from "cloudflare:test";
import { describe, expect, it, vi } from "vitest";
import worker from "../../src/index";
import { type CronSummary, runScheduledRefresh, type SchedulerEnv } from "../../src/services/scheduled";
import { leaseTaken, neonFault } from "./event-helpers";
import { testEnv } from "./helpers";
import {
  type ConnectedBranch,
  connectBranch,
  currentTokens,
  introspect,
  providerStats,
  setProviderBehavior,
  sql,
  tokenRows,
} from "./oauth-helpers";

/**
 * The cron selects every due token in the database, so each test runs in its own "era": its
 * tokens are moved to expire in a past year, and the run's scheduledTime is set there. Eras go
 * backwards test by test, so no test sees tokens left by an earlier one (those expire later).
 */
let eraYear = 2020;
function nextEra(): Date {
  eraYear -= 1;
  return new Date(Date.UTC(eraYear, 0, 1));
}

const minutes = (n: number) => n * 60_000;

async function expireAt(branch: ConnectedBranch, when: Date): Promise<void> {
  await sql("update tokens set expires_at = $2 where client_id = $1 and is_valid", [
    branch.clientId,
    when.toISOString(),
  ]);
}

async function expiresAt(branch: ConnectedBranch): Promise<number> {
  const [row] = await sql("select expires_at from tokens where client_id = $1 and is_valid", [branch.clientId]);
  return new Date(row![0]!).getTime();
}

/** Bindings as strings (wrangler types them as their literal defaults). */
function cron(now: Date, overrides: Record<string, unknown> = {}): Promise<CronSummary> {
  return runScheduledRefresh({ ...testEnv, REFRESH_QUEUE: undefined, ...overrides } as SchedulerEnv, now);
}

describe("scheduled refresh", () => {
  it("refreshes only what expires within the window, oldest first, and logs one summary line", async () => {
    const era = nextEra();
    const [soon, later, notDue] = await Promise.all([connectBranch(), connectBranch(), connectBranch()]);
    await expireAt(soon!, new Date(era.getTime() + minutes(2)));
    await expireAt(later!, new Date(era.getTime() + minutes(14)));
    await expireAt(notDue!, new Date(era.getTime() + minutes(16)));

    const log = vi.spyOn(console, "log");
    const controller = createScheduledController({ scheduledTime: era.getTime(), cron: "*/5 * * * *" });
    await worker.scheduled(controller, { ...testEnv, REFRESH_QUEUE: undefined } as SchedulerEnv);
    const lines = log.mock.calls.map((args) => String(args[0])).filter((l) => l.includes('"scheduled_refresh"'));
    log.mockRestore();

    expect(lines).toHaveLength(1);
    const summary = JSON.parse(lines[0]!);
    expect(summary).toMatchObject({ due: 2, refreshed: 2, failed: 0, dead: 0, skipped: 0, queued: 0 });
    expect(summary.duration_ms).toBeGreaterThanOrEqual(0);
    // Refreshed tokens now expire `expires_in` (Google: 3599 s) after the (era) time the refresh was sent.
    expect(await expiresAt(soon!)).toBeGreaterThanOrEqual(era.getTime() + 3599_000);
    expect(await expiresAt(later!)).toBeGreaterThanOrEqual(era.getTime() + 3599_000);
    expect(await expiresAt(notDue!)).toBe(era.getTime() + minutes(16));
    expect((await providerStats(notDue!.oauthClientId)).refreshGrants).toBe(0);
    expect((await providerStats(soon!.oauthClientId)).refreshGrants).toBe(1);
  });

  it("honours CRON_MAX_REFRESHES; without a queue the next run takes the rest", async () => {
    const era = nextEra();
    const branches = await Promise.all(Array.from({ length: 5 }, () => connectBranch()));
    for (const [i, branch] of branches.entries()) await expireAt(branch, new Date(era.getTime() + minutes(1 + i)));

    const first = await cron(era, { CRON_MAX_REFRESHES: "2" });
    expect(first).toMatchObject({ due: 5, refreshed: 2, skipped: 3, queued: 0 });
    // Oldest expiry first.
    expect((await providerStats(branches[0]!.oauthClientId)).refreshGrants).toBe(1);
    expect((await providerStats(branches[1]!.oauthClientId)).refreshGrants).toBe(1);
    expect((await providerStats(branches[2]!.oauthClientId)).refreshGrants).toBe(0);

    const second = await cron(new Date(era.getTime() + minutes(5)), { CRON_MAX_REFRESHES: "2" });
    expect(second).toMatchObject({ due: 3, refreshed: 2, skipped: 1 });
    const third = await cron(new Date(era.getTime() + minutes(10)), { CRON_MAX_REFRESHES: "2" });
    expect(third).toMatchObject({ due: 1, refreshed: 1, skipped: 0 });
  });

  it("hands what is over the cap to REFRESH_QUEUE, whose consumer refreshes it with the same code", async () => {
    const era = nextEra();
    const branches = await Promise.all(Array.from({ length: 5 }, () => connectBranch()));
    for (const [i, branch] of branches.entries()) await expireAt(branch, new Date(era.getTime() + minutes(1 + i)));

    const sent: unknown[] = [];
    const queue = { sendBatch: async (messages: Iterable<{ body: unknown }>) => void sent.push(...messages) };
    const summary = await cron(era, { CRON_MAX_REFRESHES: "2", REFRESH_QUEUE: queue as unknown as Queue });
    expect(summary).toMatchObject({ due: 5, refreshed: 2, queued: 3, skipped: 0 });
    expect(sent).toHaveLength(1);
    const body = (sent[0] as { body: { tokenIds: number[] } }).body;
    expect(body.tokenIds).toHaveLength(3);

    // Deliver the message to the Worker's queue() handler, as the Queues runtime would.
    const batch = createMessageBatch("token-refresh", [{ id: "m1", timestamp: new Date(), attempts: 1, body }]);
    const ctx = createExecutionContext();
    await worker.queue(batch, testEnv);
    const result = await getQueueResult(batch, ctx);
    expect(result.explicitAcks).toEqual(["m1"]);
    for (const branch of branches) expect((await providerStats(branch.oauthClientId)).refreshGrants).toBe(1);
  });

  it("asks the queue to retry a batch when the database is down", async () => {
    const batch = createMessageBatch("token-refresh", [
      { id: "m-down", timestamp: new Date(), attempts: 1, body: { tokenIds: [1, 2, 3] } },
    ]);
    const ctx = createExecutionContext();
    await worker.queue(batch, { ...testEnv, NEON_LOCAL_FETCH_ENDPOINT: "http://127.0.0.1:9/sql" });
    const result = await getQueueResult(batch, ctx);
    expect(result.explicitAcks).toEqual([]);
    expect(result.retryMessages.map((m) => m.msgId)).toEqual(["m-down"]);
  });

  it("sends the overflow through the real queue binding when it is configured", async () => {
    const era = nextEra();
    const branches = await Promise.all(Array.from({ length: 3 }, () => connectBranch()));
    for (const [i, branch] of branches.entries()) await expireAt(branch, new Date(era.getTime() + minutes(1 + i)));

    const summary = await cron(era, {
      CRON_MAX_REFRESHES: "1",
      REFRESH_QUEUE: (testEnv as SchedulerEnv).REFRESH_QUEUE,
    });
    expect(summary).toMatchObject({ due: 3, refreshed: 1, queued: 2 });
    // The local Queues runtime delivers the message to this Worker's queue() handler.
    await vi.waitFor(
      async () => {
        for (const branch of branches) expect((await providerStats(branch.oauthClientId)).refreshGrants).toBe(1);
      },
      { timeout: 10_000, interval: 100 },
    );
  });

  it("backs off a token whose refresh failed transiently, and retries it after the backoff", async () => {
    const era = nextEra();
    const [failing, healthy] = await Promise.all([connectBranch(), connectBranch()]);
    await expireAt(failing!, new Date(era.getTime() + minutes(5)));
    await expireAt(healthy!, new Date(era.getTime() + minutes(5)));
    await setProviderBehavior(failing!.oauthClientId, { failNext: { status: 500, count: 1 } });

    expect(await cron(era)).toMatchObject({ due: 2, refreshed: 1, failed: 1, dead: 0 });
    const [row] = await sql(
      "select failure_count, next_attempt_at, status, is_valid from tokens where client_id = $1 and is_valid",
      [failing!.clientId],
    );
    expect(row![0]).toBe("1");
    expect(new Date(row![1]!).getTime()).toBeGreaterThan(era.getTime());
    expect(row!.slice(2)).toEqual(["active", "t"]);

    // Ten seconds later it is still in backoff: not due.
    expect(await cron(new Date(era.getTime() + 10_000))).toMatchObject({ due: 0 });
    // After the backoff it is retried and succeeds; the failure count resets.
    expect(await cron(new Date(era.getTime() + minutes(2)))).toMatchObject({ due: 1, refreshed: 1 });
    const [after] = await sql("select failure_count, next_attempt_at from tokens where client_id = $1 and is_valid", [
      failing!.clientId,
    ]);
    expect(after).toEqual(["0", null]);
  });

  it("marks a dead grant needs_reauth and never selects it again", async () => {
    const era = nextEra();
    const branch = await connectBranch();
    await expireAt(branch, new Date(era.getTime() + minutes(3)));
    await fetch(`${testEnv.OAUTH_SERVER_URL}/admin/refresh-tokens/${branch.oauthClientId}/revoke-all`, {
      method: "POST",
    });

    expect(await cron(era)).toMatchObject({ due: 1, dead: 1, refreshed: 0 });
    const [row] = (await tokenRows(branch.clientId)).slice(-1);
    expect(row).toMatchObject({ status: "needs_reauth", is_valid: false });
    const requests = (await providerStats(branch.oauthClientId)).tokenRequests;
    expect(await cron(new Date(era.getTime() + minutes(60)))).toMatchObject({ due: 0 });
    expect((await providerStats(branch.oauthClientId)).tokenRequests).toBe(requests);
  });

  it("flags the client on invalid_client and skips it until its secret changes", async () => {
    const era = nextEra();
    const branch = await connectBranch();
    await expireAt(branch, new Date(era.getTime() + minutes(3)));
    await setProviderBehavior(branch.oauthClientId, { failNext: { status: 401, error: "invalid_client" } });
    expect(await cron(era)).toMatchObject({ due: 1, failed: 1 });
    const [flag] = await sql(
      "select credentials_rejected_at is not null from apps where id = (select app_id from clients where id = $1)",
      [branch.clientId],
    );
    expect(flag![0]).toBe("t");
    expect(await cron(new Date(era.getTime() + minutes(60)))).toMatchObject({ due: 0 });
  });

  it("leaves tokens leased by an on-demand refresh alone", async () => {
    const era = nextEra();
    const branch = await connectBranch();
    await expireAt(branch, new Date(era.getTime() + minutes(3)));
    // Leases live on the database's clock, whatever time the cron run is for.
    await sql(
      "update tokens set lease_owner = 'other', lease_expires_at = now() + interval '1 minute' where client_id = $1 and is_valid",
      [branch.clientId],
    );
    expect(await cron(era)).toMatchObject({ due: 0, refreshed: 0 });
    // The holder's lease runs out (it crashed): the next run takes the token over.
    await sql("update tokens set lease_expires_at = now() - interval '1 second' where client_id = $1 and is_valid", [
      branch.clientId,
    ]);
    expect(await cron(new Date(era.getTime() + 30_000))).toMatchObject({ due: 1, refreshed: 1 });
  });

  it("persists rotated refresh tokens from a cron run", async () => {
    const era = nextEra();
    const branch = await connectBranch({ providerBehavior: { rotateRefreshTokens: true } });
    const [before] = await sql("select refresh_token from tokens where client_id = $1 and is_valid", [branch.clientId]);
    await expireAt(branch, new Date(era.getTime() + minutes(3)));
    expect(await cron(era)).toMatchObject({ refreshed: 1 });
    const [after] = await sql("select refresh_token from tokens where client_id = $1 and is_valid", [branch.clientId]);
    expect(after![0]).not.toBe(before![0]);
    // The rotated token works: a second refresh with it succeeds.
    await expireAt(branch, new Date(era.getTime() + minutes(70)));
    expect(await cron(new Date(era.getTime() + minutes(60)))).toMatchObject({ refreshed: 1, dead: 0 });
  });
});

describe("a claim statement that fails while other lanes' provider calls are in flight", () => {
  it("rejects only after every started call's result, rotated refresh token included, is written", async () => {
    const era = nextEra();
    // One lane finishes early and asks for more work; the claim fails (the database refuses it)
    // while five other calls are still at the provider. Two more tokens wait for that claim.
    const quick = await connectBranch({ providerBehavior: { rotateRefreshTokens: true } });
    await setProviderBehavior(quick.oauthClientId, { tokenDelayMs: 400 });
    const slow: ConnectedBranch[] = [];
    for (let i = 0; i < 5; i++) {
      const branch = await connectBranch({ providerBehavior: { rotateRefreshTokens: true } });
      await setProviderBehavior(branch.oauthClientId, { tokenDelayMs: 2_500 });
      slow.push(branch);
    }
    const waiting = [await connectBranch(), await connectBranch()];
    const started = [quick, ...slow];
    const before = new Map<number, string>();
    for (const [i, branch] of [...started, ...waiting].entries()) {
      before.set(branch.clientId, (await currentTokens(branch.clientId)).refreshToken!);
      await expireAt(branch, new Date(era.getTime() + minutes(1 + i)));
    }
    try {
      const run = cron(era, { OAUTH_TIMEOUT_MS: "10000" }).then(
        () => undefined,
        (error: unknown) => error,
      );
      // The first claim leased the six earliest for this run's owner; from now on its claims fail.
      const owner = await leaseTaken(quick.clientId);
      await neonFault({ mode: "down", match: [owner, "make_interval", 'from "clients"'] });
      const error = await run;
      expect(error).toBeInstanceOf(Error);

      // Nothing started was left to chance: each call's result is stored, its lease released.
      for (const branch of started) {
        expect((await providerStats(branch.oauthClientId)).refreshGrants).toBe(1);
        const stored = await currentTokens(branch.clientId);
        expect(stored.refreshToken).not.toBe(before.get(branch.clientId));
        expect((await introspect(stored.refreshToken!, branch)).active).toBe(true);
        expect(stored.row).toMatchObject({ status: "active", lease_owner: null });
        // The run's clock is the era's: the new expiry is a full lifetime after it.
        expect(new Date(stored.row.expires_at).getTime()).toBeGreaterThan(era.getTime() + minutes(30));
      }
      // What the failed claim would have taken was never started.
      for (const branch of waiting) {
        expect((await providerStats(branch.oauthClientId)).refreshGrants).toBe(0);
        expect((await currentTokens(branch.clientId)).refreshToken).toBe(before.get(branch.clientId));
      }
    } finally {
      await neonFault({ mode: "ok" });
    }
  });
});
