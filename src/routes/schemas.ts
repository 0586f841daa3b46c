import { z } from "@hono/zod-openapi";

/** RFC 9457 problem details, plus `success`/`message` for callers of the old service. */
export const ProblemSchema = z
  .object({
    type: z.string(),
    title: z.string(),
    status: z.number().int(),
    detail: z.string(),
    code: z.string(),
    success: z.literal(false),
    message: z.string(),
    request_id: z.string().optional(),
    errors: z.array(z.object({ field: z.string(), message: z.string() })).optional(),
  })
  .openapi("Problem");

export const problemContent = { "application/problem+json": { schema: ProblemSchema } } as const;
