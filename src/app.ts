import { OpenAPIHono } from "@hono/zod-openapi";
import { Scalar } from "@scalar/hono-api-reference";
import { bodyLimit } from "hono/body-limit";
import { HTTPException } from "hono/http-exception";
import type { ZodError } from "zod";
import { type AppEnv, createServices } from "./context";
import { AppError, problemResponse, toAppError, validationFailed } from "./errors";
import { describeError, logError } from "./lib/log";
import { registerClientRoutes } from "./routes/clients";
import { registerEventRoutes } from "./routes/events";
import { registerHealthRoutes } from "./routes/health";
import { registerOAuthRoutes } from "./routes/oauth";
import { registerTokenRoutes } from "./routes/tokens";
import { deliverAfterChange } from "./services/webhooks";

export const BASE_PATH = "/token-management";
const MAX_BODY_BYTES = 64 * 1024;

export type App = OpenAPIHono<AppEnv>;

/** Every route of the service, mounted under BASE_PATH. Built once per isolate. */
export function createApp(): App {
  const app = new OpenAPIHono<AppEnv>({ defaultHook: throwValidationError }).basePath(BASE_PATH);

  app.use(async (c, next) => {
    c.set("requestId", c.req.header("cf-ray") ?? crypto.randomUUID());
    const services = await createServices(c.env);
    c.set("config", services.config);
    c.set("db", services.db);
    c.set("keyring", services.keyring);
    c.set("provider", services.provider);
    c.set("events", services.events);
    const baseUrl = `${new URL(c.req.url).origin}${BASE_PATH}`;
    c.set("baseUrl", baseUrl);
    await next();
    // A change that wrote events (even one that then answered an error): first delivery attempt
    // after the response, so a slow or failing receiver never delays or fails this request.
    if (services.events.touched) c.executionCtx.waitUntil(deliverAfterChange(services, new Date(), baseUrl));
  });
  app.use(
    bodyLimit({
      maxSize: MAX_BODY_BYTES,
      onError: () => {
        throw new AppError("payload_too_large", `Request bodies are limited to ${MAX_BODY_BYTES} bytes.`);
      },
    }),
  );

  registerHealthRoutes(app);
  registerClientRoutes(app);
  registerOAuthRoutes(app);
  registerTokenRoutes(app);
  registerEventRoutes(app);

  app.doc31("/openapi.json", {
    openapi: "3.1.0",
    info: { title: "Token management", version: "1.0.0", description: "OAuth 2.0 token manager for branches." },
  });
  app.openAPIRegistry.registerComponent("securitySchemes", "apiKey", { type: "http", scheme: "bearer" });
  app.get("/docs", Scalar({ url: `${BASE_PATH}/openapi.json` }));

  app.notFound((c) =>
    problemResponse(
      new AppError("not_found", `No route for ${c.req.method} ${new URL(c.req.url).pathname}.`),
      c.get("requestId"),
    ),
  );
  app.onError((error, c) => handleError(error, c.get("requestId")));
  return app;
}

export function handleError(error: unknown, requestId: string | undefined): Response {
  const appError = error instanceof HTTPException ? fromHttpException(error) : toAppError(error);
  // A stored secret that does not open is a 409 for its client but may be tampering: log it too.
  if (appError.status >= 500 || appError.code === "sealed_value_unreadable") {
    logError("request_failed", {
      request_id: requestId,
      code: appError.code,
      error: describeError(appError.cause ?? appError),
    });
  }
  return problemResponse(appError, requestId);
}

function fromHttpException(error: HTTPException): AppError {
  if (error.status === 400) return new AppError("bad_request", error.message || "Malformed request.");
  if (error.status === 413) return new AppError("payload_too_large", error.message);
  if (error.status === 415) {
    return new AppError("unsupported_media_type", "Send the request body as JSON (Content-Type: application/json).");
  }
  return new AppError("internal_error", "An unexpected error occurred.", { cause: error });
}

/** zod-openapi's hook: a failed validation becomes a 422 that names each field. */
function throwValidationError(result: { success: boolean; error?: ZodError }): void {
  if (result.success || !result.error) return;
  throw validationFailed(result.error);
}
