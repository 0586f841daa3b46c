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

const problemContent = { "application/problem+json": { schema: ProblemSchema } } as const;

/** A documented problem response: `problem("No such client")`. */
export const problem = (description: string) => ({ description, content: problemContent });

export const jsonContent = <T extends z.ZodType>(schema: T) => ({ "application/json": { schema } });

/** Every route but the browser ones takes an API key (registered as `apiKey` in src/app.ts). */
export const API_KEY_SECURITY = [{ apiKey: [] }];
