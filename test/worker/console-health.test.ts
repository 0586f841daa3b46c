import { beforeAll, describe, expect, it } from "vitest";
import { ConsoleBrowser, tableRows, textOf } from "./console-helpers";
import { uniqueId } from "./helpers";
import { connectBranch, postJson, setProviderBehavior, sql } from "./oauth-helpers";

/**
 * The console's health page (the last 24 hours, from the database). Other files share the database
 * and run beside this one, so counts are compared before and after this file's own changes (at
 * least what it did), and its rows are found by its tag.
 */

const TAG = uniqueId("ConsoleHealth").toLowerCase();
const operator = new ConsoleBrowser();

const NUMBERS = ["refreshed", "failing", "degraded", "lost", "rejected", "went-degraded", "recovered"] as const;

async function healthPage() {
  const page = await operator.get("/health");
  expect(page.status, page.html).toBe(200);
  const numbers = Object.fromEntries(
    NUMBERS.map((name) => {
      const cell = new RegExp(`<td id="health-${name}">(\\d+)</td>`).exec(page.html);
      expect(cell, `#health-${name} in the page`).not.toBeNull();
      return [name, Number(cell![1])];
    }),
  ) as Record<(typeof NUMBERS)[number], number>;
  const webhooks = /(\d+) gave up \(retries ran out\) in the period; (\d+) being retried now/.exec(
    textOf(/<p id="health-webhooks">([\s\S]*?)<\/p>/.exec(page.html)?.[1] ?? ""),
  );
  expect(webhooks).not.toBeNull();
  const consent = textOf(/<p id="health-needs-consent">([\s\S]*?)<\/p>/.exec(page.html)?.[1] ?? "");
  return {
    html: page.html,
    numbers,
    webhooksFailed: Number(webhooks![1]),
    needsConsent: consent.startsWith("None") ? 0 : Number(/^(\d+) branch/.exec(consent)?.[1]),
  };
}

async function refreshFails(branchId: string, oauthClientId: string, error: { status: number; error: string }) {
  await setProviderBehavior(oauthClientId, { failNext: error });
  await (await postJson("/tokens/refresh", { branch_id: branchId })).text();
}

beforeAll(async () => {
  await operator.signIn();
}, 60_000);

describe("console health page", () => {
  it("needs a signed-in operator", async () => {
    const anonymous = new ConsoleBrowser();
    const page = await anonymous.get("/health");
    expect(page.status).toBe(303);
    expect(page.response.headers.get("location")).toBe("/token-management/console/sign-in");
  });

  it("counts the period's refreshes, lost grants, failing grants and webhook failures, and names the oldest due token", async () => {
    const before = await healthPage();
    expect(before.html).toContain('href="/token-management/console/health"');

    const healthy = await connectBranch({ branchId: `${TAG}-healthy`, workspaceName: `${TAG} healthy` });
    const dead = await connectBranch({ branchId: `${TAG}-dead`, workspaceName: `${TAG} dead` });
    await refreshFails(dead.branchId, dead.oauthClientId, { status: 400, error: "invalid_grant" });
    const flaky = await connectBranch({ branchId: `${TAG}-flaky`, workspaceName: `${TAG} flaky` });
    await refreshFails(flaky.branchId, flaky.oauthClientId, { status: 503, error: "temporarily_unavailable" });
    // A delivery whose retries ran out (the delivery itself is webhooks.test.ts's subject).
    const [[eventId]] = (await sql(
      `insert into events (type, client_id, branch_id, seq, status_before, status_after, reason, created_at,
         delivery_state, attempts, last_attempt_at, last_error)
       values ('connection.needs_reauth', $1, $2, 99, 'connected', 'needs_reauth', 'test', now(),
         'failed', 8, now(), 'HTTP 500: receiver down') returning id`,
      [dead.clientId, dead.branchId],
    )) as [[string]];
    // The healthy branch's token, long expired: the oldest token the cron would take.
    await sql("update tokens set expires_at = '2001-02-03T04:05:06Z' where client_id = $1 and is_valid", [
      healthy.clientId,
    ]);

    const after = await healthPage();
    await sql("update tokens set expires_at = now() + interval '1 hour' where client_id = $1 and is_valid", [
      healthy.clientId,
    ]);

    // Three consents refreshed a grant each; the dead one's token is no longer valid.
    expect(after.numbers.refreshed - before.numbers.refreshed).toBeGreaterThanOrEqual(2);
    expect(after.numbers.failing - before.numbers.failing).toBeGreaterThanOrEqual(1);
    expect(after.numbers.lost - before.numbers.lost).toBeGreaterThanOrEqual(1);
    expect(after.needsConsent - before.needsConsent).toBeGreaterThanOrEqual(1);
    expect(after.webhooksFailed - before.webhooksFailed).toBeGreaterThanOrEqual(1);

    const failures = tableRows(
      after.html.replace('<table aria-labelledby="webhooks">', '<table id="webhooks">'),
      "webhooks",
    );
    expect(failures).toContainEqual([
      `evt_${eventId}`,
      dead.branchId,
      "connection.needs_reauth",
      "failed after 8 attempts",
      expect.stringMatching(/ago$/),
      "HTTP 500: receiver down",
    ]);

    const oldest = textOf(/<dl class="facts" id="health-oldest-due">([\s\S]*?)<\/dl>/.exec(after.html)?.[1] ?? "");
    expect(oldest).toContain(`Branch ${healthy.branchId}`);
    expect(oldest).toMatch(/Token expired \d+ days ago, at 2001-02-03 04:05 UTC/);
  });
});
