import { createRoute, z } from "@hono/zod-openapi";
import type { App } from "../app";
import { operatorOf } from "../context";
import { DELIVERY_STATES, EVENT_TYPES, type EventRow } from "../db/schema";
import { LIST_MAX_LIMIT, listEvents } from "../services/events";
import { queueRedelivery } from "../services/operations";
import { webhookId } from "../services/webhooks";
import { requireKey } from "./api-key";
import { API_KEY_SECURITY, jsonContent as json, problem } from "./schemas";

const MAX_EVENT_ID = Number.MAX_SAFE_INTEGER;

const EventView = z
  .object({
    id: z.number().int().describe("Sortable; the cursor of the log."),
    webhook_id: z.string().describe("The Standard Webhooks `webhook-id` of its deliveries."),
    type: z.enum(EVENT_TYPES),
    client_id: z.number().int(),
    branch_id: z.string(),
    sequence: z.number().int().describe("Per-branch order."),
    status_before: z.string(),
    status_after: z.string(),
    reason: z.string().nullable(),
    created_at: z.string(),
    delivery: z.object({
      state: z.enum(DELIVERY_STATES),
      attempts: z.number().int(),
      next_attempt_at: z.string().nullable(),
      last_attempt_at: z.string().nullable(),
      last_error: z.string().nullable(),
      delivered_at: z.string().nullable(),
    }),
  })
  .openapi("Event");

const security = API_KEY_SECURITY;
const errors = {
  401: problem("Missing or wrong API key"),
  403: problem("Service key on an admin route"),
  422: problem("Invalid parameters"),
};

const list = createRoute({
  method: "get",
  path: "/events",
  tags: ["events"],
  summary: "The event log, oldest first, a page at a time",
  security,
  middleware: [requireKey("admin")] as const,
  request: {
    query: z
      .object({
        after: z.coerce.number().int().min(0).max(MAX_EVENT_ID).optional(),
        branch_id: z.string().min(1).max(128).optional(),
        client_id: z.coerce.number().int().positive().max(2_147_483_647).optional(),
        type: z.enum(EVENT_TYPES).optional(),
        limit: z.coerce.number().int().min(1).max(LIST_MAX_LIMIT).default(50),
      })
      .strict(),
  },
  responses: {
    200: {
      description: "A page of events; pass next_cursor as `after` for the next one.",
      content: json(
        z.object({
          success: z.literal(true),
          message: z.string(),
          events: z.array(EventView),
          next_cursor: z.number().nullable(),
        }),
      ),
    },
    ...errors,
  },
});

const redeliver = createRoute({
  method: "post",
  path: "/events/{id}/redeliver",
  tags: ["events"],
  summary: "Deliver an event again (whatever its delivery state), with a fresh retry ladder",
  security,
  middleware: [requireKey("admin")] as const,
  request: {
    params: z.object({
      id: z.coerce
        .number()
        .int()
        .positive()
        .max(MAX_EVENT_ID)
        .openapi({ param: { name: "id", in: "path" }, example: 1 }),
    }),
  },
  responses: {
    202: {
      description: "Queued; the first attempt follows the response.",
      content: json(z.object({ success: z.literal(true), message: z.string(), event: EventView })),
    },
    ...errors,
    404: problem("No such event"),
    409: problem("No WEBHOOK_URL is configured"),
  },
});

export function registerEventRoutes(app: App): void {
  app.openapi(list, async (c) => {
    const query = c.req.valid("query");
    const page = await listEvents(c.var.db, {
      after: query.after,
      branchId: query.branch_id,
      clientId: query.client_id,
      type: query.type,
      limit: query.limit,
    });
    return c.json(
      {
        success: true as const,
        message: `${page.events.length} event(s).`,
        events: page.events.map(eventView),
        next_cursor: page.nextCursor,
      },
      200,
    );
  });

  app.openapi(redeliver, async (c) => {
    // The request middleware makes the first attempt after the response.
    const event = await queueRedelivery(operatorOf(c), c.req.valid("param").id, new Date());
    return c.json({ success: true as const, message: "Event queued for delivery.", event: eventView(event) }, 202);
  });
}

export function eventView(event: EventRow) {
  return {
    id: event.id,
    webhook_id: webhookId(event.id),
    type: event.type,
    client_id: event.clientId,
    branch_id: event.branchId,
    sequence: event.seq,
    status_before: event.statusBefore,
    status_after: event.statusAfter,
    reason: event.reason,
    created_at: event.createdAt.toISOString(),
    delivery: {
      state: event.deliveryState,
      attempts: event.attempts,
      next_attempt_at: event.nextAttemptAt?.toISOString() ?? null,
      last_attempt_at: event.lastAttemptAt?.toISOString() ?? null,
      last_error: event.lastError,
      delivered_at: event.deliveredAt?.toISOString() ?? null,
    },
  };
}
