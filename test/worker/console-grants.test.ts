// The console's apps, grants and locations pages: every change checked through the database, the API
// or the local authorization server afterwards, never through the console's own page alone.
import { beforeAll, describe, expect, it } from "vitest";
import { ConsoleBrowser, flashOf, tableRows } from "./console-helpers";
import { call, json, testEnv, uniqueId } from "./helpers";
import {
  appRowOf,
  connectBranch,
  providerStats,
  registerBranch,
  registerProviderClient,
  sql,
  tokenRows,
  unseal,
} from "./oauth-helpers";

const operator = new ConsoleBrowser();
beforeAll(() => operator.signIn());

interface ApiApp {
  app_id: number;
  name: string;
  client_id: string;
  branches: number;
  grants: number;
}

async function apiApps(): Promise<ApiApp[]> {
  return (await json<{ apps: ApiApp[] }>(await call("/apps", { key: "admin" }))).apps;
}

async function appSecret(appId: number): Promise<string> {
  const [[sealed]] = (await sql("select client_secret from apps where id = $1", [appId])) as [[string]];
  return unseal(sealed, { column: "clients.client_secret", clientId: appId });
}

/** Submits a form of `pagePath` and follows the 303; asserts where it went. */
async function submitAndFollow(pagePath: string, action: string, fields: Record<string, string>, landsOn: string) {
  const answer = await operator.submit(pagePath, action, fields);
  expect(answer.status, answer.html).toBe(303);
  expect(answer.response.headers.get("location")).toBe(`/token-management/console${landsOn}`);
  return operator.follow(answer);
}

describe("apps", () => {
  it("registers a google app from the form: sealed secret, its page, never the secret shown", async () => {
    const clientId = uniqueId("oc-console");
    const secret = uniqueId("app-secret");
    const answer = await operator.submit("/apps/new", "/apps", {
      name: "Reviews Console",
      client_id: clientId,
      client_secret: secret,
    });
    expect(answer.status, answer.html).toBe(303);
    const created = (await apiApps()).find((app) => app.client_id === clientId);
    expect(created).toMatchObject({ name: "Reviews Console", branches: 0, grants: 0 });
    expect(answer.response.headers.get("location")).toBe(`/token-management/console/apps/${created!.app_id}`);
    const landed = await operator.follow(answer);
    expect(flashOf(landed.html)).toEqual({
      tone: "ok",
      text: "App Reviews Console registered. Register its branches with its client ID and secret, or attach them to a grant.",
    });
    expect(landed.html).toContain(clientId);
    expect(landed.html).not.toContain(secret);
    expect(await appSecret(created!.app_id)).toBe(secret);

    const list = await operator.get("/apps");
    const row = tableRows(list.html, "apps").find((cells) => cells[2] === clientId);
    expect(row).toEqual(["Reviews Console", "google", clientId, "0", "0", "none"]);
    expect(list.html).not.toContain(secret);
  });

  it("bad input goes back to the form with an error flash naming the field, and stores nothing", async () => {
    const clientId = uniqueId("oc-console");
    const page = await submitAndFollow(
      "/apps/new",
      "/apps",
      { name: "  ", client_id: clientId, client_secret: "s3cret-value" },
      "/apps/new",
    );
    expect(flashOf(page.html)).toEqual({ tone: "error", text: "Not registered: name: must not be empty" });
    expect((await apiApps()).some((app) => app.client_id === clientId)).toBe(false);

    const noSecret = await submitAndFollow("/apps/new", "/apps", { name: "X", client_id: clientId }, "/apps/new");
    expect(flashOf(noSecret.html)?.text).toBe("Not registered: client_secret: must not be empty");
    expect((await apiApps()).some((app) => app.client_id === clientId)).toBe(false);
  });

  it("a client id already registered is refused with the API's message; the first app keeps its secret", async () => {
    const branch = await registerBranch({ atProvider: false });
    const app = await appRowOf(branch.clientId);
    const page = await submitAndFollow(
      "/apps/new",
      "/apps",
      { name: "Copy", client_id: branch.oauthClientId, client_secret: "another-secret" },
      "/apps/new",
    );
    expect(flashOf(page.html)).toEqual({
      tone: "error",
      text: `Not registered: An app with client_id ${branch.oauthClientId} is already registered.`,
    });
    expect(await appSecret(Number(app!.id))).toBe(branch.clientSecret);
  });

  it("a form without the session's CSRF token is refused (403) and registers nothing", async () => {
    const clientId = uniqueId("oc-console");
    const answer = await operator.post("/apps", { name: "No CSRF", client_id: clientId, client_secret: "x-secret" });
    expect(answer.status).toBe(403);
    expect((await apiApps()).some((app) => app.client_id === clientId)).toBe(false);
  });

  it("the list says when an app's credentials are rejected and when it is probably in Testing, with what to do", async () => {
    const branch = await registerBranch({ atProvider: false });
    const appId = Number((await appRowOf(branch.clientId))!.id);
    await sql(
      "update apps set testing_suspected_at = '2026-11-20T10:00:00Z', credentials_rejected_at = '2026-11-21T09:30:00Z' where id = $1",
      [appId],
    );
    const list = await operator.get("/apps");
    const row = tableRows(list.html, "apps").find((cells) => cells[2] === branch.oauthClientId)!;
    expect(row[3]).toBe("1");
    // The API counts the same (GET /apps counted no branch before: its subquery compared the branch's own columns).
    expect((await apiApps()).find((app) => app.app_id === appId)).toMatchObject({ branches: 1, grants: 0 });
    expect(row[5]).toContain("Credentials rejected since 2026-11-21 09:30 UTC");
    expect(row[5]).toContain(
      "Probably in Testing publishing status (a grant died about 7 days after its consent, 2026-11-20 10:00 UTC)",
    );
    expect(row[5]).toContain("press “Publish app”");
    const page = await operator.get(`/apps/${appId}`);
    expect(page.html).toContain("Probably in Testing publishing status");
  });

  it("an app's page lists its grants and its branches", async () => {
    const first = await connectBranch();
    const second = await registerBranch({
      oauthClientId: first.oauthClientId,
      clientSecret: first.clientSecret,
      atProvider: false,
      providerResource: "accounts/1/locations/2",
    });
    const appId = Number((await appRowOf(first.clientId))!.id);
    const grantId = Number((await tokenRows(first.clientId)).find((row) => row.is_valid)!.id);
    expect((await apiApps()).find((app) => app.app_id === appId)).toMatchObject({ branches: 2, grants: 1 });
    const page = await operator.get(`/apps/${appId}`);
    expect(page.status).toBe(200);
    expect(page.html).toMatch(/<dt>Branches<\/dt><dd>2<\/dd><dt>Connected grants<\/dt><dd>1<\/dd>/);
    expect(tableRows(page.html, "app-grants")).toEqual([
      [`grant ${grantId}`, expect.stringMatching(/^user@example\.com \(sub \d+\)$/), "Connected", "1", "no end", "1"],
    ]);
    expect(tableRows(page.html, "app-branches")).toEqual([
      [first.branchId, `grant ${grantId}`, "", "yes"],
      [second.branchId, "never connected", "accounts/1/locations/2", "yes"],
    ]);
    expect(page.html).not.toContain(first.clientSecret);
  });

  it("an unknown app is the 404 page; a malformed id a 422 page", async () => {
    expect((await operator.get("/apps/999999")).status).toBe(404);
    expect((await operator.get("/apps/abc")).status).toBe(422);
  });
});

describe("rotating an app's secret", () => {
  it("is one change for every branch: the next refresh of a branch uses the new secret", async () => {
    const first = await connectBranch();
    const appId = Number((await appRowOf(first.clientId))!.id);
    const newSecret = uniqueId("rotated-secret");
    // The provider now knows only the new secret.
    await registerProviderClient(first.oauthClientId, newSecret, [first.redirectUri]);
    const page = await submitAndFollow(
      `/apps/${appId}`,
      `/apps/${appId}/secret`,
      { client_secret: newSecret },
      `/apps/${appId}`,
    );
    expect(flashOf(page.html)?.tone).toBe("ok");
    expect(page.html).not.toContain(newSecret);
    expect(await appSecret(appId)).toBe(newSecret);
    const refreshed = await submitAndFollow(
      `/branches/${first.clientId}`,
      `/branches/${first.clientId}/refresh`,
      {},
      `/branches/${first.clientId}`,
    );
    expect(flashOf(refreshed.html)?.text).toMatch(/^Token refreshed/);
  });

  it("an empty secret is an error flash and changes nothing; an unknown app the 404 page", async () => {
    const branch = await registerBranch({ atProvider: false });
    const appId = Number((await appRowOf(branch.clientId))!.id);
    const page = await submitAndFollow(
      `/apps/${appId}`,
      `/apps/${appId}/secret`,
      { client_secret: " " },
      `/apps/${appId}`,
    );
    expect(flashOf(page.html)).toEqual({ tone: "error", text: "client_secret: must not be empty" });
    expect(await appSecret(appId)).toBe(branch.clientSecret);
    const csrf = (await operator.get("/apps")).csrf!;
    expect((await operator.post("/apps/999999/secret", { csrf, client_secret: "abc-secret" })).status).toBe(404);
  });
});

async function grantOf(clientId: number): Promise<number | null> {
  return (await json<{ grant_id: number | null }>(await call(`/clients/${clientId}`, { key: "admin" }))).grant_id;
}

async function tokenRead(branchId: string): Promise<{ status: number; accessToken?: string }> {
  const response = await call(`/tokens/${encodeURIComponent(branchId)}`, { key: "service" });
  if (response.status !== 200) return { status: response.status };
  return { status: 200, accessToken: (await json<{ access_token: string }>(response)).access_token };
}

describe("grants", () => {
  it("the list and a grant's page: app, account, status, minted tokens, access end, branches", async () => {
    const first = await connectBranch();
    const grantId = (await grantOf(first.clientId))!;
    const appId = Number((await appRowOf(first.clientId))!.id);
    const subject = uniqueId("sub");
    await sql(
      "update tokens set email = 'ops@chain.example', subject = $2, refresh_token_expires_at = now() + interval '3 days 1 minute' where id = $1",
      [grantId, subject],
    );
    const list = await operator.get(`/grants?app_id=${appId}`);
    expect(list.status).toBe(200);
    const rows = tableRows(list.html, "grants");
    expect(rows).toHaveLength(1);
    expect(rows[0]!.slice(0, 5)).toEqual([
      `grant ${grantId}`,
      "Test Workspace",
      `ops@chain.example (sub ${subject})`,
      "Connected",
      "1",
    ]);
    expect(rows[0]![6]).toBe("1");

    const page = await operator.get(`/grants/${grantId}`);
    expect(page.status).toBe(200);
    expect(page.html).toContain(`ops@chain.example (sub ${subject})`);
    expect(page.html).toMatch(/<dd id="access-end">time-limited: access ends in 3 days \(/);
    expect(page.html).toContain('<dd id="minted">1 of Google&#39;s 100 per account and app</dd>');
    expect(page.html).not.toContain('id="token-limit-warning"');
    expect(tableRows(page.html, "grant-branches")).toEqual([[first.branchId]]);
    expect(page.html).toContain(`/console/grants/${grantId}/locations`);
  });

  it("warns from 90 minted refresh tokens on, naming the app and the account", async () => {
    const first = await connectBranch();
    const grantId = (await grantOf(first.clientId))!;
    await sql("update tokens set refresh_tokens_minted = 89, email = 'agency@example.com' where id = $1", [grantId]);
    const [[subjectOf]] = (await sql("select subject from tokens where id = $1", [grantId])) as [[string]];
    expect((await operator.get(`/grants/${grantId}`)).html).not.toContain('id="token-limit-warning"');
    await sql("update tokens set refresh_tokens_minted = 90 where id = $1", [grantId]);
    const page = await operator.get(`/grants/${grantId}`);
    const warning = /<p class="warning" id="token-limit-warning">([\s\S]*?)<\/p>/.exec(page.html)?.[1];
    expect(warning).toBeDefined();
    expect(warning).toContain(
      `90 refresh tokens minted for agency@example.com (sub ${subjectOf}) on app Test Workspace (${first.oauthClientId}). Google keeps 100`,
    );
    await sql("update tokens set refresh_token_expires_at = now() - interval '2 hours' where id = $1", [grantId]);
    expect((await operator.get(`/grants/${grantId}`)).html).toMatch(
      /<dd id="access-end">time-limited: access ended 2 h ago \(/,
    );
  });

  it("an unknown grant is the 404 page; bad query values a 422 page", async () => {
    expect((await operator.get("/grants/999999")).status).toBe(404);
    expect((await operator.get("/grants?app_id=x")).status).toBe(422);
    expect((await operator.get("/grants?after=-1")).status).toBe(422);
  });
});

describe("attach a branch to a grant", () => {
  it("offers the app's connected grants and attaches with no consent: the branch is served the grant's token", async () => {
    const first = await connectBranch();
    const second = await registerBranch({
      oauthClientId: first.oauthClientId,
      clientSecret: first.clientSecret,
      atProvider: false,
    });
    const grantId = (await grantOf(first.clientId))!;
    const before = await operator.get(`/branches/${second.clientId}`);
    expect(before.html).toMatch(
      new RegExp(
        `<option value="${grantId}">grant ${grantId}: user@example\\.com \\(sub \\d+\\), 1 branch\\(es\\)</option>`,
      ),
    );
    expect((await tokenRead(second.branchId)).status).toBe(409);

    const page = await submitAndFollow(
      `/branches/${second.clientId}`,
      `/branches/${second.clientId}/grant`,
      { grant_id: String(grantId) },
      `/branches/${second.clientId}`,
    );
    expect(flashOf(page.html)).toEqual({
      tone: "ok",
      text: `Attached to grant ${grantId}: the branch is served from it now, with no consent.`,
    });
    expect(await grantOf(second.clientId)).toBe(grantId);
    const served = await tokenRead(second.branchId);
    expect(served).toEqual({ status: 200, accessToken: (await tokenRead(first.branchId)).accessToken });
    // Its own grant is no choice any more.
    expect(page.html).not.toContain(`<option value="${grantId}">`);
  });

  it("refuses a grant of another app, an unknown grant and a malformed id with an error flash, changing nothing", async () => {
    const mine = await registerBranch({ atProvider: false });
    const other = await connectBranch();
    const otherGrant = (await grantOf(other.clientId))!;
    const path = `/branches/${mine.clientId}`;
    const foreign = await submitAndFollow(path, `${path}/grant`, { grant_id: String(otherGrant) }, path);
    expect(flashOf(foreign.html)).toEqual({
      tone: "error",
      text: `Grant ${otherGrant} belongs to another app than branch ${mine.clientId}'s.`,
    });
    const unknown = await submitAndFollow(path, `${path}/grant`, { grant_id: "999999" }, path);
    expect(flashOf(unknown.html)).toEqual({ tone: "error", text: "No grant with id 999999." });
    const malformed = await submitAndFollow(path, `${path}/grant`, { grant_id: "abc" }, path);
    expect(flashOf(malformed.html)).toEqual({ tone: "error", text: "grant_id: choose a grant" });
    expect(await grantOf(mine.clientId)).toBeNull();
    // Without the CSRF token: refused before anything is looked at.
    const csrfless = await operator.post(`${path}/grant`, { grant_id: String(otherGrant) });
    expect(csrfless.status).toBe(403);
  });

  it("a revoked grant is not offered, and attaching it anyway is refused", async () => {
    const first = await connectBranch();
    const second = await registerBranch({
      oauthClientId: first.oauthClientId,
      clientSecret: first.clientSecret,
      atProvider: false,
    });
    const grantId = (await grantOf(first.clientId))!;
    await sql("update tokens set status = 'revoked' where id = $1", [grantId]);
    const path = `/branches/${second.clientId}`;
    expect((await operator.get(path)).html).toContain("No other connected grant of this branch&#39;s app.");
    const csrf = (await operator.get(path)).csrf!;
    const answer = await operator.follow(await operator.post(`${path}/grant`, { csrf, grant_id: String(grantId) }));
    expect(flashOf(answer.html)?.text).toMatch(new RegExp(`^Grant ${grantId} is not connected \\(revoked\\)`));
    expect(await grantOf(second.clientId)).toBeNull();
  });
});

// ---------- Locations: the Business Profile API of the local server ----------

async function apiAdmin(path: string, init: RequestInit = {}): Promise<Response> {
  return fetch(`${testEnv.OAUTH_SERVER_URL}${path}`, {
    ...init,
    headers: { "content-type": "application/json", ...init.headers },
  });
}

/**
 * The next Business Profile API call made with `account`'s token answers `status` (once): scoped to
 * the account, so another test file calling the API at the same time is not the one that fails.
 */
async function failNextApiCall(account: string, status: number, retryAfter?: number): Promise<void> {
  const response = await apiAdmin("/admin/api-behavior", {
    method: "PUT",
    body: JSON.stringify({ failNext: { status, count: 1, account, ...(retryAfter ? { retryAfter } : {}) } }),
  });
  expect(response.ok, await response.text()).toBe(true);
}

/** A branch connected by a Google account of its own (so its Business Profile data is its own). */
async function connectedAccount() {
  const account = `${uniqueId("chain")}@example.com`;
  const first = await connectBranch({ providerBehavior: { account } });
  const grantId = (await grantOf(first.clientId))!;
  return { account, first, grantId };
}

/** The locations page's checkboxes: input name -> location name. */
function checkboxes(html: string): Map<string, string> {
  return new Map(
    [...html.matchAll(/<input type="checkbox" id="location-\d+" name="(location_\d+)" value="([^"]+)"/g)].map(
      (match) => [match[1]!, match[2]!],
    ),
  );
}

describe("locations of a google grant", () => {
  it("lists every location of the account's accounts, every page, asking with the grant's token", async () => {
    const { grantId } = await connectedAccount();
    await apiAdmin("/admin/api-stats", { method: "DELETE" });
    const page = await operator.get(`/grants/${grantId}/locations`);
    expect(page.status, page.html).toBe(200);
    // The local server's data: a personal account with 1 location, a location group with 25.
    expect(page.html).toContain("<caption>26 location(s)</caption>");
    const boxes = [...checkboxes(page.html).values()];
    expect(boxes).toHaveLength(26);
    for (const name of boxes) expect(name).toMatch(/^accounts\/\d+\/locations\/\d+$/);
    const [, account, location] = /^accounts\/(\d+)\/locations\/(\d+)$/.exec(boxes[0]!)!;
    expect(page.html).toContain(`new: gbp-${account}-${location}`);
    const stats = (await (await apiAdmin("/admin/api-stats")).json()) as {
      byPath: Record<string, number>;
      lastAuthorization: string | null;
      lastPath: string;
    };
    expect(stats.lastAuthorization).toBe("Bearer …");
    expect(stats.byPath["/v1/accounts"]).toBe(1);
    expect(stats.lastPath).toContain("readMask=name%2Ctitle%2CstorefrontAddress");
  });

  it("creates or attaches one branch per ticked location on the grant, with no consent", async () => {
    const { first, grantId } = await connectedAccount();
    const page = await operator.get(`/grants/${grantId}/locations`);
    const boxes = [...checkboxes(page.html)];
    const [a, b, c] = boxes;
    // A branch of the app already stands for the third location: it is attached, not duplicated.
    const existing = await registerBranch({
      oauthClientId: first.oauthClientId,
      clientSecret: first.clientSecret,
      atProvider: false,
      providerResource: c![1],
    });
    const before = await providerStats(first.oauthClientId);
    const derived = (name: string) => name.replace(/^accounts\/(\d+)\/locations\/(\d+)$/, "gbp-$1-$2");
    const answer = await submitAndFollow(
      `/grants/${grantId}/locations`,
      `/grants/${grantId}/locations`,
      { [a![0]]: a![1], [b![0]]: b![1], [c![0]]: c![1] },
      `/grants/${grantId}`,
    );
    expect(flashOf(answer.html)).toEqual({
      tone: "ok",
      text: `Grant ${grantId}, no consent: created and attached ${derived(a![1])}, ${derived(b![1])}; attached ${existing.branchId}.`,
    });
    const grantView = await json<{ branches: { client_id: number; branch_id: string }[] }>(
      await call(`/grants/${grantId}`, { key: "admin" }),
    );
    expect(grantView.branches.map((branch) => branch.branch_id).sort()).toEqual(
      [first.branchId, derived(a![1]), derived(b![1]), existing.branchId].sort(),
    );
    // The new branch stands for its location and is served the grant's token at once.
    const read = await call(`/tokens/${derived(a![1])}`, { key: "service" });
    const body = await json<{ access_token: string; provider_resource: string }>(read);
    expect(body.provider_resource).toBe(a![1]);
    expect(body.access_token).toBe((await tokenRead(first.branchId)).accessToken);
    const after = await providerStats(first.oauthClientId);
    expect(after.authorizationCodeGrants).toBe(before.authorizationCodeGrants);

    // Ticking one again attaches the branch made the first time; nothing is duplicated.
    const again = await submitAndFollow(
      `/grants/${grantId}/locations`,
      `/grants/${grantId}/locations`,
      { location_1: a![1] },
      `/grants/${grantId}`,
    );
    expect(flashOf(again.html)?.text).toBe(`Grant ${grantId}, no consent: attached ${derived(a![1])}.`);
    const [[count]] = (await sql("select count(*) from clients where provider_resource = $1", [a![1]])) as [[string]];
    expect(count).toBe("1");
    // The page now shows them as served from this grant.
    const shown = await operator.get(`/grants/${grantId}/locations`);
    expect(shown.html).toContain(`${derived(a![1])}</a> (served from this grant)`);
  });

  it("no location ticked, a location of another account, or no CSRF token: refused, nothing created", async () => {
    const { grantId } = await connectedAccount();
    const foreign = `accounts/0/locations/${Date.now()}`;
    const none = await submitAndFollow(
      `/grants/${grantId}/locations`,
      `/grants/${grantId}/locations`,
      {},
      `/grants/${grantId}`,
    );
    expect(flashOf(none.html)).toEqual({ tone: "error", text: "Tick at least one location." });
    const forged = await submitAndFollow(
      `/grants/${grantId}/locations`,
      `/grants/${grantId}/locations`,
      { location_0: foreign },
      `/grants/${grantId}`,
    );
    expect(flashOf(forged.html)).toEqual({
      tone: "error",
      text: `Not a location of this grant's account: ${foreign}.`,
    });
    expect((await sql("select 1 from clients where provider_resource = $1", [foreign])).length).toBe(0);
    const csrfless = await operator.post(`/grants/${grantId}/locations`, { location_0: foreign });
    expect(csrfless.status).toBe(403);
  });

  it("a location whose derived branch id another app's branch holds fails alone; the others stand", async () => {
    const { grantId } = await connectedAccount();
    const boxes = [...checkboxes((await operator.get(`/grants/${grantId}/locations`)).html)];
    const [a, b] = boxes;
    const derivedA = a![1].replace(/^accounts\/(\d+)\/locations\/(\d+)$/, "gbp-$1-$2");
    const derivedB = b![1].replace(/^accounts\/(\d+)\/locations\/(\d+)$/, "gbp-$1-$2");
    const squatter = await registerBranch({ atProvider: false, branchId: derivedA });
    const page = await submitAndFollow(
      `/grants/${grantId}/locations`,
      `/grants/${grantId}/locations`,
      { [a![0]]: a![1], [b![0]]: b![1] },
      `/grants/${grantId}`,
    );
    expect(flashOf(page.html)).toEqual({
      tone: "error",
      text: `Grant ${grantId}: created and attached ${derivedB}. Not attached: ${a![1]}: A client is already registered for this branch_id.`,
    });
    expect(await grantOf(squatter.clientId)).toBeNull();
    expect(tableRows(page.html, "grant-branches").map(([cell]) => cell)).toContain(derivedB);
  });

  it("the API's 401, 403 and 429 and an unreachable API are an error message on the grant's page, never a 500", async () => {
    const { grantId, first, account } = await connectedAccount();
    const path = `/grants/${grantId}/locations`;
    const expectFlash = async (pattern: RegExp, options = {}) => {
      const answer = await operator.get(path, options);
      expect(answer.status, answer.html).toBe(303);
      expect(answer.response.headers.get("location")).toBe(`/token-management/console/grants/${grantId}`);
      const page = await operator.follow(answer);
      const flash = flashOf(page.html);
      expect(flash?.tone).toBe("error");
      expect(flash?.text).toMatch(pattern);
      const { accessToken } = await tokenRead(first.branchId);
      expect(page.html).not.toContain(accessToken);
    };
    await failNextApiCall(account, 429, 30);
    await expectFlash(
      /^The locations could not be listed: .*rate limiting this project \(429 RESOURCE_EXHAUSTED.*try again in 30 s\.$/,
    );
    await failNextApiCall(account, 403);
    await expectFlash(/refused access \(403 PERMISSION_DENIED.*business\.manage/);
    await failNextApiCall(account, 401);
    await expectFlash(/refused the grant's access token \(401 UNAUTHENTICATED/);
    await expectFlash(/could not be reached/, {
      envOverrides: { BUSINESS_PROFILE_API_BASE_URLS: "http://127.0.0.1:9,http://127.0.0.1:9" },
    });
    // And the page works again once the API does.
    expect((await operator.get(path)).status).toBe(200);
  });

  it("asks with the token of an active branch of the grant; with none active, says so", async () => {
    const { first, grantId } = await connectedAccount();
    const second = await registerBranch({
      oauthClientId: first.oauthClientId,
      clientSecret: first.clientSecret,
      atProvider: false,
    });
    const path = `/grants/${grantId}/locations`;
    await sql("update clients set grant_id = $1 where id = $2", [grantId, second.clientId]);
    const deactivate = (clientId: number) =>
      submitAndFollow(
        `/branches/${clientId}`,
        `/branches/${clientId}/active`,
        { is_active: "false" },
        `/branches/${clientId}`,
      );
    await deactivate(first.clientId);
    const listed = await operator.get(path);
    expect(listed.status, listed.html).toBe(200);
    expect(listed.html).toContain("<caption>26 location(s)</caption>");
    await deactivate(second.clientId);
    const answer = await operator.get(path);
    expect(answer.status).toBe(303);
    expect(flashOf((await operator.follow(answer)).html)?.text).toBe(
      `The locations could not be listed: No active branch is served from grant ${grantId}, so there is no token to ask the Business Profile API with: activate one first.`,
    );
  });

  it("a grant no branch is served from says so instead of asking the API", async () => {
    const { first, grantId } = await connectedAccount();
    await sql("update clients set grant_id = null where id = $1", [first.clientId]);
    await sql("update tokens set subject = coalesce(subject, 'x') where id = $1", [grantId]);
    const answer = await operator.get(`/grants/${grantId}/locations`);
    expect(answer.status).toBe(303);
    expect(flashOf((await operator.follow(answer)).html)?.text).toMatch(/No branch is served from grant/);
  });
});
