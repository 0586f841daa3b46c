import { createApp, handleError } from "./app";
import { runScheduledRefresh } from "./services/scheduled";

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
  async scheduled(controller, env, ctx) {
    await runScheduledRefresh(env, new Date(controller.scheduledTime), ctx);
  },
} satisfies ExportedHandler<Env>;
