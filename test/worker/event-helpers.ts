import { createServices } from "../../src/context";
import { runScheduledEvents } from "../../src/services/webhooks";
import type { CallOptions, TestEnv } from "./helpers";
import { testEnv, uniqueId } from "./helpers";
import { sql } from "./oauth-helpers";

/**
 * Helpers for the tests of events and webhooks: the events table as stored, and inboxes at the
 * local webhook receiver (dev/webhook-receiver), which verifies every delivery with the
 * `standardwebhooks` package.
 */

export interface RawEvent {
  id: number;
  type: string;
  client_id: number;
  branch_id: string;
  seq: number;
  status_before: string;
  status_after: string;
  reason: string | null;
  created_at: string;
  delivery_state: string;
  attempts: number;
  next_attempt_at: string | null;
  last_attempt_at: string | null;
  last_error: string | null;
  delivered_at: string | null;
}

/** The client's events, oldest first, exactly as stored. */
export async function eventsOf(clientId: number): Promise<RawEvent[]> {
  const rows = await sql("select row_to_json(e)::text from events e where client_id = $1 order by id", [clientId]);
  return rows.map(([value]) => JSON.parse(value as string) as RawEvent);
}

export async function eventById(id: number): Promise<RawEvent | undefined> {
  const rows = await sql("select row_to_json(e)::text from events e where id = $1", [id]);
  return rows[0] ? (JSON.parse(rows[0][0] as string) as RawEvent) : undefined;
}

/** As if the retry ladder's wait had elapsed: the event is due now. */
export async function makeDue(eventIds: number[]): Promise<void> {
  await sql("update events set next_attempt_at = now() - interval '1 second' where id = any($1::bigint[])", [
    `{${eventIds.join(",")}}`,
  ]);
}

/** base64 of 32 bytes: fixed test secrets (nothing real is protected by them). */
export const TEST_WEBHOOK_SECRET = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD6MYsfm1IOmw=";
export const TEST_WEBHOOK_OLD_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
export const UNRELATED_WEBHOOK_SECRET = "whsec_Zm9vYmFyYmF6cXV4Zm9vYmFyYmF6cXV4MTIzNDU2Nzg=";

export interface ReceivedDelivery {
  id: string | null;
  timestamp: string | null;
  verifiedWith: number[];
  answered: number;
  payload: {
    type: string;
    timestamp: string;
    data: Record<string, unknown> & { event_id: string; branch_id: string; sequence: number };
  };
}

export interface Inbox {
  name: string;
  url: string;
  set(mode: "ok" | "fail" | "hang" | "gone" | "flood", extra?: { status?: number; secrets?: string[] }): Promise<void>;
  deliveries(): Promise<ReceivedDelivery[]>;
}

/** A fresh inbox at the receiver, verifying with `secrets` (the current test secret by default). */
export async function newInbox(secrets: string[] = [TEST_WEBHOOK_SECRET]): Promise<Inbox> {
  const name = uniqueId("inbox");
  const admin = `${testEnv.WEBHOOK_RECEIVER_URL}/admin/inboxes/${name}`;
  const inbox: Inbox = {
    name,
    url: `${testEnv.WEBHOOK_RECEIVER_URL}/hooks/${name}`,
    async set(mode, extra = {}) {
      const response = await fetch(admin, {
        method: "PUT",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ mode, ...extra }),
      });
      if (!response.ok) throw new Error(`setting the inbox failed: ${await response.text()}`);
    },
    async deliveries() {
      const response = await fetch(admin);
      return ((await response.json()) as { deliveries: ReceivedDelivery[] }).deliveries;
    },
  };
  await inbox.set("ok", { secrets });
  return inbox;
}

/** Bindings that send events to `url` (a short attempt timeout so a hanging receiver costs little). */
export function webhookBindings(url: string, extra: Partial<Record<keyof TestEnv, string>> = {}) {
  return {
    WEBHOOK_URL: url,
    WEBHOOK_SECRET: TEST_WEBHOOK_SECRET,
    WEBHOOK_TIMEOUT_MS: "1000",
    ...extra,
  } satisfies CallOptions["envOverrides"];
}

/** The cron's event duties (retries due deliveries, prunes) with these bindings, at the real time. */
export async function runEventCron(overrides: CallOptions["envOverrides"] = {}) {
  const services = await createServices({ ...testEnv, ...overrides } as TestEnv);
  return runScheduledEvents(services, new Date());
}

/** Scoped fault injection at the local database (dev/neon-local): statements matching every string of `match` (in their SQL or a parameter; `=v`: a parameter equal to v) answer 503 until "ok". */
export async function neonFault(body: { mode: "down"; match: string[] } | { mode: "ok" }): Promise<void> {
  if (body.mode === "ok") {
    for (const id of ownFaults) await postFault({ mode: "ok", id });
    ownFaults.clear();
    return;
  }
  const { id } = (await postFault(body)) as { id: number };
  ownFaults.add(id);
}

/**
 * The scoped faults this test file set: "ok" clears only these, never another file's (the files
 * share one neon-local server, and each runs in an isolate of its own, with its own module state).
 */
const ownFaults = new Set<number>();

async function postFault(body: unknown): Promise<unknown> {
  const response = await fetch(`${testEnv.NEON_LOCAL_URL}/admin/fail`, { method: "POST", body: JSON.stringify(body) });
  if (!response.ok) throw new Error(`neon-local fault: ${await response.text()}`);
  return response.json();
}

/** Waits until the client's current token is leased, and returns the lease owner (a refresher in flight). */
export async function leaseTaken(clientId: number): Promise<string> {
  const deadline = Date.now() + 10_000;
  for (;;) {
    const [row] = await sql("select lease_owner from tokens where client_id = $1 and is_valid", [clientId]);
    if (row?.[0]) return row[0];
    if (Date.now() > deadline) throw new Error("the token was never leased");
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** Moves the client's current token to expire `seconds` from the database's now (negative: expired). */
export async function expireIn(clientId: number, seconds: number): Promise<void> {
  await sql("update tokens set expires_at = now() + make_interval(secs => $2) where client_id = $1 and is_valid", [
    clientId,
    seconds,
  ]);
}
