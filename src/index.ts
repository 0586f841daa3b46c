import { createApp, fastTokenRead, handleError } from "./app";
import { createServices } from "./context";
import { describeError, logError } from "./lib/log";
import { consumeRefreshBatch, type RefreshMessage, runScheduledRefresh, type SchedulerEnv } from "./services/scheduled";
import { deliverPending, runScheduledEvents } from "./services/webhooks";

// The Durable Object classes this Worker defines (wrangler.toml [[durable_objects.bindings]]).
export { ProxyQuota } from "./proxy/quota";

const app = createApp();

export default {
  async fetch(request, env, ctx) {
    try {
      // The warm token read when it is plainly one (src/app.ts); everything else goes through the app.
      return (await fastTokenRead(request, env, ctx)) ?? (await app.fetch(request, env, ctx));
    } catch (error) {
      // Only reached when Hono itself, or fastTokenRead before its own error handling, fails outside
      // a route (Hono's onError and fastTokenRead's handleError answer the rest).
      return handleError(error, undefined);
    }
  },
  async scheduled(controller, env) {
    const now = new Date(controller.scheduledTime);
    let failure: unknown;
    try {
      await runScheduledRefresh(env, now);
    } catch (error) {
      failure = error;
      logError("scheduled_refresh_failed", { error: describeError(error) });
    }
    // Then webhooks (the refreshes may have written events), even when refreshing failed.
    try {
      await runScheduledEvents(await createServices(env), now);
    } catch (error) {
      failure ??= error;
      logError("scheduled_events_failed", { error: describeError(error) });
    }
    // Rethrow so the invocation is recorded as failed.
    if (failure !== undefined) throw failure;
  },
  async queue(batch, env) {
    await consumeRefreshBatch(env, batch, new Date());
    // Events the batch's refreshes wrote get their first attempt now rather than at the next cron run.
    await deliverPending(await createServices(env), new Date());
  },
} satisfies ExportedHandler<SchedulerEnv, RefreshMessage>;
