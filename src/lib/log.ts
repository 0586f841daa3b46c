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

export function logError(event: string, fields: LogFields = {}): void {
  console.error(JSON.stringify({ level: "error", event, ...fields }));
}

/** The error's class and message, without stack or cause (which may carry request data). */
export function describeError(error: unknown): string {
  if (error instanceof Error) return `${error.name}: ${error.message}`.slice(0, 500);
  return String(error).slice(0, 500);
}
