import type { Context } from "hono";
import { createDb, type Db } from "./db/client";
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

/** Parses the environment (once per env object) and builds this invocation's services. */
export async function createServices(env: Env): Promise<Services> {
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
    events: eventContext(config.WEBHOOK_URL !== undefined),
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
  const { config, db, keyring, providers, events, metrics, baseUrl } = c.var;
  return {
    config,
    db,
    keyring,
    providers,
    events,
    metrics,
    baseUrl,
    defer: (task) => c.executionCtx.waitUntil(task),
  };
}
