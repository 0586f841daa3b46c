import { beforeAll, describe, expect, it } from "vitest";
import { createDb } from "../../src/db/client";
import { AppError } from "../../src/errors";
import {
  BRANCH_STATUSES,
  type BranchListQuery,
  type BranchListRow,
  type BranchStatus,
  listBranches,
} from "../../src/services/branch-list";
import { call, testEnv, uniqueId } from "./helpers";
import { connectBranch, postJson, registerBranch, setProviderBehavior, sql } from "./oauth-helpers";

/**
 * The console's branch list (src/services/branch-list.ts) over the real local database, with
 * branches brought into each status by the real flows (consent, refresh against the local
 * authorization server, revoke, deactivate). Other test files share the database, so every query
 * here searches this file's own tag and the counts are those of the search.
 */

const TAG = uniqueId("BranchList").toLowerCase();

/** A database handle whose SQL round trips neon-local counts under a user name of its own. */
function countedDb() {
  const user = uniqueId("branchlist").replace(/-/g, "_");
  const url = new URL(testEnv.TOKEN_MANAGEMENT_DATABASE_URL as string);
  url.username = user;
  return {
    db: createDb({ databaseUrl: url.toString(), localFetchEndpoint: testEnv.NEON_LOCAL_FETCH_ENDPOINT }),
    async requests(): Promise<number> {
      const response = await fetch(`${testEnv.NEON_LOCAL_URL}/stats?user=${user}`);
      return ((await response.json()) as { requests: number }).requests;
    },
  };
}

const { db, requests } = countedDb();
const list = (query: Partial<BranchListQuery> = {}) => listBranches(db, { search: TAG, limit: 200, ...query });

/** branch id → the status it was brought into, and which one was deactivated. */
const expected = new Map<string, BranchStatus>();
let inactiveBranch = "";
let degradedBranch = "";
let connectedBranch = "";

async function refreshFails(branchId: string, oauthClientId: string, error: { status: number; error: string }) {
  await setProviderBehavior(oauthClientId, { failNext: error });
  // The answer depends on the error (invalid_client still serves the current token); the list's
  // statuses below are what is checked.
  await (await postJson("/tokens/refresh", { branch_id: branchId })).text();
}

beforeAll(async () => {
  const name = (n: number) => ({ workspaceName: `${TAG} Workspace ${n}`, branchId: `${TAG}-b${n}` });
  // Connected: two, one of them later deactivated (still connected: the flag is a separate filter).
  for (const n of [1, 2]) {
    const branch = await connectBranch(name(n));
    expected.set(branch.branchId, "connected");
  }
  connectedBranch = `${TAG}-b1`;
  inactiveBranch = `${TAG}-b2`;
  const [inactive] = await sql("select id from clients where branch_id = $1", [inactiveBranch]);
  expect((await postJson(`/clients/${inactive![0]}`, { is_active: false }, { method: "PATCH" })).status).toBe(200);

  // Never connected: registered only. Its workspace is searched by e-mail below.
  for (const n of [3, 4]) {
    const branch = await registerBranch({ ...name(n), workspaceEmail: `Ops.${n}@${TAG}.Example.com` });
    expected.set(branch.branchId, "never_connected");
  }

  // needs_reauth: the provider answers invalid_grant to a refresh.
  const dead = await connectBranch(name(5));
  await refreshFails(dead.branchId, dead.oauthClientId, { status: 400, error: "invalid_grant" });
  expected.set(dead.branchId, "needs_reauth");

  // credentials_rejected: the provider answers invalid_client.
  const rejected = await connectBranch(name(6));
  await refreshFails(rejected.branchId, rejected.oauthClientId, { status: 401, error: "invalid_client" });
  expected.set(rejected.branchId, "credentials_rejected");

  // revoked: by an operator.
  const revoked = await connectBranch(name(7));
  const revoke = await call(`/tokens/${revoked.branchId}`, { key: "admin", method: "DELETE" });
  expect(revoke.status).toBe(200);
  expected.set(revoked.branchId, "revoked");

  // degraded: three transient failures in a row. The refresh backoff spaces real ones out by
  // minutes, so the counter the refresh would have reached is written directly.
  const degraded = await connectBranch(name(8));
  await sql(
    "update tokens set failure_count = 3, last_error = 'provider answered 503', next_attempt_at = now() + interval '5 minutes' where client_id = $1 and is_valid",
    [degraded.clientId],
  );
  degradedBranch = degraded.branchId;
  expected.set(degraded.branchId, "degraded");

  // One more of the first status, so paging crosses status boundaries with several rows in one.
  const again = await connectBranch(name(9));
  await refreshFails(again.branchId, again.oauthClientId, { status: 400, error: "invalid_grant" });
  expected.set(again.branchId, "needs_reauth");
}, 120_000);

const rank = (row: BranchListRow) => BRANCH_STATUSES.indexOf(row.status);

/** Attention order, then branch id: what every page must follow. */
function expectAttentionOrder(rows: BranchListRow[]) {
  for (let i = 1; i < rows.length; i++) {
    const [a, b] = [rows[i - 1]!, rows[i]!];
    expect(
      rank(a) < rank(b) || (rank(a) === rank(b) && a.branchId < b.branchId),
      `${a.branchId} before ${b.branchId}`,
    ).toBe(true);
  }
}

describe("listBranches", () => {
  it("derives each branch's status from its latest token, and puts the ones needing attention first", async () => {
    const page = await list();
    expect(new Map(page.rows.map((row) => [row.branchId, row.status]))).toEqual(expected);
    expectAttentionOrder(page.rows);
    expect(page.rows.map((row) => row.status)).toEqual([
      "needs_reauth",
      "needs_reauth",
      "credentials_rejected",
      "degraded",
      "revoked",
      "never_connected",
      "never_connected",
      "connected",
      "connected",
    ]);
    expect(page.nextCursor).toBeNull();
  });

  it("returns what the table shows: workspace, active flag, expiry, last error, failures, next attempt", async () => {
    const rows = new Map((await list()).rows.map((row) => [row.branchId, row]));
    const connected = rows.get(connectedBranch)!;
    expect(connected).toMatchObject({ workspaceName: `${TAG} Workspace 1`, isActive: true, failureCount: 0 });
    expect(connected.expiresAt).toBeInstanceOf(Date);
    expect(connected.expiresAt!.getTime()).toBeGreaterThan(Date.now());
    expect(connected.lastError).toBeNull();
    expect(rows.get(inactiveBranch)?.isActive).toBe(false);

    const degraded = rows.get(degradedBranch)!;
    expect(degraded).toMatchObject({ failureCount: 3, lastError: "provider answered 503" });
    expect(degraded.nextAttemptAt!.getTime()).toBeGreaterThan(Date.now());

    const never = rows.get(`${TAG}-b3`)!;
    expect(never).toMatchObject({ expiresAt: null, lastRefreshedAt: null, lastError: null, failureCount: 0 });
    expect(never.workspaceEmail).toBe(`Ops.3@${TAG}.Example.com`);
    const [[id]] = (await sql("select id from clients where branch_id = $1", [never.branchId])) as [[string]];
    expect(never.clientId).toBe(Number(id));
  });

  it("counts the matching branches by status, with the total and the inactive ones", async () => {
    const { counts } = await list();
    expect(counts).toEqual({
      needs_reauth: 2,
      credentials_rejected: 1,
      account_disabled: 0,
      degraded: 1,
      revoked: 1,
      never_connected: 2,
      connected: 2,
      total: 9,
      inactive: 1,
    });
  });

  it("filters by status without changing the counts (they are the filter's choices)", async () => {
    for (const status of BRANCH_STATUSES) {
      const page = await list({ status });
      const want = [...expected].filter(([, s]) => s === status).map(([branch]) => branch);
      expect(page.rows.map((row) => row.branchId)).toEqual(want.sort());
      expect(page.counts.total).toBe(9);
    }
  });

  it("filters by the active flag, and the counts follow it", async () => {
    const inactive = await list({ active: false });
    expect(inactive.rows.map((row) => row.branchId)).toEqual([inactiveBranch]);
    expect(inactive.counts).toMatchObject({ connected: 1, total: 1, inactive: 1, needs_reauth: 0 });

    const active = await list({ active: true });
    expect(active.rows.map((row) => row.branchId)).not.toContain(inactiveBranch);
    expect(active.rows).toHaveLength(8);
    expect(active.counts).toMatchObject({ connected: 1, total: 8, inactive: 0 });

    const both = await list({ active: false, status: "needs_reauth" });
    expect(both.rows).toEqual([]);
  });

  it("searches branch ids, workspace names and e-mails, case-insensitively", async () => {
    const byBranch = await listBranches(db, { search: `${TAG}-B5`.toUpperCase(), limit: 50 });
    expect(byBranch.rows.map((row) => row.branchId)).toEqual([`${TAG}-b5`]);

    const byName = await listBranches(db, { search: `${TAG} workspace 7`.toUpperCase(), limit: 50 });
    expect(byName.rows.map((row) => row.branchId)).toEqual([`${TAG}-b7`]);
    expect(byName.counts).toMatchObject({ revoked: 1, total: 1 });

    const byEmail = await listBranches(db, { search: `ops.4@${TAG}.example`, limit: 50 });
    expect(byEmail.rows.map((row) => row.branchId)).toEqual([`${TAG}-b4`]);

    // Surrounding blanks are ignored.
    expect((await listBranches(db, { search: `  ${TAG}-b9 `, limit: 50 })).rows).toHaveLength(1);
  });

  it("matches LIKE's wildcards literally", async () => {
    // As wildcards these would match every branch of this file; literally they occur nowhere.
    for (const search of [`%${TAG}`, `_${TAG.slice(1)}`, `${TAG}%b1`, `${TAG}\\`]) {
      const page = await listBranches(db, { search, limit: 50 });
      expect(page.rows, search).toEqual([]);
      expect(page.counts.total, search).toBe(0);
    }
  });

  it("pages with a cursor: every branch exactly once, in order, across pages of any size", async () => {
    const all = (await list()).rows.map((row) => row.branchId);
    for (const limit of [1, 2, 4]) {
      const seen: string[] = [];
      let cursor: string | undefined;
      let pages = 0;
      do {
        const page = await list({ limit, ...(cursor ? { cursor } : {}) });
        expect(page.rows.length).toBeLessThanOrEqual(limit);
        expect(page.counts.total).toBe(9);
        seen.push(...page.rows.map((row) => row.branchId));
        cursor = page.nextCursor ?? undefined;
        pages++;
      } while (cursor && pages < 20);
      expect(seen, `limit ${limit}`).toEqual(all);
      // A full last page says there is no next one rather than leading to an empty page.
      expect(pages).toBe(Math.ceil(all.length / limit));
    }
  });

  it("pages a filtered list and keeps the filter's order", async () => {
    const first = await list({ status: "never_connected", limit: 1 });
    expect(first.rows.map((row) => row.branchId)).toEqual([`${TAG}-b3`]);
    const second = await list({ status: "never_connected", limit: 1, cursor: first.nextCursor! });
    expect(second.rows.map((row) => row.branchId)).toEqual([`${TAG}-b4`]);
    expect(second.nextCursor).toBeNull();
  });

  it("refuses a cursor it did not hand out with a 400, not a database error", async () => {
    const forged = btoa(JSON.stringify([99, "x"])).replace(/=+$/, "");
    for (const cursor of ["not-a-cursor", "", forged, btoa("{}"), btoa("[1, 2]")]) {
      const error = await list({ cursor }).catch((e: unknown) => e);
      expect(error, cursor).toBeInstanceOf(AppError);
      expect((error as AppError).status).toBe(400);
    }
  });

  it("answers a page, counts included, in one SQL round trip", async () => {
    const before = await requests();
    const page = await list({ status: "connected", limit: 1 });
    expect(page.rows).toHaveLength(1);
    await list({ cursor: page.nextCursor!, limit: 1 });
    await listBranches(db, { search: "no such branch anywhere", limit: 50 });
    expect((await requests()) - before).toBe(3);
  });

  it("shows hostile names as they are and finds them", async () => {
    const hostile = `<script>alert(1)</script> ${uniqueId("hostile")}'; drop table clients; --`;
    const branch = await registerBranch({ workspaceName: hostile });
    const page = await listBranches(db, { search: `'; DROP TABLE clients; --`, limit: 200 });
    expect(page.rows.find((row) => row.branchId === branch.branchId)?.workspaceName).toBe(hostile);
  });
});
