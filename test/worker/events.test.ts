import { describe, expect, it } from "vitest";
import { eventsOf, type RawEvent } from "./event-helpers";
import { call, expectProblem, json } from "./helpers";
import { clientRow, connectBranch, postJson, registerBranch } from "./oauth-helpers";

/**
 * The event log: which changes write an event (exactly one per transition, none otherwise), that
 * an event exists if and only if its change committed, and GET /events. No WEBHOOK_URL here, so
 * events are logged as not_sent; delivery is tested in webhooks.test.ts.
 */

interface EventView {
  id: number;
  webhook_id: string;
  type: string;
  client_id: number;
  branch_id: string;
  sequence: number;
  status_before: string;
  status_after: string;
  reason: string | null;
  delivery: { state: string; attempts: number };
}

interface EventPage {
  events: EventView[];
  next_cursor: number | null;
}

const patch = (clientId: number, body: unknown) => postJson(`/clients/${clientId}`, body, { method: "PATCH" });
const types = (events: RawEvent[]) => events.map((event) => event.type);

describe("client events", () => {
  it("PATCH is_active=false writes one client.deactivated; repeating it writes none; true writes client.reactivated", async () => {
    const branch = await registerBranch();
    expect((await patch(branch.clientId, { is_active: false })).status).toBe(200);
    expect((await patch(branch.clientId, { is_active: false })).status).toBe(200);
    expect((await patch(branch.clientId, { workspace_name: "Renamed" })).status).toBe(200);
    expect((await patch(branch.clientId, { is_active: true })).status).toBe(200);
    expect((await patch(branch.clientId, { is_active: true, workspace_name: "Again" })).status).toBe(200);

    const events = await eventsOf(branch.clientId);
    expect(types(events)).toEqual(["client.deactivated", "client.reactivated"]);
    expect(events[0]).toMatchObject({
      branch_id: branch.branchId,
      seq: 1,
      status_before: "active",
      status_after: "inactive",
      delivery_state: "not_sent",
    });
    expect(events[1]).toMatchObject({ seq: 2, status_before: "inactive", status_after: "active" });
  });

  it("writes no event when the change does not commit (the same batch fails in the database)", async () => {
    const branch = await registerBranch();
    // The NUL character makes PostgreSQL refuse the update, after the event statement of the same batch ran.
    const response = await patch(branch.clientId, { is_active: false, workspace_name: "bad\u0000name" });
    await expectProblem(response, 422, "validation_failed");
    expect((await clientRow(branch.clientId))?.is_active).toBe(true);
    expect(await eventsOf(branch.clientId)).toEqual([]);
  });

  it("DELETE /clients/{id} writes connection.deleted, which outlives the client", async () => {
    const branch = await connectBranch();
    const before = await eventsOf(branch.clientId);
    const response = await call(`/clients/${branch.clientId}`, { key: "admin", method: "DELETE" });
    expect(response.status).toBe(200);
    expect(await clientRow(branch.clientId)).toBeUndefined();

    const after = await eventsOf(branch.clientId);
    expect(after).toHaveLength(before.length + 1);
    expect(after.at(-1)).toMatchObject({
      type: "connection.deleted",
      branch_id: branch.branchId,
      seq: before.length + 1,
      status_before: "connected",
      status_after: "deleted",
    });
    expect(after.at(-1)?.reason).toMatch(/revoked at the provider/);
    // Still in the log, by branch.
    const page = await json<EventPage>(
      await call(`/events?branch_id=${encodeURIComponent(branch.branchId)}&type=connection.deleted`, { key: "admin" }),
    );
    expect(page.events.map((event) => event.type)).toEqual(["connection.deleted"]);
  });

  it("a never-connected client's deletion says so", async () => {
    const branch = await registerBranch();
    await call(`/clients/${branch.clientId}`, { key: "admin", method: "DELETE" });
    expect(await eventsOf(branch.clientId)).toMatchObject([
      { type: "connection.deleted", seq: 1, status_before: "never_connected", status_after: "deleted" },
    ]);
  });
});

describe("GET /events", () => {
  it("pages through one branch's events with the cursor, oldest first, and filters by type", async () => {
    const branch = await registerBranch();
    for (const isActive of [false, true, false, true, false]) await patch(branch.clientId, { is_active: isActive });
    const query = `branch_id=${encodeURIComponent(branch.branchId)}`;

    const first = await json<EventPage>(await call(`/events?${query}&limit=2`, { key: "admin" }));
    expect(first.events.map((event) => event.sequence)).toEqual([1, 2]);
    expect(first.next_cursor).toBe(first.events[1]!.id);
    const second = await json<EventPage>(
      await call(`/events?${query}&limit=2&after=${first.next_cursor}`, { key: "admin" }),
    );
    expect(second.events.map((event) => event.sequence)).toEqual([3, 4]);
    const last = await json<EventPage>(
      await call(`/events?${query}&limit=2&after=${second.next_cursor}`, { key: "admin" }),
    );
    expect(last.events.map((event) => event.sequence)).toEqual([5]);
    expect(last.next_cursor).toBeNull();

    expect(first.events[0]).toMatchObject({
      webhook_id: `evt_${first.events[0]!.id}`,
      type: "client.deactivated",
      client_id: branch.clientId,
      branch_id: branch.branchId,
      status_before: "active",
      status_after: "inactive",
      delivery: { state: "not_sent", attempts: 0 },
    });
    const reactivations = await json<EventPage>(
      await call(`/events?${query}&type=client.reactivated`, { key: "admin" }),
    );
    expect(reactivations.events.map((event) => event.sequence)).toEqual([2, 4]);
  });

  it("answers bad parameters with 422 problem+json naming them, and needs the admin key", async () => {
    for (const bad of ["limit=0", "limit=1000", "after=-1", "after=abc", "type=connection.exploded", "color=red"]) {
      const body = await expectProblem(await call(`/events?${bad}`, { key: "admin" }), 422, "validation_failed");
      expect(body.errors?.length, bad).toBeGreaterThan(0);
    }
    await expectProblem(await call("/events"), 401, "unauthorized");
    await expectProblem(await call("/events", { key: "service" }), 403, "forbidden");
    await expectProblem(await call("/events/1/redeliver", { key: "service", method: "POST" }), 403, "forbidden");
    await expectProblem(await call("/events/abc/redeliver", { key: "admin", method: "POST" }), 422);
  });

  it("POST /events/{id}/redeliver is a 409 while no WEBHOOK_URL is configured, and changes nothing", async () => {
    const branch = await registerBranch();
    await patch(branch.clientId, { is_active: false });
    const [event] = await eventsOf(branch.clientId);
    await expectProblem(
      await call(`/events/${event!.id}/redeliver`, { key: "admin", method: "POST" }),
      409,
      "conflict",
    );
    expect((await eventsOf(branch.clientId))[0]?.delivery_state).toBe("not_sent");
  });
});
