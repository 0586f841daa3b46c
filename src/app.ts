import { OpenAPIHono } from "@hono/zod-openapi";
import { bodyLimit } from "hono/body-limit";
import { HTTPException } from "hono/http-exception";
import type { ZodError } from "zod";
import { type AppEnv, createServices, type Services } from "./context";
import { parseApiKeys } from "./env";
import { AppError, problemResponse, toAppError, validationFailed } from "./errors";
import { matchesAny } from "./lib/crypto";
import { describeError, logError } from "./lib/log";
import { presentedKey } from "./routes/api-key";
import { registerAppRoutes } from "./routes/apps";
import { registerClientRoutes } from "./routes/clients";
import { registerConsoleRoutes } from "./routes/console";
import { registerDocsRoutes } from "./routes/docs";
import { registerEventRoutes } from "./routes/events";
import { registerGrantRoutes } from "./routes/grants";
import { registerHealthRoutes } from "./routes/health";
import { registerOAuthRoutes } from "./routes/oauth";
import { PROXY_PATH, registerProxyRoutes } from "./routes/proxy";
import { RISC_PATH, registerRiscRoutes } from "./routes/risc";
import { registerTokenRoutes } from "./routes/tokens";
import { deliverAfterChange } from "./services/webhooks";

export const BASE_PATH = "/token-management";
const MAX_BODY_BYTES = 64 * 1024;

export type App = OpenAPIHono<AppEnv>;

/** Every route of the service, mounted under BASE_PATH. Built once per isolate. */
export function createApp(): App {
  const app = new OpenAPIHono<AppEnv>({ defaultHook: throwValidationError }).basePath(BASE_PATH);

  // Nothing an API answers may be cached: tokens, login links and client data are capabilities or
  // secrets. One header for every response (errors set it too, in problemResponse).
  app.use(async (c, next) => {
    await next();
    if (c.res.headers.get("Cache-Control") === "no-store") return;
    try {
      c.res.headers.set("Cache-Control", "no-store");
    } catch {
      // Immutable headers (a response read from the Cache API): set it on a copy.
      c.res = new Response(c.res.body, c.res);
      c.res.headers.set("Cache-Control", "no-store");
    }
  });
  app.use(async (c, next) => {
    c.set("requestId", c.req.header("cf-ray") ?? crypto.randomUUID());
    let services: Services;
    try {
      services = await createServices(c.env);
    } catch (error) {
      throw await configurationFailure(error, c.env, c.req.raw);
    }
    c.set("config", services.config);
    c.set("db", services.db);
    c.set("keyring", services.keyring);
    c.set("providers", services.providers);
    c.set("events", services.events);
    c.set("metrics", services.metrics);
    const baseUrl = `${originOf(c.req.url)}${BASE_PATH}`;
    c.set("baseUrl", baseUrl);
    await next();
    // A change that wrote events (even one that then answered an error): first delivery attempt
    // after the response, so a slow or failing receiver never delays or fails this request.
    if (services.events.written.length > 0) c.executionCtx.waitUntil(deliverAfterChange(services, new Date(), baseUrl));
  });
  const limitBody = bodyLimit({
    maxSize: MAX_BODY_BYTES,
    onError: () => {
      throw new AppError("payload_too_large", `Request bodies are limited to ${MAX_BODY_BYTES} bytes.`);
    },
  });
  // The RISC receiver has its own, smaller limit, answered with a 400 as RFC 8935 wants; the proxy
  // streams bodies up to PROXY_MAX_BODY_BYTES and counts them itself (nothing may buffer them here).
  app.use((c, next) =>
    c.req.path === `${BASE_PATH}${RISC_PATH}` || c.req.path.startsWith(`${BASE_PATH}${PROXY_PATH}/`)
      ? next()
      : limitBody(c, next),
  );

  registerHealthRoutes(app);
  registerAppRoutes(app);
  registerClientRoutes(app);
  registerGrantRoutes(app);
  registerOAuthRoutes(app);
  registerTokenRoutes(app);
  registerEventRoutes(app);
  registerRiscRoutes(app);
  registerProxyRoutes(app);
  registerConsoleRoutes(app);

  app.doc31("/openapi.json", {
    openapi: "3.1.0",
    info: { title: "Token management", version: "1.0.0", description: "OAuth 2.0 token manager for branches." },
  });
  app.openAPIRegistry.registerComponent("securitySchemes", "apiKey", { type: "http", scheme: "bearer" });
  registerDocsRoutes(app, BASE_PATH);

  app.notFound((c) =>
    problemResponse(
      new AppError("not_found", `No route for ${c.req.method} ${new URL(c.req.url).pathname}.`),
      c.get("requestId"),
    ),
  );
  app.onError((error, c) => handleError(error, c.get("requestId")));
  return app;
}

/** The origin of an absolute URL as the runtime hands it over (scheme://host[:port]), without parsing it. */
function originOf(url: string): string {
  const end = url.indexOf("/", url.indexOf("//") + 2);
  return end === -1 ? url : url.slice(0, end);
}

/**
 * A broken environment is named (which bindings, never their values) only to a caller presenting a
 * configured API key; anyone else gets the generic 500. The names always reach the log, through the
 * error's cause.
 */
async function configurationFailure(error: unknown, env: Env, request: Request): Promise<unknown> {
  if (!(error instanceof AppError) || error.code !== "configuration_error") return error;
  const presented = presentedKey(request);
  const { admin, service } = parseApiKeys(env);
  if (presented !== undefined && (await matchesAny(presented, [...admin, ...service]))) return error;
  return new AppError("internal_error", "An unexpected error occurred.", { cause: error });
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
