// `npm run db:reseal` against the local database program over a real socket, migrated with the real
// migrations: the program's entry (runReseal) in this process, and once the real command in a child
// process, as an operator runs it. Values are seeded the way older deployments left them: v1 envelopes (before row
// binding) and v2 envelopes under the previous key.
import { execFile } from "node:child_process";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { neon, neonConfig } from "@neondatabase/serverless";
import { afterAll, beforeAll, beforeEach, describe, expect, it } from "vitest";
import { type NeonLocal, startNeonLocal } from "../../dev/neon-local/server.ts";
import { applyMigrations } from "../../scripts/migrate.ts";
import { runReseal } from "../../scripts/reseal.ts";
import { loadKeyring, open, type SealedColumn, seal } from "../../src/lib/crypto.ts";
import { TEST_ENCRYPTION_KEY } from "../worker/bindings.ts";
import { sealV1 } from "../worker/legacy-seal.ts";

const ROOT = fileURLToPath(new URL("../..", import.meta.url));
const TSX = join(ROOT, "node_modules", ".bin", "tsx");
const RESEAL = join(ROOT, "scripts", "reseal.ts");

const OLD_KEY = TEST_ENCRYPTION_KEY;
const NEW_KEY = btoa(String.fromCharCode(...Array.from({ length: 32 }, (_, i) => 0x41 + i)));

let db: NeonLocal;
let query: ReturnType<typeof neon>;

beforeAll(async () => {
  db = await startNeonLocal({ backend: { kind: "pglite" } });
  await applyMigrations(db.connectionString, db.sqlEndpoint);
  neonConfig.fetchEndpoint = db.sqlEndpoint;
  query = neon(db.connectionString);
});
afterAll(() => db?.close());
beforeEach(async () => {
  await query`truncate clients, tokens, apps restart identity cascade`;
});

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs the program with only the given environment; its output lines joined. */
async function reseal(env: Record<string, string>, args: string[] = []): Promise<Run> {
  const lines: string[] = [];
  const code = await runReseal(args, env, (line) => lines.push(line));
  return { code, stdout: lines.join("\n"), stderr: "" };
}

/** The real command in a child process, with only PATH and the given environment. */
function resealCommand(env: Record<string, string>, cwd: string): Promise<Run> {
  return new Promise((resolve) => {
    // wrangler types declares the Worker's bindings on ProcessEnv as required: this env has only some.
    const childEnv = { PATH: process.env.PATH ?? "", ...env } as unknown as NodeJS.ProcessEnv;
    execFile(TSX, [RESEAL], { cwd, env: childEnv }, (error, stdout, stderr) =>
      resolve({ code: error ? Number(error.code ?? 1) : 0, stdout, stderr }),
    );
  });
}

const rotatedEnv = () => ({
  TOKEN_MANAGEMENT_DATABASE_URL: db.connectionString,
  NEON_LOCAL_FETCH_ENDPOINT: db.sqlEndpoint,
  TOKEN_ENCRYPTION_KEY: NEW_KEY,
  TOKEN_ENCRYPTION_PREVIOUS_KEYS: OLD_KEY,
});

async function insertClient(id: number, secret: string): Promise<void> {
  await query`insert into clients (id, client_id, client_secret, redirect_uri, branch_id, workspace_email, workspace_name)
    values (${id}, ${`oauth-${id}`}, ${secret}, 'https://example.test/cb', ${`branch-${id}`}, 'a@example.test', 'W')`;
}

async function insertToken(clientId: number, access: string, refresh: string | null, valid: boolean): Promise<void> {
  await query`insert into tokens (client_id, access_token, refresh_token, expires_at, is_valid)
    values (${clientId}, ${access}, ${refresh}, now() + interval '1 hour', ${valid})`;
}

const v2 = async (key: string, plaintext: string, column: SealedColumn, clientId: number) =>
  seal(await loadKeyring(key), plaintext, { column, clientId });

/**
 * Three branches as an older deployment left them: v1 values, v2 values under the old key, one
 * value already current, a token history row and a token without a refresh token.
 */
async function seedMixed(): Promise<void> {
  await insertClient(1, await sealV1(OLD_KEY, "secret-1", "clients.client_secret"));
  await insertClient(2, await v2(OLD_KEY, "secret-2", "clients.client_secret", 2));
  await insertClient(3, await v2(NEW_KEY, "secret-3", "clients.client_secret", 3));
  await insertToken(
    1,
    await sealV1(OLD_KEY, "access-1a", "tokens.access_token"),
    await sealV1(OLD_KEY, "refresh-1", "tokens.refresh_token"),
    false,
  );
  await insertToken(1, await v2(OLD_KEY, "access-1b", "tokens.access_token", 1), null, true);
  await insertToken(
    2,
    await sealV1(OLD_KEY, "access-2", "tokens.access_token"),
    await v2(OLD_KEY, "refresh-2", "tokens.refresh_token", 2),
    true,
  );
  await insertToken(
    3,
    await v2(NEW_KEY, "access-3", "tokens.access_token", 3),
    await v2(NEW_KEY, "refresh-3", "tokens.refresh_token", 3),
    true,
  );
}

/** Every stored value, opened with the new key alone and v1 refused, for its own row. */
async function openAllWithNewKeyOnly(): Promise<Record<string, string | null>> {
  const ring = await loadKeyring(NEW_KEY, [], { acceptV1: false });
  const out: Record<string, string | null> = {};
  for (const row of (await query`select id, client_secret from clients order by id`) as {
    id: number;
    client_secret: string;
  }[]) {
    expect(row.client_secret.startsWith(`v2.${ring.current.id}.`)).toBe(true);
    out[`client ${row.id}`] = await open(ring, row.client_secret, {
      column: "clients.client_secret",
      clientId: row.id,
    });
  }
  const tokens = (await query`select id, client_id, access_token, refresh_token from tokens order by id`) as {
    id: number;
    client_id: number;
    access_token: string;
    refresh_token: string | null;
  }[];
  for (const row of tokens) {
    out[`access ${row.id}`] = await open(ring, row.access_token, {
      column: "tokens.access_token",
      clientId: row.client_id,
    });
    out[`refresh ${row.id}`] = row.refresh_token
      ? await open(ring, row.refresh_token, { column: "tokens.refresh_token", clientId: row.client_id })
      : null;
  }
  return out;
}

describe("npm run db:reseal", () => {
  it("rewrites v1 and previous-key values under the current key, so the previous key can go; a second run changes nothing", async () => {
    await seedMixed();
    const first = await reseal(rotatedEnv(), ["--batch-size", "2"]);
    expect(first.code, first.stdout + first.stderr).toBe(0);
    expect(first.stdout).toContain("clients: 2 resealed, 0 changed meanwhile (kept), 0 unreadable");
    expect(first.stdout).toContain("tokens: 3 resealed, 0 changed meanwhile (kept), 0 unreadable");
    expect(first.stdout).toContain("values not yet under the current key: 0");
    // Batches of 2: one for the two client rows to do, two for the three token rows.
    expect(first.stdout.match(/^batch \d+:/gm)).toHaveLength(3);

    expect(await openAllWithNewKeyOnly()).toEqual({
      "client 1": "secret-1",
      "client 2": "secret-2",
      "client 3": "secret-3",
      "access 1": "access-1a",
      "refresh 1": "refresh-1",
      "access 2": "access-1b",
      "refresh 2": null,
      "access 3": "access-2",
      "refresh 3": "refresh-2",
      "access 4": "access-3",
      "refresh 4": "refresh-3",
    });

    const stored = await query`select client_secret from clients union all select access_token from tokens`;
    const second = await reseal(rotatedEnv());
    expect(second.code, second.stdout + second.stderr).toBe(0);
    expect(second.stdout).toContain("clients: 0 resealed");
    expect(second.stdout).toContain("tokens: 0 resealed");
    expect(await query`select client_secret from clients union all select access_token from tokens`).toEqual(stored);
  });

  it("is resumable: stopped after one batch it says so and exits 1; the next run finishes the rest", async () => {
    await seedMixed();
    const partial = await reseal(rotatedEnv(), ["--batch-size", "1", "--max-batches", "1"]);
    expect(partial.code).toBe(1);
    expect(partial.stdout).toContain("clients: 1 resealed");
    expect(partial.stdout).toContain("stopped after 1 batch(es)");
    expect(partial.stdout).toContain("values not yet under the current key: 6");

    const rest = await reseal(rotatedEnv(), ["--batch-size", "1"]);
    expect(rest.code, rest.stdout).toBe(0);
    expect(rest.stdout).toContain("clients: 1 resealed");
    expect(rest.stdout).toContain("tokens: 3 resealed");
    expect(Object.keys(await openAllWithNewKeyOnly())).toHaveLength(11);
  });

  it("leaves a value copied from another branch's row as it is, names the row, and exits 1", async () => {
    await insertClient(1, await v2(OLD_KEY, "secret-1", "clients.client_secret", 1));
    await insertClient(2, await v2(OLD_KEY, "secret-1", "clients.client_secret", 1)); // client 1's secret
    await insertToken(2, await v2(OLD_KEY, "access-2", "tokens.access_token", 2), null, true);

    const run = await reseal(rotatedEnv());
    expect(run.code).toBe(1);
    expect(run.stdout).toContain("clients: 1 resealed, 0 changed meanwhile (kept), 1 unreadable");
    expect(run.stdout).toContain("unreadable: clients 2 (client 2, client_secret)");
    expect(run.stdout).toContain("tokens: 1 resealed");
    expect(run.stdout).toContain("values not yet under the current key: 1");
    expect(run.stdout).not.toContain("secret-1");
    const [row] = (await query`select client_secret from clients where id = 2`) as { client_secret: string }[];
    expect(row?.client_secret.startsWith(`v2.${(await loadKeyring(OLD_KEY)).current.id}.`)).toBe(true);
  });

  it("as a command, reads the local database and keys from .dev.vars when the environment has no database URL", async () => {
    await seedMixed();
    const dir = await mkdtemp(join(tmpdir(), "reseal-"));
    try {
      const vars = Object.entries(rotatedEnv()).map(([name, value]) => `${name}=${value}`);
      await writeFile(join(dir, ".dev.vars"), `# written by the test\n${vars.join("\n")}\n`);
      const run = await resealCommand({}, dir);
      expect(run.code, run.stdout + run.stderr).toBe(0);
      expect(run.stdout).toContain(`on local endpoint ${db.sqlEndpoint}`);
      expect(run.stdout).toContain("values not yet under the current key: 0");
      expect(Object.keys(await openAllWithNewKeyOnly())).toHaveLength(11);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it("refuses a malformed key or argument before touching the database, naming it but not its value", async () => {
    await seedMixed();
    const before = await query`select client_secret from clients order by id`;
    const badKey = reseal({ ...rotatedEnv(), TOKEN_ENCRYPTION_PREVIOUS_KEYS: "not-a-key-value" });
    await expect(badKey).rejects.toThrow(
      /TOKEN_ENCRYPTION_PREVIOUS_KEYS(\.0)?: must be the base64 encoding of 32 bytes/,
    );
    await expect(badKey).rejects.not.toThrow(/not-a-key-value/);
    await expect(reseal(rotatedEnv(), ["--batch-size", "0"])).rejects.toThrow(/--batch-size/);
    await expect(reseal(rotatedEnv(), ["--everything"])).rejects.toThrow(/--everything/);
    expect(await query`select client_secret from clients order by id`).toEqual(before);
  });
});
