import type { Services } from "../context";
import type { EventRow } from "../db/schema";
import { AppError } from "../errors";
import { describeError, logWarn } from "../lib/log";
import { refreshRecorder } from "../lib/metrics";
import { discoverSettings, insecureUrls, OAuth2Settings } from "../oauth/profiles";
import { createApp, getApp, updateApp } from "./apps";
import { completeLogin } from "./authorization";
import {
  type BranchRow,
  type ClientChanges,
  type ClientWithToken,
  createClient,
  deleteClient,
  getClient,
  type NewClient,
  updateClient,
} from "./clients";
import { redeliverEvent } from "./events";
import { attachBranch } from "./grants";
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
    providers: op.providers,
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
): Promise<{ client: BranchRow; link: LoginLink }> {
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
    await dropTokens(op, [updated.branchId]);
  }
  return getClient(op.db, id);
}

/** Deletes a client (revoking what it holds at the provider, best effort) and drops its cached token. */
export async function removeClient(op: Operator, id: number, now: Date) {
  const result = await deleteClient(op.db, op.keyring, op.providers, op.events, id, now);
  await dropTokens(op, [result.branchId]);
  return { ...result, cacheMaxAgeSeconds: cacheMaxAgeSeconds(op) };
}

// ---------------------------------------------------------------------------------------------
// Apps and grants.

/** The `oauth2` settings as the admin API sends them (src/routes/schemas.ts OAuth2SettingsBody). */
export interface SettingsInput {
  issuer?: string | undefined;
  authorization_url?: string | undefined;
  token_url?: string | undefined;
  revocation_url?: string | undefined;
  discovery_url?: string | undefined;
  scopes: string;
  extra_authorization_params?: string | undefined;
  client_auth_method?: "client_secret_basic" | "client_secret_post" | undefined;
  openid?: boolean | undefined;
  issuer_aliases?: string[] | undefined;
  api_base_urls?: string[] | undefined;
  requests_per_minute?: number | undefined;
}

/** POST /apps: an `oauth2` app's settings are checked (and read from discovery) before it is stored. */
export async function addApp(
  op: Operator,
  input: {
    name: string;
    profile: "google" | "oauth2";
    client_id: string;
    client_secret: string;
    settings?: SettingsInput | undefined;
  },
  _now: Date,
) {
  const settings = input.settings === undefined ? null : await settingsOf(op, input.settings);
  return createApp(op.db, op.keyring, {
    name: input.name,
    profile: input.profile,
    clientId: input.client_id,
    clientSecret: input.client_secret,
    settings,
  });
}

/** PATCH /apps/{id}: a new secret is one change for every branch of the app. */
export async function changeApp(
  op: Operator,
  id: number,
  input: { name?: string | undefined; client_secret?: string | undefined; settings?: SettingsInput | undefined },
  now: Date,
) {
  const { app } = await getApp(op.db, id);
  if (input.settings !== undefined && app.profile !== "oauth2") {
    throw new AppError("conflict", "A google app takes no settings: its provider is the OAUTH_* variables.", {
      errors: [{ field: "settings", message: "not allowed for the google profile" }],
    });
  }
  const settings = input.settings === undefined ? undefined : await settingsOf(op, input.settings);
  return updateApp(
    op.db,
    op.keyring,
    op.events,
    id,
    { name: input.name, clientSecret: input.client_secret, settings },
    now,
  );
}

async function settingsOf(op: Operator, input: SettingsInput): Promise<OAuth2Settings> {
  let settings: OAuth2Settings;
  if (input.discovery_url !== undefined) {
    try {
      settings = await discoverSettings(input.discovery_url, input, op.config);
    } catch (error) {
      throw new AppError("provider_error", `The discovery document could not be read: ${describeError(error)}.`);
    }
  } else {
    const { discovery_url: _unused, ...explicit } = input;
    settings = OAuth2Settings.parse(explicit);
  }
  if (input.openid !== undefined) settings.openid = input.openid;
  const insecure = insecureUrls(settings, op.config);
  if (insecure.length > 0) {
    throw new AppError("validation_failed", "The provider's URLs must be https.", {
      errors: insecure.map((field) => ({ field: `settings.${field}`, message: "must be https" })),
    });
  }
  return settings;
}

/** PUT /clients/{id}/grant: the branch is served from the grant at once; its old cached token goes. */
export async function attachToGrant(op: Operator, id: number, grantId: number, now: Date) {
  const result = await attachBranch(op.db, op.events, id, grantId, now);
  await dropTokens(op, [result.branchId]);
  return result;
}

// ---------------------------------------------------------------------------------------------
// Login links and consent.

/** A new login link; with `revokePrevious`, every earlier one stops working. */
export function newLoginLink(
  op: Operator,
  id: number,
  revokePrevious: boolean,
  now: Date,
  account?: string,
): Promise<LoginLink> {
  return issueLoginLink(
    op.db,
    op.keyring,
    op.baseUrl,
    id,
    now,
    op.config.LOGIN_LINK_TTL_SECONDS,
    revokePrevious,
    account,
  );
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
  const result = await completeLogin(op.db, op.keyring, op.providers, params, bindingCookie, now, op.events, (work) =>
    op.defer(work),
  );
  // Every branch of the grant is served the new token from here on.
  await dropTokens(op, [result.client.branchId, ...result.branchIds]);
  return result;
}

// ---------------------------------------------------------------------------------------------
// Tokens.

/** A valid access token for the branch, through the edge cache (refreshed first when due). */
export function readToken(op: Operator, branchId: string, now: Date): Promise<CacheRead> {
  // The database path's dependencies are built only when a tier misses.
  return readThrough(cacheDepsOf(op), branchId, now, async () =>
    cachedTokenOf(await getBranchToken(tokenDepsOf(op), branchId, new Date())),
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
    if (branchId !== undefined && error instanceof AppError && error.status === 409) await dropTokens(op, [branchId]);
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
  } catch (error) {
    // Whatever happened at the provider or in the database, stop serving it from here.
    await dropTokens(op, [branchId]);
    throw error;
  }
  // The grant is revoked for every branch served from it.
  await dropTokens(op, result.branchIds);
  return { ...result, cacheMaxAgeSeconds: cacheMaxAgeSeconds(op) };
}

/**
 * This location stops serving these branches' cached tokens. A Cache API failure after a committed
 * change is logged, never turned into an error: the change stands, and other locations converge
 * within TOKEN_CACHE_MAX_AGE_SECONDS anyway.
 */
export async function dropTokens(op: Operator, branchIds: string[]): Promise<void> {
  const cache = cacheDepsOf(op);
  await Promise.all(
    [...new Set(branchIds)].map((branchId) =>
      dropToken(cache, branchId).catch((error) =>
        logWarn("cache_drop_failed", { branch: branchId, error: describeError(error) }),
      ),
    ),
  );
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
