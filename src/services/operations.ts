import type { Services } from "../context";
import type { ClientRow, EventRow } from "../db/schema";
import { AppError } from "../errors";
import { refreshRecorder } from "../lib/metrics";
import { completeLogin } from "./authorization";
import {
  type ClientChanges,
  type ClientWithToken,
  createClient,
  deleteClient,
  getClient,
  type NewClient,
  updateClient,
} from "./clients";
import { redeliverEvent } from "./events";
import { issueLoginLink, type LoginLink, revokeLoginLinks as revokeLinksOf } from "./login-links";
import { leaseMsFor } from "./refresh-policy";
import {
  type CachedToken,
  type CacheRead,
  cachedTokenOf,
  dropToken,
  readThrough,
  storeToken,
  type TokenCacheDeps,
  tokenCacheDeps,
} from "./token-cache";
import {
  forceRefresh,
  getBranchToken,
  REQUEST_BACKGROUND_BUDGET_MS,
  revokeBranchToken,
  type TokenDeps,
} from "./tokens";
import { webhookTarget } from "./webhooks";

/**
 * What callers and operators do to a branch, each with the cache invalidation it implies: the one
 * place where a change and "this location stops serving the old token" go together. The API routes
 * (src/routes/*) and the operator console (src/routes/console*) both call these; neither repeats
 * a rule. Other locations converge within TOKEN_CACHE_MAX_AGE_SECONDS (returned where it matters).
 */

/** An invocation's services, where its links point, and where its background work goes. */
export interface Operator extends Services {
  /** Absolute URL of the API root (for login links). */
  baseUrl: string;
  defer(task: Promise<unknown>): void;
}

export function tokenDepsOf(op: Operator): TokenDeps {
  return {
    db: op.db,
    keyring: op.keyring,
    provider: op.provider,
    refreshAheadSeconds: op.config.REFRESH_AHEAD_SECONDS,
    leaseMs: leaseMsFor(op.config.OAUTH_TIMEOUT_MS),
    background: { defer: (task) => op.defer(task), budgetMs: REQUEST_BACKGROUND_BUDGET_MS },
    events: op.events,
    onRefreshOutcome: refreshRecorder(op.metrics, "request"),
  };
}

export function cacheDepsOf(op: Operator): TokenCacheDeps {
  return tokenCacheDeps(op, (task) => op.defer(task));
}

/** How long another location may still serve a token this one stopped serving. */
export function cacheMaxAgeSeconds(op: Operator): number {
  return op.config.TOKEN_CACHE_MAX_AGE_SECONDS;
}

// ---------------------------------------------------------------------------------------------
// Clients.

/** Registers a branch's client and issues its first login link. */
export async function registerBranch(
  op: Operator,
  input: NewClient,
  now: Date,
): Promise<{ client: ClientRow; link: LoginLink }> {
  const client = await createClient(op.db, op.keyring, input);
  return { client, link: await newLoginLink(op, client.id, false, now) };
}

/** Changes a client's settings; deactivation or new credentials stop this location serving its token. */
export async function changeClient(
  op: Operator,
  id: number,
  changes: ClientChanges,
  now: Date,
): Promise<ClientWithToken> {
  const updated = await updateClient(op.db, op.keyring, op.events, id, changes, now);
  if (changes.isActive === false || changes.clientSecret !== undefined) {
    await dropToken(cacheDepsOf(op), updated.branchId);
  }
  return getClient(op.db, id);
}

/** Deletes a client (revoking what it holds at the provider, best effort) and drops its cached token. */
export async function removeClient(op: Operator, id: number, now: Date) {
  const result = await deleteClient(op.db, op.keyring, op.provider, op.events, id, now);
  await dropToken(cacheDepsOf(op), result.branchId);
  return { ...result, cacheMaxAgeSeconds: cacheMaxAgeSeconds(op) };
}

// ---------------------------------------------------------------------------------------------
// Login links and consent.

/** A new login link; with `revokePrevious`, every earlier one stops working. */
export function newLoginLink(op: Operator, id: number, revokePrevious: boolean, now: Date): Promise<LoginLink> {
  return issueLoginLink(op.db, op.keyring, op.baseUrl, id, now, op.config.LOGIN_LINK_TTL_SECONDS, revokePrevious);
}

/** Every link issued so far (and consents begun with one) stops working; returns the cut-off. */
export function revokeLoginLinks(op: Operator, id: number, now: Date): Promise<Date> {
  return revokeLinksOf(op.db, id, now);
}

/** The provider's redirect back: stores the consent's tokens; the old token stops being served here. */
export async function finishConsent(
  op: Operator,
  params: URLSearchParams,
  bindingCookie: string | undefined,
  now: Date,
) {
  const result = await completeLogin(op.db, op.keyring, op.provider, params, bindingCookie, now, op.events, (work) =>
    op.defer(work),
  );
  await dropToken(cacheDepsOf(op), result.client.branchId);
  return result;
}

// ---------------------------------------------------------------------------------------------
// Tokens.

/** A valid access token for the branch, through the edge cache (refreshed first when due). */
export function readToken(op: Operator, branchId: string, now: Date): Promise<CacheRead> {
  const deps = tokenDepsOf(op);
  return readThrough(cacheDepsOf(op), branchId, now, async () =>
    cachedTokenOf(await getBranchToken(deps, branchId, new Date())),
  );
}

/**
 * Refreshes now (single-flight with any refresh under way). The new token replaces the cached one
 * here; a dead or revoked grant stops being served from this location at once.
 */
export async function refreshNow(
  op: Operator,
  target: { clientId: number } | { branchId: string },
  now: Date,
): Promise<CachedToken> {
  const cache = cacheDepsOf(op);
  let token: CachedToken;
  try {
    token = cachedTokenOf(await forceRefresh(tokenDepsOf(op), target, now));
  } catch (error) {
    const branchId = "branchId" in target ? target.branchId : branchNamedBy(error);
    if (branchId !== undefined && error instanceof AppError && error.status === 409) await dropToken(cache, branchId);
    throw error;
  }
  await storeToken(cache, token, now);
  return token;
}

/** Revokes the branch's grant at the provider (best effort) and here; this location stops serving it. */
export async function revokeToken(op: Operator, branchId: string, now: Date) {
  let result: Awaited<ReturnType<typeof revokeBranchToken>>;
  try {
    result = await revokeBranchToken(tokenDepsOf(op), branchId, now);
  } finally {
    // Whatever happened at the provider or in the database, stop serving it from here.
    await dropToken(cacheDepsOf(op), branchId);
  }
  return { ...result, cacheMaxAgeSeconds: cacheMaxAgeSeconds(op) };
}

/** The branch an error names in its fields (the reconnect hint carries it). */
function branchNamedBy(error: unknown): string | undefined {
  const branchId = error instanceof AppError ? error.extra.fields?.branch_id : undefined;
  return typeof branchId === "string" ? branchId : undefined;
}

// ---------------------------------------------------------------------------------------------
// Events.

/** Queues an event for delivery again; the invocation makes the first attempt after answering. */
export async function queueRedelivery(op: Operator, id: number, now: Date): Promise<EventRow> {
  if (!webhookTarget(op.config)) {
    throw new AppError("conflict", "No WEBHOOK_URL is configured: events are only logged.");
  }
  const event = await redeliverEvent(op.db, id, now);
  op.events.written.push(event.id);
  return event;
}
