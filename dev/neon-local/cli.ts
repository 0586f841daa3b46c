// npx tsx dev/neon-local/cli.ts [--port N] [--host H] [--data-dir DIR | --memory] [--database-url postgres://...] [--latency-ms N]
import { parseArgs } from "node:util";
import { type BackendOptions, DEFAULT_HOST, startNeonLocal } from "./server.ts";

const DEFAULT_DATA_DIR = ".data/pglite";
const USAGE =
  "usage: npx tsx dev/neon-local/cli.ts [--port N] [--host H] [--data-dir DIR | --memory] [--database-url postgres://...] [--latency-ms N]\n" +
  "env fallbacks: NEON_LOCAL_PORT, NEON_LOCAL_DATABASE_URL";

function fail(message: string): never {
  console.error(`neon-local: ${message}\n${USAGE}`);
  process.exit(2);
}

const OPTIONS = {
  port: { type: "string" },
  host: { type: "string" },
  "data-dir": { type: "string" },
  memory: { type: "boolean" },
  "database-url": { type: "string" },
  "latency-ms": { type: "string" },
  help: { type: "boolean", short: "h" },
} as const;

function parse() {
  let values: ReturnType<typeof parseArgs<{ options: typeof OPTIONS; strict: true }>>["values"];
  try {
    ({ values } = parseArgs({
      options: OPTIONS,
      strict: true,
    }));
  } catch (error) {
    fail((error as Error).message);
  }
  if (values.help) {
    console.log(USAGE);
    process.exit(0);
  }

  const portText = values.port ?? process.env.NEON_LOCAL_PORT ?? "0";
  const port = Number(portText);
  if (!Number.isInteger(port) || port < 0 || port > 65535) fail(`invalid port: ${portText}`);

  const databaseUrl = values["database-url"] ?? process.env.NEON_LOCAL_DATABASE_URL;
  const chosen = [values["data-dir"] !== undefined, values.memory === true, values["database-url"] !== undefined];
  if (chosen.filter(Boolean).length > 1) fail("choose one of --data-dir, --memory, --database-url");

  let backend: BackendOptions;
  if (values["data-dir"] !== undefined) backend = { kind: "pglite", dataDir: values["data-dir"] };
  else if (values.memory) backend = { kind: "pglite" };
  else if (databaseUrl) backend = { kind: "postgres", url: databaseUrl };
  else backend = { kind: "pglite", dataDir: DEFAULT_DATA_DIR };

  const latencyText = values["latency-ms"] ?? "0";
  const latencyMs = Number(latencyText);
  if (!Number.isInteger(latencyMs) || latencyMs < 0) fail(`invalid latency: ${latencyText}`);

  return { port, host: values.host ?? DEFAULT_HOST, backend, latencyMs };
}

const options = parse();
const local = await startNeonLocal(options).catch((error: unknown) => {
  console.error(`neon-local: cannot start: ${error instanceof Error ? error.message : String(error)}`);
  process.exit(1);
});
console.log(`neon-local listening on ${local.url} (${local.description})`);

let stopping = false;
const stop = (signal: NodeJS.Signals) => {
  if (stopping) {
    console.error(`neon-local: ${signal} again, exiting without a clean close`);
    process.exit(1);
  }
  stopping = true;
  local.close().then(
    () => process.exit(0),
    (error: unknown) => {
      console.error("neon-local: error while closing", error);
      process.exit(1);
    },
  );
};
process.on("SIGINT", stop);
process.on("SIGTERM", stop);
