// Cross-Account Protection's effects on grants: what each Security Event Token does to the grants of
// the account (or token) it names, with its connection.* events, the cache and the console.
import { importPKCS8, SignJWT } from "jose";
import { beforeAll, describe, expect, it, vi } from "vitest";
import { createServices } from "../../src/context";
import { RISC_EVENT_TYPES } from "../../src/oauth/risc";
import { selectDue } from "../../src/services/scheduled";
import { ConsoleBrowser, textOf } from "./console-helpers";
import { eventsOf, newInbox, webhookBindings } from "./event-helpers";
import { type CallOptions, call, expectProblem, json, testEnv, uniqueId } from "./helpers";
import {
  type ConnectedBranch,
  currentTokens,
  providerStats,
  type RegisteredBranch,
  reconnectBranch,
  registerBranch,
  runBrowserFlow,
  setProviderBehavior,
  sql,
} from "./oauth-helpers";
import {
  issSub,
  newSigner,
  ownConfigurationUrl,
  postSet,
  publishKeys,
  signSet,
  type TestSigner,
  tokensRevoked,
  transmitterIssuer,
} from "./risc-helpers";

const OPENID = { OAUTH_OPENID: "true" } as const;
/** The optional queue binding left out (it is not a string binding, hence the cast). */
const NO_QUEUE = { REFRESH_QUEUE: undefined } as unknown as Overrides;
let signer: TestSigner;
let issuer: string;
let configurationUrl: string;

beforeAll(async () => {
  signer = await newSigner();
  await publishKeys(signer);
  issuer = await transmitterIssuer();
  // Keys are cached per configuration URL and isolate: this file's own, fetched after the key is in.
  configurationUrl = ownConfigurationUrl("risc-effects");
});

type Overrides = CallOptions["envOverrides"];

/** A branch connected through the consent flow with OpenID Connect on: its grant has the account's `sub`. */
async function connectAccount(account: string, of?: RegisteredBranch): Promise<ConnectedBranch & { grantId: number }> {
  const branch = await registerBranch(
    of
      ? { oauthClientId: of.oauthClientId, clientSecret: of.clientSecret, atProvider: false }
      : { providerBehavior: { account } },
  );
  if (of) await setProviderBehavior(of.oauthClientId, { account });
  const { callback } = await runBrowserFlow(branch.loginUrl, "json", { envOverrides: OPENID });
  const text = await callback.text();
  expect(callback.status, text).toBe(200);
  return { ...branch, callbackBody: JSON.parse(text), grantId: await grantOf(branch.clientId) };
}

async function grantOf(clientId: number): Promise<number> {
  const [row] = await sql("select grant_id from clients where id = $1", [clientId]);
  return Number(row?.[0]);
}

/** A second branch of the same app, attached to the grant without a consent. */
async function sibling(of: RegisteredBranch, grantId: number): Promise<RegisteredBranch> {
  const branch = await registerBranch({
    oauthClientId: of.oauthClientId,
    clientSecret: of.clientSecret,
    atProvider: false,
  });
  const attached = await call(`/clients/${branch.clientId}/grant`, {
    key: "admin",
    method: "PUT",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ grant_id: grantId }),
  });
  expect(attached.status, await attached.clone().text()).toBe(200);
  return branch;
}

interface GrantRow {
  status: string;
  is_valid: boolean;
  subject: string | null;
  last_error: string | null;
  held_at: string | null;
  held_reason: string | null;
  refresh_token_digest: string | null;
  refresh_token_prefix_digest: string | null;
}

async function grantRow(grantId: number): Promise<GrantRow> {
  const [row] = await sql("select row_to_json(t)::text from tokens t where id = $1", [grantId]);
  return JSON.parse(row?.[0] as string) as GrantRow;
}

async function subjectOf(grantId: number): Promise<string> {
  const subject = (await grantRow(grantId)).subject;
  if (!subject) throw new Error(`grant ${grantId} has no subject (was OpenID Connect on?)`);
  return subject;
}

/** Signs `events` addressed to `audience` and posts them to the receiver. */
async function send(audience: string, events: Record<string, unknown>, overrides: Overrides = {}) {
  const jwt = await signSet(signer, { iss: issuer, aud: audience, events });
  const response = await deliver(jwt, overrides);
  return { jwt, response };
}

function deliver(jwt: string, overrides: Overrides = {}) {
  return postSet(jwt, { envOverrides: { RISC_CONFIGURATION_URL: configurationUrl, ...overrides } });
}

const readToken = (branchId: string) => call(`/tokens/${encodeURIComponent(branchId)}`, { key: "service" });

const event = (type: string, body: Record<string, unknown>) => ({ [type]: body });

/** base64 (with padding) of SHA-512 of SHA-512 of the token: Google's hash_base64_sha512_sha512. */
async function googleHash(token: string): Promise<string> {
  const inner = await crypto.subtle.digest("SHA-512", new TextEncoder().encode(token));
  const outer = new Uint8Array(await crypto.subtle.digest("SHA-512", inner));
  return btoa(String.fromCharCode(...outer));
}

/** The local transmitter's stream points at a capture inbox, so its pushes can be relayed to the Worker. */
async function captureTransmitter(): Promise<{ url: string; sets: () => Promise<string[]> }> {
  const capture = await newInbox();
  const keyFile = (await (
    await fetch(`${testEnv.OAUTH_SERVER_URL}/admin/risc/service-accounts`, { method: "POST" })
  ).json()) as { private_key: string; private_key_id: string; client_email: string };
  const privateKey = await importPKCS8(keyFile.private_key, "RS256");
  const bearer = await new SignJWT({})
    .setProtectedHeader({ alg: "RS256", kid: keyFile.private_key_id })
    .setIssuer(keyFile.client_email)
    .setSubject(keyFile.client_email)
    .setAudience("https://risc.googleapis.com/google.identity.risc.v1beta.RiscManagementService")
    .setIssuedAt()
    .setExpirationTime("10m")
    .sign(privateKey);
  const updated = await fetch(`${testEnv.OAUTH_SERVER_URL}/v1beta/stream:update`, {
    method: "POST",
    headers: { authorization: `Bearer ${bearer}`, "content-type": "application/json" },
    body: JSON.stringify({
      delivery: { delivery_method: "https://schemas.openid.net/secevent/risc/delivery-method/push", url: capture.url },
      events_requested: [RISC_EVENT_TYPES.tokensRevoked],
    }),
  });
  expect(updated.status, await updated.clone().text()).toBe(200);
  return {
    url: capture.url,
    // Not Standard Webhooks: the inbox keeps the raw body (the compact JWS).
    sets: async () =>
      (await capture.deliveries()).map((d) => d.payload as unknown).filter((p): p is string => typeof p === "string"),
  };
}

describe("tokens-revoked (the user removed access at Google)", () => {
  it("end to end with the local transmitter: every branch of the grant is 409 with no provider call, one event per branch, a redelivery changes nothing", async () => {
    const account = `${uniqueId("owner")}@example.com`;
    const first = await connectAccount(account);
    const second = await sibling(first, first.grantId);
    const inbox = await newInbox();
    const hooks = webhookBindings(inbox.url);
    // Both branches are served (and so cached at this location) before the event.
    for (const branch of [first, second]) expect((await readToken(branch.branchId)).status).toBe(200);

    const transmitter = await captureTransmitter();
    const removed = await fetch(`${testEnv.OAUTH_SERVER_URL}/account/remove`, {
      method: "POST",
      headers: { "content-type": "application/x-www-form-urlencoded" },
      body: new URLSearchParams({ account, client_id: first.oauthClientId }),
    });
    expect(removed.status).toBe(200);
    const [jwt] = await transmitter.sets();
    expect(jwt, "the transmitter pushed a token").toBeTypeOf("string");

    const before = await providerStats(first.oauthClientId);
    expect((await deliver(jwt!, hooks)).status).toBe(202);

    const grant = await grantRow(first.grantId);
    expect(grant).toMatchObject({ status: "revoked", is_valid: false });
    expect(grant.last_error).toMatch(
      /^provider_revoked: the user removed access at Google \(Cross-Account Protection, /,
    );
    for (const branch of [first, second]) {
      const read = await readToken(branch.branchId);
      const problem = await expectProblem(read, 409, "not_connected");
      expect(problem.detail).toContain("revoked");
    }
    expect((await providerStats(first.oauthClientId)).tokenRequests).toBe(before.tokenRequests);

    const revokedEvents = async () =>
      (await Promise.all([first, second].map((b) => eventsOf(b.clientId))))
        .flat()
        .filter((e) => e.type === "connection.revoked");
    const events = await revokedEvents();
    expect(events.map((e) => e.client_id).sort()).toEqual([first.clientId, second.clientId].sort());
    for (const e of events) {
      expect(e).toMatchObject({ status_before: "connected", status_after: "revoked" });
      expect(e.reason).toMatch(/^provider_revoked: /);
    }
    await vi.waitFor(async () => expect(await inbox.deliveries()).toHaveLength(2), { timeout: 5_000 });
    expect((await inbox.deliveries()).map((d) => [d.payload.type, d.payload.data.branch_id]).sort()).toEqual(
      [
        ["connection.revoked", first.branchId],
        ["connection.revoked", second.branchId],
      ].sort(),
    );

    // Google delivers again: accepted, nothing changes, no second webhook.
    const eventCount = (await eventsOf(first.clientId)).length + (await eventsOf(second.clientId)).length;
    expect((await deliver(jwt!, hooks)).status).toBe(202);
    expect((await eventsOf(first.clientId)).length + (await eventsOf(second.clientId)).length).toBe(eventCount);
    await new Promise((resolve) => setTimeout(resolve, 300));
    expect(await inbox.deliveries()).toHaveLength(2);
  });

  it("two concurrent deliveries of one token act once", async () => {
    const first = await connectAccount(`${uniqueId("racing")}@example.com`);
    const second = await sibling(first, first.grantId);
    const jwt = await signSet(signer, {
      iss: issuer,
      aud: first.oauthClientId,
      events: tokensRevoked(issuer, await subjectOf(first.grantId)),
    });
    const answers = await Promise.all([deliver(jwt), deliver(jwt), deliver(jwt)]);
    expect(answers.map((answer) => answer.status)).toEqual([202, 202, 202]);
    for (const branch of [first, second]) {
      expect((await eventsOf(branch.clientId)).filter((e) => e.type === "connection.revoked")).toHaveLength(1);
    }
  });

  it("touches only that account's grants on the addressed app", async () => {
    const account = `${uniqueId("owner")}@example.com`;
    const target = await connectAccount(account);
    // Another account on the same app, and the same account on another app.
    const otherAccount = await connectAccount(`${uniqueId("other")}@example.com`, target);
    const otherApp = await connectAccount(account);
    expect(await subjectOf(otherApp.grantId)).toBe(await subjectOf(target.grantId));

    const { response } = await send(target.oauthClientId, tokensRevoked(issuer, await subjectOf(target.grantId)));
    expect(response.status).toBe(202);
    expect((await grantRow(target.grantId)).status).toBe("revoked");
    for (const untouched of [otherAccount, otherApp]) {
      expect(await grantRow(untouched.grantId)).toMatchObject({ status: "active", is_valid: true });
      expect((await readToken(untouched.branchId)).status).toBe(200);
    }
  });

  it("an account the service does not know: 202 and nothing changes", async () => {
    const branch = await connectAccount(`${uniqueId("known")}@example.com`);
    const eventsBefore = await eventsOf(branch.clientId);
    const { response } = await send(branch.oauthClientId, tokensRevoked(issuer, "109876543210987654321"));
    expect(response.status).toBe(202);
    expect(await grantRow(branch.grantId)).toMatchObject({ status: "active", is_valid: true });
    expect(await eventsOf(branch.clientId)).toEqual(eventsBefore);
  });
});

describe("token-revoked (one refresh token)", () => {
  const tokenRevoked = (alg: string, token: string, tokenType = "refresh_token") =>
    event(RISC_EVENT_TYPES.tokenRevoked, {
      subject: { subject_type: "oauth_token", token_type: tokenType, token_identifier_alg: alg, token },
    });

  it("matches the grant by hash_base64_sha512_sha512, storing digests, never the token", async () => {
    const branch = await connectAccount(`${uniqueId("hash")}@example.com`);
    const { refreshToken } = await currentTokens(branch.clientId);
    const row = await grantRow(branch.grantId);
    expect(row.refresh_token_digest).toBeTypeOf("string");
    expect(JSON.stringify(row)).not.toContain(refreshToken!);

    // Unknown hash, malformed hash, an access token's: accepted, nothing changes.
    for (const body of [
      tokenRevoked("hash_base64_sha512_sha512", await googleHash("some-other-token")),
      tokenRevoked("hash_base64_sha512_sha512", "not-a-digest"),
      tokenRevoked("hash_base64_sha512_sha512", await googleHash(refreshToken!), "access_token"),
    ]) {
      expect((await send(branch.oauthClientId, body)).response.status).toBe(202);
      expect((await grantRow(branch.grantId)).status).toBe("active");
    }

    const { response } = await send(
      branch.oauthClientId,
      tokenRevoked("hash_base64_sha512_sha512", await googleHash(refreshToken!)),
    );
    expect(response.status).toBe(202);
    const grant = await grantRow(branch.grantId);
    expect(grant).toMatchObject({ status: "revoked", is_valid: false });
    expect(grant.last_error).toMatch(/^provider_revoked: Google revoked its refresh token/);
    await expectProblem(await readToken(branch.branchId), 409, "not_connected");
  });

  it("matches by prefix (the first 16 characters), and follows a rotated refresh token", async () => {
    const branch = await registerBranch({
      providerBehavior: { account: `${uniqueId("prefix")}@example.com`, rotateRefreshTokens: true },
    });
    const { callback } = await runBrowserFlow(branch.loginUrl, "json", { envOverrides: OPENID });
    expect(callback.status).toBe(200);
    const grantId = await grantOf(branch.clientId);
    const { refreshToken: old } = await currentTokens(branch.clientId);
    const refreshed = await call("/tokens/refresh", {
      key: "admin",
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ branch_id: branch.branchId }),
    });
    expect(refreshed.status, await refreshed.clone().text()).toBe(200);
    const { refreshToken: rotated } = await currentTokens(branch.clientId);
    expect(rotated).not.toBe(old);

    // The replaced token names nothing any more.
    expect((await send(branch.oauthClientId, tokenRevoked("prefix", old!.slice(0, 16)))).response.status).toBe(202);
    expect((await grantRow(grantId)).status).toBe("active");
    expect((await send(branch.oauthClientId, tokenRevoked("prefix", rotated!.slice(0, 16)))).response.status).toBe(202);
    expect((await grantRow(grantId)).status).toBe("revoked");
  });
});

describe("sessions-revoked", () => {
  const sessionsRevoked = (sub: string) => event(RISC_EVENT_TYPES.sessionsRevoked, issSub(issuer, sub));

  it("checks the account's grants with a refresh through the queue, marking nothing dead by itself", async () => {
    const branch = await connectAccount(`${uniqueId("sessions")}@example.com`);
    const before = await providerStats(branch.oauthClientId);
    const { response } = await send(branch.oauthClientId, sessionsRevoked(await subjectOf(branch.grantId)));
    expect(response.status).toBe(202);
    // The local Queues runtime hands the message to this Worker's queue() handler.
    await vi.waitFor(
      async () => expect((await providerStats(branch.oauthClientId)).refreshGrants).toBe(before.refreshGrants + 1),
      { timeout: 10_000, interval: 100 },
    );
    expect(await grantRow(branch.grantId)).toMatchObject({ status: "active", is_valid: true });
    expect((await readToken(branch.branchId)).status).toBe(200);
  });

  it("a queue that refuses the message: still 202, and the check runs in the background", async () => {
    const branch = await connectAccount(`${uniqueId("sessions")}@example.com`);
    const before = await providerStats(branch.oauthClientId);
    const broken = {
      send: async () => {
        throw new Error("queue unavailable");
      },
    };
    const overrides = { REFRESH_QUEUE: broken } as unknown as Overrides;
    const { response } = await send(branch.oauthClientId, sessionsRevoked(await subjectOf(branch.grantId)), overrides);
    expect(response.status).toBe(202);
    expect((await providerStats(branch.oauthClientId)).refreshGrants).toBe(before.refreshGrants + 1);
  });

  it("without a queue, checks in the background; a grant Google no longer honours moves to needs_reauth by its refresh", async () => {
    const branch = await connectAccount(`${uniqueId("sessions")}@example.com`);
    const sub = await subjectOf(branch.grantId);
    // A transient failure of the check marks nothing.
    await setProviderBehavior(branch.oauthClientId, { failNext: { status: 503, count: 1 } });
    expect((await send(branch.oauthClientId, sessionsRevoked(sub), NO_QUEUE)).response.status).toBe(202);
    expect(await grantRow(branch.grantId)).toMatchObject({ status: "active", is_valid: true });
    expect((await providerStats(branch.oauthClientId)).failedRequests).toBeGreaterThanOrEqual(1);

    // The failed attempt's backoff elapses.
    await sql("update tokens set next_attempt_at = null where id = $1", [branch.grantId]);
    // Access removed at Google without the event reaching us: the check's refresh finds out.
    await fetch(`${testEnv.OAUTH_SERVER_URL}/account/remove`, {
      method: "POST",
      headers: { "content-type": "application/x-www-form-urlencoded" },
      body: new URLSearchParams({ account: (await grantEmail(branch.grantId))!, client_id: branch.oauthClientId }),
    });
    expect((await send(branch.oauthClientId, sessionsRevoked(sub), NO_QUEUE)).response.status).toBe(202);
    expect(await grantRow(branch.grantId)).toMatchObject({ status: "needs_reauth", is_valid: false });
    expect((await eventsOf(branch.clientId)).map((e) => e.type)).toContain("connection.needs_reauth");
  });
});

async function grantEmail(grantId: number): Promise<string | null> {
  const [row] = await sql("select email from tokens where id = $1", [grantId]);
  return row?.[0] ?? null;
}

describe("account-disabled, account-enabled, account-credential-change-required", () => {
  const accountEvent = (type: string, sub: string, extra: Record<string, unknown> = {}) =>
    event(type, { ...issSub(issuer, sub), ...extra });

  it("hijacking holds every branch of the grant (409 account_disabled, no refresh) until account-enabled releases it", async () => {
    const first = await connectAccount(`${uniqueId("hijacked")}@example.com`);
    const second = await sibling(first, first.grantId);
    const sub = await subjectOf(first.grantId);
    expect((await readToken(first.branchId)).status).toBe(200);

    const disabled = await send(
      first.oauthClientId,
      accountEvent(RISC_EVENT_TYPES.accountDisabled, sub, { reason: "hijacking" }),
    );
    expect(disabled.response.status).toBe(202);
    const held = await grantRow(first.grantId);
    expect(held).toMatchObject({ status: "active", is_valid: true, held_reason: "hijacking" });
    expect(held.held_at).not.toBeNull();

    const before = await providerStats(first.oauthClientId);
    for (const branch of [first, second]) {
      const problem = (await expectProblem(await readToken(branch.branchId), 409, "account_disabled")) as {
        held_since?: unknown;
      };
      expect(problem.held_since).toBeTypeOf("string");
    }
    // A forced refresh is refused too, and the cron does not pick the grant even when it is due.
    const forced = await call("/tokens/refresh", {
      key: "admin",
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ branch_id: first.branchId }),
    });
    await expectProblem(forced, 409, "account_disabled");
    await sql("update tokens set expires_at = now() - interval '1 second' where id = $1", [first.grantId]);
    const services = await createServices(testEnv);
    expect(await selectDue(services.db, new Date(), 300, 100_000)).not.toContain(first.grantId);
    expect((await providerStats(first.oauthClientId)).tokenRequests).toBe(before.tokenRequests);
    for (const branch of [first, second]) {
      expect((await eventsOf(branch.clientId)).at(-1)).toMatchObject({
        type: "connection.account_disabled",
        status_before: "connected",
        status_after: "account_disabled",
      });
    }
    const grantView = await json<{ status: string; held_since: string | null }>(
      await call(`/grants/${first.grantId}`, { key: "admin" }),
    );
    expect(grantView).toMatchObject({ status: "account_disabled", held_since: held.held_at && expect.any(String) });
    const view = await json<{ connection: { status: string } }>(
      await call(`/clients/${first.clientId}`, { key: "admin" }),
    );
    expect(view.connection.status).toBe("account_disabled");
    // A redelivery of the hold, or a second hold, changes nothing.
    expect((await deliver(disabled.jwt)).status).toBe(202);
    expect((await eventsOf(first.clientId)).filter((e) => e.type === "connection.account_disabled")).toHaveLength(1);

    const enabled = await send(first.oauthClientId, accountEvent(RISC_EVENT_TYPES.accountEnabled, sub));
    expect(enabled.response.status).toBe(202);
    expect(await grantRow(first.grantId)).toMatchObject({ held_at: null, held_reason: null, status: "active" });
    expect(await json(await call(`/grants/${first.grantId}`, { key: "admin" }))).toMatchObject({
      status: "connected",
      held_since: null,
    });
    expect(await selectDue(services.db, new Date(), 300, 100_000)).toContain(first.grantId);
    for (const branch of [first, second]) {
      expect((await eventsOf(branch.clientId)).at(-1)).toMatchObject({
        type: "connection.recovered",
        status_before: "account_disabled",
        status_after: "connected",
      });
      // Served again (the expired token is refreshed on the way).
      expect((await readToken(branch.branchId)).status).toBe(200);
    }
  });

  it("a new consent of the held account ends the hold (Google let it sign in again)", async () => {
    const branch = await connectAccount(`${uniqueId("reconsent")}@example.com`);
    const sub = await subjectOf(branch.grantId);
    await send(branch.oauthClientId, accountEvent(RISC_EVENT_TYPES.accountDisabled, sub, { reason: "hijacking" }));
    await expectProblem(await readToken(branch.branchId), 409, "account_disabled");
    await reconnectBranch(branch);
    expect(await grantOf(branch.clientId)).toBe(branch.grantId);
    expect(await grantRow(branch.grantId)).toMatchObject({ held_at: null, held_reason: null, status: "active" });
    expect((await readToken(branch.branchId)).status).toBe(200);
  });

  it("account-enabled for an account that is not held changes nothing", async () => {
    const branch = await connectAccount(`${uniqueId("enabled")}@example.com`);
    const eventsBefore = await eventsOf(branch.clientId);
    const { response } = await send(
      branch.oauthClientId,
      accountEvent(RISC_EVENT_TYPES.accountEnabled, await subjectOf(branch.grantId)),
    );
    expect(response.status).toBe(202);
    expect(await eventsOf(branch.clientId)).toEqual(eventsBefore);
  });

  it.each([
    [
      "account-disabled (bulk-account)",
      RISC_EVENT_TYPES.accountDisabled,
      { reason: "bulk-account" },
      /Google disabled the account \(bulk-account\)/,
    ],
    ["account-disabled (no reason)", RISC_EVENT_TYPES.accountDisabled, {}, /Google disabled the account \(Cross/],
    [
      "account-credential-change-required",
      RISC_EVENT_TYPES.accountCredentialChangeRequired,
      {},
      /Google requires the account to change its credentials/,
    ],
  ])("%s moves the grant to needs_reauth", async (_name, type, extra, reason) => {
    const branch = await connectAccount(`${uniqueId("ended")}@example.com`);
    const { response } = await send(branch.oauthClientId, accountEvent(type, await subjectOf(branch.grantId), extra));
    expect(response.status).toBe(202);
    const grant = await grantRow(branch.grantId);
    expect(grant).toMatchObject({ status: "needs_reauth", is_valid: false, held_at: null });
    expect(grant.last_error).toMatch(reason);
    await expectProblem(await readToken(branch.branchId), 409, "reauthorization_required");
    expect((await eventsOf(branch.clientId)).at(-1)).toMatchObject({
      type: "connection.needs_reauth",
      status_after: "needs_reauth",
    });
  });
});

describe("console", () => {
  it("the branch page says when Google revoked or held the grant", async () => {
    const operator = new ConsoleBrowser();
    await operator.signIn();
    const revoked = await connectAccount(`${uniqueId("console")}@example.com`);
    await send(revoked.oauthClientId, tokensRevoked(issuer, await subjectOf(revoked.grantId)));
    const revokedPage = await operator.get(`/branches/${revoked.clientId}`);
    expect(revokedPage.status).toBe(200);
    expect(textOf(revokedPage.html)).toMatch(
      /Revoked by Google: the user removed access at Google \(Cross-Account Protection, \d{4}-\d\d-\d\dT[\d:.]+Z\)/,
    );

    const held = await connectAccount(`${uniqueId("console")}@example.com`);
    await send(
      held.oauthClientId,
      event(RISC_EVENT_TYPES.accountDisabled, {
        ...issSub(issuer, await subjectOf(held.grantId)),
        reason: "hijacking",
      }),
    );
    const heldText = textOf((await operator.get(`/branches/${held.clientId}`)).html);
    expect(heldText).toContain("Account disabled");
    expect(heldText).toMatch(/Held by Google since \d{4}-\d\d-\d\d \d\d:\d\d UTC/);
    expect(heldText).toContain("not served (account disabled)");
  });
});
