import { OpenAPIHono } from "@hono/zod-openapi";
import { bodyLimit } from "hono/body-limit";
import { HTTPException } from "hono/http-exception";
import type { ZodError } from "zod";
import { type AppEnv, createServices, operatorFrom, type Services } from "./context";
import { parseApiKeys } from "./env";
import { AppError, problemResponse, toAppError, validationFailed } from "./errors";
import { matchesAny } from "./lib/crypto";
import { describeError, logError } from "./lib/log";
import { knownKeyAdmits, presentedKey } from "./routes/api-key";
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
import { BranchParam } from "./routes/schemas";
import { registerTokenRoutes, serveTokenRead, TOKEN_READ_ROLE, TOKENS_PATH } from "./routes/tokens";
import { deliverAfterChange } from "./services/webhooks";

export const BASE_PATH = "/token-management";
const MAX_BODY_BYTES = 64 * 1024;

export type App = OpenAPIHono<AppEnv>;

/** Every route of the service, mounted under BASE_PATH. Built once per isolate. */
export function createApp(): App {
  const app = new OpenAPIHono<AppEnv>({ defaultHook: throwValidationError }).basePath(BASE_PATH);

  const limitBody = bodyLimit({
    maxSize: MAX_BODY_BYTES,
    onError: () => {
      throw new AppError("payload_too_large", `Request bodies are limited to ${MAX_BODY_BYTES} bytes.`);
    },
  });
  // One middleware for every request the app answers: services, the body limit, no-store on the way
  // out, then the first delivery of events written. The warm token read skips the app (fastTokenRead,
  // below) and runs the same steps itself: a step added here must be added there, or make it decline.
  app.use(async (c, next) => {
    c.set("requestId", requestIdOf(c.req.raw));
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
    const baseUrl = baseUrlOf(c.req.raw);
    c.set("baseUrl", baseUrl);
    // The RISC receiver has its own, smaller limit, answered with a 400 as RFC 8935 wants; the proxy
    // streams bodies up to PROXY_MAX_BODY_BYTES and counts them itself (nothing may buffer them here).
    if (
      c.req.raw.body === null ||
      c.req.path === `${BASE_PATH}${RISC_PATH}` ||
      c.req.path.startsWith(`${BASE_PATH}${PROXY_PATH}/`)
    ) {
      await next();
    } else {
      await limitBody(c, next);
    }
    c.res = noStore(c.res);
    deliverWrittenEvents(services, baseUrl, (task) => c.executionCtx.waitUntil(task));
  });

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

/**
 * The warm token read, the service's hottest request, answered without the router: only when the
 * request is plainly one (`GET {BASE_PATH}/tokens/{branch_id}` with a valid id, no body, an API key
 * this isolate has already seen valid, an address not held back). It then runs what the app would:
 * the same services, the same handler (serveTokenRead), the same errors (handleError) and the same
 * first delivery of events. Anything else (no key, a key not yet checked here, a query or percent
 * sign in the id, a configuration that does not load) returns undefined, and the app answers it.
 * Hono's dispatch was a third of a memory hit's CPU in workerd (BENCHMARKS.md, issue 20).
 */
export async function fastTokenRead(request: Request, env: Env, ctx: ExecutionContext): Promise<Response | undefined> {
  if (request.method !== "GET" || request.body !== null) return undefined;
  const branchId = tokenReadTarget(request.url);
  if (branchId === undefined) return undefined;
  let services: Services;
  try {
    services = await createServices(env);
  } catch {
    // The app builds them again and answers the configuration error (a failure case only).
    return undefined;
  }
  if (!knownKeyAdmits(request, services.config, TOKEN_READ_ROLE)) return undefined;
  const requestId = requestIdOf(request);
  const baseUrl = baseUrlOf(request);
  const defer = (task: Promise<unknown>) => ctx.waitUntil(task);
  try {
    return noStore(await serveTokenRead(operatorFrom(services, baseUrl, defer), branchId, requestId));
  } catch (error) {
    return noStore(handleError(error, requestId));
  } finally {
    deliverWrittenEvents(services, baseUrl, defer);
  }
}

const TOKEN_READ_PREFIX = `${BASE_PATH}${TOKENS_PATH}/`;

/** The branch id of a `GET /tokens/{branch_id}` URL the route's schema accepts, without decoding. */
function tokenReadTarget(url: string): string | undefined {
  const path = url.indexOf("/", url.indexOf("//") + 2);
  if (path === -1 || !url.startsWith(TOKEN_READ_PREFIX, path)) return undefined;
  const id = url.slice(path + TOKEN_READ_PREFIX.length);
  if (/[/?#%]/.test(id) || !BranchParam.safeParse({ branch_id: id }).success) return undefined;
  return id;
}

/** The request's id: Cloudflare's ray id where there is one. */
function requestIdOf(request: Request): string {
  return request.headers.get("cf-ray") ?? crypto.randomUUID();
}

/** Absolute URL of the API root, for links we hand out. */
function baseUrlOf(request: Request): string {
  return `${originOf(request.url)}${BASE_PATH}`;
}

/**
 * A change that wrote events (even one that then answered an error): first delivery attempt after
 * the response, so a slow or failing receiver never delays or fails this request.
 */
function deliverWrittenEvents(services: Services, baseUrl: string, defer: (task: Promise<unknown>) => void): void {
  if (services.events.written.length > 0) defer(deliverAfterChange(services, new Date(), baseUrl));
}

/**
 * Nothing an API answers may be cached: tokens, login links and client data are capabilities or
 * secrets. One header for every response (errors set it too, in problemResponse).
 */
function noStore(response: Response): Response {
  if (response.headers.get("Cache-Control") === "no-store") return response;
  try {
    response.headers.set("Cache-Control", "no-store");
    return response;
  } catch {
    // Immutable headers (a response read from the Cache API): set it on a copy.
    const copy = new Response(response.body, response);
    copy.headers.set("Cache-Control", "no-store");
    return copy;
  }
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
