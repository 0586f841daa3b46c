import type { Context } from "hono";
import type { Db } from "./db/client";
import type { Config } from "./env";

export interface AppEnv {
  Bindings: Env;
  Variables: {
    requestId: string;
    config: Config;
    db: Db;
  };
}

export type AppContext = Context<AppEnv>;
