/**
 * The Worker's static assets (wrangler.toml `[assets]`, dist/assets): the API reference's browser
 * bundle, copied from node_modules (@scalar/api-reference's standalone build, the version
 * package-lock.json pins) to where the docs page loads it (src/routes/docs.ts, DOCS_RENDERER_PATH).
 * `npm run dev`, the tests, the benchmarks and `npm run deploy` run it first; `node
 * scripts/docs-assets.ts` runs it alone. Plain TypeScript that Node runs without a loader.
 */
import { copyFileSync, mkdirSync, statSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..");
/** wrangler.toml's `[assets] directory`. */
export const ASSETS_DIR = join(ROOT, "dist/assets");
const RENDERER_SOURCE = join(ROOT, "node_modules/@scalar/api-reference/dist/browser/standalone.js");
/** The app's base path + DOCS_RENDERER_PATH. */
const RENDERER_TARGET = join(ASSETS_DIR, "token-management/docs/api-reference.js");

/** Copies the assets when missing or different from node_modules'; returns the files written. */
export function copyDocsAssets(): string[] {
  const source = statSync(RENDERER_SOURCE, { throwIfNoEntry: false });
  if (!source) throw new Error(`${RENDERER_SOURCE} is missing: run npm install`);
  const target = statSync(RENDERER_TARGET, { throwIfNoEntry: false });
  if (target && target.size === source.size && target.mtimeMs >= source.mtimeMs) return [];
  mkdirSync(dirname(RENDERER_TARGET), { recursive: true });
  copyFileSync(RENDERER_SOURCE, RENDERER_TARGET);
  return [RENDERER_TARGET];
}

if (process.argv[1] && import.meta.filename === resolve(process.argv[1])) {
  const written = copyDocsAssets();
  console.log(written.length > 0 ? `docs assets: wrote ${written.join(", ")}` : "docs assets: up to date");
}
