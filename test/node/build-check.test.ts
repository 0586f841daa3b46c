// npm run build:check: the deployable build (wrangler deploy --dry-run) against the bundle budget.
import { execFile } from "node:child_process";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { gzipSync } from "node:zlib";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ROOT, withoutWranglerSettings } from "../../dev/local-stack.ts";
import { BUDGET_FILE, measureBundle, readBudget, verdict } from "../../scripts/build-check.ts";

const execFileAsync = promisify(execFile);

async function buildCheck(env: Record<string, string>) {
  try {
    const { stdout, stderr } = await execFileAsync(process.execPath, ["scripts/build-check.ts"], {
      cwd: ROOT,
      env: { ...withoutWranglerSettings(), ...env },
    });
    return { code: 0, stdout, stderr };
  } catch (error) {
    const failed = error as { code: number; stdout: string; stderr: string };
    return { code: failed.code, stdout: failed.stdout, stderr: failed.stderr };
  }
}

describe("npm run build:check", () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "build-check-test-"));
  });
  afterAll(() => rm(dir, { recursive: true, force: true }));

  it("measures the uploaded modules gzip-compressed, leaving out source maps and other files", async () => {
    const out = join(dir, "out");
    const js = "export default { fetch() { return new Response('x'.repeat(1000)); } };\n".repeat(50);
    await mkdir(out);
    await writeFile(join(out, "index.js"), js);
    await writeFile(join(out, "index.js.map"), "{}".repeat(10_000));
    await writeFile(join(out, "README.md"), "not a module");
    const size = measureBundle(out);
    expect(size.files).toEqual(["index.js"]);
    expect(size.rawBytes).toBe(Buffer.byteLength(js));
    expect(size.gzipBytes).toBe(gzipSync(js).length);
  });

  it("passes at the budget and fails one byte over it, naming both numbers", () => {
    const size = { rawBytes: 5000, gzipBytes: 1234, files: ["index.js"] };
    expect(verdict(size, { gzip_bytes: 1234, how_set: "" }).ok).toBe(true);
    const over = verdict(size, { gzip_bytes: 1233, how_set: "" });
    expect(over.ok).toBe(false);
    expect(over.message).toContain("1234 bytes gzip");
    expect(over.message).toContain("budget 1233 bytes");
  });

  it("refuses a budget file without a positive whole number of bytes", async () => {
    const bad = join(dir, "bad.json");
    await writeFile(bad, JSON.stringify({ gzip_bytes: "300k" }));
    expect(() => readBudget(bad)).toThrow(/gzip_bytes must be a positive integer/);
    expect(readBudget().gzip_bytes).toBeGreaterThan(0);
    expect(readBudget(BUDGET_FILE).how_set).not.toBe("");
  });

  it("builds the Worker offline and exits 1 with both numbers when the bundle is over budget", async () => {
    const tiny = join(dir, "tiny.json");
    await writeFile(tiny, JSON.stringify({ gzip_bytes: 1000, how_set: "a budget no Worker fits" }));
    const result = await buildCheck({ BUNDLE_BUDGET_FILE: tiny });
    expect(result.code, result.stderr).toBe(1);
    const measured = /bundle over budget: (\d+) bytes gzip .* > budget 1000 bytes/.exec(result.stderr);
    expect(measured, result.stderr).not.toBeNull();
    // The real bundle: a whole Worker (Hono, drizzle, zod, oauth4webapi) is well over 100 KB gzip.
    expect(Number(measured![1])).toBeGreaterThan(100_000);
  });
});
