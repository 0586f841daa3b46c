import type { ZodError } from "zod";
import { SealedValueError } from "./lib/crypto";

/**
 * One error type with a fixed list of codes; `problemResponse` is the only place an error becomes a
 * response. Anything thrown that is not an AppError is a 500 whose details are logged, never echoed.
 */

export const ERROR_STATUS = {
  bad_request: 400,
  invalid_state: 400,
  authorization_denied: 400,
  security_event_rejected: 400,
  validation_failed: 422,
  unauthorized: 401,
  forbidden: 403,
  not_found: 404,
  method_not_allowed: 405,
  conflict: 409,
  not_connected: 409,
  reauthorization_required: 409,
  account_disabled: 409,
  client_credentials_rejected: 409,
  sealed_value_unreadable: 409,
  payload_too_large: 413,
  unsupported_media_type: 415,
  rate_limited: 429,
  quota_exceeded: 429,
  provider_error: 502,
  database_unavailable: 503,
  provider_unavailable: 503,
  upstream_unreachable: 502,
  upstream_timeout: 504,
  configuration_error: 500,
  internal_error: 500,
} as const;

export type ErrorCode = keyof typeof ERROR_STATUS;

const TITLES: Record<ErrorCode, string> = {
  bad_request: "Bad request",
  invalid_state: "Invalid or expired authorization state",
  authorization_denied: "Authorization was not granted",
  security_event_rejected: "Security Event Token rejected",
  validation_failed: "Validation failed",
  unauthorized: "Unauthorized",
  forbidden: "Forbidden",
  not_found: "Not found",
  method_not_allowed: "Method not allowed",
  conflict: "Conflict",
  not_connected: "Branch not connected",
  reauthorization_required: "Reauthorization required",
  account_disabled: "The account is disabled at the provider",
  client_credentials_rejected: "Client credentials rejected by the provider",
  sealed_value_unreadable: "A stored secret of this client cannot be opened",
  payload_too_large: "Payload too large",
  unsupported_media_type: "Unsupported media type",
  rate_limited: "Too many failed attempts",
  quota_exceeded: "The provider API's quota for this app is used up for now",
  provider_error: "OAuth provider error",
  database_unavailable: "Database unavailable",
  provider_unavailable: "OAuth provider unavailable",
  upstream_unreachable: "The provider's API could not be reached",
  upstream_timeout: "The provider's API did not answer in time",
  configuration_error: "Server misconfigured",
  internal_error: "Internal server error",
};

export interface FieldProblem {
  field: string;
  message: string;
}

export class AppError extends Error {
  override readonly name = "AppError";
  readonly status: number;

  constructor(
    readonly code: ErrorCode,
    /** Safe to show to the caller: never put a secret here. */
    readonly detail: string,
    readonly extra: {
      errors?: FieldProblem[];
      retryAfterSeconds?: number;
      headers?: Record<string, string>;
      fields?: Record<string, unknown>;
      cause?: unknown;
    } = {},
  ) {
    super(detail, { cause: extra.cause });
    this.status = ERROR_STATUS[code];
  }
}

export interface ProblemBody {
  type: string;
  title: string;
  status: number;
  detail: string;
  code: ErrorCode;
  /** Kept for callers of the service this one replaces. */
  success: false;
  message: string;
  request_id?: string;
  errors?: FieldProblem[];
  [extra: string]: unknown;
}

export function problemBody(error: AppError, requestId?: string): ProblemBody {
  return {
    ...error.extra.fields,
    type: `https://errors.token-management/${error.code}`,
    title: TITLES[error.code],
    status: error.status,
    detail: error.detail,
    code: error.code,
    success: false,
    message: error.detail,
    ...(requestId ? { request_id: requestId } : {}),
    ...(error.extra.errors ? { errors: error.extra.errors } : {}),
  };
}

export function problemResponse(error: AppError, requestId?: string): Response {
  const headers = new Headers({
    "Content-Type": "application/problem+json",
    "Cache-Control": "no-store",
    ...error.extra.headers,
  });
  if (error.extra.retryAfterSeconds !== undefined) {
    headers.set("Retry-After", String(Math.ceil(error.extra.retryAfterSeconds)));
  }
  return new Response(JSON.stringify(problemBody(error, requestId)), { status: error.status, headers });
}

/** A failed request validation: a 422 that names each field. */
export function validationFailed(error: ZodError): AppError {
  const errors = error.issues.flatMap((issue) =>
    issue.code === "unrecognized_keys"
      ? issue.keys.map((key) => ({ field: [...issue.path, key].join("."), message: "unknown field" }))
      : [{ field: issue.path.join(".") || "(body)", message: issue.message }],
  );
  return new AppError("validation_failed", errors.map((e) => `${e.field}: ${e.message}`).join("; "), { errors });
}

/**
 * Turns anything thrown into an AppError. Database connectivity failures become 503s, text the
 * database cannot store a 422; every other unknown error becomes a generic 500 (its details go to
 * the log only).
 */
export function toAppError(error: unknown): AppError {
  if (error instanceof AppError) return error;
  if (error instanceof SealedValueError) return sealedValueUnreadable(error);
  if (isDatabaseUnavailable(error)) {
    return new AppError("database_unavailable", "The database is unreachable. Try again shortly.", {
      retryAfterSeconds: 5,
      cause: error,
    });
  }
  if (isUnstorableText(error)) {
    return new AppError(
      "validation_failed",
      "A value in the request contains a character that cannot be stored (such as NUL, U+0000).",
      { cause: error },
    );
  }
  return new AppError("internal_error", "An unexpected error occurred.", { cause: error });
}

/**
 * A stored secret that does not open where it is stored: copied from another row, altered, or sealed
 * with a key no longer configured. A 409, not a 500: it concerns this one client's stored state, a
 * retry cannot help, and an operator fixes it on that client (set the secret again, or reconnect),
 * like the other states that block a branch. Other clients are unaffected. Always logged.
 */
function sealedValueUnreadable(error: SealedValueError): AppError {
  const { column, clientId } = error.binding;
  // A client secret is an app's (bound to the app's id); tokens are bound to the branch whose
  // consent created their grant.
  if (column === "clients.client_secret") {
    return new AppError(
      "sealed_value_unreadable",
      `The stored client secret of app ${clientId} cannot be opened: it was altered, copied from another row, or sealed with a key that is no longer configured. To recover, set the app's client secret again (PATCH /apps/${clientId}).`,
      { fields: { app_id: clientId }, cause: error },
    );
  }
  return new AppError(
    "sealed_value_unreadable",
    `The stored token of client ${clientId} cannot be opened: it was altered, copied from another row, or sealed with a key that is no longer configured. To recover, connect the branch again with a new login link (GET /clients/${clientId}/login-url).`,
    { fields: { client_id: clientId }, cause: error },
  );
}

/**
 * PostgreSQL refuses text it cannot encode (22021: a NUL character; 22P05: untranslatable): the
 * value came from the request, so this is the caller's input, not a server failure.
 */
function isUnstorableText(error: unknown): boolean {
  const state = sqlState(error);
  return state === "22021" || state === "22P05";
}

/** SQLSTATE of a PostgreSQL error somewhere in the cause chain, if any. */
export function sqlState(error: unknown): string | undefined {
  for (let e: unknown = error, depth = 0; e && depth < 5; e = (e as { cause?: unknown }).cause, depth++) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === "string" && /^[0-9A-Z]{5}$/.test(code)) return code;
  }
  return undefined;
}

export function constraintName(error: unknown): string | undefined {
  for (let e: unknown = error, depth = 0; e && depth < 5; e = (e as { cause?: unknown }).cause, depth++) {
    const constraint = (e as { constraint?: unknown }).constraint;
    if (typeof constraint === "string") return constraint;
  }
  return undefined;
}

/** Connection-level failure (no PostgreSQL error code, or a connection/resource class code). */
function isDatabaseUnavailable(error: unknown): boolean {
  const chain: unknown[] = [];
  for (let e: unknown = error, depth = 0; e && depth < 5; e = (e as { cause?: unknown }).cause, depth++) chain.push(e);
  const fromDriver = chain.some((e) => {
    const name = (e as { name?: unknown }).name;
    const message = String((e as { message?: unknown }).message ?? "");
    return (
      name === "NeonDbError" ||
      name === "DrizzleQueryError" ||
      message.startsWith("Error connecting to database") ||
      message.startsWith("Server error (HTTP status")
    );
  });
  if (!fromDriver) return false;
  const state = sqlState(error);
  return state === undefined || /^(08|53|57P)/.test(state);
}
