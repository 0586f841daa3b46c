import { and, eq, inArray, or } from "drizzle-orm";
import { clients } from "../db/schema";
import { AppError } from "../errors";
import { describeError } from "../lib/log";
import { getApp, openSecret } from "./apps";
import { createClient, getClient } from "./clients";
import { type GrantView, getGrant } from "./grants";
import { attachToGrant, type Operator, readToken } from "./operations";

/**
 * A small Business Profile API client: the locations a Google account manages, so an operator can
 * attach many branches to one grant at once. `accounts.list` (Account Management API), then for
 * each account `accounts.locations.list` with a readMask (Business Information API), every page.
 * The access token is the grant's, passed in by the caller; it goes into the Authorization header
 * and nowhere else (no log line, no error message).
 */

export interface BusinessProfileApi {
  /** Account Management API base URL (no trailing slash). */
  accounts: string;
  /** Business Information API base URL (no trailing slash). */
  locations: string;
  /** Each call's time limit. */
  timeoutMs: number;
  fetch?: typeof fetch;
}

export interface BusinessLocation {
  /** `accounts/{a}/locations/{l}`: the branch's provider_resource. */
  name: string;
  title: string;
  /** The storefront address on one line, when the location has one. */
  address: string | null;
}

const READ_MASK = "name,title,storefrontAddress";
/** Google's maxima for the two calls. */
const ACCOUNTS_PAGE_SIZE = 20;
const LOCATIONS_PAGE_SIZE = 100;
/** A runaway pager (a page token that never ends) stops here: 100 pages of 100 locations per account. */
const MAX_PAGES = 100;
const MAX_MESSAGE_CHARS = 200;

interface Account {
  name: string;
}
interface RawLocation {
  name?: string;
  title?: string;
  storefrontAddress?: { addressLines?: string[]; locality?: string; postalCode?: string; regionCode?: string };
}

/** Every location of every account the token's Google account can see, in the API's order. */
export async function listBusinessLocations(api: BusinessProfileApi, accessToken: string): Promise<BusinessLocation[]> {
  const accounts = await allPages<Account>(api, accessToken, `${api.accounts}/v1/accounts`, "accounts", {
    pageSize: String(ACCOUNTS_PAGE_SIZE),
  });
  const out: BusinessLocation[] = [];
  for (const account of accounts) {
    if (!/^accounts\/[^/]+$/.test(account.name ?? "")) continue;
    const locations = await allPages<RawLocation>(
      api,
      accessToken,
      `${api.locations}/v1/${account.name}/locations`,
      "locations",
      { readMask: READ_MASK, pageSize: String(LOCATIONS_PAGE_SIZE) },
    );
    for (const location of locations) {
      const id = /^locations\/([^/]+)$/.exec(location.name ?? "")?.[1];
      if (id === undefined) continue;
      out.push({
        name: `${account.name}/locations/${id}`,
        title: location.title ?? "",
        address: addressOf(location.storefrontAddress),
      });
    }
  }
  return out;
}

/** A location of the grant's account, and the branch of the app that already stands for it. */
export interface LocationChoice extends BusinessLocation {
  branch: { id: number; branchId: string; grantId: number | null } | null;
}

/**
 * The locations of a google grant's account, through the Business Profile API with the grant's
 * current access token (read, and refreshed when due, through a branch served from it, as a token
 * read does), each with the app's branch that already stands for it.
 */
export async function grantLocations(op: Operator, grantId: number, now: Date): Promise<LocationChoice[]> {
  const view = await getGrant(op.db, grantId);
  const locations = await fetchLocations(op, view, now);
  const known = await branchesFor(op, view.grant.appId!, locations);
  return locations.map((location) => ({ ...location, branch: known.get(location.name) ?? null }));
}

export interface AttachOutcome {
  created: string[];
  attached: string[];
  failed: { location: string; reason: string }[];
}

/**
 * One submission of the Locations form: for each ticked location of the grant's account, the app's
 * branch standing for it (its provider_resource, or the branch id derived from it) is attached to
 * the grant, or a branch is created for it (branch id derived from the name, provider_resource the
 * name, the location's title as workspace name) and attached. No consent: the branches are served
 * the grant's token at once. The names are checked against the account's locations, read again.
 */
export async function attachLocations(
  op: Operator,
  grantId: number,
  names: string[],
  now: Date,
): Promise<AttachOutcome> {
  if (names.length === 0) throw new AppError("validation_failed", "Tick at least one location.");
  const choices = await grantLocations(op, grantId, now);
  const byName = new Map(choices.map((choice) => [choice.name, choice]));
  const unknown = names.filter((name) => !byName.has(name));
  if (unknown.length > 0) {
    throw new AppError("validation_failed", `Not a location of this grant's account: ${unknown.join(", ")}.`);
  }
  const view = await getGrant(op.db, grantId);
  const { app } = await getApp(op.db, view.grant.appId!);
  const secret = await openSecret(op.keyring, app);
  const email = view.grant.email ?? (await firstBranchEmail(op, view));
  const outcome: AttachOutcome = { created: [], attached: [], failed: [] };
  for (const name of new Set(names)) {
    const choice = byName.get(name)!;
    try {
      let branch = choice.branch;
      if (branch === null) {
        const created = await createClient(op.db, op.keyring, {
          clientId: app.clientId,
          clientSecret: secret,
          redirectUri: `${op.baseUrl}/auth/callback`,
          branchId: branchIdForLocation(name),
          workspaceEmail: email,
          workspaceName: choice.title || name,
          providerResource: name,
        });
        branch = { id: created.id, branchId: created.branchId, grantId: null };
      }
      await attachToGrant(op, branch.id, grantId, now);
      // Counted once attached: a branch created but refused by the attach is listed as a failure only.
      (choice.branch === null ? outcome.created : outcome.attached).push(branch.branchId);
    } catch (error) {
      if (!(error instanceof AppError) || error.status >= 500) throw error;
      outcome.failed.push({ location: name, reason: error.detail });
    }
  }
  return outcome;
}

async function fetchLocations(op: Operator, view: GrantView, now: Date): Promise<BusinessLocation[]> {
  if (view.grant.appId === null) throw new AppError("conflict", `Grant ${view.grant.id} belongs to no app.`);
  const { app } = await getApp(op.db, view.grant.appId);
  if (app.profile !== "google") {
    throw new AppError(
      "conflict",
      `Locations come from Google's Business Profile API; app ${app.name} is not a google app.`,
    );
  }
  const accessToken = await grantAccessToken(op, view, now);
  return listBusinessLocations(
    { ...op.config.BUSINESS_PROFILE_API_BASE_URLS, timeoutMs: op.config.OAUTH_TIMEOUT_MS },
    accessToken,
  );
}

/** Branches tried for the grant's token: a deactivated one is not served, so the next is asked. */
const TOKEN_READ_ATTEMPTS = 5;

/** The grant's current access token, read (and refreshed when due) through an active branch served from it. */
async function grantAccessToken(op: Operator, view: GrantView, now: Date): Promise<string> {
  if (view.branches.length === 0) {
    throw new AppError(
      "conflict",
      `No branch is served from grant ${view.grant.id}, so there is no token to ask the Business Profile API with: attach a branch first.`,
    );
  }
  for (const branch of view.branches.slice(0, TOKEN_READ_ATTEMPTS)) {
    try {
      return (await readToken(op, branch.branchId, now)).token.accessToken;
    } catch (error) {
      // not_found: the branch is deactivated (its token is not served); any other refusal is the grant's.
      if (!(error instanceof AppError && error.code === "not_found")) throw error;
    }
  }
  throw new AppError(
    "conflict",
    `No active branch is served from grant ${view.grant.id}, so there is no token to ask the Business Profile API with: activate one first.`,
  );
}

/** The app's branches standing for these locations: by provider_resource, else by the derived branch id. */
async function branchesFor(
  op: Operator,
  appId: number,
  locations: BusinessLocation[],
): Promise<Map<string, NonNullable<LocationChoice["branch"]>>> {
  const found = new Map<string, NonNullable<LocationChoice["branch"]>>();
  if (locations.length === 0) return found;
  const names = locations.map((location) => location.name);
  const derived = new Map(names.map((name) => [branchIdForLocation(name), name]));
  const rows = await op.db
    .select({
      id: clients.id,
      branchId: clients.branchId,
      grantId: clients.grantId,
      providerResource: clients.providerResource,
    })
    .from(clients)
    .where(
      and(
        eq(clients.appId, appId),
        or(inArray(clients.providerResource, names), inArray(clients.branchId, [...derived.keys()])),
      ),
    );
  for (const row of rows) {
    const name =
      row.providerResource && names.includes(row.providerResource) ? row.providerResource : derived.get(row.branchId);
    if (name !== undefined && !found.has(name))
      found.set(name, { id: row.id, branchId: row.branchId, grantId: row.grantId });
  }
  return found;
}

async function firstBranchEmail(op: Operator, view: GrantView): Promise<string> {
  const first = view.branches[0];
  if (!first) throw new AppError("conflict", `No branch is served from grant ${view.grant.id}.`);
  return (await getClient(op.db, first.id)).client.workspaceEmail;
}

/**
 * The branch id a location's branch gets: `gbp-<account id>-<location id>` (stable, readable, and
 * the same whoever creates it, so attaching the same location twice finds the branch made the first time).
 */
export function branchIdForLocation(name: string): string {
  const match = /^accounts\/([^/]+)\/locations\/([^/]+)$/.exec(name);
  if (!match) throw new AppError("validation_failed", `location: ${name} is not accounts/{a}/locations/{l}.`);
  return `gbp-${match[1]}-${match[2]}`;
}

function addressOf(address: RawLocation["storefrontAddress"]): string | null {
  if (!address) return null;
  const parts = [...(address.addressLines ?? []), [address.postalCode, address.locality].filter(Boolean).join(" ")];
  const line = parts.filter((part) => part && part.trim() !== "").join(", ");
  return line === "" ? null : line;
}

async function allPages<T>(
  api: BusinessProfileApi,
  accessToken: string,
  url: string,
  field: string,
  query: Record<string, string>,
): Promise<T[]> {
  const items: T[] = [];
  let pageToken: string | undefined;
  for (let page = 0; page < MAX_PAGES; page++) {
    const params = new URLSearchParams(query);
    if (pageToken) params.set("pageToken", pageToken);
    const body = await getJson(api, accessToken, `${url}?${params}`);
    const list = body[field];
    if (list !== undefined && !Array.isArray(list)) throw malformed(url);
    items.push(...((list ?? []) as T[]));
    pageToken = typeof body.nextPageToken === "string" && body.nextPageToken !== "" ? body.nextPageToken : undefined;
    if (!pageToken) return items;
  }
  throw new AppError("provider_error", `The Business Profile API kept paging past ${MAX_PAGES} pages; stopped.`);
}

async function getJson(api: BusinessProfileApi, accessToken: string, url: string): Promise<Record<string, unknown>> {
  const doFetch = api.fetch ?? fetch;
  let response: Response;
  try {
    response = await doFetch(url, {
      headers: { authorization: `Bearer ${accessToken}`, accept: "application/json" },
      signal: AbortSignal.timeout(api.timeoutMs),
    });
  } catch (error) {
    throw new AppError(
      "provider_unavailable",
      `The Business Profile API (${new URL(url).host}) could not be reached: ${describeError(error)}.`,
    );
  }
  if (!response.ok) throw await apiError(response, url);
  try {
    const body = (await response.json()) as unknown;
    if (body === null || typeof body !== "object" || Array.isArray(body)) throw malformed(url);
    return body as Record<string, unknown>;
  } catch (error) {
    if (error instanceof AppError) throw error;
    throw malformed(url);
  }
}

/** The API's refusal in words an operator can act on (Google's `error.status` and message, shortened). */
async function apiError(response: Response, url: string): Promise<AppError> {
  let said = "";
  try {
    const body = (await response.json()) as { error?: { status?: unknown; message?: unknown } };
    const status = typeof body.error?.status === "string" ? body.error.status : "";
    const message = typeof body.error?.message === "string" ? body.error.message.slice(0, MAX_MESSAGE_CHARS) : "";
    said = [status, message].filter(Boolean).join(": ");
  } catch {
    // Not Google's JSON error shape: the status code says enough.
  }
  const answer = `${response.status}${said ? ` ${said}` : ""}`;
  const host = new URL(url).host;
  switch (response.status) {
    case 401:
      return new AppError(
        "provider_error",
        `The Business Profile API (${host}) refused the grant's access token (${answer}): the grant may have been revoked; refresh it or send a login link.`,
      );
    case 403:
      return new AppError(
        "provider_error",
        `The Business Profile API (${host}) refused access (${answer}): the grant needs the business.manage scope, and the Cloud project Business Profile API access.`,
      );
    case 429: {
      const retryAfter = Number(response.headers.get("retry-after"));
      const wait = Number.isFinite(retryAfter) && retryAfter > 0 ? ` in ${retryAfter} s` : " later";
      return new AppError(
        "provider_error",
        `The Business Profile API (${host}) is rate limiting this project (${answer}): try again${wait}.`,
      );
    }
    default:
      return new AppError("provider_error", `The Business Profile API (${host}) answered ${answer}.`);
  }
}

function malformed(url: string): AppError {
  return new AppError(
    "provider_error",
    `The Business Profile API (${new URL(url).host}) answered something other than its JSON.`,
  );
}
