import { eq } from "drizzle-orm";
import type { Services } from "../context";
import { apps } from "../db/schema";
import type { Config } from "../env";
import { AppError, toAppError } from "../errors";
import { describeError, logInfo, logWarn } from "../lib/log";
import type { Metrics } from "../lib/metrics";
import {
  BASE_URL_HEADER,
  type BaseUrl,
  callerResponseHeaders,
  chooseBaseUrl,
  editedResource,
  parseBaseUrl,
  retryAfterSeconds,
  unsafePathProblem,
  upstreamRequestHeaders,
  upstreamUrl,
} from "../lib/proxy-rules";
import { OAuth2Settings } from "../oauth/profiles";
import type { QuotaAsk } from "../proxy/ledger";
import type { ProxyQuota } from "../proxy/quota";
import { cacheDepsOf, type Operator, readToken, tokenDepsOf } from "./operations";
import type { RefreshMessage } from "./scheduled";
import { cachedTokenOf, dropToken, storeToken } from "./token-cache";
import { forceRefresh, type ServedToken } from "./tokens";

/**
 * The provider-API proxy: a caller's request to the branch's app's API, sent with the branch's
 * current token (from the edge cache: a warm call reads nothing from the database), streamed both
 * ways. The app's budgets are held by one Durable Object per app (src/proxy/quota.ts); a 401 is
 * answered with one forced refresh and one retry; nothing here ever sleeps.
 */

/** A branch without an app (none are: kept for entries cached before apps). */
export const DEFAULT_APP_KEY = "default";
/** How long an isolate keeps an app's proxy settings before reading them again. */
export const APP_SETTINGS_TTL_MS = 60_000;
/** Google Business Profile: 10 edits per minute per location, which cannot be raised. */
export const GOOGLE_EDITS_PER_MINUTE_PER_LOCATION = 10;
/**
 * A request body up to this size (with a Content-Length) is read before it is sent, so a request
 * refused with 401 can be sent again; a larger or unsized body is streamed and not retried.
 */
export const REPLAYABLE_BODY_BYTES = 64 * 1024;
/** An upstream 429 without a (readable) Retry-After pauses the app this long. */
export const UPSTREAM_429_DEFAULT_PAUSE_SECONDS = 1;
/** Set on a passed-back 429 whose Retry-After was lowered to PROXY_MAX_RETRY_AFTER_SECONDS: the original. */
export const RETRY_AFTER_CLAMPED_HEADER = "Proxy-Retry-After-Clamped";
/** A grant refused twice waits this long in the queue before its check (its token was just refreshed). */
export const GRANT_CHECK_DELAY_SECONDS = 60;

/** Where a branch's calls go and what its app may spend there. */
export interface ProxyTarget {
  /** Names the app's quota object. */
  appKey: string;
  /** The allowed API bases; the first is used when the caller names none. */
  baseUrls: readonly BaseUrl[];
  quotaPerMinute: number;
  editsPerMinutePerResource: number;
}

const parsedBases = new WeakMap<Config, readonly BaseUrl[]>();
const appSettings = new Map<number, { profile: string; settings: unknown; loadedAt: number }>();

/**
 * The branch's app's proxy settings, each app its own quota object. A `google` app (the OAUTH_*
 * variables' provider) is allowed PROXY_BASE_URLS (Google's Business Profile hosts by default) and
 * PROXY_QUOTA_PER_MINUTE; an `oauth2` app its settings' `api_base_urls` and `requests_per_minute`.
 * An isolate reads an app's row at most once a minute, so a warm call still reads nothing.
 */
export async function proxyTargetOf(
  services: Pick<Services, "config" | "db">,
  appId: number | null,
): Promise<ProxyTarget> {
  const { config } = services;
  let envBases = parsedBases.get(config);
  if (!envBases) {
    envBases = config.PROXY_BASE_URLS.map(parseBaseUrl);
    parsedBases.set(config, envBases);
  }
  const google: ProxyTarget = {
    appKey: appId === null ? DEFAULT_APP_KEY : `app:${appId}`,
    baseUrls: envBases,
    quotaPerMinute: config.PROXY_QUOTA_PER_MINUTE,
    editsPerMinutePerResource: GOOGLE_EDITS_PER_MINUTE_PER_LOCATION,
  };
  if (appId === null) return google;
  let app = appSettings.get(appId);
  if (!app || Date.now() - app.loadedAt > APP_SETTINGS_TTL_MS) {
    const [row] = await services.db
      .select({ profile: apps.profile, settings: apps.settings })
      .from(apps)
      .where(eq(apps.id, appId));
    app = { profile: row?.profile ?? "google", settings: row?.settings ?? null, loadedAt: Date.now() };
    appSettings.set(appId, app);
  }
  if (app.profile !== "oauth2") return google;
  const settings = OAuth2Settings.safeParse(app.settings);
  return {
    appKey: google.appKey,
    baseUrls: settings.success ? settings.data.api_base_urls.map(parseBaseUrl) : [],
    quotaPerMinute: (settings.success && settings.data.requests_per_minute) || config.PROXY_QUOTA_PER_MINUTE,
    editsPerMinutePerResource: GOOGLE_EDITS_PER_MINUTE_PER_LOCATION,
  };
}

export interface ProxyDeps {
  op: Operator;
  requestId: string;
  /** The quota objects (PROXY_QUOTA); without the binding no budget is enforced here. */
  quota?: DurableObjectNamespace<ProxyQuota> | undefined;
  /** REFRESH_QUEUE: where a grant refused twice is queued for a check. */
  checks?: Queue<RefreshMessage> | undefined;
}

/** What the log line and the data point say about one proxied call. */
interface CallRecord {
  branch: string;
  app: string;
  upstream_host: string;
  method: string;
  status: number;
  refreshed: boolean;
  retried: boolean;
  code?: string;
}

/**
 * Sends `request` (its method, headers, body and query) to `rawPath` (still percent-encoded,
 * without a leading slash) under the branch's chosen API base, and returns the upstream's answer.
 * Refusals are AppErrors (problem+json); one log line and one data point per call either way.
 */
export async function proxyRequest(
  deps: ProxyDeps,
  branchId: string,
  rawPath: string,
  request: Request,
): Promise<Response> {
  const started = Date.now();
  const record: CallRecord = {
    branch: branchId,
    app: "",
    upstream_host: "",
    method: request.method,
    status: 0,
    refreshed: false,
    retried: false,
  };
  try {
    const response = await forward(deps, branchId, rawPath, request, record);
    record.status = response.status;
    return response;
  } catch (error) {
    const appError = toAppError(error);
    record.status = appError.status;
    record.code = appError.code;
    throw appError;
  } finally {
    const ms = Date.now() - started;
    logInfo("proxy_call", { request_id: deps.requestId, ...record, ms });
    recordMetric(deps.op.metrics, record, ms);
  }
}

async function forward(
  deps: ProxyDeps,
  branchId: string,
  rawPath: string,
  request: Request,
  record: CallRecord,
): Promise<Response> {
  const { op } = deps;
  // The branch's token (edge cache first) names its app, whose allowlist and budget apply.
  const read = await readToken(op, branchId, new Date());
  record.refreshed = read.token.refreshed;
  const target = await proxyTargetOf(op, read.token.appId);
  record.app = target.appKey;
  const base = chooseBaseUrl(request.headers.get(BASE_URL_HEADER), target.baseUrls);
  if (!base) {
    throw new AppError(
      "bad_request",
      `${BASE_URL_HEADER} must be exactly one of this app's API base URLs (https, no user info, no query).`,
      { fields: { allowed_base_urls: target.baseUrls.map((b) => `${b.origin}${b.path}`) } },
    );
  }
  const pathProblem = unsafePathProblem(rawPath);
  if (pathProblem) throw new AppError("bad_request", `The path must not contain ${pathProblem}.`);
  const url = upstreamUrl(base, rawPath, new URL(request.url).search);
  if (!url) throw new AppError("bad_request", "The path does not stay under the API base URL.");
  record.upstream_host = url.host;

  const body = await requestBody(request, op.config.PROXY_MAX_BODY_BYTES);
  const headers = upstreamRequestHeaders(request.headers);
  const ask: QuotaAsk = {
    limits: { requestsPerMinute: target.quotaPerMinute, editsPerMinutePerResource: target.editsPerMinutePerResource },
    resource: editedResource(request.method, rawPath),
  };
  const send = (accessToken: string) =>
    sendUpstream(url, request.method, headers, body, accessToken, op.config.PROXY_TIMEOUT_MS);

  await takeQuota(deps, target, ask);
  let response = await send(read.token.accessToken);

  if (response.status === 401 && body.kind !== "stream") {
    // Refused with a token we served: refresh once (single flight with every reader of the
    // grant), then send once more. The retry is a request like any other for the budget.
    await response.body?.cancel();
    const fresh = await refreshRejected(op, branchId, read.token.accessToken);
    record.refreshed ||= fresh.refreshed;
    await takeQuota(deps, target, ask);
    record.retried = true;
    response = await send(fresh.accessToken);
    if (response.status === 401) queueGrantCheck(deps, branchId, fresh);
  }

  const responseHeaders = callerResponseHeaders(response.headers);
  if (response.status === 429) await honourUpstream429(deps, target, response.headers, responseHeaders);
  return new Response(response.body, {
    status: response.status,
    statusText: response.statusText,
    headers: responseHeaders,
  });
}

type Body =
  | { kind: "none" }
  /** Read up front: can be sent again. */
  | { kind: "buffered"; bytes: ArrayBuffer }
  /** Streamed through a counter that aborts the upload past the limit. */
  | { kind: "stream"; stream: ReadableStream<Uint8Array>; limit: StreamLimit };

interface StreamLimit {
  exceeded: boolean;
  /** Aborts the upstream request under way: the upstream must see a broken upload, not a short one. */
  abort?: () => void;
}

async function requestBody(request: Request, maxBytes: number): Promise<Body> {
  if (request.method === "GET" || request.method === "HEAD" || request.body === null) return { kind: "none" };
  const tooLarge = () =>
    new AppError(
      "payload_too_large",
      `Proxied request bodies are limited to ${maxBytes} bytes (PROXY_MAX_BODY_BYTES).`,
    );
  const lengthHeader = request.headers.get("content-length");
  const declared = lengthHeader !== null && /^\d+$/.test(lengthHeader) ? Number(lengthHeader) : undefined;
  if (declared !== undefined && declared > maxBytes) throw tooLarge();
  if (declared !== undefined && declared <= REPLAYABLE_BODY_BYTES) {
    const bytes = await request.arrayBuffer();
    if (bytes.byteLength > maxBytes) throw tooLarge();
    return { kind: "buffered", bytes };
  }
  let seen = 0;
  const limit: StreamLimit = { exceeded: false };
  const source = request.body.getReader();
  const counted = new ReadableStream<Uint8Array>({
    async pull(controller) {
      const { done, value } = await source.read();
      if (done) return controller.close();
      seen += value.byteLength;
      if (seen > maxBytes) {
        // Abort the upstream request: it must see a broken upload, never a complete shorter one.
        limit.exceeded = true;
        limit.abort?.();
        void source.cancel().catch(() => {});
        return controller.close();
      }
      controller.enqueue(value);
    },
    cancel: (reason) => source.cancel(reason),
  });
  return { kind: "stream", stream: counted, limit };
}

async function sendUpstream(
  url: URL,
  method: string,
  headers: Headers,
  body: Body,
  accessToken: string,
  timeoutMs: number,
): Promise<Response> {
  const sent = new Headers(headers);
  sent.set("Authorization", `Bearer ${accessToken}`);
  const controller = new AbortController();
  // Bounds the wait for the upstream's response headers; the body then streams at its own pace.
  const timer = setTimeout(() => controller.abort(), timeoutMs);
  if (body.kind === "stream") body.limit.abort = () => controller.abort();
  try {
    return await fetch(url, {
      method,
      headers: sent,
      body: body.kind === "none" ? null : body.kind === "buffered" ? body.bytes.slice(0) : body.stream,
      redirect: "manual",
      signal: controller.signal,
    });
  } catch (error) {
    if (body.kind === "stream" && body.limit.exceeded) {
      throw new AppError("payload_too_large", "The request body exceeded PROXY_MAX_BODY_BYTES while it was sent.");
    }
    if (controller.signal.aborted) {
      throw new AppError("upstream_timeout", `${url.host} did not answer within ${timeoutMs} ms.`, {
        retryAfterSeconds: 1,
      });
    }
    throw new AppError("upstream_unreachable", `${url.host} could not be reached.`, {
      cause: error,
      retryAfterSeconds: 1,
    });
  } finally {
    clearTimeout(timer);
  }
}

/**
 * A new token for a branch whose token the upstream refused: a forced refresh (single flight through
 * the token row's lease), unless another reader's refresh already replaced the refused token. The
 * new token replaces the cached one here; a grant found dead stops being served from here.
 */
async function refreshRejected(op: Operator, branchId: string, rejected: string): Promise<ServedToken> {
  const cache = cacheDepsOf(op);
  let served: ServedToken;
  try {
    served = await forceRefresh(tokenDepsOf(op), { branchId }, new Date(), { rejected });
  } catch (error) {
    if (error instanceof AppError && error.status === 409) await dropToken(cache, branchId);
    throw error;
  }
  await storeToken(cache, cachedTokenOf(served), new Date());
  return served;
}

/**
 * A fresh token refused too: the grant may be revoked, or lack a scope, or the API may be off. A 401
 * alone proves none of these; the refresh queue refreshes the grant again later (a check message),
 * and the provider's token endpoint decides. Without the queue, the cron's next refresh does.
 */
function queueGrantCheck(deps: ProxyDeps, branchId: string, fresh: ServedToken): void {
  const fields = { request_id: deps.requestId, branch: branchId, token: fresh.token.id };
  if (!deps.checks) {
    logInfo("proxy_grant_check_deferred_to_cron", fields);
    return;
  }
  const checks = deps.checks;
  deps.op.defer(
    checks
      .send({ tokenIds: [fresh.token.id], check: true }, { delaySeconds: GRANT_CHECK_DELAY_SECONDS })
      .then(() => logInfo("proxy_grant_check_queued", fields))
      .catch((error: unknown) => logWarn("proxy_grant_check_not_queued", { ...fields, error: describeError(error) })),
  );
}

function quotaStub(deps: ProxyDeps, target: ProxyTarget) {
  return deps.quota?.get(deps.quota.idFromName(target.appKey));
}

/** Counts one upstream request against the app's budgets, or refuses it (429, nothing sent). */
async function takeQuota(deps: ProxyDeps, target: ProxyTarget, ask: QuotaAsk): Promise<void> {
  const stub = quotaStub(deps, target);
  if (!stub) return;
  let answer: Awaited<ReturnType<ProxyQuota["take"]>>;
  try {
    answer = await stub.take(ask);
  } catch (error) {
    // The quota object unreachable: the call goes ahead; the provider's own 429 still pauses the app.
    logWarn("proxy_quota_unavailable", { request_id: deps.requestId, app: target.appKey, error: describeError(error) });
    return;
  }
  if (answer.granted) return;
  const what =
    answer.reason === "paused"
      ? "The provider answered 429; this app's calls wait until its Retry-After."
      : answer.reason === "edits"
        ? `This resource's edit budget (${target.editsPerMinutePerResource} per minute) is used up.`
        : `This app's request budget (${target.quotaPerMinute} per minute) is used up.`;
  throw new AppError("quota_exceeded", `${what} Nothing was sent upstream.`, {
    retryAfterSeconds: answer.retryAfterSeconds,
    fields: { quota: answer.reason },
  });
}

/** The provider's 429: the app's budget waits until its Retry-After (clamped, and said so). */
async function honourUpstream429(
  deps: ProxyDeps,
  target: ProxyTarget,
  upstream: Headers,
  toCaller: Headers,
): Promise<void> {
  const max = deps.op.config.PROXY_MAX_RETRY_AFTER_SECONDS;
  const asked = retryAfterSeconds(upstream.get("retry-after"), new Date());
  const seconds = Math.min(asked ?? UPSTREAM_429_DEFAULT_PAUSE_SECONDS, max);
  if (asked !== undefined && asked > max) {
    toCaller.set("Retry-After", String(max));
    toCaller.set(RETRY_AFTER_CLAMPED_HEADER, String(asked));
  }
  const stub = quotaStub(deps, target);
  if (!stub || seconds <= 0) return;
  try {
    await stub.pause(Date.now() + seconds * 1000);
  } catch (error) {
    logWarn("proxy_quota_unavailable", { request_id: deps.requestId, app: target.appKey, error: describeError(error) });
  }
}

function recordMetric(metrics: Metrics, record: CallRecord, ms: number): void {
  metrics.record({
    kind: "proxy",
    outcome: record.status < 400 ? "ok" : "failed",
    failureClass: failureClassOf(record),
    app: record.app,
    source: "request",
    latencyMs: ms,
    attempt: record.retried ? 2 : 1,
  });
}

function failureClassOf(record: CallRecord): string | undefined {
  if (record.status < 400) return undefined;
  if (record.code === "quota_exceeded") return "quota";
  if (record.code === "upstream_timeout") return "timeout";
  if (record.code === "upstream_unreachable") return "network";
  if (record.code !== undefined) return record.code;
  if (record.status === 401 || record.status === 403) return "rejected";
  if (record.status === 429) return "rate_limited";
  return record.status >= 500 ? "server_error" : "client_error";
}
