/**
 * The API reference at /docs: the OpenAPI document (/openapi.json) rendered in the browser by Scalar's
 * API reference. Everything the page loads comes from this Worker: the page and its start script from
 * these routes, the renderer's browser bundle (@scalar/api-reference's standalone build, the version
 * package-lock.json pins) from the Worker's static assets (wrangler.toml `[assets]`, the ASSETS
 * binding), where scripts/docs-assets.ts copies it out of node_modules. Nothing from a CDN: it works
 * offline and cannot change under us.
 */
import type { App } from "../app";
import { AppError } from "../errors";

/** Under the app's base path; the static asset scripts/docs-assets.ts writes (keep the two in step). */
export const DOCS_RENDERER_PATH = "/docs/api-reference.js";
const DOCS_START_PATH = "/docs/start.js";

/**
 * Only this origin. The exceptions are what the renderer strictly needs, no more:
 *   - style-src 'unsafe-inline': it is a Vue app that injects its styles as <style> elements and
 *     sets style attributes at run time (scripts stay 'self' only: no inline script, no eval);
 *   - img-src data: its icons and logos are data: URIs.
 * connect-src 'self' lets it fetch /openapi.json and send "try it" requests to this API only.
 */
export const DOCS_CONTENT_SECURITY_POLICY = [
  "default-src 'none'",
  "script-src 'self'",
  "style-src 'self' 'unsafe-inline'",
  "img-src 'self' data:",
  "font-src 'self'",
  "connect-src 'self'",
  "base-uri 'none'",
  "form-action 'none'",
  "frame-ancestors 'none'",
].join("; ");

const DOCS_HEADERS = {
  "Content-Security-Policy": DOCS_CONTENT_SECURITY_POLICY,
  "X-Content-Type-Options": "nosniff",
  "Referrer-Policy": "no-referrer",
  "Cache-Control": "no-cache",
} as const;

/**
 * The renderer's options: none of its features that call Scalar's services (default web fonts from
 * its CDN, telemetry, the AI agent, MCP generation, the hosted API client); the CSP would block them.
 */
function startScript(openApiUrl: string): string {
  const options = {
    url: openApiUrl,
    withDefaultFonts: false,
    telemetry: false,
    showDeveloperTools: "never",
    hideClientButton: true,
    agent: { disabled: true },
    mcp: { disabled: true },
  };
  return `Scalar.createApiReference("#app", ${JSON.stringify(options)});\n`;
}

export function registerDocsRoutes(app: App, basePath: string): void {
  app.get("/docs", (c) =>
    c.body(
      `<!doctype html>
<html lang="en">
  <head>
    <meta charset="utf-8">
    <meta name="viewport" content="width=device-width, initial-scale=1">
    <title>Token management API</title>
  </head>
  <body>
    <div id="app"></div>
    <script src="${basePath}${DOCS_RENDERER_PATH}"></script>
    <script src="${basePath}${DOCS_START_PATH}"></script>
  </body>
</html>
`,
      200,
      { ...DOCS_HEADERS, "Content-Type": "text/html; charset=utf-8" },
    ),
  );
  app.get(DOCS_RENDERER_PATH, async (c) => {
    // The asset has the same path under the assets directory; the asset server sets its type and ETag.
    const asset = await c.env.ASSETS.fetch(new Request(c.req.url, { headers: c.req.raw.headers }));
    if (asset.status === 404) {
      throw new AppError("not_found", "The API reference's renderer is not deployed: run node scripts/docs-assets.ts.");
    }
    const response = new Response(asset.body, asset);
    response.headers.set("X-Content-Type-Options", "nosniff");
    return response;
  });
  app.get(DOCS_START_PATH, (c) =>
    c.body(startScript(`${basePath}/openapi.json`), 200, {
      ...DOCS_HEADERS,
      "Content-Type": "text/javascript; charset=utf-8",
    }),
  );
}
