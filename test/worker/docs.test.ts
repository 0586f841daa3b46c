import { describe, expect, it } from "vitest";
import { DOCS_CONTENT_SECURITY_POLICY } from "../../src/routes/docs";
import { BASE, call } from "./helpers";

const get = (url: string | URL) => call(String(url));
const ORIGIN = new URL(BASE).origin;

/** The directives of a Content-Security-Policy header, by name. */
function directives(policy: string): Record<string, string[]> {
  return Object.fromEntries(
    policy
      .split(";")
      .map((part) => part.trim().split(/\s+/))
      .filter((words) => words[0])
      .map(([name, ...values]) => [name!, values]),
  );
}

describe("GET /docs", () => {
  it("is a page whose every script comes from this Worker, under a same-origin Content-Security-Policy", async () => {
    const page = await get(`${BASE}/docs`);
    expect(page.status).toBe(200);
    expect(page.headers.get("content-type")).toBe("text/html; charset=utf-8");
    const policy = page.headers.get("content-security-policy") ?? "";
    expect(policy).toBe(DOCS_CONTENT_SECURITY_POLICY);
    const csp = directives(policy);
    expect(csp["default-src"]).toEqual(["'none'"]);
    expect(csp["script-src"]).toEqual(["'self'"]);
    expect(csp["connect-src"]).toEqual(["'self'"]);
    // Nothing but this origin, data: images and inline styles (the named exceptions).
    for (const values of Object.values(csp)) {
      for (const value of values) expect(["'none'", "'self'", "'unsafe-inline'", "data:"]).toContain(value);
    }
    expect(csp["style-src"]).toEqual(["'self'", "'unsafe-inline'"]);
    expect(csp["img-src"]).toEqual(["'self'", "data:"]);

    const html = await page.text();
    // No inline script: every <script> has a src.
    expect(html.match(/<script(?![^>]*\ssrc=)[^>]*>/g)).toBeNull();
    const references = [...html.matchAll(/\s(?:src|href)="([^"]*)"/g)].map((match) => match[1]!);
    expect(references.length).toBeGreaterThanOrEqual(2);

    const scripts: string[] = [];
    for (const reference of references) {
      const url = new URL(reference, `${BASE}/docs`);
      expect(url.origin, reference).toBe(ORIGIN);
      const asset = await get(url);
      expect(asset.status, reference).toBe(200);
      expect(asset.headers.get("content-type"), reference).toMatch(/^(text|application)\/javascript\b/);
      scripts.push(await asset.text());
    }
    // The renderer's bundle (from node_modules, not a CDN) and the script that starts it on this API's document.
    const renderers = scripts.filter((script) => script.length > 1_000_000 && script.includes("createApiReference"));
    expect(renderers).toHaveLength(1);
    const starts = scripts.filter((script) => script.length < 1_000 && script.startsWith("Scalar.createApiReference("));
    expect(starts).toHaveLength(1);
    expect(starts[0]).toContain('"url":"/token-management/openapi.json"');
    expect(starts[0]).toContain('"withDefaultFonts":false');

    const document = await get(`${BASE}/openapi.json`);
    expect(document.status).toBe(200);
    expect(document.headers.get("content-type")).toContain("application/json");
  });
});
