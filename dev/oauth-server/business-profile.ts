// A small Business Profile API on the local authorization server (paths as Google's; at Google each
// API has its own host), checking bearer tokens the server issued, so the Worker's location listing
// and proxy run offline and fail the way production would.
//
//   GET  /v1/accounts                                   Account Management API accounts.list
//   GET  /v1/accounts/{a}/locations?readMask=...        Business Information API accounts.locations.list
//   GET  /v4/accounts/{a}/locations/{l}/reviews         Google My Business API v4 reviews.list
//   PUT  /v4/accounts/{a}/locations/{l}/reviews/{r}/reply   {comment} → {comment, updateTime}
//   POST /v1/echo                                       streams the body (≤ 10 MiB): {bytes, sha256, ...}
//   GET  /v1/echo?bytes=N                               streams N bytes back, chunked
//   POST /admin/business-profile                        {account, accounts?, locations?, reviews?}: test data
//   PUT  /admin/api-behavior, GET /admin/api-behavior   {failNext: {status, retryAfter?, count?} | null}
//   GET  /admin/api-stats, DELETE /admin/api-stats      what reached the API (never a token)
import { createHash } from "node:crypto";
import type { IncomingMessage, ServerResponse } from "node:http";
import { z } from "zod";

export const BUSINESS_MANAGE_SCOPE = "https://www.googleapis.com/auth/business.manage";
/** Request bodies the API reads (the echo included): Google's APIs take up to 10 MiB or so per call. */
export const MAX_API_BODY_BYTES = 10 * 1024 * 1024;
/** GET /v1/echo?bytes=N streams at most this much. */
const MAX_ECHO_RESPONSE_BYTES = 64 * 1024 * 1024;
const ECHO_CHUNK_BYTES = 64 * 1024;
const MAX_ADMIN_BODY_BYTES = 1024 * 1024;
const MAX_REPLY_CHARS = 4096;
const ACCOUNTS_PAGE = { default: 20, max: 20 };
const LOCATIONS_PAGE = { default: 10, max: 100 };
const REVIEWS_PAGE = { default: 50, max: 50 };
/** The test data every signed-in account starts with: a personal account and a location group. */
const DEFAULT_GROUP_LOCATIONS = 25;
const DEFAULT_PERSONAL_LOCATIONS = 1;
/** Top-level fields of a Business Information API Location (what `readMask` may name). */
const LOCATION_FIELDS = new Set([
  "name",
  "languageCode",
  "storeCode",
  "title",
  "phoneNumbers",
  "categories",
  "storefrontAddress",
  "websiteUri",
  "regularHours",
  "specialHours",
  "serviceArea",
  "labels",
  "adWordsLocationExtensions",
  "latlng",
  "openInfo",
  "metadata",
  "profile",
  "relationshipData",
  "moreHours",
  "serviceItems",
]);
const ACCOUNT_TYPES = ["PERSONAL", "LOCATION_GROUP", "USER_GROUP", "ORGANIZATION"] as const;
const STAR_RATINGS = ["ONE", "TWO", "THREE", "FOUR", "FIVE"] as const;
/** google.rpc.Code names of the HTTP statuses the API answers with. */
const STATUS_NAMES: Record<number, string> = {
  400: "INVALID_ARGUMENT",
  401: "UNAUTHENTICATED",
  403: "PERMISSION_DENIED",
  404: "NOT_FOUND",
  405: "UNIMPLEMENTED",
  409: "ABORTED",
  413: "INVALID_ARGUMENT",
  429: "RESOURCE_EXHAUSTED",
  499: "CANCELLED",
  500: "INTERNAL",
  501: "UNIMPLEMENTED",
  503: "UNAVAILABLE",
  504: "DEADLINE_EXCEEDED",
};
const ResourceId = /^[A-Za-z0-9_-]+$/;
const BusinessDataInput = z.strictObject({
  account: z.string().min(1),
  accounts: z
    .array(
      z.looseObject({
        name: z.string().regex(/^accounts\/[A-Za-z0-9_-]+$/, 'must be "accounts/<id>"'),
        accountName: z.string(),
        type: z.enum(ACCOUNT_TYPES),
      }),
    )
    .optional(),
  /** Account id (or `accounts/<id>`) → its locations. */
  locations: z
    .record(
      z.string(),
      z.array(
        z.looseObject({
          name: z.string().regex(/^locations\/[A-Za-z0-9_-]+$/, 'must be "locations/<id>"'),
          title: z.string(),
        }),
      ),
    )
    .optional(),
  /** Location id (or `locations/<id>`) → its reviews. */
  reviews: z
    .record(
      z.string(),
      z.array(z.looseObject({ reviewId: z.string().regex(ResourceId), starRating: z.enum(STAR_RATINGS) })),
    )
    .optional(),
});
const ApiBehaviorInput = z.strictObject({
  failNext: z
    .strictObject({
      status: z.int().min(400).max(599),
      /** Seconds, sent as Retry-After. */
      retryAfter: z.int().min(0).optional(),
      /** How many calls fail; without it, every call until cleared. */
      count: z.int().min(1).optional(),
      /** Only calls with a token of this account fail; without it, every call. */
      account: z.string().min(1).max(320).optional(),
    })
    .nullable()
    .optional(),
});
const UNAUTHENTICATED_MESSAGE =
  "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.";

type Json = Record<string, unknown>;

/** What the API needs of the authorization server. */
export interface BusinessProfileHost {
  /** The account and scope of a live access token this server issued; null when unknown, expired or revoked. */
  accessToken(token: string): { account: string; scope: string } | null;
  /** The server's time (ms), as POST /admin/clock moves it. */
  now(): number;
}

export interface BusinessProfileApi {
  /** Handles the request when the path is the API's or its admin's; false otherwise. */
  handle(req: IncomingMessage, res: ServerResponse, url: URL): Promise<boolean>;
  reset(): void;
}

export interface ApiFailNext {
  status: number;
  retryAfter?: number;
  count?: number;
  /** Only calls made with a token of this account fail (tests running side by side stay apart). */
  account?: string;
}

export interface ApiStats {
  requests: number;
  byPath: Record<string, number>;
  /** `"Bearer …"` (the scheme, never the credential) when the last request had an Authorization header, else null. */
  lastAuthorization: string | null;
  /** The header names the last request arrived with, lower-case, sorted. */
  lastHeaders: string[];
  lastMethod: string | null;
  /** Path and query of the last request. */
  lastPath: string | null;
}

interface AccountData {
  accounts: Json[];
  /** By account id (the digits after `accounts/`). */
  locations: Map<string, Json[]>;
  /** By location id. */
  reviews: Map<string, Json[]>;
}

class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly headers: Record<string, string> = {},
    readonly details?: unknown[],
  ) {
    super(message);
  }
}

/** Errors of the admin routes, in the authorization server's admin shape. */
class AdminError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

const fieldViolation = (field: string, description: string) => [
  { "@type": "type.googleapis.com/google.rpc.BadRequest", fieldViolations: [{ field, description }] },
];

const invalidArgument = (field: string, description: string) =>
  new ApiError(400, "Request contains an invalid argument.", {}, fieldViolation(field, description));

/** Deterministic digits from a seed (ids like Google's: 18-21 digits, no leading zero). */
function digits(seed: string, length: number): string {
  const hex = createHash("sha256").update(seed).digest("hex");
  const n = BigInt(`0x${hex}`).toString();
  return `${(Number(n[0]) % 9) + 1}${n.slice(1, length)}`;
}

const pad2 = (n: number) => String(n).padStart(2, "0");

function titleCase(local: string): string {
  const words = local.split(/[^A-Za-z0-9]+/).filter(Boolean);
  return words.map((w) => w[0]?.toUpperCase() + w.slice(1)).join(" ") || "Owner";
}

/** The data an account starts with (see DEFAULT_* above): stable for the account across restarts. */
export function defaultBusinessData(account: string): AccountData {
  const owner = titleCase(account.split("@")[0] ?? account);
  const personalId = digits(`bp-account:${account}:personal`, 21);
  const groupId = digits(`bp-account:${account}:group`, 21);
  const accounts: Json[] = [
    {
      name: `accounts/${personalId}`,
      accountName: owner,
      type: "PERSONAL",
      role: "PRIMARY_OWNER",
      verificationState: "UNVERIFIED",
      vettedState: "NOT_VETTED",
    },
    {
      name: `accounts/${groupId}`,
      accountName: `${owner} Locations`,
      type: "LOCATION_GROUP",
      role: "OWNER",
      verificationState: "VERIFIED",
      vettedState: "NOT_VETTED",
      permissionLevel: "OWNER_LEVEL",
    },
  ];
  const locations = new Map<string, Json[]>();
  const reviews = new Map<string, Json[]>();
  const makeLocations = (accountId: string, count: number, label: string) => {
    const list: Json[] = [];
    for (let i = 1; i <= count; i++) {
      const id = digits(`bp-location:${account}:${accountId}:${i}`, 20);
      list.push({
        name: `locations/${id}`,
        languageCode: "en",
        storeCode: `${label}-${pad2(i)}`,
        title: `${owner} ${label === "HOME" ? "Home Office" : `Branch ${pad2(i)}`}`,
        phoneNumbers: { primaryPhone: `+1 555-01${pad2(i)}` },
        categories: { primaryCategory: { name: "categories/gcid:bakery", displayName: "Bakery" } },
        storefrontAddress: {
          regionCode: "US",
          languageCode: "en",
          postalCode: `940${pad2(i)}`,
          administrativeArea: "CA",
          locality: "Springfield",
          addressLines: [`${100 + i} Main Street`],
        },
        websiteUri: `https://example.com/locations/${label.toLowerCase()}-${pad2(i)}`,
        latlng: { latitude: 37.7 + i / 1000, longitude: -122.4 - i / 1000 },
        openInfo: { status: "OPEN", canReopen: true },
        metadata: { placeId: `ChIJ${digits(`bp-place:${id}`, 20)}`, mapsUri: `https://maps.google.com/maps?cid=${id}` },
        profile: { description: `${owner}'s bakery number ${i}.` },
      });
      reviews.set(id, makeReviews(accountId, id, i));
    }
    locations.set(accountId, list);
  };
  makeLocations(personalId, DEFAULT_PERSONAL_LOCATIONS, "HOME");
  makeLocations(groupId, DEFAULT_GROUP_LOCATIONS, "BR");
  return { accounts, locations, reviews };
}

/** A few reviews per location (3 to 5), the first one already answered. */
function makeReviews(accountId: string, locationId: string, n: number): Json[] {
  const list: Json[] = [];
  const count = 3 + (n % 3);
  for (let j = 1; j <= count; j++) {
    const reviewId = `r${digits(`bp-review:${locationId}:${j}`, 16)}`;
    const time = new Date(Date.UTC(2026, 0, 1 + n, 9 + j)).toISOString();
    const review: Json = {
      name: `accounts/${accountId}/locations/${locationId}/reviews/${reviewId}`,
      reviewId,
      reviewer: { displayName: `Customer ${n}-${j}`, isAnonymous: false },
      starRating: STAR_RATINGS[(n + j) % STAR_RATINGS.length],
      comment: `Visit ${j} to branch ${n}: fresh bread.`,
      createTime: time,
      updateTime: time,
    };
    if (j === 1) review.reviewReply = { comment: "Thank you!", updateTime: time };
    list.push(review);
  }
  return list;
}

export function createBusinessProfileApi(host: BusinessProfileHost): BusinessProfileApi {
  let data = new Map<string, AccountData>();
  let failNext: ApiFailNext | null = null;
  let stats = zeroStats();

  function zeroStats(): ApiStats {
    return { requests: 0, byPath: {}, lastAuthorization: null, lastHeaders: [], lastMethod: null, lastPath: null };
  }

  function dataOf(account: string): AccountData {
    let d = data.get(account);
    if (!d) {
      d = defaultBusinessData(account);
      data.set(account, d);
    }
    return d;
  }

  function record(req: IncomingMessage, url: URL) {
    stats.requests++;
    stats.byPath[url.pathname] = (stats.byPath[url.pathname] ?? 0) + 1;
    const auth = req.headers.authorization;
    stats.lastAuthorization = auth === undefined ? null : `${auth.trim().split(/\s+/)[0] ?? ""} …`;
    const names = new Set<string>();
    for (let i = 0; i < req.rawHeaders.length; i += 2) names.add((req.rawHeaders[i] ?? "").toLowerCase());
    stats.lastHeaders = [...names].sort();
    stats.lastMethod = req.method ?? null;
    stats.lastPath = url.pathname + url.search;
  }

  function takeFailNext(req: IncomingMessage): ApiFailNext | null {
    const f = failNext;
    if (f?.account !== undefined) {
      let caller: string | undefined;
      try {
        caller = authorize(req);
      } catch {
        caller = undefined;
      }
      if (caller !== f.account) return null;
    }
    if (f?.count !== undefined) failNext = f.count > 1 ? { ...f, count: f.count - 1 } : null;
    return f;
  }

  /** The caller's account: a live bearer token with business.manage, else 401 / 403. */
  function authorize(req: IncomingMessage): string {
    const unauthenticated = () =>
      new ApiError(401, UNAUTHENTICATED_MESSAGE, { "www-authenticate": 'Bearer error="invalid_token"' });
    const match = /^Bearer +(\S+) *$/i.exec(req.headers.authorization ?? "");
    if (!match?.[1]) throw unauthenticated();
    const token = host.accessToken(match[1]);
    if (!token) throw unauthenticated();
    if (!token.scope.split(" ").includes(BUSINESS_MANAGE_SCOPE)) {
      throw new ApiError(403, "Request had insufficient authentication scopes.", {
        "www-authenticate": `Bearer error="insufficient_scope", scope="${BUSINESS_MANAGE_SCOPE}"`,
      });
    }
    return token.account;
  }

  // ---------- paging ----------
  function pageSize(url: URL, limits: { default: number; max: number }): number {
    const raw = url.searchParams.get("pageSize");
    if (raw === null || raw === "") return limits.default;
    if (!/^\d+$/.test(raw)) throw invalidArgument("page_size", "must be a non-negative integer");
    const n = Number(raw);
    return n === 0 ? limits.default : Math.min(n, limits.max);
  }

  /** Page tokens are opaque and bound to the collection they page through. */
  function pageOffset(url: URL, collection: string): number {
    const raw = url.searchParams.get("pageToken");
    if (raw === null || raw === "") return 0;
    try {
      const parsed = JSON.parse(Buffer.from(raw, "base64url").toString("utf8")) as { c?: unknown; o?: unknown };
      if (parsed.c === collection && typeof parsed.o === "number" && Number.isInteger(parsed.o) && parsed.o > 0) {
        return parsed.o;
      }
    } catch {
      // answered below
    }
    throw invalidArgument("page_token", "Invalid page token.");
  }

  function page<T>(items: T[], url: URL, collection: string, limits: { default: number; max: number }) {
    const size = pageSize(url, limits);
    const offset = pageOffset(url, collection);
    const slice = items.slice(offset, offset + size);
    const next = offset + size < items.length ? offset + size : null;
    const nextPageToken =
      next === null ? undefined : Buffer.from(JSON.stringify({ c: collection, o: next })).toString("base64url");
    return { slice, nextPageToken };
  }

  // ---------- resources ----------
  function ownAccount(d: AccountData, accountId: string): Json {
    const found = d.accounts.find((a) => a.name === `accounts/${accountId}`);
    if (!found) throw new ApiError(403, "The caller does not have permission");
    return found;
  }

  function ownLocation(d: AccountData, accountId: string, locationId: string): Json {
    ownAccount(d, accountId);
    const found = (d.locations.get(accountId) ?? []).find((l) => l.name === `locations/${locationId}`);
    if (!found) throw new ApiError(404, "Requested entity was not found.");
    return found;
  }

  function listAccounts(account: string, url: URL): Json {
    const { slice, nextPageToken } = page(dataOf(account).accounts, url, "accounts", ACCOUNTS_PAGE);
    // proto3 JSON, as Google answers: empty lists and absent values are left out.
    const body: Json = {};
    if (slice.length > 0) body.accounts = slice;
    if (nextPageToken) body.nextPageToken = nextPageToken;
    return body;
  }

  function listLocations(account: string, accountId: string, url: URL): Json {
    const readMask = url.searchParams.get("readMask");
    if (readMask === null || readMask.trim() === "") throw invalidArgument("read_mask", "Field is required");
    const paths = readMask
      .split(",")
      .map((p) => p.trim())
      .filter(Boolean);
    for (const path of paths) {
      if (!LOCATION_FIELDS.has(path.split(".")[0] ?? "")) {
        throw invalidArgument("read_mask", `Invalid field mask provided: ${path}`);
      }
    }
    const d = dataOf(account);
    ownAccount(d, accountId);
    const all = d.locations.get(accountId) ?? [];
    const { slice, nextPageToken } = page(all, url, `accounts/${accountId}/locations`, LOCATIONS_PAGE);
    const body: Json = {};
    if (slice.length > 0) body.locations = slice.map((l) => masked(l, paths));
    if (nextPageToken) body.nextPageToken = nextPageToken;
    if (all.length > 0) body.totalSize = all.length;
    return body;
  }

  function listReviews(account: string, accountId: string, locationId: string, url: URL): Json {
    const d = dataOf(account);
    ownLocation(d, accountId, locationId);
    const all = d.reviews.get(locationId) ?? [];
    const collection = `accounts/${accountId}/locations/${locationId}/reviews`;
    const { slice, nextPageToken } = page(all, url, collection, REVIEWS_PAGE);
    const body: Json = {};
    if (slice.length > 0) body.reviews = slice;
    if (all.length > 0) {
      const stars = all.map((r) => STAR_RATINGS.indexOf(r.starRating as (typeof STAR_RATINGS)[number]) + 1);
      body.averageRating = Math.round((stars.reduce((a, b) => a + b, 0) / stars.length) * 10) / 10;
      body.totalReviewCount = all.length;
    }
    if (nextPageToken) body.nextPageToken = nextPageToken;
    return body;
  }

  async function replyToReview(
    req: IncomingMessage,
    account: string,
    accountId: string,
    locationId: string,
    reviewId: string,
  ): Promise<Json> {
    const body = await readJsonBody(req, MAX_API_BODY_BYTES, (m) => invalidArgument("review_reply", m));
    const comment = body.comment;
    if (typeof comment !== "string" || comment.trim() === "" || comment.length > MAX_REPLY_CHARS) {
      throw invalidArgument("comment", `must be a non-empty string of at most ${MAX_REPLY_CHARS} characters`);
    }
    const d = dataOf(account);
    ownLocation(d, accountId, locationId);
    const review = (d.reviews.get(locationId) ?? []).find((r) => r.reviewId === reviewId);
    if (!review) throw new ApiError(404, "Requested entity was not found.");
    const reply = { comment, updateTime: new Date(host.now()).toISOString() };
    review.reviewReply = reply;
    return reply;
  }

  // ---------- echo ----------
  async function echoBody(req: IncomingMessage, res: ServerResponse) {
    const hash = createHash("sha256");
    let bytes = 0;
    for await (const chunk of req as AsyncIterable<Buffer>) {
      bytes += chunk.length;
      if (bytes > MAX_API_BODY_BYTES) {
        req.resume();
        throw new ApiError(413, `Request body larger than ${MAX_API_BODY_BYTES} bytes.`, { connection: "close" });
      }
      hash.update(chunk);
    }
    const length = req.headers["content-length"];
    sendJson(res, 200, {
      bytes,
      sha256: hash.digest("hex"),
      contentType: req.headers["content-type"] ?? null,
      contentLength: length === undefined ? null : Number(length),
      chunked: /\bchunked\b/i.test(req.headers["transfer-encoding"] ?? ""),
    });
  }

  /** N bytes, byte i being i mod 256, in chunks as the socket drains (no Content-Length: chunked). */
  async function echoStream(res: ServerResponse, url: URL) {
    const raw = url.searchParams.get("bytes") ?? "";
    if (!/^\d+$/.test(raw) || Number(raw) > MAX_ECHO_RESPONSE_BYTES) {
      throw invalidArgument("bytes", `must be an integer from 0 to ${MAX_ECHO_RESPONSE_BYTES}`);
    }
    const total = Number(raw);
    const chunk = Buffer.alloc(ECHO_CHUNK_BYTES);
    for (let i = 0; i < chunk.length; i++) chunk[i] = i % 256;
    res.writeHead(200, { "content-type": "application/octet-stream", "cache-control": "no-store" });
    let sent = 0;
    while (sent < total && !res.destroyed) {
      const size = Math.min(chunk.length, total - sent);
      sent += size;
      if (!res.write(size === chunk.length ? chunk : chunk.subarray(0, size))) {
        const open = await new Promise<boolean>((resolve) => {
          const drained = () => done(true);
          const closed = () => done(false);
          function done(ok: boolean) {
            res.off("drain", drained);
            res.off("close", closed);
            resolve(ok);
          }
          res.on("drain", drained);
          res.on("close", closed);
        });
        if (!open) return;
      }
    }
    res.end();
  }

  // ---------- admin ----------
  /** POST /admin/business-profile's body, checked whole before anything is stored. */
  function parseData(input: unknown): { account: string; data: AccountData } {
    const parsed = BusinessDataInput.safeParse(input);
    if (!parsed.success) throw new AdminError(400, z.prettifyError(parsed.error));
    const { account } = parsed.data;
    const accounts = parsed.data.accounts ?? dataOf(account).accounts;
    const accountIds = accounts.map((a) => String(a.name).slice("accounts/".length));
    if (new Set(accountIds).size !== accountIds.length) throw new AdminError(400, "accounts: a name is given twice");
    const locations = new Map<string, Json[]>();
    /** Location id → its account id. */
    const locationAccount = new Map<string, string>();
    for (const [key, list] of Object.entries(parsed.data.locations ?? {})) {
      const accountId = key.replace(/^accounts\//, "");
      if (!accountIds.includes(accountId)) throw new AdminError(400, `locations: ${key} is not one of the accounts`);
      for (const l of list) {
        const id = l.name.slice("locations/".length);
        if (locationAccount.has(id)) throw new AdminError(400, `locations: ${l.name} is given twice`);
        locationAccount.set(id, accountId);
      }
      locations.set(accountId, list);
    }
    const reviews = new Map<string, Json[]>();
    for (const [key, list] of Object.entries(parsed.data.reviews ?? {})) {
      const locationId = key.replace(/^locations\//, "");
      const accountId = locationAccount.get(locationId);
      if (accountId === undefined) throw new AdminError(400, `reviews: ${key} is not one of the locations`);
      const parent = `accounts/${accountId}/locations/${locationId}/reviews`;
      reviews.set(
        locationId,
        list.map((r) => ({ name: `${parent}/${r.reviewId}`, ...r })),
      );
    }
    return { account, data: { accounts, locations, reviews } };
  }

  async function handleAdmin(req: IncomingMessage, res: ServerResponse, path: string): Promise<void> {
    const method = req.method ?? "GET";
    const only = (...allowed: string[]) => {
      if (!allowed.includes(method)) throw new AdminError(405, `use ${allowed.join(" or ")}`);
    };
    const adminJson = () => readJsonBody(req, MAX_ADMIN_BODY_BYTES, (m) => new AdminError(400, m));
    if (path === "/admin/business-profile") {
      only("POST");
      const { account, data: replaced } = parseData(await adminJson());
      data.set(account, replaced);
      let locations = 0;
      for (const list of replaced.locations.values()) locations += list.length;
      return sendJson(res, 201, { account, accounts: replaced.accounts.length, locations });
    }
    if (path === "/admin/api-behavior") {
      only("GET", "PUT");
      if (method === "PUT") {
        const parsed = ApiBehaviorInput.safeParse(await adminJson());
        if (!parsed.success) throw new AdminError(400, z.prettifyError(parsed.error));
        if (parsed.data.failNext !== undefined) failNext = parsed.data.failNext;
      }
      return sendJson(res, 200, { failNext });
    }
    // /admin/api-stats
    only("GET", "DELETE");
    if (method === "DELETE") stats = zeroStats();
    sendJson(res, 200, stats);
  }

  async function handleApi(req: IncomingMessage, res: ServerResponse, url: URL): Promise<void> {
    const method = req.method ?? "GET";
    const path = url.pathname;
    const fail = takeFailNext(req);
    if (fail) {
      const headers: Record<string, string> = {};
      if (fail.retryAfter !== undefined) headers["retry-after"] = String(fail.retryAfter);
      if (fail.status === 401) headers["www-authenticate"] = 'Bearer error="invalid_token"';
      throw new ApiError(fail.status, "Simulated failure (failNext).", headers);
    }
    const allow = (...allowed: string[]) => {
      if (!allowed.includes(method)) {
        throw new ApiError(405, `Method ${method} is not allowed here.`, { allow: allowed.join(", ") });
      }
    };
    const account = authorize(req);
    if (path === "/v1/accounts") {
      allow("GET");
      return sendJson(res, 200, listAccounts(account, url));
    }
    const locations = /^\/v1\/accounts\/([^/]+)\/locations$/.exec(path);
    if (locations) {
      allow("GET");
      return sendJson(res, 200, listLocations(account, locations[1] ?? "", url));
    }
    const reviews = /^\/v4\/accounts\/([^/]+)\/locations\/([^/]+)\/reviews$/.exec(path);
    if (reviews) {
      allow("GET");
      return sendJson(res, 200, listReviews(account, reviews[1] ?? "", reviews[2] ?? "", url));
    }
    const reply = /^\/v4\/accounts\/([^/]+)\/locations\/([^/]+)\/reviews\/([^/]+)\/reply$/.exec(path);
    if (reply) {
      allow("PUT");
      return sendJson(res, 200, await replyToReview(req, account, reply[1] ?? "", reply[2] ?? "", reply[3] ?? ""));
    }
    // /v1/echo
    allow("GET", "POST");
    if (method === "POST") return echoBody(req, res);
    return echoStream(res, url);
  }

  const API_PATH =
    /^\/(v1\/accounts|v1\/accounts\/[^/]+\/locations|v4\/accounts\/[^/]+\/locations\/[^/]+\/reviews(\/[^/]+\/reply)?|v1\/echo)$/;

  async function handle(req: IncomingMessage, res: ServerResponse, url: URL): Promise<boolean> {
    const path = url.pathname;
    if (path === "/admin/business-profile" || path === "/admin/api-behavior" || path === "/admin/api-stats") {
      try {
        await handleAdmin(req, res, path);
      } catch (error) {
        if (!(error instanceof AdminError)) throw error;
        sendJson(res, error.status, { error: "invalid_request", error_description: error.message });
      }
      return true;
    }
    if (!API_PATH.test(path)) return false;
    record(req, url);
    try {
      await handleApi(req, res, url);
    } catch (error) {
      if (!(error instanceof ApiError)) throw error;
      const status = STATUS_NAMES[error.status] ?? (error.status >= 500 ? "INTERNAL" : "UNKNOWN");
      const body: Json = { code: error.status, message: error.message, status };
      if (error.details) body.details = error.details;
      if (!res.headersSent) sendJson(res, error.status, { error: body }, error.headers);
    }
    return true;
  }

  return {
    handle,
    reset() {
      data = new Map();
      failNext = null;
      stats = zeroStats();
    },
  };
}

/** Masks a resource to the readMask's paths (nested paths such as `storefrontAddress.locality` too), plus `name`. */
function masked(resource: Json, paths: string[]): Json {
  const out: Json = { name: resource.name };
  for (const path of paths) {
    const parts = path.split(".");
    let from: unknown = resource;
    for (const part of parts) from = typeof from === "object" && from !== null ? (from as Json)[part] : undefined;
    if (from === undefined) continue;
    let to = out;
    for (const part of parts.slice(0, -1)) {
      if (typeof to[part] !== "object" || to[part] === null) to[part] = {};
      to = to[part] as Json;
    }
    to[parts[parts.length - 1] ?? ""] = from;
  }
  return out;
}

async function readJsonBody(req: IncomingMessage, limit: number, bad: (message: string) => Error): Promise<Json> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > limit) {
      req.resume();
      throw bad(`the body is larger than ${limit} bytes`);
    }
    chunks.push(chunk);
  }
  const text = Buffer.concat(chunks).toString("utf8");
  try {
    const body: unknown = JSON.parse(text);
    if (typeof body === "object" && body !== null && !Array.isArray(body)) return body as Json;
  } catch {
    // answered below
  }
  throw bad("the body must be a JSON object");
}

function sendJson(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}) {
  if (res.headersSent || res.destroyed) return;
  const text = JSON.stringify(body);
  res.writeHead(status, {
    "content-type": "application/json; charset=utf-8",
    "content-length": Buffer.byteLength(text),
    "cache-control": "no-store",
    ...headers,
  });
  res.end(text);
}
