import { z } from "@hono/zod-openapi";
import type { App } from "../app";
import { operatorOf } from "../context";
import { AppError } from "../errors";
import { BASE_URL_HEADER } from "../lib/proxy-rules";
import type { ProxyQuota } from "../proxy/quota";
import { proxyRequest } from "../services/proxy";
import type { RefreshMessage } from "../services/scheduled";
import { requireKey } from "./api-key";
import { API_KEY_SECURITY, problem } from "./schemas";

export const PROXY_PATH = "/proxy";
const MAX_BRANCH_ID_LENGTH = 128;
const METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/** The proxy's bindings, both optional: without them no budget is held and no check is queued. */
interface ProxyBindings {
  PROXY_QUOTA?: DurableObjectNamespace<ProxyQuota> | undefined;
  REFRESH_QUEUE?: Queue<RefreshMessage> | undefined;
}

/**
 * ANY /proxy/{branch_id}/{path}: not an OpenAPI route definition (any method, any path, a streamed
 * body of any type), so it is registered for the documentation on its own. The path after the
 * branch is taken from the URL as sent, still percent-encoded, and forwarded as it is.
 */
export function registerProxyRoutes(app: App): void {
  app.on(METHODS, `${PROXY_PATH}/:branch_id/*`, requireKey("service"), (c) => {
    const { branchId, rawPath } = splitProxyPath(new URL(c.req.url).pathname);
    const bindings: ProxyBindings = c.env as Env & { REFRESH_QUEUE?: Queue<RefreshMessage> };
    return proxyRequest(
      {
        op: operatorOf(c),
        requestId: c.var.requestId,
        quota: bindings.PROXY_QUOTA,
        checks: bindings.REFRESH_QUEUE,
      },
      branchId,
      rawPath,
      c.req.raw,
    );
  });
  for (const method of ["get", "post", "put", "patch", "delete"] as const) documentProxy(app, method);
}

/** The branch id (decoded) and the rest of the path (as sent) of a proxy URL's path. */
export function splitProxyPath(pathname: string): { branchId: string; rawPath: string } {
  const marker = `${PROXY_PATH}/`;
  const after = pathname.slice(pathname.indexOf(marker) + marker.length);
  const slash = after.indexOf("/");
  const rawBranch = slash < 0 ? after : after.slice(0, slash);
  let branchId: string;
  try {
    branchId = decodeURIComponent(rawBranch);
  } catch {
    throw new AppError("bad_request", "The branch id is not valid percent-encoding.");
  }
  if (branchId.length === 0 || branchId.length > MAX_BRANCH_ID_LENGTH) {
    throw new AppError("bad_request", `A branch id has 1 to ${MAX_BRANCH_ID_LENGTH} characters.`);
  }
  return { branchId, rawPath: slash < 0 ? "" : after.slice(slash + 1) };
}

function documentProxy(app: App, method: "get" | "post" | "put" | "patch" | "delete"): void {
  app.openAPIRegistry.registerPath({
    method,
    path: `${PROXY_PATH}/{branch_id}/{path}`,
    tags: ["proxy"],
    summary: "Call the branch's provider API with its current token (any method)",
    description:
      "Forwards the method, the path after the branch, the query, the body and the end-to-end headers to the " +
      "branch's app's API base (the first allowed one, or the one named by Proxy-Base-Url), with the branch's " +
      "token as Authorization, and returns the upstream's status, headers and body, streamed. The caller's " +
      "Authorization, X-API-Key, cookies and hop-by-hop headers are not forwarded, nor Set-Cookie back. " +
      "Redirects are returned, not followed. A 401 is answered with one refresh and one retry (requests " +
      "without a body or with one of at most 64 KiB). Over the app's budget: 429 with Retry-After, nothing sent.",
    security: API_KEY_SECURITY,
    request: {
      params: z.object({
        branch_id: z
          .string()
          .min(1)
          .max(MAX_BRANCH_ID_LENGTH)
          .openapi({ param: { name: "branch_id", in: "path" }, example: "branch-001" }),
        path: z.string().openapi({
          param: { name: "path", in: "path" },
          example: "v4/accounts/123/locations/456/reviews",
          description: "The API path under the base URL (may contain slashes).",
        }),
      }),
      headers: z.object({
        [BASE_URL_HEADER]: z.string().optional().openapi({
          example: "https://mybusiness.googleapis.com",
          description: "One of the app's allowed API bases.",
        }),
      }),
    },
    responses: {
      200: { description: "The upstream's answer, whatever its status (the upstream's status, headers and body)." },
      400: problem("Proxy-Base-Url not allowed, or a path that could leave the base (encoded slash, dot segments)"),
      401: problem("Missing or wrong API key"),
      404: problem("Unknown branch"),
      409: problem("The branch needs a consent (never connected, revoked, reauthorization required)"),
      413: problem("Request body over PROXY_MAX_BODY_BYTES"),
      429: problem("Over the app's request or edit budget, or paused after the provider's 429 (see Retry-After)"),
      502: problem("The provider's API could not be reached"),
      504: problem("The provider's API did not answer within PROXY_TIMEOUT_MS"),
    },
  });
}
