import { createRoute, z } from "@hono/zod-openapi";
import { getCookie, setCookie } from "hono/cookie";
import type { ZodError } from "zod";
import type { App } from "../app";
import { type AppContext, operatorOf } from "../context";
import { AppError, toAppError, validationFailed } from "../errors";
import { matchesAny } from "../lib/crypto";
import { PAGE_HEADERS, page } from "../lib/html";
import { describeError, logError, logInfo } from "../lib/log";
import { bindingCookie, STATE_TTL_SECONDS, startLogin } from "../services/authorization";
import { checkLoginLink } from "../services/login-links";
import { finishConsent } from "../services/operations";

/** The two browser endpoints: the start of the consent flow and the provider's redirect back. */

const login = createRoute({
  method: "get",
  path: "/oauth/login/{client_id}",
  tags: ["oauth"],
  summary: "Start the consent flow (browser). Needs a signed login link or the admin key.",
  request: {
    params: z.object({
      client_id: z.coerce
        .number()
        .int()
        .positive()
        .max(2_147_483_647)
        .openapi({ param: { name: "client_id", in: "path" } }),
    }),
    query: z.object({
      issued: z.string().max(20).optional(),
      expires: z.string().max(20).optional(),
      signature: z.string().max(128).optional(),
      account: z.string().max(320).optional(),
    }),
  },
  responses: {
    302: { description: "Redirect to the provider's consent page" },
    401: {
      description: "Missing, expired, invalid, outdated, used or revoked login link",
      content: { "text/html": { schema: z.string() } },
    },
    404: { description: "Unknown or inactive client", content: { "text/html": { schema: z.string() } } },
  },
});

const callback = createRoute({
  method: "get",
  path: "/auth/callback",
  tags: ["oauth"],
  summary: "The provider's redirect back (browser). Stores the tokens.",
  request: {
    query: z.object({
      state: z.string().max(4096).optional(),
      code: z.string().max(4096).optional(),
      error: z.string().max(256).optional(),
      error_description: z.string().max(1024).optional(),
    }),
  },
  responses: {
    200: { description: "Connected (HTML, or JSON with Accept: application/json)" },
    400: {
      description:
        "Invalid, expired, replayed or unbound state; an unexpected issuer; access denied or not every scope granted",
    },
    409: {
      description:
        "Another consent for this client stored first or its links were revoked; or no refresh token was issued (the next sign-in forces the consent screen)",
    },
    502: { description: "The provider failed or rejected the exchange" },
  },
});

export function registerOAuthRoutes(app: App): void {
  app.openapi(
    login,
    async (c) => {
      try {
        const { client_id: clientId } = c.req.valid("param");
        const link = c.req.valid("query");
        const now = new Date();
        const { issuedAt: linkIssuedAt, account } = await authorizeLogin(c, clientId, link, now);
        const cookie = bindingCookie(c.var.baseUrl);
        const start = await startLogin(
          c.var.db,
          c.var.keyring,
          c.var.providers,
          clientId,
          getCookie(c, cookie.name),
          now,
          linkIssuedAt,
          account,
        );
        setCookie(c, cookie.name, start.bindingCookie, {
          httpOnly: true,
          secure: cookie.secure,
          sameSite: "Lax",
          path: "/",
          maxAge: STATE_TTL_SECONDS,
        });
        c.header("Referrer-Policy", "no-referrer");
        return c.redirect(start.redirectTo, 302);
      } catch (error) {
        return browserError(c, error);
      }
    },
    browserValidation,
  );

  app.openapi(
    callback,
    async (c) => {
      try {
        const url = new URL(c.req.url);
        // A new consent replaces the token: this location stops serving the old one at once.
        const result = await finishConsent(
          operatorOf(c),
          url.searchParams,
          getCookie(c, bindingCookie(c.var.baseUrl).name),
          new Date(),
        );
        logInfo("branch_connected", {
          request_id: c.var.requestId,
          client: result.client.id,
          branch: result.client.branchId,
        });
        const body = {
          success: true as const,
          message: `Branch ${result.client.branchId} is connected.`,
          client_id: result.client.id,
          branch_id: result.client.branchId,
          expires_at: result.expiresAt.toISOString(),
          scope: result.scope,
          refresh_token_received: result.hasRefreshToken,
        };
        if (wantsJson(c)) return c.json(body, 200);
        return c.body(
          page(
            "Connected",
            [
              `${result.client.workspaceName} (branch ${result.client.branchId}) is now connected.`,
              "You can close this window.",
            ],
            "ok",
          ),
          200,
          PAGE_HEADERS,
        );
      } catch (error) {
        return browserError(c, error);
      }
    },
    browserValidation,
  );
}

/**
 * The link's issue time and the account it is bound to, or a null issue time when the admin key
 * opened the page; throws when neither is good.
 */
async function authorizeLogin(
  c: AppContext,
  clientId: number,
  link: {
    issued?: string | undefined;
    expires?: string | undefined;
    signature?: string | undefined;
    account?: string | undefined;
  },
  now: Date,
): Promise<{ issuedAt: Date | null; account: string | undefined }> {
  const bearer = /^Bearer\s+(\S+)$/i.exec(c.req.header("authorization") ?? "")?.[1];
  if (bearer && (await matchesAny(bearer, c.var.config.ADMIN_API_KEY))) return { issuedAt: null, account: undefined };
  const check = await checkLoginLink(c.var.keyring, clientId, link, now);
  if (check.result === "valid") return { issuedAt: check.issuedAt, account: check.account };
  const detail = {
    missing: "This page needs a login link. Ask your administrator for one.",
    expired: "This login link has expired. Ask your administrator for a new one.",
    invalid: "This login link is not valid. Ask your administrator for a new one.",
    outdated: "This login link is from before an upgrade and no longer works. Ask your administrator for a new one.",
  }[check.result];
  throw new AppError("unauthorized", detail);
}

function wantsJson(c: AppContext): boolean {
  const accept = c.req.header("accept") ?? "";
  return accept.includes("application/json") && !accept.includes("text/html");
}

/** Invalid path or query parameters: a page for browsers too, not only problem+json. */
function browserValidation(result: { success: boolean; error?: ZodError }, c: AppContext): Response | undefined {
  return result.success || !result.error ? undefined : browserError(c, validationFailed(result.error));
}

/** Browsers get a page saying what went wrong and what to do; API clients get problem+json. */
function browserError(c: AppContext, error: unknown): Response {
  const appError = toAppError(error);
  if (appError.status >= 500) {
    logError("browser_flow_failed", {
      request_id: c.var.requestId,
      code: appError.code,
      error: describeError(appError.cause ?? appError),
    });
  }
  if (wantsJson(c)) throw appError;
  const title =
    appError.status === 404 ? "Not found" : appError.status >= 500 ? "Something went wrong" : "Could not connect";
  return c.body(
    page(title, [appError.detail, `Reference: ${c.var.requestId}`], "error"),
    appError.status as 400,
    PAGE_HEADERS,
  );
}
