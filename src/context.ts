import type { Context } from "hono";
import { createDb, type Db, useDatabaseEndpoint } from "./db/client";
import { type Config, parseEnv } from "./env";
import { type Keyring, loadKeyring } from "./lib/crypto";
import { type Metrics, metricsOf } from "./lib/metrics";
import { type Providers, providersOf } from "./oauth/profiles";
import { type EventContext, eventContext } from "./services/events";
import type { Operator } from "./services/operations";

/** What every invocation works with: requests, cron runs and queue batches build it the same way. */
export interface Services {
  config: Config;
  db: Db;
  keyring: Keyring;
  /** The provider of each app (src/oauth/profiles.ts). */
  providers: Providers;
  /** Whether state changes queue their events for delivery, and whether one ran (see events.ts). */
  events: EventContext;
  /** Data points to the METRICS dataset; a no-op without the binding (src/lib/metrics.ts). */
  metrics: Metrics;
}

/** What an invocation's services share with every other invocation on the same environment. */
type Shared = Omit<Services, "events">;
const sharedByEnv = new WeakMap<Env, Promise<Shared>>();

/**
 * This invocation's services. What depends only on the environment (parsed configuration, database
 * handle, keyring, providers, metrics) is built once per env object and isolate: neon-http holds no
 * connection and none of it holds request state. Only the event context is per invocation.
 */
export async function createServices(env: Env): Promise<Services> {
  let shared = sharedByEnv.get(env);
  if (!shared) {
    shared = buildShared(env);
    sharedByEnv.set(env, shared);
    // A broken configuration is reported again to the next invocation, not cached.
    shared.catch(() => sharedByEnv.delete(env));
  }
  const services = await shared;
  // The driver reads its endpoint from a global at query time: set it for this invocation's env.
  useDatabaseEndpoint(services.config.NEON_LOCAL_FETCH_ENDPOINT);
  return { ...services, events: eventContext(services.config.WEBHOOK_URL !== undefined) };
}

async function buildShared(env: Env): Promise<Shared> {
  const config = parseEnv(env);
  return {
    config,
    db: createDb({
      databaseUrl: config.TOKEN_MANAGEMENT_DATABASE_URL,
      localFetchEndpoint: config.NEON_LOCAL_FETCH_ENDPOINT,
    }),
    keyring: await loadKeyring(config.TOKEN_ENCRYPTION_KEY, config.TOKEN_ENCRYPTION_PREVIOUS_KEYS, {
      acceptV1: config.TOKEN_ENCRYPTION_ACCEPT_V1,
    }),
    providers: providersOf(config),
    // Optional binding: absent in the tests and wherever wrangler.toml leaves it out.
    metrics: metricsOf(env.METRICS as AnalyticsEngineDataset | undefined),
  };
}

export interface AppEnv {
  Bindings: Env;
  Variables: Services & {
    requestId: string;
    /** Absolute URL of the API root, for links we hand out. */
    baseUrl: string;
  };
}

export type AppContext = Context<AppEnv>;

/** The request's services as src/services/operations.ts takes them. */
export function operatorOf(c: AppContext): Operator {
  // c.get, not c.var: Hono builds c.var as a new object on every access.
  const services: Services = {
    config: c.get("config"),
    db: c.get("db"),
    keyring: c.get("keyring"),
    providers: c.get("providers"),
    events: c.get("events"),
    metrics: c.get("metrics"),
  };
  return operatorFrom(services, c.get("baseUrl"), (task) => c.executionCtx.waitUntil(task));
}

/** An invocation's services as an Operator: links rooted at baseUrl, background work to defer. */
export function operatorFrom(services: Services, baseUrl: string, defer: Operator["defer"]): Operator {
  return { ...services, baseUrl, defer };
}
