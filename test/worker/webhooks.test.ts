import { createExecutionContext, waitOnExecutionContext } from "cloudflare:test";
import { afterEach, describe, expect, it } from "vitest";
import { createServices } from "../../src/context";
import worker from "../../src/index";
import { metricsOf } from "../../src/lib/metrics";
import {
  DELIVERY_CONCURRENCY,
  DELIVERY_PAGE_SIZE,
  runScheduledEvents,
  sendWebhook,
  signWebhook,
} from "../../src/services/webhooks";
import { TEST_ADMIN_KEY } from "./bindings";
import {
  eventById,
  eventsOf,
  expireIn,
  type Inbox,
  makeDue,
  neonFault,
  newInbox,
  type RawEvent,
  runEventCron,
  TEST_WEBHOOK_OLD_SECRET,
  TEST_WEBHOOK_SECRET,
  UNRELATED_WEBHOOK_SECRET,
  webhookBindings,
} from "./event-helpers";
import { BASE, type CallOptions, call, expectProblem, json, recordingDataset, type TestEnv, testEnv } from "./helpers";
import { connectBranch, postJson, registerBranch, setProviderBehavior, sql } from "./oauth-helpers";

/**
 * Webhook delivery against the real local receiver (dev/webhook-receiver), which verifies each
 * delivery with the `standardwebhooks` package. Each test sends to an inbox of its own. This is the
 * only file that configures WEBHOOK_URL, and its tests run one after another, so no other test
 * delivers (or stops) its events.
 */

type Overrides = CallOptions["envOverrides"];

/** A state change that writes one event: deactivating a fresh client. Returns the event id. */
async function deactivate(overrides: Overrides): Promise<{ clientId: number; branchId: string; eventId: number }> {
  const branch = await registerBranch({ atProvider: false });
  const response = await postJson(
    `/clients/${branch.clientId}`,
    { is_active: false },
    { method: "PATCH", envOverrides: overrides },
  );
  expect(response.status).toBe(200);
  const events = await eventsOf(branch.clientId);
  expect(events).toHaveLength(1);
  return { clientId: branch.clientId, branchId: branch.branchId, eventId: events[0]!.id };
}

// What a test leaves pending must not reach the next test's inbox.
afterEach(async () => {
  await sql("update events set delivery_state = 'stopped', next_attempt_at = null where delivery_state = 'pending'");
});

const accepted = (inbox: Inbox) =>
  inbox
    .deliveries()
    .then((all) => all.filter((d) => d.verifiedWith.length > 0 && d.answered >= 200 && d.answered < 300));

describe("signatures", () => {
  it("match the published Svix / Standard Webhooks test vector", async () => {
    const signature = await signWebhook(
      ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
      "msg_p5jXN8AQM9LWM0D4loKWxJek",
      1614265330,
      '{"test": 2432232314}',
    );
    expect(signature).toBe("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
  });

  it("during a rotation a receiver holding only the new or only the old secret verifies", async () => {
    const newOnly = await newInbox([TEST_WEBHOOK_SECRET]);
    const oldOnly = await newInbox([TEST_WEBHOOK_OLD_SECRET]);
    const neither = await newInbox([UNRELATED_WEBHOOK_SECRET]);
    for (const inbox of [newOnly, oldOnly, neither]) {
      await deactivate(webhookBindings(inbox.url, { WEBHOOK_PREVIOUS_SECRETS: TEST_WEBHOOK_OLD_SECRET }));
    }
    expect((await newOnly.deliveries()).map((d) => [d.verifiedWith, d.answered])).toEqual([[[0], 204]]);
    expect((await oldOnly.deliveries()).map((d) => [d.verifiedWith, d.answered])).toEqual([[[0], 204]]);
    // A receiver with neither secret rejects it (401), and the event stays pending for a retry.
    const [rejected] = await neither.deliveries();
    expect(rejected).toMatchObject({ verifiedWith: [], answered: 401 });
    // After the rotation ends (previous secret removed), the old-secret receiver no longer verifies.
    await deactivate(webhookBindings(oldOnly.url));
    expect((await oldOnly.deliveries()).at(-1)).toMatchObject({ verifiedWith: [], answered: 401 });
  });
});

describe("delivery", () => {
  it("sends the thin payload right after the change, once, and marks the event delivered", async () => {
    const inbox = await newInbox();
    const { clientId, branchId, eventId } = await deactivate(webhookBindings(inbox.url));
    const deliveries = await inbox.deliveries();
    expect(deliveries).toHaveLength(1);
    const [delivery] = deliveries;
    expect(delivery).toMatchObject({ id: `evt_${eventId}`, verifiedWith: [0], answered: 204 });
    expect(delivery!.payload).toEqual({
      type: "client.deactivated",
      timestamp: expect.any(String),
      data: {
        event_id: `evt_${eventId}`,
        branch_id: branchId,
        client_id: clientId,
        sequence: 1,
        status_before: "active",
        status_after: "inactive",
        reason: "deactivated by an administrator",
      },
    });
    expect(await eventById(eventId)).toMatchObject({ delivery_state: "delivered", attempts: 1, last_error: null });
    // The cron finds nothing more to send.
    await runEventCron(webhookBindings(inbox.url));
    expect(await inbox.deliveries()).toHaveLength(1);
  });

  it("retries after a 500 on the ladder (5 s first) and delivers the same webhook-id once the receiver recovers", async () => {
    const inbox = await newInbox();
    await inbox.set("fail", { status: 500 });
    const bindings = webhookBindings(inbox.url);
    const startedAt = Date.now();
    const { eventId } = await deactivate(bindings);
    const failed = await eventById(eventId);
    expect(failed).toMatchObject({ delivery_state: "pending", attempts: 1 });
    expect(failed!.last_error).toMatch(/^HTTP 500/);
    const wait = new Date(failed!.next_attempt_at!).getTime() - startedAt;
    expect(wait).toBeGreaterThanOrEqual(4_000);
    expect(wait).toBeLessThan(5_000 + 30_000);

    // Not due yet: the cron leaves it alone.
    await runEventCron(bindings);
    expect(await inbox.deliveries()).toHaveLength(1);

    await inbox.set("ok");
    await makeDue([eventId]);
    await runEventCron(bindings);
    const deliveries = await inbox.deliveries();
    expect(deliveries.map((d) => [d.id, d.answered])).toEqual([
      [`evt_${eventId}`, 500],
      [`evt_${eventId}`, 204],
    ]);
    expect(await eventById(eventId)).toMatchObject({ delivery_state: "delivered", attempts: 2 });
  });

  it("a hanging receiver neither delays nor fails the request; the attempt times out and stays pending", async () => {
    const inbox = await newInbox();
    await inbox.set("hang");
    const branch = await registerBranch({ atProvider: false });
    const env = { ...testEnv, ...webhookBindings(inbox.url, { WEBHOOK_TIMEOUT_MS: "1500" }) } as TestEnv;
    const ctx = createExecutionContext();
    const startedAt = Date.now();
    const response = await worker.fetch(
      new Request(`${BASE}/clients/${branch.clientId}`, {
        method: "PATCH",
        headers: { authorization: `Bearer ${TEST_ADMIN_KEY}`, "content-type": "application/json" },
        body: JSON.stringify({ is_active: false }),
      }) as Request<unknown, IncomingRequestCfProperties>,
      env,
      ctx,
    );
    const answeredAfter = Date.now() - startedAt;
    expect(response.status).toBe(200);
    await waitOnExecutionContext(ctx);
    const attemptDoneAfter = Date.now() - startedAt;
    // The response did not wait for the receiver; the background attempt waited for its timeout.
    expect(attemptDoneAfter).toBeGreaterThanOrEqual(1_500);
    expect(answeredAfter).toBeLessThan(attemptDoneAfter - 1_000);

    const [event] = await eventsOf(branch.clientId);
    expect(event).toMatchObject({ delivery_state: "pending", attempts: 1, last_error: "no answer within 1500 ms" });
    expect(await inbox.deliveries()).toHaveLength(1);
    await inbox.set("ok");
  });

  it("a receiver's error body is read only up to a bound: an endless 500 answer is recorded at once, its start kept", async () => {
    const inbox = await newInbox();
    await inbox.set("flood", { status: 500 });
    const timeoutMs = 5_000;
    const target = { url: inbox.url, secrets: [TEST_WEBHOOK_SECRET], timeoutMs };
    const startedAt = Date.now();
    const result = await sendWebhook(target, "evt_flood", '{"type":"test"}', new Date());
    const tookMs = Date.now() - startedAt;
    await inbox.set("ok"); // ends the flood for a reader that is still reading
    // Not read to the timeout (an unbounded read of an endless body waits for it, or runs out of memory).
    expect(tookMs).toBeLessThan(timeoutMs / 2);
    expect(result).toEqual({
      kind: "failed",
      error: `HTTP 500: ${"flood ".repeat(40).slice(0, 200)}`,
      failureClass: "http_5xx",
    });
    expect((await inbox.deliveries()).map((d) => d.answered)).toEqual([500]);
  });

  it("when the outcomes cannot be written, the pass fails after sending and the event stays pending, claimed", async () => {
    const inbox = await newInbox();
    const bindings = webhookBindings(inbox.url);
    await inbox.set("fail", { status: 500 });
    const { eventId } = await deactivate(bindings);
    await inbox.set("ok");
    await makeDue([eventId]);
    // Only the statement recording this event's outcome fails (its id is in the JSON parameter).
    await neonFault({ mode: "down", match: ["json_to_recordset", `"id":${eventId},`] });
    try {
      await expect(runEventCron(bindings)).rejects.toThrow();
    } finally {
      await neonFault({ mode: "ok" });
    }
    // Sent once and accepted; not recorded, so it stays pending under its claim and a later pass
    // sends it again (at least once; receivers deduplicate by webhook-id).
    const answers = (await inbox.deliveries()).filter((d) => d.id === `evt_${eventId}`).map((d) => d.answered);
    expect(answers).toEqual([500, 204]);
    const stored = await eventById(eventId);
    expect(stored).toMatchObject({ delivery_state: "pending", attempts: 2 });
    expect(Date.parse(stored!.next_attempt_at!)).toBeGreaterThan(Date.now());
  });

  it("a pass that stops after claiming gives back what it did not send: due again, its attempt not counted", async () => {
    const inbox = await newInbox();
    const bindings = webhookBindings(inbox.url);
    await inbox.set("fail", { status: 500 });
    // A needs_reauth event: invalid_grant on a read (the first attempt fails at the receiver).
    const branch = await connectBranch();
    await expireIn(branch.clientId, -10);
    await setProviderBehavior(branch.oauthClientId, { failNext: { status: 400, error: "invalid_grant", count: 1 } });
    const read = await call(`/tokens/${branch.branchId}`, { key: "service", envOverrides: bindings });
    expect(read.status).toBe(409);
    const [event] = (await eventsOf(branch.clientId)).filter((e) => e.type === "connection.needs_reauth");
    expect(event).toMatchObject({ delivery_state: "pending", attempts: 1 });
    await inbox.set("ok");
    await makeDue([event!.id]);
    // The pass claims the event, then its lookup of clients awaiting consent (this client only) fails.
    await neonFault({ mode: "down", match: ["lateral", "needs_reauth", `=${branch.clientId}`] });
    try {
      await expect(runEventCron(bindings)).rejects.toThrow(/Failed query: select "clients"."id"/);
    } finally {
      await neonFault({ mode: "ok" });
    }
    const given = await eventById(event!.id);
    expect(given).toMatchObject({ delivery_state: "pending", attempts: 1 });
    expect(Date.parse(given!.next_attempt_at!)).toBeLessThanOrEqual(Date.now());
    // The next pass sends it at once (not when a claim of minutes ends).
    await runEventCron(bindings);
    const answers = (await inbox.deliveries()).filter((d) => d.id === `evt_${event!.id}`).map((d) => d.answered);
    expect(answers).toEqual([500, 204]);
    expect(await eventById(event!.id)).toMatchObject({ delivery_state: "delivered", attempts: 2 });
  });

  it("a claim outlasts the longest page a pass can take, so a second pass cannot send the same event", async () => {
    const inbox = await newInbox();
    const timeoutMs = 15_000; // the default
    const bindings = webhookBindings(inbox.url, { WEBHOOK_TIMEOUT_MS: String(timeoutMs) });
    await inbox.set("fail", { status: 500 });
    const { eventId } = await deactivate(bindings);
    await inbox.set("hang");
    await makeDue([eventId]);
    const pass = runEventCron(bindings);
    let claimed: RawEvent | undefined;
    for (let i = 0; i < 500 && claimed?.attempts !== 2; i++) {
      await new Promise((resolve) => setTimeout(resolve, 20));
      claimed = await eventById(eventId);
    }
    // A second pass now finds nothing due: the event is claimed by the first, which is still sending.
    const second = await runEventCron(bindings);
    await inbox.set("ok"); // the hanging attempt ends (connection closed)
    await pass;
    expect(claimed).toMatchObject({ attempts: 2, delivery_state: "pending" });
    const claimMs = Date.parse(claimed!.next_attempt_at!) - Date.parse(claimed!.last_attempt_at!);
    // A full page goes out DELIVERY_CONCURRENCY at a time, each attempt waiting up to the timeout.
    expect(claimMs).toBeGreaterThanOrEqual(Math.ceil(DELIVERY_PAGE_SIZE / DELIVERY_CONCURRENCY) * timeoutMs);
    expect(second.attempted).toBe(0);
    expect((await inbox.deliveries()).filter((d) => d.id === `evt_${eventId}`)).toHaveLength(2);
  });

  it("each attempt writes one data point: failure class, attempt number, latency, source", async () => {
    const inbox = await newInbox();
    await inbox.set("fail", { status: 503 });
    const bindings = webhookBindings(inbox.url);
    const { eventId } = await deactivate(bindings);
    const { points, dataset } = recordingDataset();
    const cron = async () => {
      const services = await createServices({ ...testEnv, ...bindings } as TestEnv);
      return runScheduledEvents({ ...services, metrics: metricsOf(dataset) }, new Date());
    };
    await makeDue([eventId]);
    await cron();
    await inbox.set("ok");
    await makeDue([eventId]);
    await cron();
    expect(await eventById(eventId)).toMatchObject({ delivery_state: "delivered", attempts: 3 });
    expect(points.map((p) => [p.blobs, p.doubles?.[1]])).toEqual([
      [["webhook", "failed", "http_5xx", "", "cron"], 2],
      [["webhook", "delivered", "", "", "cron"], 3],
    ]);
    for (const point of points) {
      expect(point.doubles![0]).toBeGreaterThanOrEqual(0);
      expect(point.doubles![0]).toBeLessThan(1_000);
    }
  });

  it("410 Gone stops delivery of that event and of everything else pending; redeliver sends it again", async () => {
    const inbox = await newInbox();
    const bindings = webhookBindings(inbox.url);
    await inbox.set("fail", { status: 503 });
    const waiting = await deactivate(bindings);
    expect((await eventById(waiting.eventId))?.delivery_state).toBe("pending");

    await inbox.set("gone");
    const gone = await deactivate(bindings);
    expect(await eventById(gone.eventId)).toMatchObject({ delivery_state: "stopped", last_error: "HTTP 410 Gone" });
    expect((await eventById(waiting.eventId))?.delivery_state).toBe("stopped");
    // Nothing goes out for stopped events, even when due.
    await makeDue([waiting.eventId, gone.eventId]);
    const sent = (await inbox.deliveries()).length;
    await runEventCron(bindings);
    expect(await inbox.deliveries()).toHaveLength(sent);

    // The receiver wants events again: redeliver one.
    await inbox.set("ok");
    const response = await call(`/events/${gone.eventId}/redeliver`, {
      key: "admin",
      method: "POST",
      envOverrides: bindings,
    });
    expect(response.status).toBe(202);
    expect((await json<{ event: { id: number } }>(response)).event.id).toBe(gone.eventId);
    expect(await eventById(gone.eventId)).toMatchObject({ delivery_state: "delivered", attempts: 1 });
    expect((await accepted(inbox)).map((d) => d.id)).toEqual([`evt_${gone.eventId}`]);
    await expectProblem(
      await call("/events/999999999/redeliver", { key: "admin", method: "POST", envOverrides: bindings }),
      404,
      "not_found",
    );
  });

  it("a receiver down for a while then back gets every event, each accepted once (dedupe by webhook-id)", async () => {
    const inbox = await newInbox();
    // Nothing listens on the discard port: connection refused.
    const down = webhookBindings("http://127.0.0.1:9/hooks/down");
    const changes = [];
    for (let i = 0; i < 5; i++) changes.push(await deactivate(down));
    const ids = changes.map((change) => change.eventId);
    for (const id of ids) expect(await eventById(id)).toMatchObject({ delivery_state: "pending", attempts: 1 });

    // Three more rounds of the ladder while it is down.
    for (let round = 0; round < 3; round++) {
      await makeDue(ids);
      await runEventCron(down);
    }
    for (const id of ids) expect(await eventById(id)).toMatchObject({ delivery_state: "pending", attempts: 4 });

    // Back (at its URL): the next round delivers all of them.
    const up = webhookBindings(inbox.url);
    await makeDue(ids);
    await runEventCron(up);
    for (const id of ids) expect(await eventById(id)).toMatchObject({ delivery_state: "delivered", attempts: 5 });
    const webhookIds = (await accepted(inbox)).map((d) => d.id);
    expect(webhookIds.sort()).toEqual(ids.map((id) => `evt_${id}`).sort());
    // Per-branch order is in the payload whatever the arrival order.
    for (const delivery of await accepted(inbox)) expect(delivery.payload.data.sequence).toBe(1);
  });

  it("an event whose ladder runs out is marked failed, stays in the log, and can be redelivered", async () => {
    const inbox = await newInbox();
    await inbox.set("fail", { status: 500 });
    const bindings = webhookBindings(inbox.url);
    const { eventId } = await deactivate(bindings);
    for (let attempt = 2; attempt <= 8; attempt++) {
      await makeDue([eventId]);
      await runEventCron(bindings);
    }
    expect(await eventById(eventId)).toMatchObject({ delivery_state: "failed", attempts: 8, next_attempt_at: null });
    expect(await inbox.deliveries()).toHaveLength(8);
    // Failed is final for the cron.
    await runEventCron(bindings);
    expect(await inbox.deliveries()).toHaveLength(8);

    await inbox.set("ok");
    expect(
      (await call(`/events/${eventId}/redeliver`, { key: "admin", method: "POST", envOverrides: bindings })).status,
    ).toBe(202);
    expect(await eventById(eventId)).toMatchObject({ delivery_state: "delivered", attempts: 1 });
  });
});

describe("retention", () => {
  it("the cron prunes events older than EVENT_RETENTION_DAYS, keeping newer and still-pending ones", async () => {
    const inbox = await newInbox();
    const bindings = webhookBindings(inbox.url);
    const old = await deactivate(bindings);
    const recent = await deactivate(bindings);
    await inbox.set("fail");
    const pending = await deactivate(bindings);
    await sql("update events set created_at = now() - interval '31 days' where id = any($1::bigint[])", [
      `{${old.eventId},${pending.eventId}}`,
    ]);
    const summary = await runEventCron({ ...bindings, EVENT_RETENTION_DAYS: "30" });
    expect(summary.pruned).toBeGreaterThanOrEqual(1);
    expect(await eventById(old.eventId)).toBeUndefined();
    expect(await eventById(recent.eventId)).toBeDefined();
    expect(await eventById(pending.eventId)).toBeDefined();
  });
});

describe("configuration", () => {
  const configError = async (overrides: Overrides, binding: string, leaked?: string) => {
    const response = await call("/events", { key: "admin", envOverrides: overrides });
    const text = await response.clone().text();
    const body = await expectProblem(response, 500, "configuration_error");
    expect(body.detail).toContain(binding);
    if (leaked) expect(text).not.toContain(leaked);
  };

  it("refuses a non-https PUBLIC_BASE_URL outside loopback, whatever OAUTH_ALLOW_INSECURE_HTTP says", async () => {
    for (const flag of ["true", "false"]) {
      for (const url of ["http://tokens.example.com/token-management", "ftp://tokens.example.com/"]) {
        await configError({ PUBLIC_BASE_URL: url, OAUTH_ALLOW_INSECURE_HTTP: flag }, "PUBLIC_BASE_URL", url);
      }
    }
    for (const url of ["https://tokens.example.com/token-management", "http://127.0.0.1:8787/token-management"]) {
      const response = await call("/events", { key: "admin", envOverrides: { PUBLIC_BASE_URL: url } });
      expect(response.status, url).toBe(200);
    }
  });

  it("refuses a non-https WEBHOOK_URL outside local development, naming the binding", async () => {
    await configError({ ...webhookBindings("http://hooks.example.com/in") }, "WEBHOOK_URL");
    await configError(
      { ...webhookBindings("http://127.0.0.1:4446/hooks/x"), OAUTH_ALLOW_INSECURE_HTTP: "false" },
      "WEBHOOK_URL",
    );
    await configError({ ...webhookBindings("ftp://hooks.example.com/in") }, "WEBHOOK_URL");
    // https anywhere, and http on loopback in local development, are accepted.
    expect(
      (await call("/events?limit=1", { key: "admin", envOverrides: webhookBindings("https://hooks.example.com/in") }))
        .status,
    ).toBe(200);
    expect(
      (await call("/events?limit=1", { key: "admin", envOverrides: webhookBindings("http://localhost:4446/x") }))
        .status,
    ).toBe(200);
  });

  it("refuses a malformed or missing secret without echoing it", async () => {
    const url = "https://hooks.example.com/in";
    await configError(
      { WEBHOOK_URL: url, WEBHOOK_SECRET: "not-a-whsec-secret" },
      "WEBHOOK_SECRET",
      "not-a-whsec-secret",
    );
    await configError({ WEBHOOK_URL: url, WEBHOOK_SECRET: "whsec_dG9vc2hvcnQ=" }, "WEBHOOK_SECRET", "dG9vc2hvcnQ");
    await configError({ WEBHOOK_URL: url, WEBHOOK_SECRET: undefined }, "WEBHOOK_SECRET");
    await configError(
      { ...webhookBindings(url), WEBHOOK_PREVIOUS_SECRETS: `${TEST_WEBHOOK_OLD_SECRET} whsec_!!!` },
      "WEBHOOK_PREVIOUS_SECRETS",
      "whsec_!!!",
    );
  });
});
