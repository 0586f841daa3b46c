/**
 * Runs a command in a process group of its own and keeps it alive only as long as the process that
 * started this one: `npm run dev` runs `wrangler dev` through it.
 *
 *   node dev/lifeline.ts --pid-file <path> -- <command> [args...]
 *
 * Standard input is the lifeline: the parent holds the other end of the pipe, so when the parent
 * exits, however it exits (Ctrl-C, SIGTERM, SIGKILL, a crash), the pipe closes. Then, or on SIGINT,
 * SIGTERM or SIGHUP, the whole group (wrangler and its workerd) gets SIGTERM, and SIGKILL what is
 * left after GRACE_MS. The group's id is written to the pid file while it runs, so that a next start
 * can stop a group this program could not (itself killed with SIGKILL along with its parent).
 * Exits with the command's exit code (128 + signal number when it was killed).
 *
 * Plain TypeScript that Node runs without a loader (type stripping), so it starts at once.
 */
import { spawn } from "node:child_process";
import { rmSync, writeFileSync } from "node:fs";
import { constants } from "node:os";

/** How long the group gets to stop after SIGTERM before SIGKILL (wrangler needs about a second). */
const GRACE_MS = 2_500;
const POLL_MS = 50;

/** Sends a signal to a whole process group; false when nothing is left in it. */
export function signalGroup(pgid: number, signal: NodeJS.Signals | 0): boolean {
  try {
    process.kill(-pgid, signal);
    return true;
  } catch {
    return false; // ESRCH: the group is gone
  }
}

/** SIGTERM to the group, SIGKILL to what is left after `graceMs`; resolves once the group is gone. */
export async function stopGroup(pgid: number, graceMs = GRACE_MS): Promise<void> {
  if (!signalGroup(pgid, "SIGTERM")) return;
  const deadline = Date.now() + graceMs;
  while (signalGroup(pgid, 0) && Date.now() < deadline) await new Promise((r) => setTimeout(r, POLL_MS));
  if (signalGroup(pgid, "SIGKILL")) {
    while (signalGroup(pgid, 0)) await new Promise((r) => setTimeout(r, POLL_MS));
  }
}

function main(): void {
  const separator = process.argv.indexOf("--");
  const options = process.argv.slice(2, separator);
  const pidFileIndex = options.indexOf("--pid-file");
  const pidFile = pidFileIndex >= 0 ? options[pidFileIndex + 1] : undefined;
  const [command, ...args] = separator >= 0 ? process.argv.slice(separator + 1) : [];
  if (!command) {
    console.error("usage: node dev/lifeline.ts [--pid-file <path>] -- <command> [args...]");
    process.exit(2);
  }

  const child = spawn(command, args, {
    // Its own group, so that it and everything it starts (workerd) are stopped together. Its stdin is
    // not the terminal: a background group reading the terminal would be stopped (SIGTTIN).
    detached: true,
    stdio: ["ignore", "inherit", "inherit"],
  });
  const pgid = child.pid;
  if (pgid === undefined) {
    child.once("error", (error) => {
      console.error(`[dev] cannot run ${command}: ${error.message}`);
      process.exit(1);
    });
    return;
  }
  if (pidFile) writeFileSync(pidFile, `${pgid}\n`);

  let exitCode: number | undefined;
  let stopping = false;
  const stop = () => {
    if (stopping) return;
    stopping = true;
    void stopGroup(pgid).then(() => {
      if (pidFile) rmSync(pidFile, { force: true });
      process.exit(exitCode ?? 0);
    });
  };

  child.once("exit", (code, signal) => {
    exitCode = code ?? 128 + (signal ? constants.signals[signal] : 0);
    // workerd may outlive wrangler: the group is stopped either way.
    stop();
  });
  process.stdin.on("data", () => undefined);
  process.stdin.once("end", stop);
  process.stdin.once("close", stop);
  for (const signal of ["SIGINT", "SIGTERM", "SIGHUP"] as const) process.on(signal, stop);
}

if (process.argv[1] && import.meta.filename === process.argv[1]) main();
