import { parseEnv } from "../env";
import { logInfo } from "../lib/log";

/** The Cron Trigger's work: refresh what expires soon. Filled in by the token refresh work. */
export async function runScheduledRefresh(env: Env, now: Date, _ctx: ExecutionContext): Promise<{ due: number }> {
  parseEnv(env);
  const summary = { due: 0 };
  logInfo("scheduled_refresh", { ...summary, now: now.toISOString() });
  return summary;
}
