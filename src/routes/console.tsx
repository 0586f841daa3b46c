import { type Context, Hono, type Next } from "hono";
import { deleteCookie, getCookie, setCookie } from "hono/cookie";
import { csrf as sameOriginCheck } from "hono/csrf";
import { HTTPException } from "hono/http-exception";
import type { ContentfulStatusCode } from "hono/utils/http-status";
import { z } from "zod";
import type { App } from "../app";
import { type AppEnv, operatorOf } from "../context";
import { EVENT_TYPES, type EventRow, type TokenRow } from "../db/schema";
import { AppError, toAppError } from "../errors";
import { type Keyring, open } from "../lib/crypto";
import { toBase64Url } from "../lib/encoding";
import { describeError, logError } from "../lib/log";
import { AUTH_FAILURE_PERIOD_SECONDS, addressBlocked, clientAddress, recordFailure } from "../lib/rate-limit";
import { getApp, listAppBranches, listApps } from "../services/apps";
import { BRANCH_STATUSES, type BranchListQuery, branchStatus, listBranches } from "../services/branch-list";
import { getClient } from "../services/clients";
import {
  accessSettings,
  type ConsoleSession,
  checkCsrfToken,
  consoleCookies,
  consoleTransportAllowed,
  createKeySession,
  csrfToken,
  FLASH_TTL_SECONDS,
  type Flash,
  keyRole,
  openFlash,
  readAccessSession,
  readKeySession,
  SIGN_IN_TTL_SECONDS,
  sealFlash,
  signInNonce,
} from "../services/console-session";
import { LIST_MAX_LIMIT, listEvents } from "../services/events";
import { getGrant, listGrants } from "../services/grants";
import { healthReport } from "../services/health-report";
import { attachLocations, branchIdForLocation, grantLocations } from "../services/locations";
import {
  addApp,
  attachToGrant,
  changeApp,
  changeClient,
  newLoginLink,
  type Operator,
  queueRedelivery,
  refreshNow,
  registerBranch,
  removeClient,
  revokeLoginLinks,
  revokeToken,
} from "../services/operations";
import { webhookTarget } from "../services/webhooks";
import { type AppBranch, AppListView, AppView, NewAppView } from "./console/apps";
import { type BranchDetails, BranchView } from "./console/branch";
import { GrantListView, GrantPageView, LocationsView } from "./console/grants";
import { HealthView } from "./console/health";
import { consolePath, expiryWords } from "./console/layout";
import {
  BranchListView,
  ErrorPage,
  EventLogView,
  NEW_BRANCH_FIELDS,
  type NewBranchField,
  NewBranchView,
  type PageContext,
  SignInPage,
} from "./console/pages";
import { AppBody, AppPatch, ClientBody, ClientPatch, clientChangesOf, newClientOf } from "./schemas";

/**
 * The operator console: server-rendered pages under /console (hono/jsx, no client framework, no
 * script but the copy button's). Handlers parse with zod, call the same services as the API
 * routes and render; forms post and are answered 303 to a page showing the result (a flash
 * message in a short signed cookie), so every page works without JavaScript.
 *
 * Locked down: a signed session cookie from an admin key, or the Cloudflare Access JWT when Access
 * is configured; every POST passes hono/csrf (Origin) and carries the session's CSRF token; every
 * response has a strict CSP with a per-response nonce, frame-ancestors 'none' and no caching.
 */

declare module "hono" {
  interface ContextVariableMap {
    /** The response's CSP nonce. */
    consoleNonce: string;
    /** The signed-in operator, when there is one. */
    consoleSession: ConsoleSession;
  }
}

type ConsoleContext = Context<AppEnv>;

const BRANCH_PAGE_SIZE = 50;
/** An app's page lists this many of its grants and branches (the grants list pages through the rest). */
const APP_PAGE_ITEMS = 200;
const EVENT_PAGE_SIZE = 50;
const GRANT_PAGE_SIZE = 50;
/** One Locations submission attaches at most this many (each is a few statements). */
const MAX_LOCATIONS_PER_SUBMISSION = 200;
const NONCE_BYTES = 16;
const TOKEN_FINGERPRINT_HEX_CHARS = 8;
/** One year: the usual HSTS lifetime. */
const HSTS_MAX_AGE_SECONDS = 365 * 24 * 60 * 60;

const csp = (nonce: string) =>
  [
    "default-src 'none'",
    `style-src 'nonce-${nonce}'`,
    `script-src 'nonce-${nonce}'`,
    "img-src 'self'",
    "form-action 'self'",
    "frame-ancestors 'none'",
    "base-uri 'none'",
  ].join("; ");

export function registerConsoleRoutes(app: App): void {
  const ui = new Hono<AppEnv>();
  ui.use(securityHeaders);
  ui.use(navigationsOnly);
  ui.use(requireHttps);
  ui.use(refuseCrossOrigin);
  ui.use(authenticate);

  ui.get("/sign-in", async (c) => (session(c) ? c.redirect(consolePath(), 303) : signInForm(c, 200)));
  ui.post("/sign-in", signIn);
  ui.post("/sign-out", signOut);

  ui.get("/", async (c) => {
    const query = parseOr422(ListQuery, c.req.query());
    const listQuery: BranchListQuery = {
      status: query.status || undefined,
      active: query.active === "true" ? true : query.active === "false" ? false : undefined,
      search: query.q?.trim() || undefined,
      cursor: query.cursor || undefined,
      limit: BRANCH_PAGE_SIZE,
    };
    const list = await listBranches(c.var.db, listQuery);
    const next = list.nextCursor
      ? `${consolePath()}?${new URLSearchParams(
          Object.entries({
            status: listQuery.status ?? "",
            active: query.active ?? "",
            q: listQuery.search ?? "",
            cursor: list.nextCursor,
          }).filter(([, value]) => value !== ""),
        )}`
      : null;
    return page(
      c,
      200,
      <BranchListView page={await pageContext(c)} list={list} query={listQuery} now={new Date()} nextHref={next} />,
    );
  });

  ui.get("/branches/new", async (c) =>
    page(
      c,
      200,
      <NewBranchView
        page={await pageContext(c)}
        values={{}}
        errors={{}}
        defaultRedirectUri={`${c.var.baseUrl}/auth/callback`}
      />,
    ),
  );

  ui.get("/branches/:id", async (c) => {
    const id = parseOr422(IdParam, c.req.param()).id;
    const now = new Date();
    const context = await pageContext(c);
    // A link the login-link POST just issued for this branch (never another branch's).
    const link = context.flash?.link?.clientId === id ? context.flash.link : undefined;
    return page(c, 200, <BranchView page={context} details={await loadBranch(c, id)} now={now} link={link} />);
  });

  ui.get("/events", async (c) => {
    const query = parseOr422(EventQuery, c.req.query());
    const filters = { branchId: query.branch_id?.trim() || undefined, type: query.type || undefined };
    const log = await listEvents(c.var.db, { ...filters, after: query.after, limit: EVENT_PAGE_SIZE });
    const next =
      log.nextCursor === null
        ? null
        : `${consolePath("/events")}?${new URLSearchParams(
            Object.entries({
              branch_id: filters.branchId ?? "",
              type: filters.type ?? "",
              after: String(log.nextCursor),
            }).filter(([, value]) => value !== ""),
          )}`;
    return page(
      c,
      200,
      <EventLogView
        page={await pageContext(c)}
        events={log.events}
        filters={filters}
        now={new Date()}
        nextHref={next}
        canRedeliver={webhookTarget(c.var.config) !== undefined}
      />,
    );
  });

  ui.get("/health", async (c) => {
    const now = new Date();
    const report = await healthReport(c.var.db, now, c.var.config.CRON_REFRESH_WINDOW_SECONDS);
    return page(
      c,
      200,
      <HealthView
        page={await pageContext(c)}
        report={report}
        now={now}
        webhooks={webhookTarget(c.var.config) !== undefined}
      />,
    );
  });

  ui.get("/apps", async (c) =>
    page(c, 200, <AppListView page={await pageContext(c)} apps={await listApps(c.var.db)} />),
  );
  ui.get("/apps/new", async (c) => page(c, 200, <NewAppView page={await pageContext(c)} values={{}} />));
  ui.get("/apps/:id", async (c) => {
    const id = parseOr422(IdParam, c.req.param()).id;
    const db = c.var.db;
    const [summary, grants, branches] = await Promise.all([
      getApp(db, id),
      listGrants(db, { appId: id, limit: APP_PAGE_ITEMS }),
      listAppBranches(db, id, APP_PAGE_ITEMS + 1),
    ]);
    return page(
      c,
      200,
      <AppView
        page={await pageContext(c)}
        summary={summary}
        grants={grants.grants}
        moreGrants={grants.nextCursor !== null}
        branches={branches.slice(0, APP_PAGE_ITEMS) satisfies AppBranch[]}
        moreBranches={branches.length > APP_PAGE_ITEMS}
      />,
    );
  });
  ui.get("/grants", async (c) => {
    const query = parseOr422(GrantQuery, c.req.query());
    const list = await listGrants(c.var.db, { appId: query.app_id, after: query.after, limit: GRANT_PAGE_SIZE });
    const next =
      list.nextCursor === null
        ? null
        : `${consolePath("/grants")}?${new URLSearchParams(
            Object.entries({ app_id: query.app_id?.toString() ?? "", after: String(list.nextCursor) }).filter(
              ([, value]) => value !== "",
            ),
          )}`;
    return page(
      c,
      200,
      <GrantListView page={await pageContext(c)} grants={list.grants} appId={query.app_id} nextHref={next} />,
    );
  });
  ui.get("/grants/:id", async (c) => {
    const id = parseOr422(IdParam, c.req.param()).id;
    const view = await getGrant(c.var.db, id);
    const isGoogle = view.grant.appId !== null && (await getApp(c.var.db, view.grant.appId)).app.profile === "google";
    return page(c, 200, <GrantPageView page={await pageContext(c)} view={view} isGoogle={isGoogle} now={new Date()} />);
  });

  ui.get("/grants/:id/locations", async (c) => {
    const id = parseOr422(IdParam, c.req.param()).id;
    const view = await getGrant(c.var.db, id);
    let locations: Awaited<ReturnType<typeof grantLocations>>;
    try {
      locations = await grantLocations(operatorOf(c), id, new Date());
    } catch (error) {
      // The API's refusal (401, 403, 429, unreachable), a grant that cannot serve a token, a non-google
      // app: said on the grant's page, never a 500.
      const appError = toAppError(error);
      if (appError.status === 500) throw error;
      return redirectWithFlash(c, consolePath(`/grants/${id}`), {
        tone: "error",
        message: `The locations could not be listed: ${appError.detail}`,
      });
    }
    return page(
      c,
      200,
      <LocationsView
        page={await pageContext(c)}
        view={view}
        locations={locations}
        derivedBranchId={branchIdForLocation}
      />,
    );
  });
  ui.post("/grants/:id/locations", async (c) => {
    const id = parseOr422(IdParam, c.req.param()).id;
    const form = await formOf(c);
    const names = Object.entries(form)
      .filter(([name]) => /^location_\d{1,5}$/.test(name))
      .map(([, value]) => value);
    return formAction(c, consolePath(`/grants/${id}`), async (op, now) => {
      if (names.length > MAX_LOCATIONS_PER_SUBMISSION) {
        throw new AppError("validation_failed", `At most ${MAX_LOCATIONS_PER_SUBMISSION} locations at a time.`);
      }
      const outcome = await attachLocations(op, id, names, now);
      const done = [
        outcome.created.length > 0 ? `created and attached ${outcome.created.join(", ")}` : "",
        outcome.attached.length > 0 ? `attached ${outcome.attached.join(", ")}` : "",
      ].filter(Boolean);
      const failed = outcome.failed.map((failure) => `${failure.location}: ${failure.reason}`).join("; ");
      if (outcome.failed.length > 0) {
        return {
          tone: "error",
          message: `${done.length > 0 ? `Grant ${id}: ${done.join("; ")}. ` : ""}Not attached: ${failed}`,
        };
      }
      return `Grant ${id}, no consent: ${done.join("; ")}.`;
    });
  });

  ui.post("/apps", registerAppForm);
  ui.post("/apps/:id/secret", async (c) => {
    const id = parseOr422(IdParam, c.req.param()).id;
    const form = await formOf(c);
    return formAction(c, consolePath(`/apps/${id}`), async (op, now) => {
      const changes = parseOr422(AppPatch, { client_secret: form.client_secret ?? "" });
      const app = await changeApp(op, id, changes, now);
      return `Client secret of ${app.name} rotated: one change for all its branches; the next refresh uses it.`;
    });
  });

  ui.post("/branches", registerBranchForm);
  // Post/Redirect/Get: the link rides in the flash cookie to the branch page, so reloading that
  // page neither posts again (which, with "Revoke earlier links", would revoke the link just
  // copied) nor puts the link in a URL (history, logs, Referer).
  ui.post("/branches/:id/login-link", (c) =>
    branchAction(c, async (op, id, now, form) => {
      const revokePrevious = form.revoke_previous === "true";
      const link = await newLoginLink(op, id, revokePrevious, now);
      return {
        tone: "ok",
        message: revokePrevious
          ? "New login link created; every earlier link no longer works. Copy it below."
          : "New login link created. Copy it below.",
        link: { clientId: id, url: link.url, expiresAt: link.expiresAt },
      };
    }),
  );
  ui.post("/branches/:id/login-links/revoke", (c) =>
    branchAction(c, async (op, id, now) => {
      await revokeLoginLinks(op, id, now);
      return "Every login link issued so far, and any consent begun with one, no longer works.";
    }),
  );
  ui.post("/branches/:id/refresh", (c) =>
    branchAction(c, async (op, id, now) => {
      const token = await refreshNow(op, { clientId: id }, now);
      return `Token refreshed: the new one ${expiryWords(token.expiresAt, new Date())}.`;
    }),
  );
  ui.post("/branches/:id/active", (c) =>
    branchAction(c, async (op, id, now, form) => {
      const choice = z.enum(["true", "false"]).safeParse(form.is_active);
      if (!choice.success) throw new AppError("validation_failed", 'is_active must be "true" or "false".');
      const isActive = choice.data === "true";
      await changeClient(op, id, clientChangesOf(parseOr422(ClientPatch, { is_active: isActive })), now);
      return isActive
        ? "Branch activated: its token is served and refreshed again."
        : "Branch deactivated: its token is no longer served or refreshed.";
    }),
  );
  ui.post("/branches/:id/secret", (c) =>
    branchAction(c, async (op, id, now, form) => {
      const changes = parseOr422(ClientPatch, { client_secret: form.client_secret ?? "" });
      await changeClient(op, id, clientChangesOf(changes), now);
      return "Client secret rotated. The next refresh uses it.";
    }),
  );
  ui.post("/branches/:id/grant", (c) =>
    branchAction(c, async (op, id, now, form) => {
      const { grant_id: grantId } = parseOr422(AttachForm, { grant_id: form.grant_id ?? "" });
      try {
        await getGrant(op.db, grantId);
      } catch (error) {
        // A grant the form did not offer is the form's error, not a missing page.
        if (error instanceof AppError && error.code === "not_found")
          throw new AppError("validation_failed", error.detail);
        throw error;
      }
      const result = await attachToGrant(op, id, grantId, now);
      return result.previousGrantId === grantId
        ? `Already served from grant ${grantId}.`
        : `Attached to grant ${grantId}: the branch is served from it now, with no consent.`;
    }),
  );
  ui.post("/branches/:id/revoke", (c) =>
    branchAction(c, async (op, id, now) => {
      const { client } = await getClient(op.db, id);
      const result = await revokeToken(op, client.branchId, now);
      return `${
        result.revokedAtProvider
          ? "Grant revoked here and at the provider."
          : "Grant revoked here; the provider could not revoke it (see the log), so revoke it there too if it matters."
      } Other locations may serve the old token from their cache for up to ${result.cacheMaxAgeSeconds} s.`;
    }),
  );
  ui.post("/branches/:id/delete", async (c) => {
    const id = parseOr422(IdParam, c.req.param()).id;
    const op = operatorOf(c);
    const { client } = await getClient(op.db, id);
    const confirm = (await formOf(c)).confirm ?? "";
    if (confirm.trim() !== client.branchId) {
      return redirectWithFlash(c, consolePath(`/branches/${id}`), {
        tone: "error",
        message: `Not deleted: type the branch ID (${client.branchId}) exactly to confirm.`,
      });
    }
    const result = await removeClient(op, id, new Date());
    const failures = result.revocationFailures ? `, ${result.revocationFailures} revocation(s) failed` : "";
    return redirectWithFlash(c, consolePath(), {
      tone: "ok",
      message: `Branch ${client.branchId} deleted (${result.revoked} grant(s) revoked at the provider${failures}). Other locations may serve its token from their cache for up to ${result.cacheMaxAgeSeconds} s.`,
    });
  });
  ui.post("/events/:id/redeliver", async (c) => {
    const id = parseOr422(EventIdParam, c.req.param()).id;
    const back = consolePath("/events");
    let event: EventRow;
    try {
      // The request middleware makes the first attempt after the response (as POST /events/{id}/redeliver).
      event = await queueRedelivery(operatorOf(c), id, new Date());
    } catch (error) {
      if (!(error instanceof AppError && error.code === "conflict")) throw error;
      return redirectWithFlash(c, back, { tone: "error", message: error.detail });
    }
    return redirectWithFlash(c, `${back}?branch_id=${encodeURIComponent(event.branchId)}`, {
      tone: "ok",
      message: `evt_${event.id} queued for delivery; the first attempt follows now.`,
    });
  });

  ui.all("*", async (c) => {
    throw new AppError("not_found", `No console page at ${new URL(c.req.url).pathname}.`);
  });
  ui.onError(renderError);

  app.route("/console", ui);
}

// ---------------------------------------------------------------------------------------------
// Query and form schemas.

const ListQuery = z.object({
  status: z.union([z.enum(BRANCH_STATUSES), z.literal("")]).optional(),
  active: z.enum(["any", "true", "false", ""]).optional(),
  q: z.string().max(128, "must be at most 128 characters").optional(),
  cursor: z.string().max(512).optional(),
});

const EventQuery = z.object({
  branch_id: z.string().max(128, "must be at most 128 characters").optional(),
  type: z.union([z.enum(EVENT_TYPES), z.literal("")]).optional(),
  after: z.coerce.number().int().min(0).max(Number.MAX_SAFE_INTEGER).optional(),
});

/** As the API's {id} parameter (src/routes/clients.ts): an internal client id. */
const IdParam = z.object({ id: z.coerce.number().int().positive().max(2_147_483_647) });

const GrantQuery = z.object({
  app_id: z.coerce.number().int().positive().max(2_147_483_647).optional(),
  after: z.coerce.number().int().min(0).max(2_147_483_647).optional(),
});

const AttachForm = z.object({
  grant_id: z.coerce.number({ error: "choose a grant" }).int().positive("choose a grant").max(2_147_483_647),
});

const EventIdParam = z.object({ id: z.coerce.number().int().positive().max(Number.MAX_SAFE_INTEGER) });

function parseOr422<T extends z.ZodType>(schema: T, value: unknown): z.infer<T> {
  const result = schema.safeParse(value);
  if (result.success) return result.data;
  const problems = result.error.issues.map((issue) => `${issue.path.join(".") || "(query)"}: ${issue.message}`);
  throw new AppError("validation_failed", problems.join("; "));
}

// ---------------------------------------------------------------------------------------------
// Middleware: headers, origin, session, CSRF token.

async function securityHeaders(c: ConsoleContext, next: Next): Promise<void> {
  const nonce = toBase64Url(crypto.getRandomValues(new Uint8Array(NONCE_BYTES)));
  c.set("consoleNonce", nonce);
  await next();
  const headers: Record<string, string> = {
    "Content-Security-Policy": csp(nonce),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    // A console page opened by a script of another page of this origin (the docs renderer) is put
    // in a browsing context group of its own: the opener gets no handle on its document.
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
  };
  // Browsers ignore HSTS over http; on https it keeps the next visit off plain http.
  if (new URL(c.req.url).protocol === "https:")
    headers["Strict-Transport-Security"] = `max-age=${HSTS_MAX_AGE_SECONDS}`;
  try {
    for (const [name, value] of Object.entries(headers)) c.res.headers.set(name, value);
  } catch {
    c.res = new Response(c.res.body, c.res);
    for (const [name, value] of Object.entries(headers)) c.res.headers.set(name, value);
  }
}

/**
 * The console answers a browser only when it navigates to a page or submits a form (Fetch Metadata:
 * `Sec-Fetch-Mode: navigate`, `Sec-Fetch-Dest: document`), never a script's fetch: a script running
 * on this origin (the docs page's third-party renderer) could otherwise read a page with the
 * operator's session, and its CSRF token. Browsers send these headers and scripts cannot set them;
 * a client without them (curl, an old browser) is not a script in someone's page and is let through.
 */
async function navigationsOnly(c: ConsoleContext, next: Next): Promise<Response | undefined> {
  const mode = c.req.header("sec-fetch-mode");
  const dest = c.req.header("sec-fetch-dest");
  if (mode === undefined || (mode === "navigate" && (dest === undefined || dest === "document"))) {
    await next();
    return undefined;
  }
  return forbidden(c, "Console pages open only as pages of their own, not from a script or inside another page.");
}

/**
 * Plain http is refused on any host but loopback, before the sign-in form is shown or a key or
 * cookie read: see consoleTransportAllowed.
 */
async function requireHttps(c: ConsoleContext, next: Next): Promise<Response | undefined> {
  if (!consoleTransportAllowed(c.req.url)) {
    const https = new URL(c.req.url);
    https.protocol = "https:";
    return page(
      c,
      403,
      <ErrorPage
        page={{ nonce: c.get("consoleNonce") }}
        title="The console needs https"
        message={`The console needs https: open ${https.origin}${consolePath()} instead. Over plain http the admin key and the session would cross the network in clear.`}
        homeHref={`${https.origin}${consolePath()}`}
      />,
    );
  }
  await next();
  return undefined;
}

const originCheck = sameOriginCheck();

/** hono/csrf: a form POST must come from this origin (Origin or Sec-Fetch-Site), else a 403 page. */
async function refuseCrossOrigin(c: ConsoleContext, next: Next): Promise<Response | undefined> {
  try {
    await originCheck(c, async () => {});
  } catch (error) {
    if (!(error instanceof HTTPException) || error.status !== 403) throw error;
    return forbidden(c, "This form was sent from another site (its Origin is not this console's), so it was refused.");
  }
  await next();
  return undefined;
}

async function authenticate(c: ConsoleContext, next: Next): Promise<Response | undefined> {
  const now = new Date();
  const access = accessSettings(c.var.config);
  const cookies = consoleCookies(c.req.url);
  let current: ConsoleSession | null;
  if (access) {
    current = await readAccessSession(access, c.req.header("cf-access-jwt-assertion"), now);
  } else {
    const value = getCookie(c, cookies.session);
    current = await readKeySession(c.var.keyring, value, c.var.config.ADMIN_API_KEY, now);
    // Forged, expired, or its key was removed: the browser forgets it.
    if (value !== undefined && !current) deleteCookie(c, cookies.session, { path: "/", secure: cookies.secure });
  }
  if (current) c.set("consoleSession", current);
  if (c.req.path === consolePath("/sign-in")) {
    await next();
    return undefined;
  }
  if (!current) {
    if (c.req.method === "GET" || c.req.method === "HEAD") return c.redirect(consolePath("/sign-in"), 303);
    const message = access
      ? "A valid Cloudflare Access token is required."
      : "Your session has ended or is not valid: sign in again.";
    return page(
      c,
      401,
      <ErrorPage page={{ nonce: c.get("consoleNonce") }} title="Signed out" message={message} signIn />,
    );
  }
  if (c.req.method !== "GET" && c.req.method !== "HEAD") {
    const form = await formOf(c);
    if (!(await checkCsrfToken(c.var.keyring, current.id, form.csrf))) {
      return forbidden(c, "The form's CSRF token is missing or not this session's: reload the page and try again.");
    }
  }
  await next();
  return undefined;
}

/**
 * The request's form fields (hono caches the parsed body, so handlers read it again for free). A
 * body that does not parse as its content type says (a multipart body without its boundary, say)
 * is the sender's error: a 400, before anything else looks at it.
 */
async function formOf(c: ConsoleContext): Promise<Record<string, string>> {
  const type = c.req.header("content-type") ?? "";
  if (!/^(application\/x-www-form-urlencoded|multipart\/form-data)/i.test(type)) return {};
  let body: Awaited<ReturnType<typeof c.req.parseBody>>;
  try {
    body = await c.req.parseBody();
  } catch (error) {
    if (error instanceof AppError || error instanceof HTTPException) throw error; // the body limit's 413
    throw new AppError("bad_request", "The form body does not parse as its Content-Type says.", { cause: error });
  }
  const out: Record<string, string> = {};
  for (const [name, value] of Object.entries(body)) if (typeof value === "string") out[name] = value;
  return out;
}

function session(c: ConsoleContext): ConsoleSession | undefined {
  return c.get("consoleSession") as ConsoleSession | undefined;
}

// ---------------------------------------------------------------------------------------------
// Sign-in and sign-out.

async function signInForm(c: ConsoleContext, status: ContentfulStatusCode, error?: string): Promise<Response> {
  const nonce = c.get("consoleNonce");
  if (accessSettings(c.var.config)) {
    return page(c, status === 200 ? 401 : status, <SignInPage page={{ nonce }} error={error} accessOnly />);
  }
  const cookies = consoleCookies(c.req.url);
  const formNonce = signInNonce();
  setCookie(c, cookies.signIn, formNonce, cookieOptions(cookies.secure, SIGN_IN_TTL_SECONDS));
  const csrf = await csrfToken(c.var.keyring, `sign-in:${formNonce}`);
  return page(c, status, <SignInPage page={{ nonce, csrf, flash: await takeFlash(c) }} error={error} />);
}

async function signIn(c: ConsoleContext): Promise<Response> {
  if (accessSettings(c.var.config)) return signInForm(c, 403, "Signing in with an API key is turned off.");
  const cookies = consoleCookies(c.req.url);
  const form = await formOf(c);
  const formNonce = getCookie(c, cookies.signIn);
  if (!formNonce || !(await checkCsrfToken(c.var.keyring, `sign-in:${formNonce}`, form.csrf))) {
    return signInForm(c, 403, "The sign-in form expired or was not sent from this console: try again.");
  }
  const address = clientAddress(c.req.raw);
  if (addressBlocked(address, Date.now())) return tooManySignIns(c);
  const key = (form.api_key ?? "").trim();
  const { ADMIN_API_KEY, SERVICE_API_KEY } = c.var.config;
  const role = key ? await keyRole(key, { admin: ADMIN_API_KEY, service: SERVICE_API_KEY }) : null;
  if (role === "service") return signInForm(c, 401, "The service key cannot sign in: use an admin API key.");
  if (role !== "admin") {
    if (await recordFailure(c.env.AUTH_FAILURES, address, Date.now())) return tooManySignIns(c);
    return signInForm(c, 401, "That is not a valid admin API key.");
  }
  const ttl = c.var.config.CONSOLE_SESSION_TTL_SECONDS;
  const { value } = await createKeySession(c.var.keyring, key, new Date(), ttl);
  setCookie(c, cookies.session, value, cookieOptions(cookies.secure, ttl));
  deleteCookie(c, cookies.signIn, { path: "/", secure: cookies.secure });
  return c.redirect(consolePath(), 303);
}

/** Failed sign-ins are limited per client address (src/lib/rate-limit.ts). */
function tooManySignIns(c: ConsoleContext): Promise<Response> {
  c.header("Retry-After", String(AUTH_FAILURE_PERIOD_SECONDS));
  return signInForm(c, 429, "Too many failed sign-ins came from your address: wait a minute and try again.");
}

async function signOut(c: ConsoleContext): Promise<Response> {
  // Behind Access the session is Access's: its own logout ends it.
  if (accessSettings(c.var.config)) return c.redirect("/cdn-cgi/access/logout", 303);
  const cookies = consoleCookies(c.req.url);
  deleteCookie(c, cookies.session, { path: "/", secure: cookies.secure });
  return redirectWithFlash(c, consolePath("/sign-in"), { tone: "ok", message: "Signed out." });
}

function cookieOptions(secure: boolean, maxAgeSeconds: number) {
  return { httpOnly: true, secure, sameSite: "Strict", path: "/", maxAge: maxAgeSeconds } as const;
}

// ---------------------------------------------------------------------------------------------
// Pages.

async function pageContext(c: ConsoleContext): Promise<PageContext> {
  const current = session(c);
  return {
    nonce: c.get("consoleNonce"),
    who: current?.who,
    csrf: current ? await csrfToken(c.var.keyring, current.id) : undefined,
    flash: await takeFlash(c),
  };
}

/** The flash message the last redirect left, read once. */
async function takeFlash(c: ConsoleContext): Promise<Flash | null> {
  const cookies = consoleCookies(c.req.url);
  const value = getCookie(c, cookies.flash);
  if (value === undefined) return null;
  deleteCookie(c, cookies.flash, { path: "/", secure: cookies.secure });
  return openFlash(c.var.keyring, value, new Date());
}

export async function redirectWithFlash(c: ConsoleContext, location: string, flash: Flash): Promise<Response> {
  const cookies = consoleCookies(c.req.url);
  setCookie(
    c,
    cookies.flash,
    await sealFlash(c.var.keyring, flash, new Date()),
    cookieOptions(cookies.secure, FLASH_TTL_SECONDS),
  );
  return c.redirect(location, 303);
}

function page(c: ConsoleContext, status: ContentfulStatusCode, node: { toString(): string }): Response {
  return c.html(`<!doctype html>${node.toString()}`, status);
}

function forbidden(c: ConsoleContext, message: string): Response {
  return page(c, 403, <ErrorPage page={{ nonce: c.get("consoleNonce") }} title="Refused" message={message} />);
}

/** An error as a page: the AppError's status and its detail (never a secret); anything else is a logged 500. */
async function renderError(error: Error, c: ConsoleContext): Promise<Response> {
  const appError =
    error instanceof HTTPException
      ? new AppError(error.status === 413 ? "payload_too_large" : "bad_request", error.message || "Malformed request.")
      : toAppError(error);
  if (appError.status >= 500 || appError.code === "sealed_value_unreadable") {
    logError("console_request_failed", {
      request_id: c.var.requestId,
      code: appError.code,
      error: describeError(appError.cause ?? appError),
    });
  }
  if (appError.extra.retryAfterSeconds !== undefined) {
    c.header("Retry-After", String(Math.ceil(appError.extra.retryAfterSeconds)));
  }
  let context: PageContext = { nonce: c.get("consoleNonce") };
  try {
    context = await pageContext(c);
  } catch {
    // The page still renders without the header's session details.
  }
  const title = appError.status === 404 ? "Not found" : appError.status >= 500 ? "Something went wrong" : "Refused";
  // The detail is the generic text of src/errors.ts for anything unexpected, never the cause; the
  // request id lets an operator find the logged cause.
  return page(
    c,
    appError.status as ContentfulStatusCode,
    <ErrorPage
      page={context}
      title={title}
      message={appError.detail}
      requestId={appError.status >= 500 ? c.var.requestId : undefined}
    />,
  );
}

// ---------------------------------------------------------------------------------------------
// Actions.

/**
 * A change to one branch, answered 303 to its page with what happened. A refusal the operator can
 * act on (409 not connected, 422 a bad field, 502/503 the provider or database) is the page's error
 * message; an unknown branch is the 404 page.
 */
async function branchAction(
  c: ConsoleContext,
  change: (op: Operator, id: number, now: Date, form: Record<string, string>) => Promise<string | Flash>,
): Promise<Response> {
  const id = parseOr422(IdParam, c.req.param()).id;
  const form = await formOf(c);
  let flash: Flash;
  try {
    const result = await change(operatorOf(c), id, new Date(), form);
    flash = typeof result === "string" ? { tone: "ok", message: result } : result;
  } catch (error) {
    const appError = toAppError(error);
    // An unknown branch is the 404 page, a bug the 500 page; the rest the operator can act on.
    if (appError.status === 404 || appError.status === 500) throw error;
    flash = { tone: "error", message: appError.detail };
  }
  return redirectWithFlash(c, consolePath(`/branches/${id}`), flash);
}

/**
 * A change answered 303 to `back` with what happened: as branchAction, for pages other than a
 * branch's (an unknown app or grant is the 404 page, a bug the 500 page, the rest an error message).
 */
async function formAction(
  c: ConsoleContext,
  back: string,
  change: (op: Operator, now: Date) => Promise<string | Flash>,
): Promise<Response> {
  let flash: Flash;
  try {
    const result = await change(operatorOf(c), new Date());
    flash = typeof result === "string" ? { tone: "ok", message: result } : result;
  } catch (error) {
    const appError = toAppError(error);
    if (appError.status === 404 || appError.status === 500) throw error;
    flash = { tone: "error", message: appError.detail };
  }
  return redirectWithFlash(c, back, flash);
}

/** Register an app (profile google): POST /apps' schema; a refusal goes back to the form with its message. */
async function registerAppForm(c: ConsoleContext): Promise<Response> {
  const form = await formOf(c);
  let created: { id: number; name: string };
  try {
    const body = parseOr422(AppBody, {
      name: form.name ?? "",
      profile: "google",
      client_id: form.client_id ?? "",
      client_secret: form.client_secret ?? "",
    });
    created = await addApp(operatorOf(c), body, new Date());
  } catch (error) {
    const appError = toAppError(error);
    if (appError.status === 500) throw error;
    return redirectWithFlash(c, consolePath("/apps/new"), {
      tone: "error",
      message: `Not registered: ${appError.detail}`,
    });
  }
  return redirectWithFlash(c, consolePath(`/apps/${created.id}`), {
    tone: "ok",
    message: `App ${created.name} registered. Register its branches with its client ID and secret, or attach them to a grant.`,
  });
}

/** The register form: POST /clients' schema, its errors next to their fields (the secret never echoed). */
async function registerBranchForm(c: ConsoleContext): Promise<Response> {
  const form = await formOf(c);
  const values: Partial<Record<NewBranchField, string>> = {};
  for (const { name } of NEW_BRANCH_FIELDS) if (form[name] !== undefined) values[name] = form[name];
  // An empty optional field is an absent one (a form always sends it).
  const body: Record<string, string> = { ...values };
  if ((body.scopes ?? "").trim() === "") delete body.scopes;
  const rerender = async (
    status: ContentfulStatusCode,
    errors: Partial<Record<NewBranchField, string>>,
    formError?: string,
  ) =>
    page(
      c,
      status,
      <NewBranchView
        page={await pageContext(c)}
        values={values}
        errors={errors}
        defaultRedirectUri={`${c.var.baseUrl}/auth/callback`}
        formError={formError}
      />,
    );
  const parsed = ClientBody.safeParse(body);
  if (!parsed.success) {
    const errors: Partial<Record<NewBranchField, string>> = {};
    for (const issue of parsed.error.issues) {
      const field = String(issue.path[0] ?? "") as NewBranchField;
      if (NEW_BRANCH_FIELDS.some((f) => f.name === field) && errors[field] === undefined) errors[field] = issue.message;
    }
    return rerender(422, errors, "Some fields need fixing: see the messages next to them.");
  }
  try {
    const { client } = await registerBranch(operatorOf(c), newClientOf(parsed.data), new Date());
    return redirectWithFlash(c, consolePath(`/branches/${client.id}`), {
      tone: "ok",
      message: `Branch ${client.branchId} registered. Press “Copy new login link” to get the link to send to the branch.`,
    });
  } catch (error) {
    if (!(error instanceof AppError) || error.code !== "conflict") throw error;
    const errors: Partial<Record<NewBranchField, string>> = {};
    for (const problem of error.extra.errors ?? []) errors[problem.field as NewBranchField] = problem.message;
    return rerender(409, errors, error.detail);
  }
}

// ---------------------------------------------------------------------------------------------
// A branch's details.

async function loadBranch(c: ConsoleContext, id: number): Promise<BranchDetails> {
  const db = c.var.db;
  const [found, status, history] = await Promise.all([
    getClient(db, id),
    // The status as events name it: the one rule (src/services/events.ts), not a copy.
    branchStatus(db, id),
    listEvents(db, { clientId: id, limit: LIST_MAX_LIMIT }),
  ]);
  const appId = found.client.appId;
  const grants = appId === null ? [] : (await listGrants(db, { appId, limit: APP_PAGE_ITEMS })).grants;
  return {
    client: found.client,
    token: found.token,
    // Connected grants of the branch's app: what attachBranch accepts.
    attachGrants: grants.filter((view) => view.grant.isValid && view.grant.status === "active"),
    status,
    fingerprint: found.token ? await tokenFingerprint(c.var.keyring, found.token) : null,
    events: history.events,
    moreEvents: history.nextCursor !== null,
  };
}

/** The access token only as the first hex digits of its SHA-256: enough to tell tokens apart. */
async function tokenFingerprint(keyring: Keyring, token: TokenRow): Promise<string> {
  let value: string;
  try {
    value = await open(keyring, token.accessToken, { column: "tokens.access_token", clientId: token.clientId });
  } catch {
    return "unreadable (the stored token does not open)";
  }
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(value)));
  return [...digest]
    .map((byte) => byte.toString(16).padStart(2, "0"))
    .join("")
    .slice(0, TOKEN_FINGERPRINT_HEX_CHARS);
}
