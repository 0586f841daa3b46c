/**
 * `npm run build:check`: builds the Worker exactly as `npm run deploy` would (the docs assets, then
 * `wrangler deploy --dry-run --outdir`), offline and without a Cloudflare account, and checks the
 * bundle's gzip size against the budget in bundle-budget.json. Exit 0 within the budget; exit 1
 * naming both numbers when over it, or when the build fails. `.ci/run` and the pull request
 * workflow run it. Plain TypeScript that Node runs without a loader.
 *
 * The size measured is what Cloudflare measures against its Worker size limit: the modules wrangler
 * uploads (JavaScript and WebAssembly, not the source map nor the static assets), gzip-compressed.
 */
import { execFileSync } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { gzipSync } from "node:zlib";
import { copyDocsAssets } from "./docs-assets.ts";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..");
export const BUDGET_FILE = join(ROOT, "bundle-budget.json");
/** The files of wrangler's --outdir that are uploaded as the Worker's modules. */
const MODULE_FILE = /\.(?:m?js|cjs|wasm)$/;

export interface BundleBudget {
  /** The most the uploaded modules may weigh, gzip-compressed, in bytes. */
  gzip_bytes: number;
  /** How the number was set, and when to change it. */
  how_set: string;
}

export interface BundleSize {
  rawBytes: number;
  gzipBytes: number;
  files: string[];
}

export function readBudget(path = BUDGET_FILE): BundleBudget {
  const budget = JSON.parse(readFileSync(path, "utf8")) as Partial<BundleBudget>;
  if (typeof budget.gzip_bytes !== "number" || !Number.isInteger(budget.gzip_bytes) || budget.gzip_bytes <= 0) {
    throw new Error(`${path}: gzip_bytes must be a positive integer (bytes)`);
  }
  return { gzip_bytes: budget.gzip_bytes, how_set: budget.how_set ?? "" };
}

/** Size of the modules in a `wrangler deploy --dry-run --outdir` directory. */
export function measureBundle(outdir: string): BundleSize {
  const files = readdirSync(outdir, { recursive: true, encoding: "utf8" })
    .filter((name) => MODULE_FILE.test(name))
    .sort();
  if (files.length === 0) throw new Error(`no modules in ${outdir}: did the build run?`);
  let rawBytes = 0;
  let gzipBytes = 0;
  for (const name of files) {
    const bytes = readFileSync(join(outdir, name));
    rawBytes += bytes.length;
    gzipBytes += gzipSync(bytes).length;
  }
  return { rawBytes, gzipBytes, files };
}

/** The verdict line: within the budget, or over it with both numbers. */
export function verdict(size: BundleSize, budget: BundleBudget): { ok: boolean; message: string } {
  const kib = (bytes: number) => `${(bytes / 1024).toFixed(1)} KiB`;
  const share = ((size.gzipBytes / budget.gzip_bytes) * 100).toFixed(1);
  if (size.gzipBytes > budget.gzip_bytes) {
    return {
      ok: false,
      message:
        `bundle over budget: ${size.gzipBytes} bytes gzip (${kib(size.gzipBytes)}) > budget ${budget.gzip_bytes} bytes ` +
        `(${kib(budget.gzip_bytes)}), ${size.gzipBytes - budget.gzip_bytes} bytes over. Shrink the bundle, or raise ` +
        "gzip_bytes in bundle-budget.json and say why in how_set.",
    };
  }
  return {
    ok: true,
    message: `bundle within budget: ${size.gzipBytes} bytes gzip (${kib(size.gzipBytes)}, ${share}% of ${budget.gzip_bytes} bytes); ${size.rawBytes} bytes raw in ${size.files.join(", ")}`,
  };
}

/** `wrangler deploy --dry-run --outdir`: offline, no account, no telemetry. */
export function dryRunBuild(outdir: string): void {
  copyDocsAssets();
  const wrangler = join(ROOT, "node_modules/wrangler/bin/wrangler.js");
  execFileSync(process.execPath, [wrangler, "deploy", "--dry-run", "--outdir", outdir], {
    cwd: ROOT,
    stdio: ["ignore", "ignore", "inherit"],
    env: {
      ...process.env,
      WRANGLER_SEND_METRICS: "false",
      CLOUDFLARE_CF_FETCH_ENABLED: "false",
      NO_UPDATE_NOTIFIER: "1",
    },
  });
}

function main(): void {
  const budgetFile = process.env.BUNDLE_BUDGET_FILE ? resolve(process.env.BUNDLE_BUDGET_FILE) : BUDGET_FILE;
  const budget = readBudget(budgetFile);
  const outdir = mkdtempSync(join(tmpdir(), "token-management-build-"));
  try {
    dryRunBuild(outdir);
    const result = verdict(measureBundle(outdir), budget);
    (result.ok ? console.log : console.error)(result.message);
    process.exitCode = result.ok ? 0 : 1;
  } finally {
    rmSync(outdir, { recursive: true, force: true });
  }
}

if (process.argv[1] && import.meta.filename === resolve(process.argv[1])) {
  try {
    main();
  } catch (error) {
    console.error(`build check failed: ${error instanceof Error ? error.message : String(error)}`);
    process.exit(1);
  }
}
