/**
 * `npm run dev` as a user runs it: started with npm, stopped with Ctrl-C, SIGTERM or SIGKILL, on ports
 * of its own (PORT, NEON_LOCAL_PORT, OAUTH_SERVER_PORT) and with its own .dev.vars and data directory
 * (DEV_VARS_FILE, DEV_DATA_DIR), so that it never meets a developer's stack or anything else here.
 */
import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer, type Server } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { fillDevVarsTemplate } from "../../dev/dev.ts";
import { connectBranch, ROOT, withoutWranglerSettings } from "../../dev/local-stack.ts";
import { type OAuthServer, startOAuthServer } from "../../dev/oauth-server/server.ts";
import { readDevVars } from "../../scripts/migrate.ts";

/** The issue's promise: after a stop, nothing started keeps running or holds a port within this. */
const STOPPED_WITHIN_MS = 5_000;
/** Starting the stack (PGlite, migrations, wrangler's build, workerd) on a busy 2-core machine. */
const START_TIMEOUT_MS = 150_000;

async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as { port: number };
  await new Promise((resolve) => server.close(resolve));
  return port;
}

async function isPortFree(port: number): Promise<boolean> {
  const server = createServer();
  return new Promise((resolve) => {
    server.once("error", () => resolve(false));
    server.listen({ port, host: "127.0.0.1", exclusive: true }, () => server.close(() => resolve(true)));
  });
}

/** Every process below `pid` (ps works the same on Linux and macOS). */
function descendants(pid: number): { pid: number; args: string }[] {
  const rows = execFileSync("ps", ["-eo", "pid=,ppid=,args="], { encoding: "utf8" })
    .split("\n")
    .map((line) => /^\s*(\d+)\s+(\d+)\s+(.*)$/.exec(line))
    .filter((match) => match !== null)
    .map((match) => ({ pid: Number(match[1]), ppid: Number(match[2]), args: match[3]! }));
  const found: { pid: number; args: string }[] = [];
  const queue = [pid];
  while (queue.length > 0) {
    const parent = queue.shift()!;
    for (const row of rows.filter((r) => r.ppid === parent)) {
      found.push({ pid: row.pid, args: row.args });
      queue.push(row.pid);
    }
  }
  return found;
}

/** Running, i.e. neither gone nor a zombie (an exited process its new parent has not reaped yet). */
function isRunning(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch {
    return false;
  }
  try {
    return !execFileSync("ps", ["-o", "stat=", "-p", String(pid)], { encoding: "utf8" })
      .trim()
      .startsWith("Z");
  } catch {
    return false;
  }
}

interface Ports {
  PORT: string;
  NEON_LOCAL_PORT: string;
  OAUTH_SERVER_PORT: string;
}

interface Dev {
  npm: ChildProcess;
  output: () => string;
  exited: Promise<number | null>;
}

function startDev(ports: Ports, files: { varsFile: string; dataDir: string }): Dev {
  const npm = spawn("npm", ["run", "dev"], {
    cwd: ROOT,
    // A process group of its own, as a terminal gives a foreground job: Ctrl-C signals the whole group.
    detached: true,
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...withoutWranglerSettings(), ...ports, DEV_VARS_FILE: files.varsFile, DEV_DATA_DIR: files.dataDir },
  });
  let output = "";
  npm.stdout!.on("data", (chunk: Buffer) => (output += chunk.toString()));
  npm.stderr!.on("data", (chunk: Buffer) => (output += chunk.toString()));
  const exited = new Promise<number | null>((resolve) => npm.once("exit", (code) => resolve(code)));
  return { npm, output: () => output, exited };
}

/** Resolves once the Worker answers /health with 200 (the database behind it is up too). */
async function waitHealthy(dev: Dev, port: string): Promise<void> {
  const deadline = Date.now() + START_TIMEOUT_MS;
  let exited = false;
  void dev.exited.then(() => (exited = true));
  while (Date.now() < deadline && !exited) {
    const status = await fetch(`http://127.0.0.1:${port}/token-management/health`).then(
      (response) => response.status,
      () => 0,
    );
    if (status === 200) return;
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
  throw new Error(`npm run dev did not become healthy:\n${dev.output()}`);
}

/** Asserts that within STOPPED_WITHIN_MS no process of the stack runs and every port is free. */
async function expectStopped(dev: Dev, pids: { pid: number; args: string }[], ports: Ports): Promise<void> {
  const started = Date.now();
  let running = pids;
  let busy: string[] = [];
  while (Date.now() - started < STOPPED_WITHIN_MS) {
    running = pids.filter((p) => isRunning(p.pid));
    busy = [];
    for (const port of Object.values(ports)) if (!(await isPortFree(Number(port)))) busy.push(port);
    if (running.length === 0 && busy.length === 0) return;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  for (const p of running) process.kill(p.pid, "SIGKILL"); // leave nothing behind for the next test
  expect({ running: running.map((p) => p.args), busy }, dev.output()).toEqual({ running: [], busy: [] });
}

// `npm run dev` never uses TEST_DATABASE_URL: .ci/run's second pass (on PostgreSQL) would only repeat this.
describe.skipIf(Boolean(process.env.TEST_DATABASE_URL))("npm run dev", () => {
  let dir: string;
  let ports: Ports;
  let builtIn: { varsFile: string; dataDir: string };
  let dev: Dev | undefined;

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "dev-stack-"));
    ports = {
      PORT: String(await freePort()),
      NEON_LOCAL_PORT: String(await freePort()),
      OAUTH_SERVER_PORT: String(await freePort()),
    };
    // A fresh .dev.vars as the first `npm run dev` writes it: the built-in OAuth server's default URLs.
    builtIn = { varsFile: join(dir, "built-in.dev.vars"), dataDir: join(dir, "data") };
    writeFileSync(builtIn.varsFile, fillDevVarsTemplate(readFileSync(join(ROOT, ".dev.vars.example"), "utf8")));
  });
  afterEach(async () => {
    // Whatever a failed test left running.
    if (dev?.npm.pid && dev.npm.exitCode === null) {
      try {
        process.kill(-dev.npm.pid, "SIGKILL");
      } catch {}
    }
    dev = undefined;
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  for (const [variable, what] of [
    ["PORT", "the Worker"],
    ["NEON_LOCAL_PORT", "the local database"],
    ["OAUTH_SERVER_PORT", "the local OAuth server"],
  ] as const) {
    it(`says in one line that ${what}'s port is taken and how to choose another, and exits non-zero`, async () => {
      const squatter: Server = createServer();
      await new Promise<void>((resolve) => squatter.listen(Number(ports[variable]), "127.0.0.1", resolve));
      try {
        dev = startDev(ports, builtIn);
        const code = await dev.exited;
        expect(code).not.toBe(0);
        const complaints = dev
          .output()
          .split("\n")
          .filter((line) => line.includes("already in use"));
        expect(complaints, dev.output()).toEqual([expect.stringContaining(`port ${ports[variable]} (${what}`)]);
        expect(complaints[0]).toContain(`${variable}=<port> npm run dev`);
        expect(dev.output()).not.toMatch(/^\s+at /m); // no stack trace
      } finally {
        await new Promise((resolve) => squatter.close(resolve));
      }
    });
  }

  it("stops everything it started on Ctrl-C", { timeout: START_TIMEOUT_MS + 30_000 }, async () => {
    dev = startDev(ports, builtIn);
    await waitHealthy(dev, ports.PORT);
    // The built-in OAuth server answers on its moved port.
    const metadata = await fetch(`http://127.0.0.1:${ports.OAUTH_SERVER_PORT}/.well-known/oauth-authorization-server`);
    expect(metadata.status).toBe(200);
    const pids = descendants(dev.npm.pid!);
    expect(
      pids.some((p) => /workerd/.test(p.args)),
      JSON.stringify(pids),
    ).toBe(true);
    process.kill(-dev.npm.pid!, "SIGINT"); // what a terminal does on Ctrl-C
    await expectStopped(dev, pids, ports);
  });

  it("uses an authorization server already listening on localhost as it is, and stops on SIGTERM", {
    timeout: START_TIMEOUT_MS + 60_000,
  }, async () => {
    const external: OAuthServer = await startOAuthServer({ profile: "google" });
    try {
      const varsFile = join(dir, "external.dev.vars");
      const vars = readDevVars(builtIn.varsFile);
      const lines = Object.entries({
        ...vars,
        OAUTH_ISSUER: external.issuer,
        OAUTH_AUTHORIZATION_URL: external.authorizationEndpoint,
        OAUTH_TOKEN_URL: external.tokenEndpoint,
        OAUTH_REVOCATION_URL: external.revocationEndpoint,
      }).map(([name, value]) => `${name}=${value}`);
      writeFileSync(varsFile, `${lines.join("\n")}\n`);

      dev = startDev(ports, { varsFile, dataDir: builtIn.dataDir });
      await waitHealthy(dev, ports.PORT);
      expect(dev.output()).toContain("starting no OAuth server");
      expect(await isPortFree(Number(ports.OAUTH_SERVER_PORT))).toBe(true);
      // A branch connects through the external server's consent flow and gets its token.
      const worker = `http://127.0.0.1:${ports.PORT}`;
      const adminKey = vars.ADMIN_API_KEY!;
      const branchId = await connectBranch(worker, external, adminKey, {
        client_id: "external-client",
        client_secret: "external-secret-0123456789",
        branch_id: "external-branch",
        workspace_email: "ops@example.com",
        workspace_name: "External",
      });
      const token = await fetch(`${worker}/token-management/tokens/${branchId}`, {
        headers: { authorization: `Bearer ${adminKey}` },
      });
      expect(token.status).toBe(200);
      const stats = await (await fetch(`${external.url}/admin/stats`)).json();
      expect(stats).toMatchObject({ tokenRequests: expect.any(Number) });
      expect((stats as { tokenRequests: number }).tokenRequests).toBeGreaterThan(0);

      const pids = descendants(dev.npm.pid!);
      process.kill(dev.npm.pid!, "SIGTERM");
      await expectStopped(dev, pids, ports);
    } finally {
      await external.close();
    }
  });

  it("stops everything when npm run dev is killed with SIGKILL", { timeout: START_TIMEOUT_MS + 30_000 }, async () => {
    dev = startDev(ports, builtIn);
    await waitHealthy(dev, ports.PORT);
    const pids = descendants(dev.npm.pid!);
    process.kill(dev.npm.pid!, "SIGKILL");
    await expectStopped(dev, pids, ports);
  });

  it("stops wrangler and workerd when the dev program itself is killed with SIGKILL, and starts again cleanly", {
    timeout: 2 * START_TIMEOUT_MS + 30_000,
  }, async () => {
    dev = startDev(ports, builtIn);
    await waitHealthy(dev, ports.PORT);
    const pids = descendants(dev.npm.pid!);
    const program = pids.find((p) => /dev\/dev\.ts/.test(p.args) && /--import/.test(p.args));
    expect(program, JSON.stringify(pids)).toBeDefined();
    process.kill(program!.pid, "SIGKILL");
    await expectStopped(dev, pids, ports);

    // The data PGlite had on disk is still usable, and nothing is in the way.
    dev = startDev(ports, builtIn);
    await waitHealthy(dev, ports.PORT);
    const again = descendants(dev.npm.pid!);
    process.kill(-dev.npm.pid!, "SIGINT");
    await expectStopped(dev, again, ports);
  });
});
