import { createRoute, z } from "@hono/zod-openapi";
import { sql } from "drizzle-orm";
import type { App } from "../app";
import { AppError } from "../errors";
import { jsonContent, problem } from "./schemas";

const route = createRoute({
  method: "get",
  path: "/health",
  tags: ["health"],
  summary: "Liveness and database reachability",
  responses: {
    200: {
      description: "The Worker runs and the database answers.",
      content: jsonContent(
        z.object({ success: z.literal(true), status: z.literal("ok"), database: z.literal("reachable") }),
      ),
    },
    503: problem("The database does not answer."),
  },
});

export function registerHealthRoutes(app: App): void {
  app.openapi(route, async (c) => {
    try {
      await c.var.db.execute(sql`select 1`);
    } catch (error) {
      throw new AppError("database_unavailable", "The database is unreachable.", {
        retryAfterSeconds: 5,
        cause: error,
      });
    }
    return c.json({ success: true as const, status: "ok" as const, database: "reachable" as const }, 200);
  });
}
