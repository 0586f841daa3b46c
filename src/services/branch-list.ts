import { type SQL, sql } from "drizzle-orm";
import type { Db } from "../db/client";
import { AppError } from "../errors";
import { fromBase64Url, fromUtf8, toBase64Url, utf8 } from "../lib/encoding";
import { connectionStatusSql, currentStatusSql } from "./events";

/**
 * The console's branch list: every branch with its connection status, "needs attention" first,
 * filtered, searched and paged, with counts by status. One SQL statement per page (the counts
 * come with it), so a page costs one round trip however many branches there are.
 */

/** Connection statuses in attention order: the list shows the first ones first. */
export const BRANCH_STATUSES = [
  "needs_reauth",
  "credentials_rejected",
  "account_disabled",
  "degraded",
  "revoked",
  "never_connected",
  "connected",
] as const;
export type BranchStatus = (typeof BRANCH_STATUSES)[number];

export const BRANCH_LIST_MAX_LIMIT = 200;

export interface BranchListQuery {
  status?: BranchStatus;
  active?: boolean;
  /** Case-insensitive substring of the branch id, the workspace name or the workspace email. */
  search?: string;
  /** The previous page's `nextCursor`. */
  cursor?: string;
  limit: number;
}

export interface BranchListRow {
  clientId: number;
  branchId: string;
  workspaceName: string;
  workspaceEmail: string;
  isActive: boolean;
  status: BranchStatus;
  expiresAt: Date | null;
  lastRefreshedAt: Date | null;
  /** The latest token's last refresh failure (as GET /clients/{id} shows it). */
  lastError: string | null;
  failureCount: number;
  nextAttemptAt: Date | null;
}

export interface BranchListPage {
  rows: BranchListRow[];
  nextCursor: string | null;
  /**
   * The branches matching `active` and `search` (not `status`: the counts are the status filter's
   * choices), by status; `total` is their number, `inactive` how many of them are deactivated.
   */
  counts: Record<BranchStatus, number> & { total: number; inactive: number };
}

/** Where a page starts: after this (attention rank, branch id). Branch ids are unique. */
interface Cursor {
  rank: number;
  branchId: string;
}

export function encodeCursor(cursor: Cursor): string {
  return toBase64Url(utf8(JSON.stringify([cursor.rank, cursor.branchId])));
}

export function decodeCursor(text: string): Cursor {
  let parsed: unknown;
  try {
    parsed = JSON.parse(fromUtf8(fromBase64Url(text)));
  } catch {
    parsed = undefined;
  }
  if (
    Array.isArray(parsed) &&
    parsed.length === 2 &&
    Number.isInteger(parsed[0]) &&
    parsed[0] >= 0 &&
    parsed[0] < BRANCH_STATUSES.length &&
    typeof parsed[1] === "string"
  ) {
    return { rank: parsed[0], branchId: parsed[1] };
  }
  throw new AppError("bad_request", "The cursor is not one this list handed out; start again from the first page.");
}

/** `text` matched literally by LIKE (its `%`, `_` and `\` are not wildcards). */
function likePattern(text: string): string {
  return `%${text.replace(/[\\%_]/g, (char) => `\\${char}`)}%`;
}

const RANK_SQL = sql.raw(`(case b.status ${BRANCH_STATUSES.map((s, i) => `when '${s}' then ${i}`).join(" ")} end)`);

type TimeMs = number | null;
interface RawRow {
  client_id: number;
  branch_id: string;
  workspace_name: string;
  workspace_email: string;
  is_active: boolean;
  status: BranchStatus;
  rank: number;
  expires_at: TimeMs;
  last_refreshed_at: TimeMs;
  last_error: string | null;
  failure_count: number | null;
  next_attempt_at: TimeMs;
}
interface RawResult extends Record<string, unknown> {
  /** [status, branches, of which inactive] per status present. */
  counts: [BranchStatus, number, number][] | string;
  rows: RawRow[] | string;
}

const ZERO_COUNTS = Object.fromEntries(BRANCH_STATUSES.map((status) => [status, 0])) as Record<BranchStatus, number>;

const epochMs = (column: string) => sql.raw(`(extract(epoch from ${column}) * 1000)::float8`);
const toDate = (ms: TimeMs) => (ms === null ? null : new Date(ms));
const parsed = <T>(value: T | string): T => (typeof value === "string" ? (JSON.parse(value) as T) : value);

/**
 * One page of the list. The statement derives every matching branch's status once (from the grant
 * it is served from, clients.grant_id), counts them by status and returns the page
 * after the cursor in attention order, then by branch id. The counts need every matching branch's
 * status, so the statement reads them all whatever the page (about 10 ms per 10,000 branches on
 * PostgreSQL; see BENCHMARKS.md); no index can spare that without storing the status.
 */
export async function listBranches(db: Db, query: BranchListQuery): Promise<BranchListPage> {
  const limit = Math.min(Math.max(1, Math.trunc(query.limit)), BRANCH_LIST_MAX_LIMIT);
  const after = query.cursor === undefined ? undefined : decodeCursor(query.cursor);
  const search = query.search?.trim();

  const matching: SQL[] = [sql`true`];
  if (query.active !== undefined) matching.push(sql`c.is_active = ${query.active}`);
  if (search) {
    const pattern = likePattern(search);
    matching.push(
      sql`(c.branch_id ilike ${pattern} or c.workspace_name ilike ${pattern} or c.workspace_email ilike ${pattern})`,
    );
  }
  const onPage: SQL[] = [sql`true`];
  if (query.status !== undefined) onPage.push(sql`b.status = ${query.status}`);
  if (after) onPage.push(sql`(${RANK_SQL}, b.branch_id) > (${after.rank}::int, ${after.branchId}::text)`);

  // `b` holds only what the status, the filters and the order need, for every matching branch;
  // the page's display columns are read for its rows alone.
  const result = await db.execute<RawResult>(sql`
    with b as materialized (
      select c.id as client_id, c.branch_id, c.is_active, t.id as token_id,
        ${connectionStatusSql("t", "c")} as status
      from clients c
      left join tokens t on t.id = c.grant_id
      where ${sql.join(matching, sql` and `)}
    ),
    page as (
      select b.*, ${RANK_SQL} as rank from b
      where ${sql.join(onPage, sql` and `)}
      order by ${RANK_SQL}, b.branch_id
      limit ${limit + 1}
    )
    select
      (select coalesce(json_agg(json_build_array(s.status, s.n, s.inactive)), '[]'::json) from (
        select status, count(*)::int as n, (count(*) filter (where not is_active))::int as inactive
        from b group by status
      ) s) as counts,
      (select coalesce(json_agg(json_build_object(
          'client_id', p.client_id, 'branch_id', p.branch_id, 'workspace_name', c.workspace_name,
          'workspace_email', c.workspace_email, 'is_active', p.is_active, 'status', p.status,
          'rank', p.rank, 'expires_at', ${epochMs("t.expires_at")},
          'last_refreshed_at', ${epochMs("t.last_refreshed_at")}, 'last_error', t.last_error,
          'failure_count', t.failure_count, 'next_attempt_at', ${epochMs("t.next_attempt_at")}
        ) order by p.rank, p.branch_id), '[]'::json)
        from page p join clients c on c.id = p.client_id left join tokens t on t.id = p.token_id) as rows`);

  const raw = result.rows[0]!;
  const found = parsed(raw.rows);
  const rows = found.slice(0, limit);
  const last = rows.at(-1);
  const counts = { ...ZERO_COUNTS };
  let inactive = 0;
  for (const [status, n, inactiveOfStatus] of parsed(raw.counts)) {
    counts[status] = Number(n);
    inactive += Number(inactiveOfStatus);
  }
  return {
    rows: rows.map((row) => ({
      clientId: Number(row.client_id),
      branchId: row.branch_id,
      workspaceName: row.workspace_name,
      workspaceEmail: row.workspace_email,
      isActive: row.is_active,
      status: row.status,
      expiresAt: toDate(row.expires_at),
      lastRefreshedAt: toDate(row.last_refreshed_at),
      lastError: row.last_error,
      failureCount: row.failure_count ?? 0,
      nextAttemptAt: toDate(row.next_attempt_at),
    })),
    nextCursor: found.length > limit && last ? encodeCursor({ rank: last.rank, branchId: last.branch_id }) : null,
    counts: { ...counts, total: Object.values(counts).reduce((sum, n) => sum + n, 0), inactive },
  };
}

/** One client's connection status now, by the same rule as the list (never_connected for an unknown id). */
export async function branchStatus(db: Db, clientId: number): Promise<BranchStatus> {
  const result = await db.execute<{ status: BranchStatus }>(
    sql`select ${currentStatusSql("c")} as status from clients c where c.id = ${clientId}`,
  );
  return result.rows[0]?.status ?? "never_connected";
}
