/**
 * `npm run bench` (third part; alone: `npm run bench:events`): connection events. See BENCHMARKS.md.
 *
 * 1. Events written per refresh, by the real Worker (workerd through Miniflare) against the local
 *    database and authorization server: BENCH_EVENTS_PLAIN forced refreshes of one branch that all
 *    succeed (expected: 0 events), then BENCH_EVENTS_FAILURES refreshes that all fail with a 503
 *    (expected: 1, `degraded` at the 3rd), one success (1, `recovered`) and one `invalid_grant`
 *    (1, `needs_reauth`); with the SQL round trips per refresh (neon-local's counter).
 * 2. The delivery of 1,000 pending events by one cron run to the local webhook receiver
 *    (dev/webhook-receiver, which verifies every request with the `standardwebhooks` package):
 *    wall time, receiver requests per event, SQL round trips. The floor, measured in the same run:
 *    1,000 POSTs signed with the same secret (by `standardwebhooks`), sent from this process to the
 *    same receiver at the Worker's delivery concurrency. No assertion on time: figures and ratios.
 *
 * Knobs: BENCH_EVENTS_PLAIN (200), BENCH_EVENTS_FAILURES (1000), BENCH_EVENTS_DELIVERY (1000),
 * BENCH_EVENTS_ROUNDS (3).
 */
import { mkdtempSync, rmSync } from "node:fs";
import { cpus, tmpdir } from "node:os";
import { join } from "node:path";
import { Webhook } from "standardwebhooks";
import * as stack from "../dev/local-stack.ts";
import type { OAuthServer } from "../dev/oauth-server/server.ts";
import { startWebhookReceiver, type WebhookReceiver } from "../dev/webhook-receiver/server.ts";
import { MAX_OUTBOUND_CONNECTIONS } from "../src/lib/concurrency.ts";
import { DEGRADED_AFTER_FAILURES } from "../src/services/events.ts";
import { DELIVERY_MAX_PER_RUN } from "../src/services/webhooks.ts";

const RESULTS = stack.resultsPath(process.env.BENCH_EVENTS_RESULTS ?? "bench/events-results.json");
const PLAIN = stack.benchKnob("BENCH_EVENTS_PLAIN", 200, 5);
const FAILURES = stack.benchKnob("BENCH_EVENTS_FAILURES", 1000, 5);
const DELIVERY = Math.min(stack.benchKnob("BENCH_EVENTS_DELIVERY", 1000, 20), DELIVERY_MAX_PER_RUN);
const ROUNDS = stack.benchKnob("BENCH_EVENTS_ROUNDS", 3, 1);
/** A fixed test secret (base64 of 32 bytes); nothing real is protected by it. */
const SECRET = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD6MYsfm1IOmw=";

const log = (message: string) => console.log(`[bench:events] ${message}`);
const round = (value: number, digits = 2) => Math.round(value * 10 ** digits) / 10 ** digits;
const median = (values: number[]) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]!;

async function dbRequests(db: stack.LocalDatabase): Promise<number> {
  return ((await (await fetch(`${db.url}/stats`)).json()) as { requests: number }).requests;
}

async function countEvents(db: stack.LocalDatabase): Promise<Record<string, number>> {
  const rows = await stack.sql(db, "select type, count(*) from events group by type");
  return Object.fromEntries(rows.map(([type, n]) => [type!, Number(n)]));
}

const total = (counts: Record<string, number>) => Object.values(counts).reduce((s, n) => s + n, 0);

function difference(after: Record<string, number>, before: Record<string, number>): Record<string, number> {
  const out: Record<string, number> = {};
  for (const [type, n] of Object.entries(after)) if (n !== (before[type] ?? 0)) out[type] = n - (before[type] ?? 0);
  return out;
}

async function setBehavior(oauth: OAuthServer, clientId: string, behavior: Record<string, unknown>): Promise<void> {
  const response = await fetch(`${oauth.url}/admin/clients/${encodeURIComponent(clientId)}/behavior`, {
    method: "PUT",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(behavior),
  });
  if (!response.ok) throw new Error(`provider behaviour: ${response.status} ${await response.text()}`);
}

async function inboxSize(receiver: WebhookReceiver, inbox: string): Promise<{ received: number; verified: number }> {
  const { deliveries } = (await (await fetch(`${receiver.url}/admin/inboxes/${inbox}`)).json()) as {
    deliveries: { verifiedWith: number[]; answered: number }[];
  };
  return {
    received: deliveries.length,
    verified: deliveries.filter((d) => d.verifiedWith.length > 0 && d.answered === 204).length,
  };
}

interface Sequence {
  refreshes: number;
  statuses: Record<string, number>;
  events: Record<string, number>;
  eventsPerRefresh: number;
  sqlRoundTripsPerRefresh: number;
  wallMs: number;
}

async function main(): Promise<void> {
  const t0 = performance.now();
  const outdir = mkdtempSync(join(tmpdir(), "bench-events-"));
  let backends: stack.Backends | undefined;
  let receiver: WebhookReceiver | undefined;
  let worker: stack.RunningWorker | undefined;
  try {
    backends = await stack.startBackends();
    const { db, oauth, adminKey } = backends;
    receiver = await startWebhookReceiver({ secrets: [SECRET] });
    const bundle = await stack.bundleWorker(outdir);
    worker = await stack.startWorker({
      name: "bench-events",
      bundle,
      bindings: {
        ...backends.bindings,
        WEBHOOK_URL: `${receiver.url}/hooks/worker`,
        WEBHOOK_SECRET: SECRET,
      },
    });
    const api = `${worker.url}${stack.BASE_PATH}`;
    const client = {
      client_id: "bench-events-client",
      client_secret: "bench-events-secret-0123456789",
      branch_id: "bench-events-branch",
      workspace_email: "bench@example.com",
      workspace_name: "Bench",
    };
    await stack.connectBranch(worker.url, oauth, adminKey, client);
    log(`stack up: worker ${worker.url}, receiver ${receiver.url}`);

    const refresh = async (): Promise<number> => {
      const response = await fetch(`${api}/tokens/refresh`, {
        method: "POST",
        headers: { authorization: `Bearer ${adminKey}`, "content-type": "application/json" },
        body: JSON.stringify({ branch_id: client.branch_id }),
      });
      await response.arrayBuffer();
      return response.status;
    };
    const sequence = async (name: string, refreshes: number): Promise<Sequence> => {
      const before = await countEvents(db);
      const trips = await dbRequests(db);
      const statuses: Record<string, number> = {};
      const started = performance.now();
      for (let i = 0; i < refreshes; i++) {
        const status = await refresh();
        statuses[status] = (statuses[status] ?? 0) + 1;
      }
      const wallMs = performance.now() - started;
      const sqlRoundTrips = (await dbRequests(db)) - trips;
      const events = difference(await countEvents(db), before);
      const result = {
        refreshes,
        statuses,
        events,
        eventsPerRefresh: round(total(events) / refreshes, 4),
        sqlRoundTripsPerRefresh: round(sqlRoundTrips / refreshes, 2),
        wallMs: round(wallMs, 0),
      };
      log(`${name}: ${JSON.stringify(result)}`);
      return result;
    };

    // 1. Events per refresh. (The SQL counter also sees each first delivery attempt, in waitUntil.)
    const plain = await sequence("plain refreshes", PLAIN);
    await setBehavior(oauth, client.client_id, { failNext: { status: 503, count: FAILURES } });
    const failing = await sequence("failed refreshes (503)", FAILURES);
    const recovery = await sequence("one successful refresh", 1);
    await setBehavior(oauth, client.client_id, { failNext: { status: 400, error: "invalid_grant", count: 1 } });
    const dead = await sequence("one invalid_grant", 1);
    const perRefresh = { plain, failing, recovery, dead };
    const expected =
      total(plain.events) === 0 &&
      total(failing.events) === 1 &&
      failing.events["connection.degraded"] === 1 &&
      recovery.events["connection.recovered"] === 1 &&
      dead.events["connection.needs_reauth"] === 1;
    if (!expected) throw new Error(`unexpected events per refresh: ${JSON.stringify(perRefresh)}`);

    // 2. Delivery of DELIVERY pending events by one cron run, against the floor.
    const [[clientRowId]] = (await stack.sql(db, "select id from clients where branch_id = $1", [
      client.branch_id,
    ])) as [[string]];
    const cron = await worker.mf.getWorker();
    const signer = new Webhook(SECRET);
    const rounds: { workerMs: number; floorMs: number; requestsPerEvent: number; sqlRoundTrips: number }[] = [];
    for (let r = 1; r <= ROUNDS; r++) {
      const pending = await stack.sql(
        db,
        `insert into events (type, client_id, branch_id, seq, status_before, status_after, reason, created_at,
           delivery_state, next_attempt_at)
         select case when g % 2 = 0 then 'connection.degraded' else 'connection.recovered' end, $1, $2, 1000000 * $3 + g,
           case when g % 2 = 0 then 'connected' else 'degraded' end,
           case when g % 2 = 0 then 'degraded' else 'connected' end,
           'bench', now(), 'pending', now() - interval '1 second'
         from generate_series(1, $4) g returning id`,
        [clientRowId, client.branch_id, r, DELIVERY],
      );
      const sample = (
        await stack.sql(db, "select row_to_json(e)::text from events e where id = $1", [pending[0]![0]])
      )[0]![0]!;
      const inboxBefore = await inboxSize(receiver, "worker");
      const trips = await dbRequests(db);
      const started = performance.now();
      const outcome = await cron.scheduled({ scheduledTime: new Date() });
      const workerMs = performance.now() - started;
      const sqlRoundTrips = (await dbRequests(db)) - trips;
      const inboxAfter = await inboxSize(receiver, "worker");
      const [[delivered]] = (await stack.sql(
        db,
        "select count(*) from events where id = any($1::bigint[]) and delivery_state = 'delivered'",
        [`{${pending.map(([id]) => id).join(",")}}`],
      )) as [[string]];
      if (outcome.outcome !== "ok" || Number(delivered) !== DELIVERY) {
        throw new Error(`cron run ${outcome.outcome}: ${delivered}/${DELIVERY} delivered`);
      }
      const received = inboxAfter.received - inboxBefore.received;
      const verified = inboxAfter.verified - inboxBefore.verified;
      if (verified !== DELIVERY) throw new Error(`the receiver verified ${verified} of ${received} requests`);

      // The floor: the same number of signed POSTs of a payload of the same size, same receiver.
      const body = JSON.stringify({ type: "connection.degraded", timestamp: new Date().toISOString(), data: sample });
      let next = 0;
      const floorStarted = performance.now();
      await Promise.all(
        Array.from({ length: MAX_OUTBOUND_CONNECTIONS }, async () => {
          for (let i = next++; i < DELIVERY; i = next++) {
            const id = `floor_${r}_${i}`;
            const response = await fetch(`${receiver!.url}/hooks/floor`, {
              method: "POST",
              headers: {
                "content-type": "application/json",
                "webhook-id": id,
                "webhook-timestamp": String(Math.floor(Date.now() / 1000)),
                "webhook-signature": signer.sign(id, new Date(), body),
              },
              body,
            });
            await response.arrayBuffer();
            if (response.status !== 204) throw new Error(`floor POST answered ${response.status}`);
          }
        }),
      );
      const floorMs = performance.now() - floorStarted;
      rounds.push({ workerMs, floorMs, requestsPerEvent: received / DELIVERY, sqlRoundTrips });
      log(
        `delivery round ${r}/${ROUNDS}: ${DELIVERY} events in ${round(workerMs, 0)} ms (${round(received / DELIVERY, 3)} requests/event, ${sqlRoundTrips} SQL round trips); floor ${round(floorMs, 0)} ms; ratio ${round(workerMs / floorMs)}`,
      );
    }
    const workerMs = median(rounds.map((x) => x.workerMs));
    const floorMs = median(rounds.map((x) => x.floorMs));
    const report = {
      machine: { cpus: cpus().length, node: process.version },
      degradedAfterFailures: DEGRADED_AFTER_FAILURES,
      eventsPerRefresh: perRefresh,
      delivery: {
        events: DELIVERY,
        concurrency: MAX_OUTBOUND_CONNECTIONS,
        rounds: rounds.map((x) => ({
          workerMs: round(x.workerMs, 0),
          floorMs: round(x.floorMs, 0),
          requestsPerEvent: round(x.requestsPerEvent, 3),
          sqlRoundTrips: x.sqlRoundTrips,
        })),
        medianWorkerMs: round(workerMs, 0),
        medianFloorMs: round(floorMs, 0),
        eventsPerSecond: round((DELIVERY / workerMs) * 1000, 0),
        ratioToFloor: round(workerMs / floorMs),
      },
      benchWallSeconds: round((performance.now() - t0) / 1000, 1),
    };
    stack.writeResults(RESULTS, report);
    console.table({
      "plain refreshes": {
        refreshes: PLAIN,
        events: total(plain.events),
        sqlPerRefresh: plain.sqlRoundTripsPerRefresh,
      },
      "failed (503)": {
        refreshes: FAILURES,
        events: total(failing.events),
        sqlPerRefresh: failing.sqlRoundTripsPerRefresh,
      },
      "success after": {
        refreshes: 1,
        events: total(recovery.events),
        sqlPerRefresh: recovery.sqlRoundTripsPerRefresh,
      },
      invalid_grant: { refreshes: 1, events: total(dead.events), sqlPerRefresh: dead.sqlRoundTripsPerRefresh },
    });
    log(
      `delivery of ${DELIVERY}: median ${report.delivery.medianWorkerMs} ms (${report.delivery.eventsPerSecond} events/s), floor ${report.delivery.medianFloorMs} ms, ratio ${report.delivery.ratioToFloor}`,
    );
    log(`wrote ${RESULTS} (${report.benchWallSeconds} s)`);
  } finally {
    await worker?.mf.dispose().catch(() => undefined);
    await receiver?.close().catch(() => undefined);
    await backends?.stop();
    rmSync(outdir, { recursive: true, force: true });
  }
}

await main();
