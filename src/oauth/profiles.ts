import { z } from "zod";
import type { Config } from "../env";
import { AppError } from "../errors";
import { type Provider, providerFromConfig, withIssuerAliases } from "./provider";

/**
 * Provider profiles, as data. An app names one:
 * - `google` (the default): the provider the OAUTH_* variables describe, Google's endpoints unless
 *   configured otherwise, with `openid email` asked beside the scopes (OAUTH_OPENID).
 * - `oauth2`: any OAuth 2.0 / OpenID Connect provider, described by the app's `settings` (explicit
 *   URLs, or filled from an OpenID discovery document when the app is created).
 */

const url = z.url({ protocol: /^https?$/ });

/** The `oauth2` profile's settings, as the admin API takes them and the apps table keeps them. */
export const OAuth2Settings = z.strictObject({
  issuer: url,
  authorization_url: url,
  token_url: url,
  revocation_url: url.optional(),
  scopes: z.string().trim().min(1).max(2000),
  extra_authorization_params: z.string().max(2000).default(""),
  client_auth_method: z.enum(["client_secret_basic", "client_secret_post"]).default("client_secret_basic"),
  /** OpenID Connect: ask for `openid email` too and keep one grant per account (the ID token's `sub`). */
  openid: z.boolean().default(false),
  /** Other values the provider's ID tokens may carry as `iss` for the issuer above. */
  issuer_aliases: z.array(z.string().min(1).max(300)).max(5).default([]),
  /** The proxy's allowlist for this app's API (the first is the default); none: no proxying. */
  api_base_urls: z.array(url).max(10).default([]),
  /** The proxy's budget for this app (default PROXY_QUOTA_PER_MINUTE). */
  requests_per_minute: z.number().int().positive().max(1_000_000).optional(),
});
export type OAuth2Settings = z.infer<typeof OAuth2Settings>;

/** What the registry needs of an app row. */
export interface AppProfileRef {
  id: number;
  profile: "google" | "oauth2";
  settings: unknown;
}

export interface Providers {
  /** The `google` profile (the OAUTH_* variables). */
  google: Provider;
  /** The provider of an app. An `oauth2` app whose stored settings no longer parse is a 409. */
  of(app: AppProfileRef): Provider;
}

/**
 * Built once per isolate and configuration (src/context.ts); the provider of an `oauth2` app is
 * built on first use and again whenever its stored settings change (PATCH /apps).
 */
export function providersOf(config: Config, fetchImpl: typeof fetch = fetch): Providers {
  const google = providerFromConfig(config, fetchImpl);
  const built = new Map<number, { settings: string; provider: Provider }>();
  return {
    google,
    of(app) {
      if (app.profile === "google") return google;
      const settings = JSON.stringify(app.settings);
      const known = built.get(app.id);
      if (known?.settings === settings) return known.provider;
      const provider = oauth2Provider(parseStoredSettings(app), config, fetchImpl);
      if (built.size >= MAX_BUILT_PROVIDERS) built.clear();
      built.set(app.id, { settings, provider });
      return provider;
    },
  };
}

/** oauth2 providers kept per isolate before the cache starts over (each is a few small objects). */
const MAX_BUILT_PROVIDERS = 1_000;

export function oauth2Provider(settings: OAuth2Settings, config: Config, fetchImpl: typeof fetch = fetch): Provider {
  return {
    profile: "oauth2",
    as: withIssuerAliases(
      {
        issuer: settings.issuer,
        authorization_endpoint: settings.authorization_url,
        token_endpoint: settings.token_url,
        ...(settings.revocation_url ? { revocation_endpoint: settings.revocation_url } : {}),
      },
      settings.issuer_aliases,
    ),
    authorizationUrl: settings.authorization_url,
    defaultScopes: settings.scopes,
    extraAuthorizationParams: new URLSearchParams(settings.extra_authorization_params),
    authMethod: settings.client_auth_method,
    timeoutMs: config.OAUTH_TIMEOUT_MS,
    allowInsecureHttp: config.OAUTH_ALLOW_INSECURE_HTTP,
    fetch: fetchImpl,
    openid: settings.openid,
    identityScopes: settings.openid ? "openid email" : "",
  };
}

function parseStoredSettings(app: AppProfileRef): OAuth2Settings {
  const parsed = OAuth2Settings.safeParse(app.settings);
  if (parsed.success) return parsed.data;
  throw new AppError(
    "conflict",
    `App ${app.id}'s stored oauth2 settings are not valid; set them again with PATCH /token-management/apps/${app.id}.`,
  );
}

/**
 * Settings checked against the deployment's rules: every URL https, unless OAUTH_ALLOW_INSECURE_HTTP
 * (the local server). Returns the problems, field by field.
 */
export function insecureUrls(settings: OAuth2Settings, config: Pick<Config, "OAUTH_ALLOW_INSECURE_HTTP">): string[] {
  if (config.OAUTH_ALLOW_INSECURE_HTTP) return [];
  return [
    ...(["issuer", "authorization_url", "token_url", "revocation_url"] as const).filter(
      (field) => settings[field] !== undefined && new URL(settings[field]!).protocol !== "https:",
    ),
    ...settings.api_base_urls.filter((base) => new URL(base).protocol !== "https:").map(() => "api_base_urls"),
  ];
}

/**
 * An OpenID Connect discovery document (or RFC 8414 metadata) turned into settings: the URLs it
 * names, the issuer it states, OpenID Connect on when it lists an ID token signing algorithm.
 */
export async function discoverSettings(
  discoveryUrl: string,
  overrides: {
    scopes: string;
    extra_authorization_params?: string | undefined;
    api_base_urls?: string[] | undefined;
    requests_per_minute?: number | undefined;
  },
  config: Config,
  fetchImpl: typeof fetch = fetch,
): Promise<OAuth2Settings> {
  const response = await fetchImpl(discoveryUrl, {
    headers: { accept: "application/json" },
    signal: AbortSignal.timeout(config.OAUTH_TIMEOUT_MS),
    // Never followed: a redirect is an answer of its own (workerd has no redirect: "error").
    redirect: "manual",
  });
  if (!response.ok) throw new Error(`the discovery document answered HTTP ${response.status}`);
  const doc = (await response.json()) as Record<string, unknown>;
  return OAuth2Settings.parse({
    issuer: doc.issuer,
    authorization_url: doc.authorization_endpoint,
    token_url: doc.token_endpoint,
    ...(typeof doc.revocation_endpoint === "string" ? { revocation_url: doc.revocation_endpoint } : {}),
    scopes: overrides.scopes,
    extra_authorization_params: overrides.extra_authorization_params ?? "",
    client_auth_method: Array.isArray(doc.token_endpoint_auth_methods_supported)
      ? doc.token_endpoint_auth_methods_supported.includes("client_secret_basic")
        ? "client_secret_basic"
        : "client_secret_post"
      : "client_secret_basic",
    openid: Array.isArray(doc.id_token_signing_alg_values_supported),
    ...(overrides.api_base_urls === undefined ? {} : { api_base_urls: overrides.api_base_urls }),
    ...(overrides.requests_per_minute === undefined ? {} : { requests_per_minute: overrides.requests_per_minute }),
  });
}
