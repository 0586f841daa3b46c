import { createRoute, z } from "@hono/zod-openapi";
import type { MiddlewareHandler } from "hono";
import { bodyLimit } from "hono/body-limit";
import type { App } from "../app";
import { type AppEnv, operatorOf } from "../context";
import { AppError } from "../errors";
import { logWarn } from "../lib/log";
import { MAX_SET_BYTES, type SetErrorCode } from "../oauth/risc";
import { dropTokens } from "../services/operations";
import {
  type Receipt,
  RiscKeysUnavailable,
  receiveSecurityEvent,
  SetRejected,
  verificationReceivedAt,
} from "../services/risc";
import { requestGrantCheck } from "../services/scheduled";
import { requireKey } from "./api-key";
import { API_KEY_SECURITY, jsonContent, problem } from "./schemas";

export const RISC_PATH = "/risc";
const SET_CONTENT_TYPE = "application/secevent+jwt";
/** Google delivers again after an error: a short wait is enough for a key fetch to work again. */
const KEYS_UNAVAILABLE_RETRY_SECONDS = 30;

/**
 * Every refusal is a 400 (RFC 8935 §2.3), including a body over MAX_SET_BYTES: the transmitter
 * should not retry a token that will never be accepted.
 */
function rejected(err: SetErrorCode, description: string): AppError {
  return new AppError("security_event_rejected", description, { fields: { err, description } });
}

const limitBody: MiddlewareHandler<AppEnv> = bodyLimit({
  maxSize: MAX_SET_BYTES,
  onError: () => {
    throw rejected("invalid_request", `A Security Event Token is at most ${MAX_SET_BYTES} bytes.`);
  },
});

const receive = createRoute({
  method: "post",
  path: RISC_PATH,
  tags: ["cross-account protection"],
  summary: "Receive a Security Event Token pushed by Google (Cross-Account Protection, RFC 8935)",
  description:
    "No API key: the token's signature (RS256, a key of the transmitter's RISC configuration document), " +
    "issuer and audience (an app's client id) authenticate it. Each jti is acted on once.",
  middleware: [limitBody] as const,
  request: {
    body: {
      required: true,
      content: { [SET_CONTENT_TYPE]: { schema: z.string().openapi({ description: "A compact JWS (RFC 8417)." }) } },
    },
  },
  responses: {
    202: { description: "Accepted (also a redelivery, an unknown event type or an unknown account)." },
    400: problem("Rejected: malformed, wrongly signed, wrong issuer or audience, too old, or too large."),
    503: problem("The transmitter's keys could not be fetched; deliver again later."),
  },
});

const MAX_STATE_LENGTH = 1024;

const verificationStatus = createRoute({
  method: "get",
  path: `${RISC_PATH}/verifications/{state}`,
  tags: ["cross-account protection"],
  summary: "Whether the verification event carrying this state arrived (npm run risc:verify polls it)",
  security: API_KEY_SECURITY,
  middleware: [requireKey("admin")] as const,
  request: {
    params: z.object({
      state: z
        .string()
        .min(1)
        .max(MAX_STATE_LENGTH)
        .openapi({ param: { name: "state", in: "path" }, example: "verify-1a2b3c" }),
    }),
  },
  responses: {
    200: {
      description: "It arrived, and when.",
      content: jsonContent(z.object({ success: z.literal(true), message: z.string(), received_at: z.string() })),
    },
    401: problem("Missing or wrong API key"),
    403: problem("Service key on an admin route"),
    404: problem("No verification event with this state has arrived (yet)."),
  },
});

export function registerRiscRoutes(app: App): void {
  app.openapi(verificationStatus, async (c) => {
    const { state } = c.req.valid("param");
    const receivedAt = await verificationReceivedAt(c.var.db, state);
    if (!receivedAt) throw new AppError("not_found", "No verification event with this state has arrived yet.");
    return c.json(
      { success: true as const, message: "The verification event arrived.", received_at: receivedAt.toISOString() },
      200,
    );
  });

  app.openapi(receive, async (c) => {
    const type = (c.req.header("content-type") ?? "").split(";")[0]?.trim().toLowerCase();
    if (type !== SET_CONTENT_TYPE) {
      throw rejected("invalid_request", `Send the token as ${SET_CONTENT_TYPE}.`);
    }
    const jwt = (await c.req.text()).trim();
    const now = new Date();
    let receipt: Receipt;
    try {
      receipt = await receiveSecurityEvent(c.var, jwt, now);
    } catch (error) {
      if (error instanceof SetRejected) {
        logWarn("risc_event_rejected", { request_id: c.var.requestId, err: error.err, reason: error.description });
        throw rejected(error.err, error.description);
      }
      if (error instanceof RiscKeysUnavailable) {
        logWarn("risc_keys_unavailable", { request_id: c.var.requestId, error: error.message });
        throw new AppError("provider_unavailable", "The transmitter's signing keys could not be fetched.", {
          retryAfterSeconds: KEYS_UNAVAILABLE_RETRY_SECONDS,
        });
      }
      throw error;
    }
    // Every branch of a grant the events changed stops being served from this location's cache.
    await dropTokens(operatorOf(c), receipt.branchIds);
    await requestGrantCheck(c.env, c.var, receipt.grantsToCheck, now, (task) => c.executionCtx.waitUntil(task));
    return c.body(null, 202);
  });
}
