/**
 * `npm run db:reseal`: re-encrypts every sealed value (client secrets, access and refresh tokens)
 * that is not yet a v2 envelope under TOKEN_ENCRYPTION_KEY, using TOKEN_ENCRYPTION_PREVIOUS_KEYS to
 * open the old ones. Afterwards the previous keys can be removed and TOKEN_ENCRYPTION_ACCEPT_V1 set
 * to false. Reaches the database like `npm run db:migrate`: the environment when it has
 * TOKEN_MANAGEMENT_DATABASE_URL (a Neon URL), otherwise .dev.vars (the local database).
 *
 *   npm run db:reseal [-- --batch-size N] [-- --max-batches N]
 *
 * Exit status: 0 when every value is under the current key; 1 on a configuration or database
 * error, or when values remain (unreadable ones, or a run stopped by --max-batches).
 */
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { createDb } from "../src/db/client";
import { parseResealEnv } from "../src/env";
import { currentEnvelopePrefix, loadKeyring } from "../src/lib/crypto";
import { DEFAULT_RESEAL_BATCH_SIZE, type ResealResult, resealAll } from "../src/services/reseal";
import { describeTarget, readDevVars } from "./migrate.ts";

interface Flags {
  batchSize: number;
  maxBatches: number | undefined;
}

function parseFlags(argv: string[]): Flags {
  const flags: Flags = { batchSize: DEFAULT_RESEAL_BATCH_SIZE, maxBatches: undefined };
  for (let i = 0; i < argv.length; i++) {
    const name = argv[i];
    const value = Number(argv[i + 1]);
    if ((name !== "--batch-size" && name !== "--max-batches") || !Number.isInteger(value) || value < 1) {
      throw new Error(`unknown or malformed argument ${name} (use --batch-size N, --max-batches N)`);
    }
    if (name === "--batch-size") flags.batchSize = value;
    else flags.maxBatches = value;
    i++;
  }
  return flags;
}

/**
 * The program: `args` are the command-line arguments, `environment` the process environment, `dir`
 * where .dev.vars is looked for; every line of output goes to `print`. Returns the exit status.
 */
export async function runReseal(
  args: string[],
  environment: Record<string, string | undefined>,
  print: (line: string) => void,
  dir = ".",
): Promise<number> {
  const flags = parseFlags(args);
  const source = environment.TOKEN_MANAGEMENT_DATABASE_URL ? environment : readDevVars(join(dir, ".dev.vars"));
  const config = parseResealEnv(source);
  // v1 values are opened whatever the Worker's TOKEN_ENCRYPTION_ACCEPT_V1 says: rewriting them is the point.
  const keyring = await loadKeyring(config.TOKEN_ENCRYPTION_KEY, config.TOKEN_ENCRYPTION_PREVIOUS_KEYS, {
    acceptV1: true,
  });
  const db = createDb({
    databaseUrl: config.TOKEN_MANAGEMENT_DATABASE_URL,
    localFetchEndpoint: config.NEON_LOCAL_FETCH_ENDPOINT,
  });
  const target = describeTarget({
    url: config.TOKEN_MANAGEMENT_DATABASE_URL,
    localFetchEndpoint: config.NEON_LOCAL_FETCH_ENDPOINT,
  });
  print(
    `resealing under key ${keyring.current.id} (${currentEnvelopePrefix(keyring)}…) on ${target}, ` +
      `${keyring.byId.size - 1} previous key(s), batches of ${flags.batchSize}`,
  );
  const result = await resealAll(db, keyring, {
    batchSize: flags.batchSize,
    maxBatches: flags.maxBatches,
    onBatch: (p) =>
      print(
        `batch ${p.batches}: apps ${p.apps.resealed} resealed, clients ${p.clients.resealed} resealed, tokens ${p.tokens.resealed} resealed`,
      ),
  });
  report(result, print);
  return result.remaining === 0 ? 0 : 1;
}

function report(result: ResealResult, print: (line: string) => void): void {
  for (const [table, counts] of [
    ["apps", result.apps],
    ["clients", result.clients],
    ["tokens", result.tokens],
  ] as const) {
    print(
      `${table}: ${counts.resealed} resealed, ${counts.changedMeanwhile} changed meanwhile (kept), ` +
        `${counts.unreadable.length} unreadable`,
    );
    for (const row of counts.unreadable) print(`  unreadable: ${row}`);
  }
  print(`values not yet under the current key: ${result.remaining}`);
  if (!result.complete) {
    print(`stopped after ${result.batches} batch(es) (--max-batches): run again to continue`);
  } else if (result.remaining === 0) {
    print(
      "done: every sealed value is v2 under the current key. TOKEN_ENCRYPTION_PREVIOUS_KEYS can be emptied " +
        "and TOKEN_ENCRYPTION_ACCEPT_V1 set to false.",
    );
  } else {
    print(
      "not done: the unreadable values above keep their old envelope. Fix each branch (PATCH its client " +
        "secret, or connect it again), or run again once the key that sealed them is configured.",
    );
  }
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  runReseal(process.argv.slice(2), process.env, (line) => console.log(line)).then(
    (code) => process.exit(code),
    (error: unknown) => {
      // Configuration errors name the binding, never its value; the driver's messages carry no password.
      console.error(`reseal failed: ${error instanceof Error ? error.message : String(error)}`);
      process.exit(1);
    },
  );
}
