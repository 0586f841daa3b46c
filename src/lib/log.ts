/**
 * Structured logs: one JSON object per line, so Workers Logs can filter on fields.
 * Callers pass only non-secret fields; nothing here inspects or redacts values.
 */
export type LogFields = Record<string, string | number | boolean | null | undefined>;

export function logInfo(event: string, fields: LogFields = {}): void {
  console.log(JSON.stringify({ level: "info", event, ...fields }));
}

export function logWarn(event: string, fields: LogFields = {}): void {
  console.warn(JSON.stringify({ level: "warn", event, ...fields }));
}

/**
 * Whether this occurrence of a line logged at `rate` (0 = never, 1 = always, else that fraction,
 * at random) is written. For success lines of the hot path only: failures and changes always are.
 */
export function sampled(rate: number, random: () => number = Math.random): boolean {
  return rate >= 1 || (rate > 0 && random() < rate);
}

export function logError(event: string, fields: LogFields = {}): void {
  console.error(JSON.stringify({ level: "error", event, ...fields }));
}

/**
 * The innermost error's class and message, without stack. drizzle's "Failed query" wrapper is
 * skipped: its message lists the query parameters, which may include sealed secrets.
 */
export function describeError(error: unknown): string {
  let inner = error;
  for (let depth = 0; depth < 5; depth++) {
    const cause = (inner as { cause?: unknown } | null)?.cause;
    if (!(cause instanceof Error)) break;
    inner = cause;
  }
  if (inner instanceof Error) return `${inner.name}: ${inner.message}`.slice(0, 500);
  return String(inner).slice(0, 500);
}
