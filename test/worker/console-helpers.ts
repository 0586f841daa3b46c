import { expect, inject } from "vitest";
import { TEST_ADMIN_KEY } from "./bindings";
import { Browser } from "./browser";
import { BASE, type CallOptions } from "./helpers";

declare module "vitest" {
  export interface ProvidedContext {
    /** dev/access-jwks: a stand-in for an Access team's certs endpoint (see global-setup.ts). */
    accessJwksUrl: string;
  }
}

/**
 * An operator's browser on the console: a cookie jar (test/worker/browser.ts) that sends what a
 * browser sends with a form (Origin, the form's content type) and reads what a page shows.
 */

export const CONSOLE = "/console";

export interface ConsolePage {
  response: Response;
  status: number;
  html: string;
  /** The CSRF token of the page's forms (the first one). */
  csrf: string | undefined;
}

export class ConsoleBrowser {
  readonly browser: Browser;
  readonly origin: string;

  constructor(base: string = BASE) {
    this.browser = new Browser(base);
    this.origin = new URL(base).origin;
  }

  async get(path: string, options: CallOptions = {}): Promise<ConsolePage> {
    return read(await this.browser.open(`${CONSOLE}${path}`, options));
  }

  /** POSTs a form as a browser would (with this origin), without following the redirect. */
  async post(
    path: string,
    fields: Record<string, string>,
    options: CallOptions & { origin?: string | null } = {},
  ): Promise<ConsolePage> {
    const { origin = this.origin, ...rest } = options;
    const headers = new Headers(rest.headers);
    if (!headers.has("content-type")) headers.set("content-type", "application/x-www-form-urlencoded");
    if (origin !== null) headers.set("origin", origin);
    return read(
      await this.browser.open(`${CONSOLE}${path}`, {
        ...rest,
        method: "POST",
        headers,
        body: new URLSearchParams(fields).toString(),
      }),
    );
  }

  /** GETs `path`, then posts `fields` with that page's CSRF token: what submitting its form does. */
  async submit(
    pagePath: string,
    action: string,
    fields: Record<string, string> = {},
    options: CallOptions = {},
  ): Promise<ConsolePage> {
    const before = await this.get(pagePath, options);
    expect(before.status, before.html).toBe(200);
    return this.post(action, { csrf: before.csrf ?? "", ...fields }, options);
  }

  /** Follows a 303 as a browser does (GET of its Location). */
  async follow(page: ConsolePage, options: CallOptions = {}): Promise<ConsolePage> {
    expect(page.status, page.html).toBe(303);
    const location = page.response.headers.get("location") ?? "";
    return read(await this.browser.open(new URL(location, `${this.origin}/`).toString(), options));
  }

  /** Signs in through the form; asserts the 303 to the branch list. */
  async signIn(key: string = TEST_ADMIN_KEY, options: CallOptions = {}): Promise<void> {
    const form = await this.get("/sign-in", options);
    expect(form.status, form.html).toBe(200);
    const answer = await this.post("/sign-in", { csrf: form.csrf ?? "", api_key: key }, options);
    expect(answer.status, answer.html).toBe(303);
    expect(answer.response.headers.get("location")).toBe("/token-management/console");
  }
}

async function read(response: Response): Promise<ConsolePage> {
  const html = await response.text();
  return { response, status: response.status, html, csrf: /name="csrf" value="([^"]*)"/.exec(html)?.[1] };
}

/** The text of the flash message on a page, if any. */
export function flashOf(html: string): { tone: "ok" | "error"; text: string } | undefined {
  const match = /<p role="(status|alert)" class="flash(?: error)?">([\s\S]*?)<\/p>/.exec(html);
  return match ? { tone: match[1] === "alert" ? "error" : "ok", text: decode(match[2]!) } : undefined;
}

/** Rows of a table (by id) as cell texts, header row excluded. */
export function tableRows(html: string, id: string): string[][] {
  const table = new RegExp(`<table id="${id}">([\\s\\S]*?)</table>`).exec(html)?.[1];
  if (table === undefined) throw new Error(`no table#${id} on the page`);
  const body = /<tbody>([\s\S]*?)<\/tbody>/.exec(table)?.[1] ?? "";
  return [...body.matchAll(/<tr>([\s\S]*?)<\/tr>/g)].map((row) =>
    [...row[1]!.matchAll(/<td[^>]*>([\s\S]*?)<\/td>/g)].map((cell) => textOf(cell[1]!)),
  );
}

/** Visible text of an HTML fragment (tags dropped, entities decoded, spaces collapsed). */
export function textOf(fragment: string): string {
  return decode(fragment.replace(/<[^>]+>/g, " "))
    .replace(/\s+/g, " ")
    .trim();
}

function decode(text: string): string {
  return text
    .replace(/&#(\d+);/g, (_, code) => String.fromCharCode(Number(code)))
    .replace(/&#x([0-9a-f]+);/gi, (_, code) => String.fromCharCode(Number.parseInt(code, 16)))
    .replace(/&quot;/g, '"')
    .replace(/&lt;/g, "<")
    .replace(/&gt;/g, ">")
    .replace(/&amp;/g, "&");
}

export function accessJwksUrl(): string {
  return inject("accessJwksUrl");
}
