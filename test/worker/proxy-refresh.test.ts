import { createMessageBatch } from "cloudflare:test";
import { afterEach, describe, expect, it, vi } from "vitest";
import worker from "../../src/index";
import type { RefreshMessage, SchedulerEnv } from "../../src/services/scheduled";
import { expectProblem, testEnv } from "./helpers";
import { connectBranch, currentTokens, providerStats, setProviderBehavior } from "./oauth-helpers";
import { generatedBytes, proxy, sha256Hex, Upstream } from "./proxy-helpers";

/**
 * The proxy's answer to an upstream 401: one forced refresh (single flight with every reader of the
 * grant), one retry, and a second 401 passed back with the grant queued for a check, never marked dead.
 */

afterEach(() => vi.restoreAllMocks());

/** A Queue producer that keeps what is sent, to see the check a second 401 queues. */
function recordingQueue() {
  const sent: { body: RefreshMessage; options?: QueueSendOptions }[] = [];
  const queue = {
    send: async (body: RefreshMessage, options?: QueueSendOptions) => void sent.push({ body, options }),
    sendBatch: async () => {},
  } as unknown as Queue<RefreshMessage>;
  return { sent, queue };
}

function proxyLine(spy: { mock: { calls: unknown[][] } }): Record<string, unknown> | undefined {
  const lines = spy.mock.calls.map((args) => String(args[0])).filter((line) => line.includes('"proxy_call"'));
  expect(lines).toHaveLength(1);
  return JSON.parse(lines[0]!) as Record<string, unknown>;
}

/** Sends one check message through the Worker's queue consumer, as the queue would deliver it. */
async function deliverCheck(tokenId: number): Promise<void> {
  const batch = createMessageBatch<RefreshMessage>("token-refresh", [
    { id: `check-${tokenId}`, timestamp: new Date(), attempts: 1, body: { tokenIds: [tokenId], check: true } },
  ]);
  await worker.queue(batch, { ...testEnv, REFRESH_QUEUE: undefined } as SchedulerEnv);
}

describe("an upstream 401", () => {
  it("refreshes the token once and retries once with the new token, which later calls then use", async () => {
    const branch = await connectBranch();
    const old = await currentTokens(branch.clientId);
    const upstream = new Upstream();
    await upstream.script({ rejectTokens: [old.accessToken] });
    const before = await providerStats(branch.oauthClientId);
    const log = vi.spyOn(console, "log");

    const response = await proxy(upstream, branch.branchId, "v1/accounts?pageSize=20");
    expect(response.status).toBe(200);
    await response.arrayBuffer();

    const fresh = await currentTokens(branch.clientId);
    expect(fresh.accessToken).not.toBe(old.accessToken);
    expect((await providerStats(branch.oauthClientId)).refreshGrants).toBe(before.refreshGrants + 1);
    const sent = await upstream.requests();
    expect(sent.map((r) => r.headers.authorization)).toEqual([
      `Bearer ${old.accessToken}`,
      `Bearer ${fresh.accessToken}`,
    ]);
    expect(sent[1]?.url).toBe(sent[0]?.url);
    const line = proxyLine(log);
    expect(line).toMatchObject({ status: 200, refreshed: true, retried: true });
    for (const args of log.mock.calls) {
      expect(String(args[0])).not.toContain(old.accessToken);
      expect(String(args[0])).not.toContain(fresh.accessToken);
    }

    // The next call takes the new token from the cache: no refresh, one request.
    const next = await proxy(upstream, branch.branchId, "v1/accounts");
    expect(next.status).toBe(200);
    await next.arrayBuffer();
    expect((await upstream.requests()).slice(2).map((r) => r.headers.authorization)).toEqual([
      `Bearer ${fresh.accessToken}`,
    ]);
    expect((await providerStats(branch.oauthClientId)).refreshGrants).toBe(before.refreshGrants + 1);
  });

  it("gives concurrent calls refused with the same token one refresh between them", async () => {
    const branch = await connectBranch();
    const old = await currentTokens(branch.clientId);
    const upstream = new Upstream();
    await upstream.script({ rejectTokens: [old.accessToken] });
    const before = await providerStats(branch.oauthClientId);

    const responses = await Promise.all(
      Array.from({ length: 5 }, () => proxy(upstream, branch.branchId, "v1/accounts")),
    );
    for (const response of responses) {
      expect(response.status).toBe(200);
      await response.arrayBuffer();
    }
    expect((await providerStats(branch.oauthClientId)).refreshGrants).toBe(before.refreshGrants + 1);
    const fresh = await currentTokens(branch.clientId);
    const retries = (await upstream.requests()).filter((r) => r.headers.authorization !== `Bearer ${old.accessToken}`);
    expect(retries.map((r) => r.headers.authorization)).toEqual(Array(5).fill(`Bearer ${fresh.accessToken}`));
  });

  it("uses a token that replaced the refused one meanwhile (another location's refresh) without refreshing again", async () => {
    const branch = await connectBranch();
    const old = await currentTokens(branch.clientId);
    const upstream = new Upstream();
    // This isolate caches the old token.
    const warm = await proxy(upstream, branch.branchId, "v1/accounts");
    expect(warm.status).toBe(200);
    await warm.arrayBuffer();
    // The queue consumer refreshes the grant elsewhere (a check message: refreshed whatever its
    // expiry), leaving this isolate's cache alone.
    await deliverCheck(old.row.id);
    const replaced = await currentTokens(branch.clientId);
    expect(replaced.accessToken).not.toBe(old.accessToken);
    const before = await providerStats(branch.oauthClientId);

    await upstream.script({ rejectTokens: [old.accessToken] });
    const response = await proxy(upstream, branch.branchId, "v1/accounts");
    expect(response.status).toBe(200);
    await response.arrayBuffer();
    expect((await providerStats(branch.oauthClientId)).refreshGrants).toBe(before.refreshGrants);
    expect((await upstream.requests()).slice(1).map((r) => r.headers.authorization)).toEqual([
      `Bearer ${old.accessToken}`,
      `Bearer ${replaced.accessToken}`,
    ]);
  });

  it("passes a second 401 back and queues the grant for a check, without marking it dead", async () => {
    const branch = await connectBranch();
    const old = await currentTokens(branch.clientId);
    const upstream = new Upstream();
    const denied = '{"error":{"code":401,"status":"UNAUTHENTICATED"}}';
    // The old token is refused by the list; the retry takes the scripted 401.
    await upstream.script({
      rejectTokens: [old.accessToken],
      responses: [{ status: 401, headers: { "content-type": "application/json" }, body: denied }],
    });
    const checks = recordingQueue();
    const log = vi.spyOn(console, "log");

    const response = await proxy(upstream, branch.branchId, "v1/accounts", {
      overrides: { REFRESH_QUEUE: checks.queue },
    });
    expect(response.status).toBe(401);
    expect(await response.text()).toBe(denied);
    expect(await upstream.requests()).toHaveLength(2);
    expect(proxyLine(log)).toMatchObject({ status: 401, refreshed: true, retried: true });

    const fresh = await currentTokens(branch.clientId);
    expect(fresh.row).toMatchObject({ status: "active", is_valid: true });
    expect(checks.sent).toEqual([{ body: { tokenIds: [fresh.row.id], check: true }, options: { delaySeconds: 60 } }]);

    // The check, delivered: the provider's token endpoint decides (here: the grant lives).
    const beforeCheck = await providerStats(branch.oauthClientId);
    await deliverCheck(fresh.row.id);
    expect((await providerStats(branch.oauthClientId)).refreshGrants).toBe(beforeCheck.refreshGrants + 1);
    expect((await currentTokens(branch.clientId)).row).toMatchObject({ status: "active", is_valid: true });
  });

  it("sends a small body again, byte for byte, but returns the 401 of a streamed body without refreshing", async () => {
    const branch = await connectBranch();
    const old = await currentTokens(branch.clientId);
    const upstream = new Upstream();
    await upstream.script({ rejectTokens: [old.accessToken] });
    const small = generatedBytes(10_000);
    const before = await providerStats(branch.oauthClientId);

    const replayed = await proxy(upstream, branch.branchId, "v1/locations/9:batchUpdate", {
      method: "POST",
      // As over HTTP: a sized body (a Request built here has no Content-Length of its own).
      headers: { "content-type": "application/octet-stream", "content-length": String(small.byteLength) },
      body: small,
    });
    expect(replayed.status).toBe(200);
    await replayed.arrayBuffer();
    const sent = await upstream.requests();
    expect(sent).toHaveLength(2);
    for (const request of sent) expect(request.bodySha256).toBe(await sha256Hex(small));
    expect((await providerStats(branch.oauthClientId)).refreshGrants).toBe(before.refreshGrants + 1);

    // A streamed body (no Content-Length) cannot be sent twice: its 401 goes back as it is.
    const fresh = await currentTokens(branch.clientId);
    await upstream.script({ rejectTokens: [fresh.accessToken] });
    const streamed = await proxy(upstream, branch.branchId, "v1/locations/9:batchUpdate", {
      method: "POST",
      body: new Blob([generatedBytes(100_000)]).stream(),
    });
    expect(streamed.status).toBe(401);
    await streamed.arrayBuffer();
    expect(await upstream.requests()).toHaveLength(3);
    expect((await providerStats(branch.oauthClientId)).refreshGrants).toBe(before.refreshGrants + 1);
  });

  it("answers 409 when the forced refresh finds the grant dead, and sends nothing more", async () => {
    const branch = await connectBranch();
    const old = await currentTokens(branch.clientId);
    const upstream = new Upstream();
    await upstream.script({ rejectTokens: [old.accessToken] });
    await setProviderBehavior(branch.oauthClientId, { failNext: { status: 400, error: "invalid_grant" } });

    const response = await proxy(upstream, branch.branchId, "v1/accounts");
    const problem = await expectProblem(response, 409, "reauthorization_required");
    expect(JSON.stringify(problem)).not.toContain(old.accessToken);
    expect(await upstream.requests()).toHaveLength(1);
    // The next call is refused here, from the database's word, with nothing sent.
    await expectProblem(await proxy(upstream, branch.branchId, "v1/accounts"), 409, "reauthorization_required");
    expect(await upstream.requests()).toHaveLength(1);
  });
});
