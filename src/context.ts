import type { Context } from "hono";
import type { Db } from "./db/client";
import type { Config } from "./env";
import type { Keyring } from "./lib/crypto";
import type { Provider } from "./oauth/provider";

export interface AppEnv {
  Bindings: Env;
  Variables: {
    requestId: string;
    config: Config;
    db: Db;
    keyring: Keyring;
    provider: Provider;
    /** Absolute URL of the API root, for links we hand out. */
    baseUrl: string;
  };
}

export type AppContext = Context<AppEnv>;
