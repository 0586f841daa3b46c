import { createApp, handleError } from "./app";
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
    await runScheduledRefresh(env, new Date(controller.scheduledTime));
  },
  async queue(batch, env) {
    await consumeRefreshBatch(env, batch, new Date());
  },
} satisfies ExportedHandler<SchedulerEnv, RefreshMessage>;
