// `npm run dev:webhooks`: the local webhook receiver on the port of WEBHOOK_URL in .dev.vars
// (default 4446), verifying every delivery with WEBHOOK_SECRET and WEBHOOK_PREVIOUS_SECRETS and
// printing each verified event. A delivery that does not verify is answered 401 and reported.
import { existsSync } from "node:fs";
import { readDevVars } from "../../scripts/migrate.ts";
import { startWebhookReceiver } from "./server.ts";

const DEFAULT_PORT = 4446;
const vars = existsSync(".dev.vars") ? readDevVars(".dev.vars") : {};
const secrets = [vars.WEBHOOK_SECRET, ...(vars.WEBHOOK_PREVIOUS_SECRETS ?? "").split(/\s+/)].filter(
  (secret): secret is string => Boolean(secret),
);
if (secrets.length === 0) {
  console.error("[webhooks] no WEBHOOK_SECRET in .dev.vars: run `npm run dev` once to create it, or set it by hand.");
  process.exit(1);
}
const configured = vars.WEBHOOK_URL ? new URL(vars.WEBHOOK_URL) : undefined;
const port = Number(process.env.WEBHOOK_RECEIVER_PORT ?? (configured?.port || DEFAULT_PORT));

const receiver = await startWebhookReceiver({
  port,
  secrets,
  onVerified: (_inbox, delivery) => {
    const { type, data } = delivery.payload as { type: string; data: Record<string, unknown> };
    const login = data.login_url ? `\n    login link: ${String(data.login_url)}` : "";
    console.log(
      `[webhooks] ${delivery.id} ${type} branch=${String(data.branch_id)} #${String(data.sequence)} ` +
        `${String(data.status_before)} -> ${String(data.status_after)}` +
        `${data.reason ? ` (${String(data.reason)})` : ""}${login}`,
    );
  },
});
console.log(
  `[webhooks] receiver listening on ${receiver.url}/hooks/<any name>, verifying with ${secrets.length} secret(s)`,
);
if (!configured) console.log("[webhooks] WEBHOOK_URL is not set in .dev.vars: the Worker only logs events");

for (const signal of ["SIGINT", "SIGTERM"] as const) {
  process.on(signal, () => {
    void receiver.close().then(() => process.exit(0));
  });
}
