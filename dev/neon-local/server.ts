// A local stand-in for Neon's SQL-over-HTTP endpoint, so the Worker runs the same driver path
// (`@neondatabase/serverless` `neon()` through `drizzle-orm/neon-http`) locally as in production.
// The contract is ../../../shared/neon-http-protocol.md; the real driver is the judge.
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";

// ---------------------------------------------------------------------------------------------
// What a backend (PGlite or PostgreSQL) must provide.

export interface SqlQuery {
  query: string;
  /** Text or NULL, sent to PostgreSQL with no type OIDs so the server infers the types. */
  params: (string | null)[];
}

export interface FieldDescription {
  name: string;
  dataTypeID: number;
  tableID: number;
  columnID: number;
  dataTypeSize: number;
  dataTypeModifier: number;
  format: "text";
}

export interface QueryResult {
  fields: FieldDescription[];
  /** PostgreSQL's text output for every value, NULL as null. */
  rows: (string | null)[][];
  /** First word of the command tag. */
  command: string;
  /** Last number of the command tag, null when it has none. */
  rowCount: number | null;
}

export const ISOLATION_LEVELS = {
  ReadUncommitted: "READ UNCOMMITTED",
  ReadCommitted: "READ COMMITTED",
  RepeatableRead: "REPEATABLE READ",
  Serializable: "SERIALIZABLE",
} as const;
export type IsolationLevel = keyof typeof ISOLATION_LEVELS;

export interface BatchOptions {
  isolationLevel?: IsolationLevel;
  readOnly?: boolean;
  deferrable?: boolean;
}

export interface SqlBackend {
  /** For the CLI's banner, e.g. "pglite: .data/pglite". Never contains a password. */
  readonly description: string;
  query(query: SqlQuery): Promise<QueryResult>;
  /** All queries in one transaction; any error rolls the whole batch back and is rethrown. */
  batch(queries: SqlQuery[], options: BatchOptions): Promise<QueryResult[]>;
  close(): Promise<void>;
}

/** Transaction modes for `BEGIN …` / `SET TRANSACTION …`, "" when there are none. */
export function transactionModes(options: BatchOptions): string {
  const modes: string[] = [];
  if (options.isolationLevel) modes.push(`ISOLATION LEVEL ${ISOLATION_LEVELS[options.isolationLevel]}`);
  if (options.readOnly) modes.push("READ ONLY");
  if (options.deferrable) modes.push("DEFERRABLE");
  return modes.join(", ");
}

/** Fills what a backend lacks (PGlite reports only name and type OID) with what Neon sends. */
export function fieldDescription(
  field: { name: string; dataTypeID: number } & Partial<FieldDescription>,
): FieldDescription {
  return {
    name: field.name,
    dataTypeID: field.dataTypeID,
    tableID: field.tableID ?? 0,
    columnID: field.columnID ?? 0,
    dataTypeSize: field.dataTypeSize ?? -1,
    dataTypeModifier: field.dataTypeModifier ?? -1,
    format: "text",
  };
}

// ---------------------------------------------------------------------------------------------
// Public API.

export type BackendOptions =
  | { kind: "pglite"; dataDir?: string /* undefined = in memory */ }
  | { kind: "postgres"; url: string };

export interface NeonLocalOptions {
  backend?: BackendOptions;
  host?: string; // default 127.0.0.1
  port?: number; // default 0 = free port
  maxBodyBytes?: number; // default 10 MiB → 413 beyond
  latencyMs?: number; // default 0: added before every POST /sql answer (POST /admin/latency changes it)
}

export interface NeonStats {
  /** POST /sql requests, i.e. driver round trips. */
  requests: number;
  /** Statements run (a batch counts each of its queries). */
  queries: number;
  batches: number;
}

export interface NeonLocal {
  url: string;
  sqlEndpoint: string;
  connectionString: string;
  /** What the server runs on, e.g. "pglite: memory" or "postgres: 127.0.0.1:5432/app". */
  description: string;
  stats(): NeonStats;
  resetStats(): void;
  close(): Promise<void>;
}

export const DEFAULT_HOST = "127.0.0.1";
export const DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024;
/** How much of an oversize body we read and discard before answering 413 and dropping the connection. */
const OVERSIZE_DRAIN_BYTES = 64 * 1024 * 1024;
const CLOSE_GRACE_MS = 2_000;

export async function startNeonLocal(opts: NeonLocalOptions = {}): Promise<NeonLocal> {
  const backend = await openBackend(opts.backend ?? { kind: "pglite" });
  const host = opts.host ?? DEFAULT_HOST;
  const maxBodyBytes = opts.maxBodyBytes ?? DEFAULT_MAX_BODY_BYTES;
  const state: ServerState = {
    backend,
    maxBodyBytes,
    down: false,
    scopedFaults: new Map(),
    nextFaultId: 1,
    latencyMs: opts.latencyMs ?? 0,
    stats: emptyStats(),
    statsByUser: new Map(),
  };

  const server = createServer((req, res) => {
    handle(state, req, res).catch((error: unknown) => {
      console.error("neon-local: unhandled error", error);
      if (!res.headersSent) sendText(res, 500, "neon-local: internal error");
      else res.destroy();
    });
  });
  try {
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(opts.port ?? 0, host, () => {
        server.off("error", reject);
        resolve();
      });
    });
  } catch (error) {
    await backend.close();
    throw error;
  }

  const { port } = server.address() as AddressInfo;
  const urlHost = host.includes(":") ? `[${host}]` : host;
  const url = `http://${urlHost}:${port}`;
  let closing: Promise<void> | undefined;

  return {
    url,
    sqlEndpoint: `${url}/sql`,
    connectionString: `postgresql://local:local@${urlHost}:${port}/main`,
    description: backend.description,
    stats: () => ({ ...state.stats }),
    resetStats: () => {
      state.stats = emptyStats();
      state.statsByUser.clear();
    },
    close: () => {
      closing ??= (async () => {
        await stopServer(server);
        await backend.close();
      })();
      return closing;
    },
  };
}

async function openBackend(options: BackendOptions): Promise<SqlBackend> {
  if (options.kind === "postgres") {
    const { openPostgresBackend } = await import("./postgres-backend.ts");
    return openPostgresBackend(options.url);
  }
  const { openPgliteBackend } = await import("./pglite-backend.ts");
  return openPgliteBackend(options.dataDir);
}

/** Stops accepting, lets in-flight requests finish for a moment, then drops whatever is left. */
async function stopServer(server: ReturnType<typeof createServer>): Promise<void> {
  const closed = new Promise<void>((resolve) => server.close(() => resolve()));
  server.closeIdleConnections();
  const timer = setTimeout(() => server.closeAllConnections(), CLOSE_GRACE_MS);
  // Keep-alive connections that finish a request while we wait would otherwise linger.
  const sweeper = setInterval(() => server.closeIdleConnections(), 50);
  try {
    await closed;
  } finally {
    clearTimeout(timer);
    clearInterval(sweeper);
  }
}

// ---------------------------------------------------------------------------------------------
// HTTP.

interface ServerState {
  backend: SqlBackend;
  maxBodyBytes: number;
  /** Every POST /sql fails. */
  down: boolean;
  /**
   * Scoped faults by id: a POST /sql with a statement matching every string of one fails. Each is
   * cleared on its own, so test files sharing the server do not clear each other's.
   */
  scopedFaults: Map<number, string[]>;
  nextFaultId: number;
  /** Injected delay per POST /sql, as if the database were that far away. */
  latencyMs: number;
  stats: NeonStats;
  /** The same counters per connection-string user, so concurrent clients can count their own. */
  statsByUser: Map<string, NeonStats>;
}

/** Longest latency POST /admin/latency accepts. */
const MAX_LATENCY_MS = 60_000;

const emptyStats = (): NeonStats => ({ requests: 0, queries: 0, batches: 0 });

const CORS_HEADERS = {
  "Access-Control-Allow-Origin": "*",
  "Access-Control-Allow-Methods": "POST, OPTIONS",
  "Access-Control-Allow-Headers":
    "Authorization, Content-Type, Neon-Connection-String, Neon-Raw-Text-Output, Neon-Array-Mode, " +
    "Neon-Batch-Isolation-Level, Neon-Batch-Read-Only, Neon-Batch-Deferrable, Neon-Pool-Opt-In",
  "Access-Control-Max-Age": "86400",
};

async function handle(state: ServerState, req: IncomingMessage, res: ServerResponse): Promise<void> {
  const path = new URL(req.url ?? "/", "http://localhost").pathname;
  const method = req.method ?? "GET";
  const route = `${method} ${path}`;

  switch (route) {
    case "OPTIONS /sql":
      res.writeHead(204, CORS_HEADERS).end();
      return;
    case "POST /sql":
      return handleSql(state, req, res);
    case "GET /health":
      return sendJson(res, 200, { ok: true });
    case "GET /stats": {
      const user = new URL(req.url ?? "/", "http://localhost").searchParams.get("user");
      return sendJson(res, 200, user === null ? state.stats : (state.statsByUser.get(user) ?? emptyStats()));
    }
    case "POST /stats/reset":
      state.stats = emptyStats();
      state.statsByUser.clear();
      return sendJson(res, 200, state.stats);
    case "POST /admin/fail":
      return handleFail(state, req, res);
    case "POST /admin/latency":
      return handleLatency(state, req, res);
  }
  if (path === "/sql") return sendText(res, 405, "method not allowed", { Allow: "POST, OPTIONS" });
  return sendText(res, 404, "not found");
}

async function handleFail(state: ServerState, req: IncomingMessage, res: ServerResponse): Promise<void> {
  const body = await readBody(req, state.maxBodyBytes);
  if (body === "too-large") return sendText(res, 413, "request body too large", { Connection: "close" });
  let request: { mode?: unknown; match?: unknown; id?: unknown } | null;
  try {
    request = JSON.parse(body.toString("utf8")) as { mode?: unknown; match?: unknown; id?: unknown } | null;
  } catch {
    request = null;
  }
  const mode = request?.mode;
  const match = request?.match;
  const id = request?.id;
  const validMatch =
    match === undefined ||
    (Array.isArray(match) &&
      match.length > 0 &&
      match.every((m) => typeof m === "string" && m.length > 0 && m !== "="));
  const validId = id === undefined || (mode === "ok" && Number.isInteger(id));
  if ((mode !== "down" && mode !== "ok") || !validMatch || !validId || (mode === "ok" && match !== undefined)) {
    return sendText(
      res,
      400,
      'expected {"mode": "down"} (everything), {"mode": "down", "match": [strings]} (a scoped fault, answered with its id), {"mode": "ok", "id": N} (clears that one) or {"mode": "ok"} (clears all)',
    );
  }
  if (mode === "down" && match !== undefined) {
    const faultId = state.nextFaultId++;
    state.scopedFaults.set(faultId, match as string[]);
    return sendJson(res, 200, { mode, match, id: faultId });
  }
  if (mode === "down") {
    state.down = true;
    return sendJson(res, 200, { mode });
  }
  if (id !== undefined) {
    state.scopedFaults.delete(id as number);
    return sendJson(res, 200, { mode, id });
  }
  state.down = false;
  state.scopedFaults.clear();
  return sendJson(res, 200, { mode });
}

/**
 * Whether fault injection fails this request: all of it, or only a statement matching every string
 * (in its SQL or a parameter; `=value`: a parameter equal to value, e.g. one id among many).
 */
function faulted(state: ServerState, request: ParsedRequest): boolean {
  if (state.down) return true;
  const queries = "queries" in request ? request.queries : [request];
  return [...state.scopedFaults.values()].some((match) => queries.some((q) => matches(match, q)));
}

function matches(match: string[], q: { query: string; params: (string | null)[] }): boolean {
  return match.every((text) =>
    text.startsWith("=")
      ? q.params.some((p) => p === text.slice(1))
      : q.query.includes(text) || q.params.some((p) => p?.includes(text)),
  );
}

async function handleLatency(state: ServerState, req: IncomingMessage, res: ServerResponse): Promise<void> {
  const body = await readBody(req, state.maxBodyBytes);
  if (body === "too-large") return sendText(res, 413, "request body too large", { Connection: "close" });
  let ms: unknown;
  try {
    ms = (JSON.parse(body.toString("utf8")) as { ms?: unknown } | null)?.ms;
  } catch {
    ms = undefined;
  }
  if (typeof ms !== "number" || !Number.isInteger(ms) || ms < 0 || ms > MAX_LATENCY_MS) {
    return sendText(res, 400, `expected {"ms": <integer 0..${MAX_LATENCY_MS}>}`);
  }
  state.latencyMs = ms;
  return sendJson(res, 200, { ms });
}

/** The user named in the request's connection string ("" when there is none or it is malformed). */
function connectionUser(req: IncomingMessage): string {
  const text = header(req, "neon-connection-string");
  if (!text) return "";
  try {
    return decodeURIComponent(new URL(text).username);
  } catch {
    return "";
  }
}

function countersOf(state: ServerState, req: IncomingMessage): NeonStats[] {
  const user = connectionUser(req);
  let mine = state.statsByUser.get(user);
  if (!mine) {
    mine = emptyStats();
    state.statsByUser.set(user, mine);
  }
  return [state.stats, mine];
}

async function handleSql(state: ServerState, req: IncomingMessage, res: ServerResponse): Promise<void> {
  const counters = countersOf(state, req);
  for (const stats of counters) stats.requests++;
  const body = await readBody(req, state.maxBodyBytes);
  if (body === "too-large") {
    return sendText(res, 413, `request body too large (limit ${state.maxBodyBytes} bytes)`, {
      ...cors(),
      Connection: "close",
    });
  }
  if (state.latencyMs > 0) await new Promise((resolve) => setTimeout(resolve, state.latencyMs));
  const downMessage = "neon-local: database is down (fault injection)";
  if (state.down === true) return sendText(res, 503, downMessage, cors());

  try {
    checkConnectionString(req.headers["neon-connection-string"]);
    const request = parseSqlRequest(body);
    if (faulted(state, request)) return sendText(res, 503, downMessage, cors());
    const defaultArrayMode = header(req, "neon-array-mode") === "true";
    if ("queries" in request) {
      const options = batchOptions(req);
      for (const stats of counters) {
        stats.batches++;
        stats.queries += request.queries.length;
      }
      const results = await state.backend.batch(request.queries, options);
      const shaped = results.map((result, i) => shapeResult(result, request.queries[i]?.arrayMode ?? defaultArrayMode));
      return sendJson(res, 200, { results: shaped }, cors());
    }
    for (const stats of counters) stats.queries++;
    const result = await state.backend.query(request);
    return sendJson(res, 200, shapeResult(result, request.arrayMode ?? defaultArrayMode), cors());
  } catch (error) {
    if (error instanceof ProtocolError || isPostgresError(error)) return sendJson(res, 400, errorBody(error), cors());
    console.error("neon-local: internal error", error);
    const message = error instanceof Error ? error.message : String(error);
    return sendText(res, 500, `neon-local: internal error: ${message}`, cors());
  }
}

function cors(): Record<string, string> {
  return { "Access-Control-Allow-Origin": "*" };
}

function header(req: IncomingMessage, name: string): string | undefined {
  const value = req.headers[name];
  return Array.isArray(value) ? value[0] : value;
}

function sendJson(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  const text = JSON.stringify(body);
  res.writeHead(status, {
    "Content-Type": "application/json",
    "Content-Length": Buffer.byteLength(text),
    "Cache-Control": "no-store",
    ...headers,
  });
  res.end(text);
}

function sendText(res: ServerResponse, status: number, text: string, headers: Record<string, string> = {}): void {
  res.writeHead(status, {
    "Content-Type": "text/plain; charset=utf-8",
    "Content-Length": Buffer.byteLength(text),
    "Cache-Control": "no-store",
    ...headers,
  });
  res.end(text);
}

/**
 * Reads the whole body, or reports it too large. An oversize body is drained (up to a cap) rather
 * than cut off, so the client gets to read our 413 instead of a reset connection.
 */
async function readBody(req: IncomingMessage, limit: number): Promise<Buffer | "too-large"> {
  const declared = Number(req.headers["content-length"]);
  if (Number.isFinite(declared) && declared > limit + OVERSIZE_DRAIN_BYTES) return "too-large";
  const chunks: Buffer[] = [];
  let total = 0;
  for await (const chunk of req as AsyncIterable<Buffer>) {
    total += chunk.length;
    if (total > limit + OVERSIZE_DRAIN_BYTES) return "too-large";
    if (total <= limit) chunks.push(chunk);
  }
  return total > limit ? "too-large" : Buffer.concat(chunks, total);
}

// ---------------------------------------------------------------------------------------------
// The request.

/** An error of the protocol rather than of PostgreSQL: 400 with `code` and `severity` "". */
export class ProtocolError extends Error {
  override name = "ProtocolError";
}

type ParsedQuery = SqlQuery & { arrayMode?: boolean };
type ParsedRequest = ParsedQuery | { queries: ParsedQuery[] };

function checkConnectionString(value: string | string[] | undefined): void {
  const text = Array.isArray(value) ? value[0] : value;
  if (!text) throw new ProtocolError("missing connection string (Neon-Connection-String header)");
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw new ProtocolError("invalid connection string");
  }
  if (url.protocol !== "postgres:" && url.protocol !== "postgresql:") {
    throw new ProtocolError(`invalid connection string: unsupported scheme "${url.protocol}"`);
  }
}

function parseSqlRequest(body: Buffer): ParsedRequest {
  let json: unknown;
  try {
    json = JSON.parse(body.toString("utf8"));
  } catch {
    throw new ProtocolError("request body is not valid JSON");
  }
  if (!isObject(json)) throw new ProtocolError("request body must be a JSON object");
  if ("queries" in json) {
    if (!Array.isArray(json.queries)) throw new ProtocolError('"queries" must be an array');
    return { queries: json.queries.map((q, i) => parseQuery(q, `queries[${i}]`)) };
  }
  return parseQuery(json, "body");
}

function parseQuery(value: unknown, where: string): ParsedQuery {
  if (!isObject(value)) throw new ProtocolError(`${where} must be an object`);
  const { query, params = [], arrayMode } = value;
  if (typeof query !== "string") throw new ProtocolError(`${where}: "query" must be a string`);
  if (!Array.isArray(params)) throw new ProtocolError(`${where}: "params" must be an array`);
  if (arrayMode !== undefined && typeof arrayMode !== "boolean") {
    throw new ProtocolError(`${where}: "arrayMode" must be a boolean`);
  }
  return { query, params: params.map((p, i) => parseParam(p, `${where}.params[${i}]`)), arrayMode };
}

function parseParam(value: unknown, where: string): string | null {
  if (value === null || typeof value === "string") return value;
  // The driver sends only strings and nulls; JSON numbers and booleans are harmless to accept.
  if (typeof value === "number" || typeof value === "boolean") return String(value);
  throw new ProtocolError(`${where}: a parameter must be a string or null`);
}

function batchOptions(req: IncomingMessage): BatchOptions {
  const level = header(req, "neon-batch-isolation-level");
  if (level !== undefined && !Object.hasOwn(ISOLATION_LEVELS, level)) {
    throw new ProtocolError(`invalid isolation level: ${level}`);
  }
  return {
    isolationLevel: level as IsolationLevel | undefined,
    readOnly: header(req, "neon-batch-read-only") === "true",
    deferrable: header(req, "neon-batch-deferrable") === "true",
  };
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

// ---------------------------------------------------------------------------------------------
// The response.

function shapeResult(result: QueryResult, arrayMode: boolean) {
  const rows = arrayMode
    ? result.rows
    : result.rows.map((row) => Object.fromEntries(result.fields.map((field, i) => [field.name, row[i] ?? null])));
  return { fields: result.fields, rows, command: result.command, rowCount: result.rowCount, rowAsArray: arrayMode };
}

const ERROR_KEYS = [
  "message",
  "code",
  "detail",
  "hint",
  "position",
  "internalPosition",
  "internalQuery",
  "severity",
  "where",
  "table",
  "column",
  "schema",
  "dataType",
  "constraint",
  "file",
  "line",
  "routine",
] as const;

export type ErrorBody = Record<(typeof ERROR_KEYS)[number], string | null>;

interface PostgresErrorLike {
  message: string;
  code: string;
  severity: string;
}

/** Both `pg` and PGlite raise errors carrying the fields of PostgreSQL's ErrorResponse. */
function isPostgresError(error: unknown): error is PostgresErrorLike & Record<string, unknown> {
  if (!(error instanceof Error)) return false;
  const { code, severity } = error as unknown as Record<string, unknown>;
  return typeof code === "string" && /^[0-9A-Z]{5}$/.test(code) && typeof severity === "string";
}

function errorBody(error: ProtocolError | (PostgresErrorLike & Record<string, unknown>)): ErrorBody {
  const body = {} as ErrorBody;
  for (const key of ERROR_KEYS) body[key] = null;
  body.message = error.message;
  if (error instanceof ProtocolError) {
    body.code = "";
    body.severity = "";
    return body;
  }
  const fields = error as unknown as Record<string, unknown>;
  for (const key of ERROR_KEYS) {
    const value = fields[key];
    if (key !== "message" && value !== undefined && value !== null) body[key] = String(value);
  }
  return body;
}
