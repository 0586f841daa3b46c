import { DurableObject } from "cloudflare:workers";
import { type QuotaAnswer, type QuotaAsk, QuotaLedger } from "./ledger";

const PAUSED_UNTIL_KEY = "pausedUntilMs";

/**
 * One per app (named by its app key): the app's budgets at its provider, for every branch and every
 * Cloudflare location at once. The windows live in memory: an object evicted after a quiet minute
 * has nothing left to count. A pause (the provider's 429) is also stored, so a restart within it
 * still honours it.
 */
export class ProxyQuota extends DurableObject<Env> {
  private readonly ledger = new QuotaLedger();

  constructor(ctx: DurableObjectState, env: Env) {
    super(ctx, env);
    void ctx.blockConcurrencyWhile(async () => {
      const pausedUntil = await ctx.storage.get<number>(PAUSED_UNTIL_KEY);
      if (pausedUntil !== undefined) this.ledger.pause(pausedUntil);
    });
  }

  /** Counts one upstream request, or says why not and for how long. */
  take(ask: QuotaAsk): QuotaAnswer {
    return this.ledger.take(ask, Date.now());
  }

  /** The provider answered 429: nothing is let through before `untilMs`. */
  async pause(untilMs: number): Promise<void> {
    if (this.ledger.pause(untilMs)) await this.ctx.storage.put(PAUSED_UNTIL_KEY, untilMs);
  }
}
