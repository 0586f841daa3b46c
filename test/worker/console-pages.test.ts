import { beforeAll, describe, expect, it } from "vitest";
import { ConsoleBrowser, flashOf, tableRows, textOf } from "./console-helpers";
import { BASE, call, uniqueId } from "./helpers";
import { connectBranch, currentTokens, postJson, registerBranch, setProviderBehavior, sql } from "./oauth-helpers";

/**
 * What the console's pages show, for branches brought into every status by the real flows
 * (consent, refreshes against the local authorization server, an operator's revoke). Other files
 * share the database, so the list is searched by this file's tag.
 */

const TAG = uniqueId("ConsolePages").toLowerCase();
const HOSTILE = `<script>alert(1)</script> ${TAG}`;

interface Seeded {
  clientId: number;
  branchId: string;
}
const seeded = new Map<string, Seeded>();
const operator = new ConsoleBrowser();

async function refreshFails(branchId: string, oauthClientId: string, error: { status: number; error: string }) {
  await setProviderBehavior(oauthClientId, { failNext: error });
  await (await postJson("/tokens/refresh", { branch_id: branchId })).text();
}

beforeAll(async () => {
  const names = (status: string) => ({ branchId: `${TAG}-${status}`, workspaceName: `${TAG} ${status}` });
  const never = await registerBranch({ ...names("never_connected"), workspaceName: HOSTILE });
  seeded.set("never_connected", never);
  const connected = await connectBranch(names("connected"));
  seeded.set("connected", connected);

  const dead = await connectBranch(names("needs_reauth"));
  await refreshFails(dead.branchId, dead.oauthClientId, { status: 400, error: "invalid_grant" });
  seeded.set("needs_reauth", dead);

  const rejected = await connectBranch(names("credentials_rejected"));
  await refreshFails(rejected.branchId, rejected.oauthClientId, { status: 401, error: "invalid_client" });
  seeded.set("credentials_rejected", rejected);

  const revoked = await connectBranch(names("revoked"));
  expect((await call(`/tokens/${revoked.branchId}`, { key: "admin", method: "DELETE" })).status).toBe(200);
  seeded.set("revoked", revoked);

  // degraded: one real transient failure, then the counter three in a row would reach (the
  // backoff spaces real ones out by minutes).
  const degraded = await connectBranch(names("degraded"));
  await refreshFails(degraded.branchId, degraded.oauthClientId, { status: 503, error: "temporarily_unavailable" });
  await sql("update tokens set failure_count = 3 where client_id = $1 and is_valid", [degraded.clientId]);
  seeded.set("degraded", degraded);

  await operator.signIn();
}, 120_000);

const WORDS: Record<string, string> = {
  needs_reauth: "Needs reconnection",
  credentials_rejected: "Credentials rejected",
  degraded: "Degraded",
  revoked: "Revoked",
  never_connected: "Never connected",
  connected: "Connected",
};

describe("the branch list", () => {
  it("shows every status in words, needing attention first, each branch linking to its page", async () => {
    const page = await operator.get(`?q=${encodeURIComponent(TAG)}`);
    expect(page.status).toBe(200);
    const rows = tableRows(page.html, "branches");
    expect(rows.map((row) => row[2])).toEqual([
      "Needs reconnection",
      "Credentials rejected",
      "Degraded",
      "Revoked",
      "Never connected",
      "Connected",
    ]);
    for (const [status, branch] of seeded) {
      expect(page.html).toContain(
        `<a href="/token-management/console/branches/${branch.clientId}">${branch.branchId}</a>`,
      );
      expect(rows.find((row) => row[0] === branch.branchId)?.[2]).toBe(WORDS[status]);
    }
    const connected = rows.find((row) => row[0] === `${TAG}-connected`)!;
    expect(connected[3]).toMatch(/^expires in \d+ min$/);
    expect(connected[4]).toMatch(/ ago$/);
    const degraded = rows.find((row) => row[0] === `${TAG}-degraded`)!;
    expect(degraded[5]).not.toBe("none");
    expect(rows.find((row) => row[0] === `${TAG}-never_connected`)![3]).toBe("no token");
    // A dead or revoked grant's row still has an expiry; the list says the token is not served.
    expect(rows.find((row) => row[0] === `${TAG}-revoked`)![3]).toBe("not served (revoked)");
    expect(rows.find((row) => row[0] === `${TAG}-needs_reauth`)![3]).toBe("not served (needs reconnection)");
    expect(rows.find((row) => row[0] === `${TAG}-credentials_rejected`)![3]).toMatch(/^expires in \d+ min$/);
  });

  it("counts by status for the search at the top, and filters by status and active flag", async () => {
    const page = await operator.get(`?q=${encodeURIComponent(TAG)}`);
    const counts = textOf(/<section aria-label="Counts"[^>]*>([\s\S]*?)<\/section>/.exec(page.html)![1]!);
    expect(counts).toContain("All: 6");
    for (const words of Object.values(WORDS)) expect(counts).toContain(`${words}: 1`);

    const onlyRevoked = await operator.get(`?q=${encodeURIComponent(TAG)}&status=revoked&active=any`);
    expect(tableRows(onlyRevoked.html, "branches").map((row) => row[0])).toEqual([`${TAG}-revoked`]);
    expect(onlyRevoked.html).toMatch(/<option value="revoked" selected="">/);

    const inactive = await operator.get(`?q=${encodeURIComponent(TAG)}&active=false`);
    expect(tableRows(inactive.html, "branches")).toEqual([]);
    expect(inactive.html).toContain("No branches match.");
  });

  it("pages with a Next page link that carries the filters", async () => {
    const first = await operator.get(`?q=${encodeURIComponent(TAG)}`);
    expect(first.html).not.toContain("Next page");
    // Beyond this file's six: the whole list (other files' branches too) has a second page when
    // it has more than a page of rows; check the link's shape when it does.
    const all = await operator.get("");
    const next = /<a href="([^"]+)" rel="next">Next page<\/a>/.exec(all.html)?.[1];
    if (next) {
      expect(next.replace(/&amp;/g, "&")).toMatch(/^\/token-management\/console\?cursor=/);
      const second = await operator.get(next.replace(/&amp;/g, "&").replace("/token-management/console", ""));
      expect(second.status).toBe(200);
    }
  });

  it("a tampered cursor is a 400 page, not a 500", async () => {
    const page = await operator.get("?cursor=not-a-cursor");
    expect(page.status).toBe(400);
    expect(page.response.headers.get("content-type")).toMatch(/^text\/html/);
  });
});

describe("a branch's page", () => {
  it("renders for each status: its words, why, expiry, failures and the actions", async () => {
    for (const [status, branch] of seeded) {
      const page = await operator.get(`/branches/${branch.clientId}`);
      expect(page.status, status).toBe(200);
      const text = textOf(page.html);
      expect(text).toContain(`Branch ${branch.branchId}`);
      expect(text).toContain(`Status ${WORDS[status]}`);
      for (const button of [
        "Copy new login link",
        "Revoke all login links",
        "Refresh now",
        "Deactivate",
        "Rotate secret",
        "Revoke grant",
        "Delete branch",
      ]) {
        expect(page.html, `${status}: ${button}`).toContain(`>${button}</button>`);
      }
      expect(page.html).toContain('<table id="events">');
    }
    const why = async (status: string) =>
      textOf(
        /<dt>Why<\/dt><dd>([\s\S]*?)<\/dd>/.exec(
          (await operator.get(`/branches/${seeded.get(status)!.clientId}`)).html,
        )![1]!,
      );
    expect(await why("never_connected")).toContain("send the branch a login link");
    expect(await why("credentials_rejected")).toContain("rotate the client secret");
    expect(await why("needs_reauth")).toContain("send a new login link");
    expect(await why("degraded")).toContain("The last 3 refreshes failed");
    expect(await why("revoked")).toContain("An operator revoked the grant");
  });

  it("shows the access token only as the first 8 hex digits of its SHA-256", async () => {
    const branch = seeded.get("connected")!;
    const { accessToken } = await currentTokens(branch.clientId);
    const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(accessToken)));
    const hex = [...digest].map((b) => b.toString(16).padStart(2, "0")).join("");
    const page = await operator.get(`/branches/${branch.clientId}`);
    expect(textOf(page.html)).toContain(`Token fingerprint ${hex.slice(0, 8)}`);
    expect(page.html).not.toContain(accessToken);
    expect(page.html).not.toContain(hex.slice(0, 9));
  });

  it("shows the connection's history: created by the consent, then revoked by an operator", async () => {
    const revoked = seeded.get("revoked")!;
    const rows = tableRows((await operator.get(`/branches/${revoked.clientId}`)).html, "events");
    expect(rows.map((row) => [row[2], row[3], row[4]])).toEqual([
      ["connection.created", "Never connected", "Connected"],
      ["connection.revoked", "Connected", "Revoked"],
    ]);
  });

  it("lists the branch's events, oldest first", async () => {
    const branch = await registerBranch({ branchId: `${TAG}-history`, atProvider: false });
    expect(tableRows((await operator.get(`/branches/${branch.clientId}`)).html, "events")).toEqual([]);
    for (const isActive of [false, true]) {
      const patched = await postJson(`/clients/${branch.clientId}`, { is_active: isActive }, { method: "PATCH" });
      expect(patched.status).toBe(200);
    }
    const rows = tableRows((await operator.get(`/branches/${branch.clientId}`)).html, "events");
    expect(rows.map((row) => [row[2], row[3], row[4]])).toEqual([
      ["client.deactivated", "active", "inactive"],
      ["client.reactivated", "inactive", "active"],
    ]);
    expect(rows[1]![5]).toBe("reactivated by an administrator");
    expect(rows[1]![6]).toBe("not sent (no webhook configured)");
  });
});

describe("hostile names", () => {
  it("a workspace named <script>alert(1)</script> shows as text on every page", async () => {
    const branch = seeded.get("never_connected")!;
    const pages = [
      await operator.get(`?q=${encodeURIComponent(TAG)}`),
      await operator.get(`/branches/${branch.clientId}`),
      await operator.get(`?q=${encodeURIComponent(HOSTILE)}`),
    ];
    for (const page of pages) {
      expect(page.status).toBe(200);
      expect(page.html).not.toContain("<script>alert(1)</script>");
      expect(page.html).toContain("&lt;script&gt;alert(1)&lt;/script&gt;");
    }
    // The search box echoes the query escaped, inside its attribute.
    expect(pages[2]!.html).toMatch(/value="&lt;script&gt;alert\(1\)&lt;\/script&gt; /);
  });

  it("a branch id with quotes and markup stays inside its attribute and text", async () => {
    const branchId = `${TAG}-"><img src=x onerror=alert(1)>`;
    const branch = await registerBranch({ branchId, atProvider: false });
    const page = await operator.get(`/branches/${branch.clientId}`);
    expect(page.status).toBe(200);
    expect(page.html).not.toContain("<img src=x");
    expect(page.html).toContain("&quot;&gt;&lt;img src=x onerror=alert(1)&gt;");
  });
});

describe("hostile event fields", () => {
  it("the event log shows a branch id, reason and delivery error holding <script> as text", async () => {
    const branchId = `${TAG}-<script>alert("id")</script>`;
    const branch = await registerBranch({ branchId, atProvider: false });
    await postJson(`/clients/${branch.clientId}`, { is_active: false }, { method: "PATCH" });
    // What a provider's error text or a receiver's answer could put there (the real columns).
    await sql("update events set reason = $2, last_error = $3 where client_id = $1", [
      branch.clientId,
      '<script>alert("reason")</script>',
      '<script>alert("last_error")</script>',
    ]);
    const pages = [
      await operator.get(`/events?branch_id=${encodeURIComponent(branchId)}`),
      await operator.get(`/branches/${branch.clientId}`),
    ];
    for (const page of pages) {
      expect(page.status).toBe(200);
      expect(page.html).not.toMatch(/<script>alert/);
      for (const what of ["reason", "last_error"]) {
        expect(page.html).toContain(`&lt;script&gt;alert(&quot;${what}&quot;)&lt;/script&gt;`);
      }
    }
    expect(pages[0]!.html).toContain(`&lt;script&gt;alert(&quot;id&quot;)&lt;/script&gt;`);
    const rows = tableRows(pages[0]!.html, "event-log");
    expect(rows).toHaveLength(1);
    expect(rows[0]![2]).toBe(branchId);
    expect(rows[0]!.join(" ")).toContain('<script>alert("reason")</script>');
  });
});

describe("a failure while rendering a page", () => {
  it("the database failing is a 503 page with the generic message and the request id, no SQL, stack or cause", async () => {
    const branch = await registerBranch({ branchId: `${TAG}-outage`, atProvider: false });
    const requestId = `ray-${uniqueId("console")}`;
    // This one request's database is a closed port (the shared database stays up for other files).
    const page = await operator.get(`/branches/${branch.clientId}`, {
      headers: { "cf-ray": requestId },
      envOverrides: { NEON_LOCAL_FETCH_ENDPOINT: "http://127.0.0.1:9/sql" },
    });
    expect(page.status, page.html).toBe(503);
    expect(page.response.headers.get("content-type")).toMatch(/^text\/html/);
    expect(Number(page.response.headers.get("retry-after"))).toBeGreaterThan(0);
    expect(flashOf(page.html)?.text).toBe("The database is unreachable. Try again shortly.");
    expect(page.html).toContain(`Request ID: <code id="request-id">${requestId}</code>`);
    const text = textOf(page.html);
    for (const leak of [
      /select\s/i,
      /from\s+"/i,
      /\bat\s+\S+\s*\(/,
      /Error:/,
      /HTTP status/i,
      /neon/i,
      /127\.0\.0\.1/,
      /postgres/i,
    ]) {
      expect(text).not.toMatch(leak);
    }
    // The same page renders with the database reachable.
    expect((await operator.get(`/branches/${branch.clientId}`)).status).toBe(200);
  });
});

describe("the event log and the register form", () => {
  it("the event log filters by branch and type", async () => {
    const branch = await registerBranch({ branchId: `${TAG}-log`, atProvider: false });
    for (const isActive of [false, true, false]) {
      await postJson(`/clients/${branch.clientId}`, { is_active: isActive }, { method: "PATCH" });
    }
    const branchFilter = `branch_id=${encodeURIComponent(branch.branchId)}`;
    const page = await operator.get(`/events?${branchFilter}&type=client.deactivated`);
    expect(page.status).toBe(200);
    expect(tableRows(page.html, "event-log").map((row) => [row[2], row[3]])).toEqual([
      [branch.branchId, "client.deactivated"],
      [branch.branchId, "client.deactivated"],
    ]);
    const all = tableRows((await operator.get(`/events?${branchFilter}`)).html, "event-log");
    expect(all.map((row) => row[3])).toEqual(["client.deactivated", "client.reactivated", "client.deactivated"]);
    expect((await operator.get("/events?type=bogus")).status).toBe(422);
  });

  it("the register form has a labelled field per POST /clients field", async () => {
    const page = await operator.get("/branches/new");
    for (const name of [
      "client_id",
      "client_secret",
      "redirect_uri",
      "branch_id",
      "workspace_email",
      "workspace_name",
      "scopes",
    ]) {
      expect(page.html).toMatch(new RegExp(`<label for="f-${name}">`));
      expect(page.html).toMatch(new RegExp(`<input id="f-${name}" name="${name}"`));
    }
    expect(page.html).toContain(`value="${BASE}/auth/callback"`);
  });
});
