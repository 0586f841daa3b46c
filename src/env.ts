import { z } from "zod";
import { AppError } from "./errors";
import { baseUrlProblem } from "./lib/proxy-rules";
import { DEFAULT_RISC_CONFIGURATION_URL } from "./oauth/risc";

/**
 * The Worker's bindings, parsed once per environment object. A missing or malformed binding is a
 * clear configuration error that names the binding and never echoes its value (the app shows
 * those names only to callers holding a configured API key; see src/app.ts).
 */

const DEFAULTS = {
  /** Google's issuer (RFC 9207 `iss`): another origin than its token endpoint. */
  OAUTH_ISSUER: "https://accounts.google.com",
  OAUTH_AUTHORIZATION_URL: "https://accounts.google.com/o/oauth2/v2/auth",
  OAUTH_TOKEN_URL: "https://oauth2.googleapis.com/token",
  OAUTH_REVOCATION_URL: "https://oauth2.googleapis.com/revoke",
  OAUTH_SCOPES: "https://www.googleapis.com/auth/business.manage",
  // No prompt=consent: Google then issues a refresh token only on an account's first consent, which
  // is what tells a consent by another account (its old grant is revoked) from the same account
  // consenting again (one grant: nothing may be revoked). See src/services/authorization.ts.
  OAUTH_EXTRA_AUTHORIZATION_PARAMS: "access_type=offline",
} as const;

/** Google's Business Profile API hosts: the default app's allowed upstreams (the first is the default). */
export const DEFAULT_PROXY_BASE_URLS = [
  "https://mybusinessbusinessinformation.googleapis.com",
  "https://mybusinessaccountmanagement.googleapis.com",
  "https://mybusiness.googleapis.com",
  "https://businessprofileperformance.googleapis.com",
  "https://mybusinessverifications.googleapis.com",
  "https://mybusinessnotifications.googleapis.com",
  "https://mybusinessplaceactions.googleapis.com",
  "https://mybusinesslodging.googleapis.com",
].join(" ");
/** Business Profile APIs: 300 requests per minute per Cloud project, shared by every branch. */
export const DEFAULT_PROXY_QUOTA_PER_MINUTE = 300;
/** Photos and bulk edits fit; a Worker's request body may not exceed 100 MB anyway. */
export const DEFAULT_PROXY_MAX_BODY_BYTES = 10 * 1024 * 1024;
const PROXY_MAX_BODY_BYTES_LIMIT = 100 * 1024 * 1024;
/** Until the upstream's response headers arrive. */
export const DEFAULT_PROXY_TIMEOUT_MS = 30_000;
/** An upstream 429 pauses the app's budget at most this long, whatever its Retry-After says. */
export const DEFAULT_PROXY_MAX_RETRY_AFTER_SECONDS = 60;
/** Google's Business Profile API hosts: Account Management, then Business Information. */
const BUSINESS_PROFILE_DEFAULT_BASE_URLS = [
  "https://mybusinessaccountmanagement.googleapis.com",
  "https://mybusinessbusinessinformation.googleapis.com",
];

const ENCRYPTION_KEY_BYTES = 32;
/**
 * A login link is a bearer capability that travels by email or chat. 72 hours covers a link sent
 * on a Friday evening and opened on Monday morning; shorter would mean resending links, longer
 * only widens the window in which a leaked link works. It is also single use and revocable.
 */
export const LOGIN_LINK_TTL_DEFAULT_SECONDS = 72 * 60 * 60;
/** The hard upper bound (the old default): a larger value is a configuration error at start-up. */
export const LOGIN_LINK_TTL_MAX_SECONDS = 7 * 24 * 60 * 60;
const MIN_API_KEY_LENGTH = 16;
/** An operator's working day: after it the console asks for the admin key again. */
export const CONSOLE_SESSION_TTL_DEFAULT_SECONDS = 8 * 60 * 60;
/** A console sign-in longer than a day would outlive the shift of whoever opened it. */
const CONSOLE_SESSION_TTL_MAX_SECONDS = 24 * 60 * 60;

const base64Key = z.string().refine((value) => decodedLength(value) === ENCRYPTION_KEY_BYTES, {
  message: `must be the base64 encoding of ${ENCRYPTION_KEY_BYTES} bytes`,
});

const commaList = z.string().transform((value) =>
  value
    .split(",")
    .map((item) => item.trim())
    .filter((item) => item.length > 0),
);

const apiKeys = commaList.pipe(
  z
    .array(z.string().min(MIN_API_KEY_LENGTH, `each key needs at least ${MIN_API_KEY_LENGTH} characters`))
    .min(1, "needs at least one key"),
);

const httpUrl = z.url({ protocol: /^https?$/ });

/** Standard Webhooks secrets: `whsec_` and the base64 of 24 to 64 random bytes. */
export const WEBHOOK_SECRET_PREFIX = "whsec_";
const WEBHOOK_SECRET_MIN_BYTES = 24;
const WEBHOOK_SECRET_MAX_BYTES = 64;
const webhookSecret = z
  .string()
  .refine(
    (value) =>
      value.startsWith(WEBHOOK_SECRET_PREFIX) &&
      decodedLength(value.slice(WEBHOOK_SECRET_PREFIX.length)) >= WEBHOOK_SECRET_MIN_BYTES &&
      decodedLength(value.slice(WEBHOOK_SECRET_PREFIX.length)) <= WEBHOOK_SECRET_MAX_BYTES,
    {
      message: `must be ${WEBHOOK_SECRET_PREFIX} followed by the base64 of ${WEBHOOK_SECRET_MIN_BYTES} to ${WEBHOOK_SECRET_MAX_BYTES} random bytes`,
    },
  );
const spaceList = z.string().transform((value) => value.split(/\s+/).filter((item) => item.length > 0));

/** A receiver's answer may take this long before the attempt counts as failed. */
const WEBHOOK_TIMEOUT_MS = 15_000;
const EVENT_RETENTION_DAYS = 90;

/** The provider's URLs: plain http only with OAUTH_ALLOW_INSECURE_HTTP (the local server). */
const PROVIDER_URLS = [
  "OAUTH_ISSUER",
  "OAUTH_AUTHORIZATION_URL",
  "OAUTH_TOKEN_URL",
  "OAUTH_REVOCATION_URL",
  "RISC_CONFIGURATION_URL",
] as const;

/**
 * The local database program listens on loopback; a production binding pointing elsewhere would
 * send every query (and the connection string) to that host, so anything else is refused.
 */
const loopbackUrl = httpUrl.refine((value) => URL.canParse(value) && isLoopback(new URL(value).hostname), {
  message: "must point at a loopback host (127.0.0.0/8, ::1 or localhost): it is for the local database only",
});
const seconds = (fallback: number) => z.coerce.number().int().positive().default(fallback);
const flag = z
  .enum(["true", "false", "1", "0", ""])
  .default("false")
  .transform((value) => value === "true" || value === "1");

const EnvFields = z.object({
  TOKEN_MANAGEMENT_DATABASE_URL: z.url({ protocol: /^postgres(ql)?$/ }),
  NEON_LOCAL_FETCH_ENDPOINT: loopbackUrl.optional(),
  TOKEN_ENCRYPTION_KEY: base64Key,
  TOKEN_ENCRYPTION_PREVIOUS_KEYS: commaList.pipe(z.array(base64Key)).default([]),
  /**
   * Whether values sealed before row binding (v1 envelopes) still open. Off by default: a deployment
   * that never wrote v1 values never accepts one. Only an upgrade from a release that wrote them
   * turns it on, until `npm run db:reseal` (which always reads v1) reports none left (README).
   */
  TOKEN_ENCRYPTION_ACCEPT_V1: z
    .enum(["true", "false", "1", "0"])
    .default("false")
    .transform((value) => value === "true" || value === "1"),
  ADMIN_API_KEY: apiKeys,
  SERVICE_API_KEY: apiKeys,

  /** The issuer the callback checks a provider's `iss` against (a missing `iss` is accepted). */
  OAUTH_ISSUER: httpUrl.default(DEFAULTS.OAUTH_ISSUER),
  OAUTH_AUTHORIZATION_URL: httpUrl.default(DEFAULTS.OAUTH_AUTHORIZATION_URL),
  OAUTH_TOKEN_URL: httpUrl.default(DEFAULTS.OAUTH_TOKEN_URL),
  OAUTH_REVOCATION_URL: z.union([httpUrl, z.literal("")]).default(DEFAULTS.OAUTH_REVOCATION_URL),
  OAUTH_SCOPES: z.string().min(1).default(DEFAULTS.OAUTH_SCOPES),
  OAUTH_EXTRA_AUTHORIZATION_PARAMS: z.string().default(DEFAULTS.OAUTH_EXTRA_AUTHORIZATION_PARAMS),
  OAUTH_CLIENT_AUTH_METHOD: z.enum(["client_secret_post", "client_secret_basic"]).default("client_secret_post"),
  /** Lets the provider be plain http: only for the local authorization server in dev and tests. */
  OAUTH_ALLOW_INSECURE_HTTP: flag,
  OAUTH_TIMEOUT_MS: z.coerce.number().int().positive().default(10_000),
  /**
   * The `google` profile asks for `openid email` beside OAUTH_SCOPES and keeps one grant per Google
   * account and app (the ID token's `sub`). Off: one grant per consent, as before apps.
   */
  OAUTH_OPENID: z
    .enum(["true", "false", "1", "0"])
    .default("true")
    .transform((value) => value === "true" || value === "1"),
  /**
   * Cross-Account Protection: the transmitter's configuration document (issuer, jwks_uri), which
   * says whose Security Event Tokens POST /risc accepts. Default Google's.
   */
  RISC_CONFIGURATION_URL: httpUrl.default(DEFAULT_RISC_CONFIGURATION_URL),
  /**
   * The Business Profile API the console lists a grant's locations from: the Account Management
   * API's base URL, a comma, the Business Information API's. Default Google's two hosts.
   */
  BUSINESS_PROFILE_API_BASE_URLS: commaList
    .pipe(z.array(httpUrl).length(2, "must be two URLs: account management, then business information"))
    .default(BUSINESS_PROFILE_DEFAULT_BASE_URLS)
    .transform(([accounts, locations]) => ({
      accounts: accounts!.replace(/\/+$/, ""),
      locations: locations!.replace(/\/+$/, ""),
    })),

  LOGIN_LINK_TTL_SECONDS: seconds(LOGIN_LINK_TTL_DEFAULT_SECONDS).refine(
    (value) => value <= LOGIN_LINK_TTL_MAX_SECONDS,
    `must be at most ${LOGIN_LINK_TTL_MAX_SECONDS} (7 days): a login link is a bearer capability`,
  ),
  REFRESH_AHEAD_SECONDS: seconds(5 * 60),
  CRON_REFRESH_WINDOW_SECONDS: seconds(15 * 60),
  /** connection.expiring comes this long before time-limited access ends (default 3 days). */
  GRANT_EXPIRY_WARNING_SECONDS: seconds(3 * 24 * 3600),
  CRON_MAX_REFRESHES: z.coerce.number().int().positive().default(500),
  /**
   * The `token_served` line of a token read: "off" (the default, or 0), "all", or the fraction of
   * reads that write it (e.g. 0.01). A read that refreshed still logs `token_refreshed`, and every failure
   * its own line, whatever this says; Workers Logs' head sampling would drop those too.
   */
  LOG_TOKEN_READS: z
    .union([z.enum(["off", "all"]), z.coerce.number().min(0).max(1)], {
      error: 'must be "off", "all" or a fraction of reads between 0 and 1 (e.g. 0.01)',
    })
    .default("off")
    .transform((value) => (value === "off" ? 0 : value === "all" ? 1 : value)),
  /** Edge read cache: the longest a cached token is served without the database; 0 turns the cache off. */
  TOKEN_CACHE_MAX_AGE_SECONDS: z.coerce.number().int().min(0).max(3600).default(60),
  /** Entries of the per-isolate memory tier; 0 leaves only the location tier (Cache API). */
  TOKEN_CACHE_MEMORY_ENTRIES: z.coerce.number().int().min(0).max(1_000_000).default(10_000),

  /** Where events are delivered (Standard Webhooks). Unset: events are only logged. */
  WEBHOOK_URL: z.url({ protocol: /^https?$/, message: "must be an https URL" }).optional(),
  WEBHOOK_SECRET: webhookSecret.optional(),
  /** During a secret rotation: the previous secrets, space-separated; deliveries are signed with each. */
  WEBHOOK_PREVIOUS_SECRETS: spaceList.pipe(z.array(webhookSecret)).default([]),
  WEBHOOK_TIMEOUT_MS: z.coerce.number().int().positive().default(WEBHOOK_TIMEOUT_MS),
  EVENT_RETENTION_DAYS: z.coerce.number().int().positive().default(EVENT_RETENTION_DAYS),
  /**
   * The service's public root (e.g. https://tokens.example.com/token-management), for the login
   * link in a needs_reauth webhook. Unset: the request's origin when a request caused the delivery.
   * https, or plain http on a loopback host (local development): a login link is a bearer capability.
   */
  PUBLIC_BASE_URL: httpUrl
    .refine((value) => value.startsWith("https:") || isLoopback(new URL(value).hostname), {
      message: "must be an https URL (plain http only on a loopback host, for local development)",
    })
    .optional(),

  /** How long a console sign-in with the admin key lasts (see src/services/console-session.ts). */
  CONSOLE_SESSION_TTL_SECONDS: seconds(CONSOLE_SESSION_TTL_DEFAULT_SECONDS).refine(
    (value) => value <= CONSOLE_SESSION_TTL_MAX_SECONDS,
    `must be at most ${CONSOLE_SESSION_TTL_MAX_SECONDS} (24 hours)`,
  ),
  /**
   * Cloudflare Access in front of the console: the team domain (`myteam.cloudflareaccess.com`) and
   * the application's AUD tag. Both set: the console takes the Access JWT and no key sign-in.
   */
  CF_ACCESS_TEAM_DOMAIN: z
    .string()
    .regex(/^(https:\/\/)?[a-z0-9-]+(\.[a-z0-9-]+)+\/?$/i, "must be a host name such as myteam.cloudflareaccess.com")
    .optional(),
  CF_ACCESS_AUD: z.string().min(1).optional(),
  /**
   * Where the team's signing keys are fetched from (default: the team's certs URL). The console
   * trusts any key found there, so it must be on the team's own origin, or on a loopback host (a
   * local stand-in, as the tests use; unreachable from a deployed Worker). No flag relaxes this.
   */
  CF_ACCESS_CERTS_URL: httpUrl.optional(),

  /**
   * The proxy (src/services/proxy.ts) for the app configured by OAUTH_*: its allowed API bases,
   * space-separated (a caller picks one with Proxy-Base-Url, else the first), checked below.
   */
  PROXY_BASE_URLS: spaceList
    .pipe(z.array(z.string()).min(1, "needs at least one URL"))
    .default(DEFAULT_PROXY_BASE_URLS.split(" ")),
  /** Requests per minute sent upstream for the app, from every branch and location together. */
  PROXY_QUOTA_PER_MINUTE: z.coerce.number().int().positive().default(DEFAULT_PROXY_QUOTA_PER_MINUTE),
  PROXY_MAX_BODY_BYTES: z.coerce
    .number()
    .int()
    .positive()
    .max(PROXY_MAX_BODY_BYTES_LIMIT, "must be at most 104857600 (100 MiB, a Worker's request body limit)")
    .default(DEFAULT_PROXY_MAX_BODY_BYTES),
  PROXY_TIMEOUT_MS: z.coerce.number().int().positive().default(DEFAULT_PROXY_TIMEOUT_MS),
  PROXY_MAX_RETRY_AFTER_SECONDS: z.coerce.number().int().positive().default(DEFAULT_PROXY_MAX_RETRY_AFTER_SECONDS),
});

const EnvSchema = EnvFields.superRefine((config, context) => {
  if (!config.OAUTH_ALLOW_INSECURE_HTTP) {
    for (const name of PROVIDER_URLS) {
      if (config[name].startsWith("http:")) {
        context.addIssue({
          code: "custom",
          path: [name],
          message: "must be https (plain http only with OAUTH_ALLOW_INSECURE_HTTP=true, for a local server)",
        });
      }
    }
    if (Object.values(config.BUSINESS_PROFILE_API_BASE_URLS).some((url) => url.startsWith("http:"))) {
      context.addIssue({
        code: "custom",
        path: ["BUSINESS_PROFILE_API_BASE_URLS"],
        message: "must be https (plain http only with OAUTH_ALLOW_INSECURE_HTTP=true, for a local server)",
      });
    }
  }
  config.PROXY_BASE_URLS.forEach((url, index) => {
    const problem = baseUrlProblem(url, config.OAUTH_ALLOW_INSECURE_HTTP);
    if (problem)
      context.addIssue({ code: "custom", path: ["PROXY_BASE_URLS"], message: `URL ${index + 1} ${problem}` });
  });
  // A key in both lists would make every service caller an admin.
  if (config.ADMIN_API_KEY.some((key) => config.SERVICE_API_KEY.includes(key))) {
    context.addIssue({
      code: "custom",
      path: ["SERVICE_API_KEY"],
      message: "repeats a key of ADMIN_API_KEY: each key must have one role",
    });
  }
  if ((config.CF_ACCESS_TEAM_DOMAIN === undefined) !== (config.CF_ACCESS_AUD === undefined)) {
    context.addIssue({
      code: "custom",
      path: [config.CF_ACCESS_AUD === undefined ? "CF_ACCESS_AUD" : "CF_ACCESS_TEAM_DOMAIN"],
      message: "is required when the other CF_ACCESS_* binding is set (Cloudflare Access needs both)",
    });
  }
  if (config.CF_ACCESS_CERTS_URL !== undefined) {
    const team = config.CF_ACCESS_TEAM_DOMAIN;
    const certs = new URL(config.CF_ACCESS_CERTS_URL);
    const onTeamOrigin = team !== undefined && certs.origin === accessTeamOrigin(team);
    if (!onTeamOrigin && !(team !== undefined && isLoopback(certs.hostname))) {
      context.addIssue({
        code: "custom",
        path: ["CF_ACCESS_CERTS_URL"],
        message:
          "must be on the origin of CF_ACCESS_TEAM_DOMAIN (https://<team>.cloudflareaccess.com); leave it unset for the team's own certs URL (another origin only on a loopback host, for a local stand-in)",
      });
    }
  }
  if (config.WEBHOOK_URL === undefined) return;
  if (config.WEBHOOK_SECRET === undefined) {
    context.addIssue({ code: "custom", path: ["WEBHOOK_SECRET"], message: "is required when WEBHOOK_URL is set" });
  }
  const url = new URL(config.WEBHOOK_URL);
  if (url.protocol === "http:" && !(config.OAUTH_ALLOW_INSECURE_HTTP && isLoopback(url.hostname))) {
    context.addIssue({
      code: "custom",
      path: ["WEBHOOK_URL"],
      message:
        "must be an https URL (http only for localhost or 127.0.0.1 in local development, with OAUTH_ALLOW_INSECURE_HTTP=true)",
    });
  }
});

export type Config = z.infer<typeof EnvSchema>;

const parsed = new WeakMap<object, Config>();

export function parseEnv(env: object): Config {
  const cached = parsed.get(env);
  if (cached) return cached;
  const config = parseWith(EnvSchema, env, "The Worker is misconfigured.");
  parsed.set(env, config);
  return config;
}

/** What `npm run db:reseal` needs (the database and the keys), checked by the Worker's own rules. */
const ResealSchema = EnvFields.pick({
  TOKEN_MANAGEMENT_DATABASE_URL: true,
  NEON_LOCAL_FETCH_ENDPOINT: true,
  TOKEN_ENCRYPTION_KEY: true,
  TOKEN_ENCRYPTION_PREVIOUS_KEYS: true,
});

export type ResealConfig = z.infer<typeof ResealSchema>;

export function parseResealEnv(env: object): ResealConfig {
  return parseWith(ResealSchema, env, "The configuration is incomplete.");
}

function parseWith<T extends z.ZodType>(schema: T, env: object, summary: string): z.infer<T> {
  const result = schema.safeParse(stringBindings(env));
  if (!result.success) {
    const problems = result.error.issues.map((issue) => `${issue.path.join(".")}: ${issue.message}`);
    throw new AppError("configuration_error", `${summary} ${problems.join("; ")}.`);
  }
  return result.data;
}

/** Only string bindings are configuration; `""` counts as unset so an empty var falls back to its default. */
function stringBindings(env: object): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [name, value] of Object.entries(env)) {
    if (typeof value === "string" && value !== "") out[name] = value;
  }
  return out;
}

/**
 * The API keys alone, each list by the Worker's own rules, for authenticating a caller while the
 * rest of the configuration is broken. A list that does not parse authenticates nobody.
 */
export function parseApiKeys(env: object): { admin: string[]; service: string[] } {
  const bindings = stringBindings(env);
  const parse = (name: "ADMIN_API_KEY" | "SERVICE_API_KEY") => {
    const result = apiKeys.safeParse(bindings[name]);
    return result.success ? result.data : [];
  };
  return { admin: parse("ADMIN_API_KEY"), service: parse("SERVICE_API_KEY") };
}

/** The https origin of a Cloudflare Access team domain (`myteam.cloudflareaccess.com` or its URL). */
export function accessTeamOrigin(teamDomain: string): string {
  const trimmed = teamDomain.trim().replace(/\/+$/, "");
  return new URL(/^https?:\/\//.test(trimmed) ? trimmed : `https://${trimmed}`).origin;
}

/** 127.0.0.0/8, ::1 and localhost, as the URL parser normalises them. */
export function isLoopback(hostname: string): boolean {
  return hostname === "localhost" || hostname === "[::1]" || /^127(\.\d{1,3}){3}$/.test(hostname);
}

function decodedLength(value: string): number {
  try {
    return atob(value.trim()).length;
  } catch {
    return -1;
  }
}
