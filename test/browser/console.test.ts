import { mkdirSync, readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";
import type { AxeResults, Result as AxeViolation } from "axe-core";
import { type Browser, type BrowserContext, chromium, type Locator, type Page } from "playwright-core";
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from "vitest";
import { ROOT } from "../../dev/local-stack.ts";
import { providerStats, registerAtProvider, type Stack, startStack } from "./stack.ts";

/**
 * The operator console in headless Chromium (the system's, through playwright-core), end to end
 * against a stack of its own: sign in with the admin key, register a branch, copy its login link,
 * complete the consent at the local authorization server in another browser, see it connected,
 * refresh now, see its app and grant and attach two of the account's locations to the grant, revoke
 * the grant, read the event history, use it without JavaScript, delete the
 * branch, sign out. Every console page
 * (and our own callback page) is checked with axe-core: zero serious or critical violations; all
 * violations are printed. Screenshots of each page go to test-artifacts/ (not committed).
 *
 * The steps share one browser session and run in order; a failing step skips the rest.
 */

const CHROMIUM = process.env.CHROMIUM_PATH ?? "/usr/bin/chromium";
const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];
const ARTIFACTS = join(ROOT, "test-artifacts");
const AXE_SOURCE = readFileSync(createRequire(import.meta.url).resolve("axe-core/axe.min.js"), "utf8");
const BLOCKING_IMPACTS = new Set(["serious", "critical"]);

let stack: Stack;
let browser: Browser;
/** The operator's browser. axe is injected as an inline script, so this context bypasses the CSP. */
let operator: BrowserContext;
let page: Page;
let shot = 0;
const audits: { page: string; violations: AxeViolation[] }[] = [];

const branch = {
  clientId: `browser-client-${Date.now()}`,
  clientSecret: "browser-secret-0123456789abcdef",
  branchId: `browser-branch-${Date.now()}`,
  workspaceEmail: "owner@browser-test.example.com",
  workspaceName: "Browser <b>Test</b> Workspace",
};
let branchUrl = "";
let loginLink = "";

/** Runs axe-core on the page, prints every violation, screenshots it; fails on serious or critical ones. */
async function audit(target: Page, name: string): Promise<void> {
  await target.addScriptTag({ content: AXE_SOURCE });
  const result = await target.evaluate(
    () => (window as unknown as { axe: { run(): Promise<AxeResults> } }).axe.run() as Promise<AxeResults>,
  );
  shot++;
  await target.screenshot({ path: join(ARTIFACTS, `${String(shot).padStart(2, "0")}-${name}.png`), fullPage: true });
  audits.push({ page: name, violations: result.violations });
  for (const violation of result.violations) {
    const nodes = violation.nodes.map((node) => node.target.join(" ")).join(", ");
    console.log(`[axe] ${name}: ${violation.impact} ${violation.id}: ${violation.help} — ${nodes}`);
  }
  const blocking = result.violations.filter((v) => BLOCKING_IMPACTS.has(v.impact ?? ""));
  expect(
    blocking.map((v) => `${v.impact} ${v.id}: ${v.help}`),
    `serious or critical accessibility violations on ${name}`,
  ).toEqual([]);
}

const flash = (target: Page) => target.locator('p[role="status"].flash');
const alert = (target: Page) => target.locator('p[role="alert"]');
const textOf = async (locator: Locator) => ((await locator.textContent()) ?? "").trim();
/** The branch page's status badge (the first status on the page, in its Connection section). */
const statusBadge = (target: Page) => target.locator(".status").first();

async function serviceRead(): Promise<{ status: number; accessToken?: string }> {
  const response = await fetch(`${stack.base}/tokens/${branch.branchId}`, {
    headers: { authorization: `Bearer ${stack.serviceKey}` },
  });
  const body = (await response.json()) as { access_token?: string };
  return { status: response.status, ...(body.access_token ? { accessToken: body.access_token } : {}) };
}

beforeAll(async () => {
  mkdirSync(ARTIFACTS, { recursive: true });
  stack = await startStack();
  // Playwright gives each launch a fresh temporary profile (--user-data-dir) of its own.
  browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, headless: true });
  operator = await browser.newContext({ bypassCSP: true });
  page = await operator.newPage();
  console.log(`browser test: ${browser.version()} at ${CHROMIUM}; Worker at ${stack.base}`);
});

afterAll(async () => {
  const total = audits.reduce((n, a) => n + a.violations.length, 0);
  console.log(
    `[axe] ${audits.length} pages audited, ${total} violations in all (${audits
      .map((a) => `${a.page}: ${a.violations.map((v) => `${v.impact} ${v.id}`).join(" ") || "none"}`)
      .join("; ")})`,
  );
  await browser?.close();
  await stack?.close();
});

// Each step needs the state the previous ones left: after a failure, the rest are skipped.
let failed = false;
beforeEach((context) => {
  if (failed) context.skip();
});
afterEach((context) => {
  if (context.task.result?.state === "fail") failed = true;
});

describe("the operator console in a real browser", () => {
  it("sends a visitor to the sign-in page, refuses a wrong key, and signs in with the admin key", async () => {
    await page.goto(`${stack.base}/console`);
    expect(new URL(page.url()).pathname).toBe("/token-management/console/sign-in");
    await audit(page, "sign-in");

    await page.getByLabel("Admin API key").fill("not-the-admin-key-0123456789");
    const refused = page.waitForResponse((r) => r.request().method() === "POST");
    await page.getByRole("button", { name: "Sign in" }).click();
    expect((await refused).status()).toBe(401);
    await expect.poll(() => alert(page).count()).toBeGreaterThan(0);
    await audit(page, "sign-in-refused");

    // The service key is not an operator's key either.
    await page.getByLabel("Admin API key").fill(stack.serviceKey);
    const service = page.waitForResponse((r) => r.request().method() === "POST");
    await page.getByRole("button", { name: "Sign in" }).click();
    expect((await service).status()).toBe(401);

    await page.getByLabel("Admin API key").fill(stack.adminKey);
    await page.getByRole("button", { name: "Sign in" }).click();
    await page.waitForURL((url) => url.pathname === "/token-management/console");
    await expect.poll(() => page.locator('section[aria-label="Counts"]').count()).toBe(1);
    expect(await page.locator("table#branches").count()).toBe(1);
    await audit(page, "branches-empty");
  });

  it("registers a branch through the form, showing field errors next to the fields first", async () => {
    await page.getByRole("main").getByRole("link", { name: "Register a branch" }).click();
    await page.waitForURL((url) => url.pathname === "/token-management/console/branches/new");
    await audit(page, "register");

    const redirectUri = `${stack.base}/auth/callback`;
    await registerAtProvider(stack.oauth, { ...branch, redirectUri });
    await page.locator("#f-client_id").fill(branch.clientId);
    await page.locator("#f-client_secret").fill(branch.clientSecret);
    await page.locator("#f-redirect_uri").fill(redirectUri);
    await page.locator("#f-branch_id").fill(branch.branchId);
    await page.locator("#f-workspace_name").fill(branch.workspaceName);
    await page.locator("#f-workspace_email").fill("not an e-mail address");
    const invalid = page.waitForResponse((r) => r.request().method() === "POST");
    await page.getByRole("button", { name: "Register" }).click();
    expect((await invalid).status()).toBe(422);
    await expect.poll(() => page.locator("#err-workspace_email").count()).toBe(1);
    expect(await textOf(page.locator("#err-workspace_email"))).not.toBe("");
    // Values are kept, except the secret.
    expect(await page.locator("#f-branch_id").inputValue()).toBe(branch.branchId);
    expect(await page.locator("#f-client_secret").inputValue()).toBe("");
    await audit(page, "register-errors");

    await page.locator("#f-workspace_email").fill(branch.workspaceEmail);
    await page.locator("#f-client_secret").fill(branch.clientSecret);
    await page.getByRole("button", { name: "Register" }).click();
    await page.waitForURL((url) => /^\/token-management\/console\/branches\/\d+$/.test(url.pathname));
    branchUrl = page.url();
    // The workspace name is shown as text, never as markup.
    await expect.poll(() => page.getByText(branch.workspaceName).count()).toBeGreaterThan(0);
    expect(await page.locator("b", { hasText: /^Test$/ }).count()).toBe(0);
    expect(await textOf(statusBadge(page))).toBe("Never connected");
    await audit(page, "branch-registered");
  });

  it("copies a new login link with the Copy button, under the page's own CSP", async () => {
    // A context that enforces the CSP (the copy script must carry the response's nonce), signed
    // in with the operator's session cookie.
    const strict = await browser.newContext();
    try {
      await strict.addCookies(await operator.cookies());
      await strict.grantPermissions(["clipboard-read", "clipboard-write"], { origin: new URL(stack.base).origin });
      const strictPage = await strict.newPage();
      const blocked: string[] = [];
      strictPage.on("console", (message) => {
        if (/Content Security Policy/i.test(message.text())) blocked.push(message.text());
      });
      await strictPage.goto(branchUrl);
      await strictPage.getByRole("button", { name: "Copy new login link" }).click();
      const field = strictPage.locator("input#login-link");
      await expect.poll(() => field.count()).toBe(1);
      loginLink = await field.inputValue();
      expect(loginLink).toMatch(/^http:\/\/127\.0\.0\.1:\d+\/token-management\//);
      expect(await field.getAttribute("readonly")).not.toBeNull();
      await strictPage.getByRole("button", { name: "Copy", exact: true }).click();
      await expect.poll(() => strictPage.evaluate(() => navigator.clipboard.readText())).toBe(loginLink);
      expect(blocked, "CSP violations").toEqual([]);
    } finally {
      await strict.close();
    }
    // The same page for axe, in the operator's context (a second link; the first is still valid).
    await page.goto(branchUrl);
    await page.getByRole("button", { name: "Copy new login link" }).click();
    await expect.poll(() => page.locator("input#login-link").count()).toBe(1);
    await audit(page, "login-link");
  });

  it("completes the consent at the authorization server in the workspace owner's browser", async () => {
    // A browser of its own (no operator session); it bypasses the CSP for axe, as the operator's does.
    const owner = await browser.newContext({ bypassCSP: true });
    try {
      const ownerPage = await owner.newPage();
      await ownerPage.goto(loginLink);
      // The local authorization server's consent screen (not ours: screenshot only).
      expect(new URL(ownerPage.url()).origin).toBe(new URL(stack.oauth.url).origin);
      shot++;
      await ownerPage.screenshot({ path: join(ARTIFACTS, `${String(shot).padStart(2, "0")}-provider-consent.png`) });
      await ownerPage.getByRole("button", { name: "Approve" }).click();
      await ownerPage.waitForURL((url) => url.pathname === "/token-management/auth/callback");
      expect(await textOf(ownerPage.locator("body"))).toMatch(/connected/i);
      await audit(ownerPage, "callback-connected");
    } finally {
      await owner.close();
    }
    const stats = await providerStats(stack.oauth, branch.clientId);
    expect(stats.authorizationCodeGrants).toBe(1);
  });

  it("shows the branch connected, with the token as a fingerprint only", async () => {
    await page.goto(branchUrl);
    expect(await textOf(statusBadge(page))).toBe("Connected");
    const read = await serviceRead();
    expect(read.status).toBe(200);
    expect(read.accessToken).toBeTruthy();
    expect(await page.content()).not.toContain(read.accessToken!);
    await audit(page, "branch-connected");
  });

  it("refreshes now: the provider issues a new token and the page says so", async () => {
    const before = await providerStats(stack.oauth, branch.clientId);
    const tokenBefore = (await serviceRead()).accessToken;
    await page.getByRole("button", { name: "Refresh now" }).click();
    await page.waitForURL(branchUrl);
    await expect.poll(() => flash(page).count()).toBe(1);
    expect(await alert(page).count()).toBe(0);
    const after = await providerStats(stack.oauth, branch.clientId);
    expect(after.refreshGrants).toBe(before.refreshGrants + 1);
    const tokenAfter = (await serviceRead()).accessToken;
    expect(tokenAfter).not.toBe(tokenBefore);
    expect(await page.content()).not.toContain(tokenAfter!);
    expect(await textOf(statusBadge(page))).toBe("Connected");
    await audit(page, "refreshed");
  });

  it("shows apps and grants, and attaches two of the account's locations to its grant with no consent", async () => {
    await page.getByRole("navigation", { name: "Console" }).getByRole("link", { name: "Apps" }).click();
    await page.waitForURL(`${stack.base}/console/apps`);
    await audit(page, "apps");
    await page.getByRole("link", { name: "Register an app" }).click();
    await audit(page, "register-app");
    await page.goto(`${stack.base}/console/apps`);
    await page.locator("#apps").getByRole("link").first().click();
    await expect.poll(() => page.locator("#app-branches").textContent()).toContain(branch.branchId);
    await audit(page, "app");
    await page.getByRole("navigation", { name: "Console" }).getByRole("link", { name: "Grants" }).click();
    await audit(page, "grants");
    await page
      .locator("#grants")
      .getByRole("link", { name: /^grant / })
      .first()
      .click();
    await expect.poll(() => page.locator("#grant-branches").textContent()).toContain(branch.branchId);
    await audit(page, "grant");
    const grantUrl = page.url();
    const before = await providerStats(stack.oauth, branch.clientId);
    await page.getByRole("link", { name: "Choose this account's locations" }).click();
    await expect.poll(() => page.locator('#locations input[type="checkbox"]').count()).toBe(26);
    await audit(page, "locations");
    const boxes = page.locator('#locations input[type="checkbox"]');
    await boxes.nth(0).check();
    await boxes.nth(1).check();
    await page.getByRole("button", { name: "Attach the ticked locations" }).click();
    await page.waitForURL(grantUrl);
    await expect.poll(() => flash(page).count()).toBe(1);
    expect(await textOf(flash(page))).toMatch(
      /^Grant \d+, no consent: created and attached gbp-\d+-\d+, gbp-\d+-\d+\.$/,
    );
    expect(await page.locator("#grant-branches tbody tr").count()).toBe(3);
    const after = await providerStats(stack.oauth, branch.clientId);
    expect(after.authorizationCodeGrants).toBe(before.authorizationCodeGrants);
    await audit(page, "grant-locations-attached");
    await page.goto(branchUrl);
  });

  it("revokes the grant: revoked at the provider, the branch shows revoked and serves nothing", async () => {
    const before = await providerStats(stack.oauth, branch.clientId);
    await page.getByRole("button", { name: "Revoke grant" }).click();
    await page.waitForURL(branchUrl);
    await expect.poll(() => flash(page).count()).toBe(1);
    expect(await textOf(statusBadge(page))).toBe("Revoked");
    expect((await providerStats(stack.oauth, branch.clientId)).revocations).toBeGreaterThan(before.revocations);
    expect((await serviceRead()).status).toBe(409);
    await audit(page, "revoked");
  });

  it("shows the branch's event history, on its page and in the event log", async () => {
    const history = await page.locator("table#events tbody tr").allTextContents();
    const text = history.join("\n");
    expect(text).toContain("connection.created");
    expect(text).toContain("connection.revoked");
    // Oldest first.
    expect(text.indexOf("connection.created")).toBeLessThan(text.indexOf("connection.revoked"));

    await page.goto(`${stack.base}/console/events?branch_id=${encodeURIComponent(branch.branchId)}`);
    const log = (await page.locator("table#event-log tbody tr").allTextContents()).join("\n");
    expect(log).toContain("connection.created");
    expect(log).toContain("connection.revoked");
    await audit(page, "event-log");

    await page.goto(`${stack.base}/console`);
    const row = page.locator("table#branches tbody tr", { hasText: branch.branchId });
    expect(await row.count()).toBe(1);
    expect(await textOf(row)).toContain("Revoked");
    await audit(page, "branches");
  });

  it("shows the health page from the navigation: the period's refreshes, consents, webhooks and due tokens", async () => {
    await page.goto(`${stack.base}/console`);
    await page.getByRole("navigation", { name: "Console" }).getByRole("link", { name: "Health" }).click();
    await page.waitForURL(`${stack.base}/console/health`);
    expect(await page.locator("h1").textContent()).toBe("Health");
    const headings = await page.locator("h2").allTextContents();
    expect(headings).toEqual(["Refreshes", "Grants needing consent", "Webhook failures", "Oldest token still due"]);
    // This stack's one branch was connected, refreshed and revoked: nothing needs consent, nothing is due.
    expect(await page.locator("#health-lost").textContent()).toBe("0");
    expect(await textOf(page.locator("#health-needs-consent"))).toContain("None");
    expect(await textOf(page.locator("#health-oldest-due"))).toContain("Nothing is due");
    await audit(page, "health");
  });

  it("works without JavaScript: sign in, and a new login link to select by hand", async () => {
    const noScript = await browser.newContext({ javaScriptEnabled: false });
    try {
      const plain = await noScript.newPage();
      await plain.goto(`${stack.base}/console/sign-in`);
      await plain.getByLabel("Admin API key").fill(stack.adminKey);
      await plain.getByRole("button", { name: "Sign in" }).click();
      await plain.waitForURL((url) => url.pathname === "/token-management/console");
      await plain.goto(branchUrl);
      await plain.getByRole("button", { name: "Copy new login link" }).click();
      const link = await plain.locator("input#login-link").inputValue();
      expect(link).toMatch(/^http:\/\/127\.0\.0\.1:\d+\/token-management\//);
      expect(link).not.toBe(loginLink);
    } finally {
      await noScript.close();
    }
  });

  it("deletes the branch after the typed confirmation, then signs out", async () => {
    await page.goto(branchUrl);
    await page.locator('input[name="confirm"]').fill(branch.branchId);
    await page.getByRole("button", { name: "Delete branch" }).click();
    await page.waitForURL((url) => url.pathname === "/token-management/console");
    await expect.poll(() => flash(page).count()).toBe(1);
    expect(await page.locator("table#branches tbody tr", { hasText: branch.branchId }).count()).toBe(0);
    await audit(page, "deleted");

    await page.getByRole("button", { name: /sign out/i }).click();
    await page.waitForURL((url) => url.pathname === "/token-management/console/sign-in");
    await page.goto(`${stack.base}/console`);
    expect(new URL(page.url()).pathname).toBe("/token-management/console/sign-in");
  });
});
