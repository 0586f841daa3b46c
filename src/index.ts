import { createApp, handleError } from "./app";
import { describeError, logError } from "./lib/log";
import { consumeRefreshBatch, type RefreshMessage, runScheduledRefresh, type SchedulerEnv } from "./services/scheduled";

const app = createApp();

export default {
  async fetch(request, env, ctx) {
    try {
      return await app.fetch(request, env, ctx);
    } catch (error) {
      // Only reached when Hono itself fails outside a route (its onError handles the rest).
      return handleError(error, undefined);
    }
  },
  async scheduled(controller, env) {
    try {
      await runScheduledRefresh(env, new Date(controller.scheduledTime));
    } catch (error) {
      // One structured line, then rethrow so the invocation is recorded as failed.
      logError("scheduled_refresh_failed", { error: describeError(error) });
      throw error;
    }
  },
  async queue(batch, env) {
    await consumeRefreshBatch(env, batch, new Date());
  },
} satisfies ExportedHandler<SchedulerEnv, RefreshMessage>;
