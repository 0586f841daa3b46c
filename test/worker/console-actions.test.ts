import { beforeAll, describe, expect, it } from "vitest";
import { ConsoleBrowser, flashOf, tableRows } from "./console-helpers";
import { eventsOf, newInbox, webhookBindings } from "./event-helpers";
import { call, uniqueId } from "./helpers";
import {
  appRowOf,
  clientRow,
  connectBranch,
  currentTokens,
  introspect,
  newClientBody,
  providerStats,
  registerBranch,
  registerProviderClient,
  runBrowserFlow,
  startLogin,
  tokenRows,
  unseal,
} from "./oauth-helpers";

/**
 * Every console action changes what it says it changes: checked through the database, the API and
 * the local authorization server afterwards, never through the console's own page alone.
 */

const operator = new ConsoleBrowser();
beforeAll(() => operator.signIn());

const branchPage = (clientId: number) => `/branches/${clientId}`;

/** Submits one of a branch page's forms and follows the 303 back to a page; returns that page. */
async function act(clientId: number, action: string, fields: Record<string, string> = {}) {
  const answer = await operator.submit(branchPage(clientId), `${branchPage(clientId)}/${action}`, fields);
  expect(answer.status, answer.html).toBe(303);
  expect(answer.response.headers.get("location")).toBe(`/token-management/console/branches/${clientId}`);
  return operator.follow(answer);
}

describe("register a branch", () => {
  it("registers with the POST /clients fields and lands on the branch's page", async () => {
    const body = newClientBody({ workspaceName: "Registered From The Console", scopes: "openid email" });
    const answer = await operator.submit("/branches/new", "/branches", body);
    expect(answer.status, answer.html).toBe(303);
    const location = answer.response.headers.get("location") ?? "";
    const clientId = Number(/\/console\/branches\/(\d+)$/.exec(location)?.[1]);
    expect(clientId).toBeGreaterThan(0);
    const landed = await operator.follow(answer);
    expect(flashOf(landed.html)?.text).toContain(`Branch ${body.branch_id} registered.`);

    const row = await clientRow(clientId);
    expect((await appRowOf(clientId))?.client_id).toBe(body.client_id);
    expect(row).toMatchObject({
      branch_id: body.branch_id,
      redirect_uri: body.redirect_uri,
      workspace_email: body.workspace_email,
      workspace_name: "Registered From The Console",
      scopes: "openid email",
      is_active: true,
    });
    const app = await appRowOf(clientId);
    expect(
      await unseal(app!.client_secret as string, { column: "clients.client_secret", clientId: Number(app!.id) }),
    ).toBe(body.client_secret);
  });

  it("an empty scopes field is no scopes (the service's default)", async () => {
    const body = { ...newClientBody(), scopes: "  " };
    const answer = await operator.submit("/branches/new", "/branches", body);
    expect(answer.status, answer.html).toBe(303);
    const clientId = Number(/(\d+)$/.exec(answer.response.headers.get("location") ?? "")?.[1]);
    expect((await clientRow(clientId))?.scopes).toBeNull();
  });

  it("shows each invalid field's error next to it (422), keeps the values but never the secret", async () => {
    const body = {
      ...newClientBody(),
      workspace_email: "not-an-email",
      redirect_uri: "http://example.com/callback",
      workspace_name: "",
    };
    const answer = await operator.submit("/branches/new", "/branches", body);
    expect(answer.status).toBe(422);
    expect(answer.html).toMatch(
      /<input id="f-workspace_email" name="workspace_email" type="email" value="not-an-email"[^>]*aria-invalid="true" aria-describedby="err-workspace_email"/,
    );
    expect(answer.html).toContain('<p class="field-error" id="err-workspace_email">must be an email address</p>');
    expect(answer.html).toContain('id="err-redirect_uri">must be an https URL');
    expect(answer.html).toContain('<p class="field-error" id="err-workspace_name">must not be empty</p>');
    expect(answer.html).not.toContain('id="err-client_id"');
    expect(answer.html).toContain(`value="${body.client_id}"`);
    expect(answer.html).not.toContain(body.client_secret);
    // Nothing was stored.
    const stored = await call(`/clients?limit=100`, { key: "admin" });
    expect(await stored.text()).not.toContain(body.branch_id);
  });

  it("a branch id already registered is a 409 with the error next to branch_id", async () => {
    const existing = await registerBranch({ atProvider: false });
    const body = newClientBody({ branchId: existing.branchId });
    const answer = await operator.submit("/branches/new", "/branches", body);
    expect(answer.status).toBe(409);
    expect(answer.html).toContain('<p class="field-error" id="err-branch_id">already registered</p>');
    expect(flashOf(answer.html)?.text).toBe("A client is already registered for this branch_id.");
  });
});

describe("login links", () => {
  it("Copy new login link answers 303 to the branch page, which shows a working link in a read-only field with a nonce'd copy script", async () => {
    const branch = await registerBranch();
    const answer = await operator.submit(branchPage(branch.clientId), `${branchPage(branch.clientId)}/login-link`);
    // Post/Redirect/Get, the link in neither the Location nor the response's body.
    expect(answer.status).toBe(303);
    const location = answer.response.headers.get("location")!;
    expect(location).toBe(`/token-management/console/branches/${branch.clientId}`);
    expect(answer.html).not.toContain("/oauth/login/");
    expect(answer.response.headers.get("cache-control")).toBe("no-store");
    const page = await operator.follow(answer);
    expect(page.status).toBe(200);
    expect(page.response.headers.get("cache-control")).toBe("no-store");
    expect(flashOf(page.html)?.text).toBe("New login link created. Copy it below.");
    const link = /<input id="login-link" type="text" readonly="" value="([^"]+)"/.exec(page.html)?.[1];
    expect(link).toBeDefined();
    expect(link).toContain(`/token-management/oauth/login/${branch.clientId}?`);
    const nonce = /script-src 'nonce-([^']+)'/.exec(page.response.headers.get("content-security-policy")!)![1];
    expect(page.html).toContain(`<script nonce="${nonce}">`);
    expect(page.html).toContain('<button type="button" id="copy-login-link">Copy</button>');
    // The link starts the consent and connects the branch.
    const { callback } = await runBrowserFlow(link!.replace(/&amp;/g, "&"));
    expect(callback.status).toBe(200);
    expect((await tokenRows(branch.clientId)).filter((row) => row.is_valid)).toHaveLength(1);
  });

  it("with Revoke earlier links, the earlier links stop working; reloading the page neither revokes the new one nor shows it again", async () => {
    const branch = await registerBranch();
    const answer = await operator.submit(branchPage(branch.clientId), `${branchPage(branch.clientId)}/login-link`, {
      revoke_previous: "true",
    });
    const page = await operator.follow(answer);
    expect(flashOf(page.html)?.text).toContain("every earlier link no longer works");
    const link = /id="login-link" type="text" readonly="" value="([^"]+)"/.exec(page.html)![1]!.replace(/&amp;/g, "&");
    const old = await call(branch.loginUrl);
    expect(old.status).toBe(401);
    // The page that showed the link cleared the flash cookie: a reload (a GET) shows no link and
    // changes nothing.
    expect(page.response.headers.getSetCookie().some((c) => /^tm_console_flash=;.*Max-Age=0/.test(c))).toBe(true);
    const reloaded = await operator.get(branchPage(branch.clientId));
    expect(reloaded.status).toBe(200);
    expect(reloaded.html).not.toContain('id="login-link"');
    expect(flashOf(reloaded.html)).toBeUndefined();
    expect((await startLogin(link)).response.status).toBe(302);
  });

  it("the link shows only on its own branch's page", async () => {
    const branch = await registerBranch();
    const other = await registerBranch({ atProvider: false });
    const answer = await operator.submit(branchPage(branch.clientId), `${branchPage(branch.clientId)}/login-link`);
    expect(answer.status).toBe(303);
    // The flash cookie taken to another branch's page (the same browser, before the redirect's GET).
    const elsewhere = await operator.get(branchPage(other.clientId));
    expect(elsewhere.status).toBe(200);
    expect(elsewhere.html).not.toContain('id="login-link"');
    expect(elsewhere.html).not.toContain(`/oauth/login/${branch.clientId}`);
  });

  it("on https the flash cookie carrying the link is __Host-, Secure, HttpOnly, SameSite=Strict and 60 s", async () => {
    const secure = new ConsoleBrowser("https://token-manager.test/token-management");
    await secure.signIn();
    const branch = await registerBranch();
    const answer = await secure.submit(branchPage(branch.clientId), `${branchPage(branch.clientId)}/login-link`);
    expect(answer.status).toBe(303);
    const cookie = answer.response.headers.getSetCookie().find((c) => c.startsWith("__Host-tm_console_flash="));
    expect(cookie).toBeDefined();
    for (const attribute of ["Secure", "HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=60"]) {
      expect(cookie).toContain(`; ${attribute}`);
    }
    const page = await secure.follow(answer);
    expect(page.html).toContain('id="login-link"');
    expect(
      page.response.headers.getSetCookie().some((c) => /^__Host-tm_console_flash=;.*Max-Age=0.*Secure/.test(c)),
    ).toBe(true);
    expect(secure.browser.names()).not.toContain("__Host-tm_console_flash");
  });

  it("Revoke all login links: every link so far stops working", async () => {
    const branch = await registerBranch();
    expect((await startLogin(branch.loginUrl)).response.status).toBe(302);
    const after = await act(branch.clientId, "login-links/revoke");
    expect(flashOf(after.html)).toEqual({
      tone: "ok",
      text: "Every login link issued so far, and any consent begun with one, no longer works.",
    });
    expect((await call(branch.loginUrl)).status).toBe(401);
  });
});

describe("token actions", () => {
  it("Refresh now refreshes at the provider and stores a new token", async () => {
    const branch = await connectBranch();
    const before = await currentTokens(branch.clientId);
    const grants = (await providerStats(branch.oauthClientId)).refreshGrants;
    const after = await act(branch.clientId, "refresh");
    expect(flashOf(after.html)?.tone).toBe("ok");
    expect(flashOf(after.html)?.text).toMatch(/^Token refreshed: the new one expires in \d+ min\.$/);
    expect((await providerStats(branch.oauthClientId)).refreshGrants).toBe(grants + 1);
    expect((await currentTokens(branch.clientId)).accessToken).not.toBe(before.accessToken);
  });

  it("Refresh now on a branch never connected says why, as an error, and changes nothing", async () => {
    const branch = await registerBranch();
    const after = await act(branch.clientId, "refresh");
    expect(flashOf(after.html)?.tone).toBe("error");
    expect(after.html).toContain('<p role="alert" class="flash error">');
    expect(await tokenRows(branch.clientId)).toEqual([]);
  });

  it("Revoke grant revokes at the provider and here", async () => {
    const branch = await connectBranch();
    const { accessToken, refreshToken } = await currentTokens(branch.clientId);
    const after = await act(branch.clientId, "revoke");
    expect(flashOf(after.html)?.text).toMatch(/^Grant revoked here and at the provider\. Other locations/);
    const rows = await tokenRows(branch.clientId);
    expect(rows.at(-1)).toMatchObject({ status: "revoked", is_valid: false });
    const credentials = { oauthClientId: branch.oauthClientId, clientSecret: branch.clientSecret };
    expect((await introspect(refreshToken!, credentials)).active).toBe(false);
    expect((await introspect(accessToken, credentials)).active).toBe(false);
    expect((await call(`/tokens/${branch.branchId}`, { key: "service" })).status).toBe(409);
    expect(after.html).toContain('<span class="status status-revoked">Revoked</span>');
  });
});

describe("client actions", () => {
  it("Deactivate and Activate flip is_active, stop and restart serving the token, and write events", async () => {
    const branch = await connectBranch();
    const off = await act(branch.clientId, "active", { is_active: "false" });
    expect(flashOf(off.html)?.text).toBe("Branch deactivated: its token is no longer served or refreshed.");
    expect((await clientRow(branch.clientId))?.is_active).toBe(false);
    expect((await call(`/tokens/${branch.branchId}`, { key: "service" })).status).not.toBe(200);
    expect(off.html).toContain(">Activate</button>");

    const on = await act(branch.clientId, "active", { is_active: "true" });
    expect(flashOf(on.html)?.text).toBe("Branch activated: its token is served and refreshed again.");
    expect((await clientRow(branch.clientId))?.is_active).toBe(true);
    expect((await call(`/tokens/${branch.branchId}`, { key: "service" })).status).toBe(200);
    expect((await eventsOf(branch.clientId)).map((event) => event.type)).toEqual(
      expect.arrayContaining(["client.deactivated", "client.reactivated"]),
    );
    const bad = await act(branch.clientId, "active", { is_active: "maybe" });
    expect(flashOf(bad.html)?.tone).toBe("error");
    expect((await clientRow(branch.clientId))?.is_active).toBe(true);
  });

  it("Rotate secret stores the new secret (sealed) and the next refresh uses it", async () => {
    const branch = await connectBranch();
    const secret = uniqueId("rotated-secret");
    await registerProviderClient(branch.oauthClientId, secret, [branch.redirectUri]);
    const after = await act(branch.clientId, "secret", { client_secret: secret });
    expect(flashOf(after.html)?.text).toBe("Client secret rotated. The next refresh uses it.");
    expect(after.html).not.toContain(secret);
    const row = await appRowOf(branch.clientId);
    expect(
      await unseal(row!.client_secret as string, { column: "clients.client_secret", clientId: Number(row!.id) }),
    ).toBe(secret);
    // The provider knows only the new secret now: a refresh with it succeeds.
    expect(flashOf((await act(branch.clientId, "refresh")).html)?.tone).toBe("ok");
  });

  it("an empty secret is refused with the field's error and the stored one is kept", async () => {
    const branch = await registerBranch({ atProvider: false });
    const before = (await appRowOf(branch.clientId))?.client_secret;
    const after = await act(branch.clientId, "secret", { client_secret: "   " });
    expect(flashOf(after.html)).toEqual({ tone: "error", text: "client_secret: must not be empty" });
    expect((await appRowOf(branch.clientId))?.client_secret).toBe(before);
  });

  it("Delete needs the branch id typed exactly; then the branch is gone and revoked at the provider", async () => {
    const branch = await connectBranch();
    const wrong = await act(branch.clientId, "delete", { confirm: `${branch.branchId}x` });
    expect(flashOf(wrong.html)).toEqual({
      tone: "error",
      text: `Not deleted: type the branch ID (${branch.branchId}) exactly to confirm.`,
    });
    expect(await clientRow(branch.clientId)).toBeDefined();
    // Exact: the same letters in another case are not the branch id.
    const shouted = await act(branch.clientId, "delete", { confirm: branch.branchId.toUpperCase() });
    expect(branch.branchId.toUpperCase()).not.toBe(branch.branchId);
    expect(flashOf(shouted.html)?.tone).toBe("error");
    expect(await clientRow(branch.clientId)).toBeDefined();

    const { refreshToken } = await currentTokens(branch.clientId);
    const answer = await operator.submit(branchPage(branch.clientId), `${branchPage(branch.clientId)}/delete`, {
      confirm: branch.branchId,
    });
    expect(answer.status).toBe(303);
    expect(answer.response.headers.get("location")).toBe("/token-management/console");
    const list = await operator.follow(answer);
    expect(flashOf(list.html)?.text).toMatch(
      new RegExp(`^Branch ${branch.branchId} deleted \\(1 grant\\(s\\) revoked at the provider\\)`),
    );
    expect(await clientRow(branch.clientId)).toBeUndefined();
    const credentials = { oauthClientId: branch.oauthClientId, clientSecret: branch.clientSecret };
    expect((await introspect(refreshToken!, credentials)).active).toBe(false);
    expect((await operator.get(branchPage(branch.clientId))).status).toBe(404);
  });

  it("an action on an unknown branch is the 404 page; one without the CSRF token changes nothing", async () => {
    const missing = await operator.submit("", "/branches/2147483646/refresh");
    expect(missing.status).toBe(404);
    const branch = await registerBranch({ atProvider: false });
    const forged = await operator.post(`${branchPage(branch.clientId)}/delete`, { confirm: branch.branchId });
    expect(forged.status).toBe(403);
    const foreign = await operator.post(
      `${branchPage(branch.clientId)}/active`,
      { csrf: (await operator.get("")).csrf!, is_active: "false" },
      { origin: "https://evil.example" },
    );
    expect(foreign.status).toBe(403);
    expect(await clientRow(branch.clientId)).toMatchObject({ is_active: true });
  });
});

describe("redeliver", () => {
  it("without a WEBHOOK_URL says there is nothing to deliver to", async () => {
    const branch = await registerBranch({ atProvider: false });
    await act(branch.clientId, "active", { is_active: "false" });
    const [event] = await eventsOf(branch.clientId);
    const answer = await operator.submit("/events", `/events/${event!.id}/redeliver`);
    expect(answer.status).toBe(303);
    const page = await operator.follow(answer);
    expect(flashOf(page.html)).toEqual({
      tone: "error",
      text: "No WEBHOOK_URL is configured: events are only logged.",
    });
    expect((await eventsOf(branch.clientId))[0]!.delivery_state).toBe("not_sent");
  });

  it("queues the event again and delivers it to the webhook receiver", async () => {
    const inbox = await newInbox();
    const envOverrides = webhookBindings(inbox.url);
    const branch = await registerBranch({ atProvider: false });
    await act(branch.clientId, "active", { is_active: "false" });
    const [event] = await eventsOf(branch.clientId);
    expect(event!.delivery_state).toBe("not_sent");

    const log = await operator.get(`/events?branch_id=${encodeURIComponent(branch.branchId)}`, { envOverrides });
    expect(tableRows(log.html, "event-log")[0]!.at(-1)).toBe(`Redeliver`);
    const answer = await operator.post(`/events/${event!.id}/redeliver`, { csrf: log.csrf! }, { envOverrides });
    expect(answer.status).toBe(303);
    const page = await operator.follow(answer, { envOverrides });
    expect(flashOf(page.html)?.text).toBe(`evt_${event!.id} queued for delivery; the first attempt follows now.`);
    const deliveries = await inbox.deliveries();
    expect(deliveries.map((d) => d.id)).toEqual([`evt_${event!.id}`]);
    expect((await eventsOf(branch.clientId))[0]!.delivery_state).toBe("delivered");
  });
});
