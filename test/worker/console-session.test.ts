import { exportJWK, generateKeyPair, importJWK, SignJWT } from "jose";
import { beforeAll, describe, expect, it } from "vitest";
import { parseEnv } from "../../src/env";
import { loadKeyring, sign } from "../../src/lib/crypto";
import { toBase64Url } from "../../src/lib/encoding";
import { createKeySession, readKeySession, sealFlash } from "../../src/services/console-session";
import { TEST_ADMIN_KEY, TEST_ENCRYPTION_KEY, TEST_SERVICE_KEY } from "./bindings";
import { accessJwksUrl, ConsoleBrowser, flashOf } from "./console-helpers";
import { BASE, call, testEnv, uniqueId } from "./helpers";

/**
 * Who gets into the console: the admin-key sign-in and its signed session cookie (expiry, sign-out,
 * forgery, a removed key), the CSRF defences (Origin and the per-session token), the headers every
 * page carries, and Cloudflare Access JWTs against a local stand-in for the team's certs endpoint.
 */

const SECOND_ADMIN_KEY = "test-admin-key-0000000000000002";
const HOUR_MS = 60 * 60 * 1000;

describe("sign-in", () => {
  it("sends a visitor without a session to the sign-in page", async () => {
    const visitor = new ConsoleBrowser();
    for (const path of ["", "/events", "/branches/new", "/branches/1"]) {
      const page = await visitor.get(path);
      expect(page.status).toBe(303);
      expect(page.response.headers.get("location")).toBe("/token-management/console/sign-in");
    }
  });

  it("shows a labelled key field and signs in with an admin key: a HttpOnly, SameSite=Strict session cookie", async () => {
    const operator = new ConsoleBrowser();
    const form = await operator.get("/sign-in");
    expect(form.status).toBe(200);
    expect(form.html).toContain('<label for="api_key">Admin API key</label>');
    expect(form.html).toMatch(/<input id="api_key" name="api_key" type="password"/);
    expect(form.html).toMatch(/<button type="submit">Sign in<\/button>/);

    const answer = await operator.post("/sign-in", { csrf: form.csrf!, api_key: TEST_ADMIN_KEY });
    expect(answer.status).toBe(303);
    expect(answer.response.headers.get("location")).toBe("/token-management/console");
    const cookie = answer.response.headers.getSetCookie().find((c) => c.startsWith("tm_console="));
    expect(cookie).toBeDefined();
    expect(cookie).toMatch(/; HttpOnly/);
    expect(cookie).toMatch(/; SameSite=Strict/);
    expect(cookie).toMatch(/; Path=\//);
    expect(cookie).toMatch(/; Max-Age=28800/);
    // Plain http (local development): a browser would drop a Secure cookie, so it is not one.
    expect(cookie).not.toMatch(/Secure/);

    const list = await operator.get("");
    expect(list.status).toBe(200);
    expect(list.html).toContain('<table id="branches">');
    expect(list.html).toContain("Signed in: admin key");
  });

  it("on https the cookie is __Host- prefixed and Secure", async () => {
    const operator = new ConsoleBrowser("https://token-manager.test/token-management");
    await operator.signIn();
    expect(operator.browser.names()).toContain("__Host-tm_console");
    const list = await operator.get("");
    expect(list.status).toBe(200);
  });

  it("refuses the service key and a wrong key with a 401 and the form again, and sets no session", async () => {
    for (const [key, message] of [
      [TEST_SERVICE_KEY, "The service key cannot sign in: use an admin API key."],
      ["not-a-key-of-this-service-at-all", "That is not a valid admin API key."],
      ["", "That is not a valid admin API key."],
    ] as const) {
      const visitor = new ConsoleBrowser();
      const form = await visitor.get("/sign-in");
      const answer = await visitor.post("/sign-in", { csrf: form.csrf!, api_key: key });
      expect(answer.status).toBe(401);
      expect(flashOf(answer.html)).toEqual({ tone: "error", text: message });
      expect(answer.html).toContain('id="api_key"');
      expect(visitor.browser.names()).not.toContain("tm_console");
      expect((await visitor.get("")).status).toBe(303);
    }
  });

  it("refuses a sign-in without the form's CSRF token or from another origin", async () => {
    const visitor = new ConsoleBrowser();
    const form = await visitor.get("/sign-in");
    const withoutToken = await visitor.post("/sign-in", { api_key: TEST_ADMIN_KEY });
    expect(withoutToken.status).toBe(403);
    const foreign = await visitor.post(
      "/sign-in",
      { csrf: form.csrf!, api_key: TEST_ADMIN_KEY },
      { origin: "https://evil.example" },
    );
    expect(foreign.status).toBe(403);
    // A token of another browser's form: bound to that browser's sign-in cookie.
    const other = new ConsoleBrowser();
    const otherForm = await other.get("/sign-in");
    const swapped = await visitor.post("/sign-in", { csrf: otherForm.csrf!, api_key: TEST_ADMIN_KEY });
    expect(swapped.status).toBe(403);
    expect(visitor.browser.names()).not.toContain("tm_console");
  });

  it("an operator already signed in who opens the sign-in page goes to the branches", async () => {
    const operator = new ConsoleBrowser();
    await operator.signIn();
    const again = await operator.get("/sign-in");
    expect(again.status).toBe(303);
    expect(again.response.headers.get("location")).toBe("/token-management/console");
  });
});

describe("plain http", () => {
  /** Production-like bindings: https provider, no OAUTH_ALLOW_INSECURE_HTTP. */
  const production = {
    OAUTH_ALLOW_INSECURE_HTTP: "false",
    OAUTH_ISSUER: "https://issuer.example",
    OAUTH_AUTHORIZATION_URL: "https://issuer.example/authorize",
    OAUTH_TOKEN_URL: "https://issuer.example/token",
    OAUTH_REVOCATION_URL: "",
    // Its default (Google's, https): the tests' local stand-in is plain http.
    RISC_CONFIGURATION_URL: "",
    BUSINESS_PROFILE_API_BASE_URLS: "",
  };

  it("on a non-loopback host is refused with a page saying the console needs https, before any key is read", async () => {
    const visitor = new ConsoleBrowser("http://tokens.example.com/token-management");
    for (const path of ["/sign-in", "", "/branches/1", "/events"]) {
      const page = await visitor.get(path, { envOverrides: production });
      expect(page.status, path).toBe(403);
      expect(page.response.headers.get("content-type")).toMatch(/^text\/html/);
      expect(flashOf(page.html)?.text).toMatch(
        /^The console needs https: open https:\/\/tokens\.example\.com\/token-management\/console instead\./,
      );
      expect(page.html).not.toContain('id="api_key"');
      expect(page.response.headers.get("strict-transport-security")).toBeNull();
      expect(page.response.headers.get("cache-control")).toBe("no-store");
    }
    // The admin key posted anyway opens nothing and sets no cookie.
    const signIn = await visitor.post("/sign-in", { api_key: TEST_ADMIN_KEY }, { envOverrides: production });
    expect(signIn.status).toBe(403);
    expect(signIn.response.headers.getSetCookie()).toEqual([]);
    // A valid session cookie sent over http is not honoured either.
    const keyring = await loadKeyring(TEST_ENCRYPTION_KEY);
    const { value } = await createKeySession(keyring, TEST_ADMIN_KEY, new Date(), 3600);
    const withCookie = await call("http://tokens.example.com/token-management/console", {
      envOverrides: production,
      headers: { cookie: `tm_console=${value}` },
    });
    expect(withCookie.status).toBe(403);
  });

  it("is allowed on loopback hosts only: OAUTH_ALLOW_INSECURE_HTTP does not open it elsewhere", async () => {
    for (const host of ["localhost:8787", "127.0.0.1:8787", "[::1]:8787"]) {
      const page = await new ConsoleBrowser(`http://${host}/token-management`).get("/sign-in", {
        envOverrides: production,
      });
      expect(page.status, host).toBe(200);
      expect(page.html).toContain('id="api_key"');
    }
    expect(new URL(BASE).protocol).toBe("http:");
    expect((await new ConsoleBrowser().get("/sign-in")).status).toBe(200);
    // The development flag (on in these tests' bindings) relaxes nothing on another host.
    const remote = new ConsoleBrowser("http://tokens.example.com/token-management");
    const page = await remote.get("/sign-in", { envOverrides: { OAUTH_ALLOW_INSECURE_HTTP: "true" } });
    expect(page.status).toBe(403);
    expect(page.html).not.toContain('id="api_key"');
  });

  it("https responses carry Strict-Transport-Security for a year; http ones do not", async () => {
    const secure = new ConsoleBrowser("https://tokens.example.com/token-management");
    const form = await secure.get("/sign-in", { envOverrides: production });
    expect(form.status).toBe(200);
    expect(form.response.headers.get("strict-transport-security")).toBe("max-age=31536000");
    await secure.signIn(TEST_ADMIN_KEY, { envOverrides: production });
    const list = await secure.get("", { envOverrides: production });
    expect(list.status).toBe(200);
    expect(list.response.headers.get("strict-transport-security")).toBe("max-age=31536000");
    const plain = await new ConsoleBrowser().get("/sign-in");
    expect(plain.response.headers.get("strict-transport-security")).toBeNull();
  });
});

describe("the session", () => {
  it("sign-out clears the cookie and the console asks for the key again", async () => {
    const operator = new ConsoleBrowser();
    await operator.signIn();
    const list = await operator.get("");
    const out = await operator.post("/sign-out", { csrf: list.csrf! });
    expect(out.status).toBe(303);
    expect(out.response.headers.get("location")).toBe("/token-management/console/sign-in");
    expect(out.response.headers.getSetCookie().some((c) => /^tm_console=;.*Max-Age=0/.test(c))).toBe(true);
    const signInPage = await operator.follow(out);
    expect(flashOf(signInPage.html)).toEqual({ tone: "ok", text: "Signed out." });
    expect((await operator.get("")).status).toBe(303);
  });

  it("expires: a session older than its lifetime is refused (time as a parameter)", async () => {
    const keyring = await loadKeyring(TEST_ENCRYPTION_KEY);
    const start = new Date("2026-12-01T08:00:00Z");
    const { value } = await createKeySession(keyring, TEST_ADMIN_KEY, start, 8 * 60 * 60);
    const admins = [TEST_ADMIN_KEY];
    expect(await readKeySession(keyring, value, admins, new Date(start.getTime() + 8 * HOUR_MS - 1000))).not.toBeNull();
    expect(await readKeySession(keyring, value, admins, new Date(start.getTime() + 8 * HOUR_MS))).toBeNull();
  });

  it("refuses an expired session cookie and tells the browser to drop it", async () => {
    const keyring = await loadKeyring(TEST_ENCRYPTION_KEY);
    const { value } = await createKeySession(keyring, TEST_ADMIN_KEY, new Date(Date.now() - 9 * HOUR_MS), 8 * 60 * 60);
    const page = await call("/console", { headers: { cookie: `tm_console=${value}` } });
    expect(page.status).toBe(303);
    expect(page.headers.get("location")).toBe("/token-management/console/sign-in");
    expect(page.headers.getSetCookie().some((c) => /^tm_console=;/.test(c))).toBe(true);
    // The same session, minted now, opens the console: only its age differed.
    const fresh = await createKeySession(keyring, TEST_ADMIN_KEY, new Date(), 60);
    expect((await call("/console", { headers: { cookie: `tm_console=${fresh.value}` } })).status).toBe(200);
  });

  it("a short CONSOLE_SESSION_TTL_SECONDS is the cookie's lifetime and the session's", async () => {
    const operator = new ConsoleBrowser();
    const envOverrides = { CONSOLE_SESSION_TTL_SECONDS: "1" } as Record<string, string>;
    const form = await operator.get("/sign-in", { envOverrides });
    const answer = await operator.post("/sign-in", { csrf: form.csrf!, api_key: TEST_ADMIN_KEY }, { envOverrides });
    expect(answer.response.headers.getSetCookie().find((c) => c.startsWith("tm_console="))).toMatch(/Max-Age=1(;|$)/);
    const value = /tm_console=([^;]+)/.exec(answer.response.headers.getSetCookie().join("\n"))![1]!;
    await new Promise((resolve) => setTimeout(resolve, 1_100));
    // Sent anyway (a browser would have dropped it): the signed expiry refuses it.
    const late = await call("/console", { headers: { cookie: `tm_console=${value}` }, envOverrides });
    expect(late.status).toBe(303);
  });

  it("refuses forged sessions: altered payload, bad signature, another purpose's signature, garbage", async () => {
    const keyring = await loadKeyring(TEST_ENCRYPTION_KEY);
    const { value } = await createKeySession(keyring, TEST_ADMIN_KEY, new Date(), 3600);
    const [payload, signature] = value.split(".") as [string, string];
    const decoded = JSON.parse(atob(payload.replace(/-/g, "+").replace(/_/g, "/")));
    const longer = toBase64Url(new TextEncoder().encode(JSON.stringify({ ...decoded, e: decoded.e + 100 * HOUR_MS })));
    const forged = [
      `${longer}.${signature}`,
      `${payload}.${signature.slice(0, -2)}AA`,
      // Signed with the same sub-key but without the session purpose (as a login link is).
      `${longer}.${await sign(keyring, longer)}`,
      `${payload}`,
      "garbage",
    ];
    for (const cookie of forged) {
      const page = await call("/console", { headers: { cookie: `tm_console=${cookie}` } });
      expect(page.status, cookie).toBe(303);
    }
    // Another deployment's encryption key signs sessions this one does not accept.
    const otherKeyring = await loadKeyring(btoa(String.fromCharCode(...new Uint8Array(32).fill(7))));
    const foreign = await createKeySession(otherKeyring, TEST_ADMIN_KEY, new Date(), 3600);
    expect((await call("/console", { headers: { cookie: `tm_console=${foreign.value}` } })).status).toBe(303);
    expect((await call("/console", { headers: { cookie: `tm_console=${value}` } })).status).toBe(200);
  });

  it("refuses another purpose's value as the session: a CSRF token, a flash cookie, a session-shaped payload signed for them", async () => {
    const operator = new ConsoleBrowser();
    await operator.signIn();
    const list = await operator.get("");
    const out = await operator.post("/sign-out", { csrf: list.csrf! });
    const flashCookie = /tm_console_flash=([^;]+)/.exec(out.response.headers.getSetCookie().join("\n"))?.[1];
    expect(flashCookie).toBeDefined();

    const keyring = await loadKeyring(TEST_ENCRYPTION_KEY);
    // A payload that would be a valid session under the session purpose (the control below)...
    const payload = toBase64Url(
      new TextEncoder().encode(
        JSON.stringify({
          s: "attacker-chosen-id",
          k: await sign(keyring, `token-management/console-session-key/v1|${TEST_ADMIN_KEY}`),
          e: Date.now() + HOUR_MS,
        }),
      ),
    );
    const signedAs = async (purpose: string) => `${payload}.${await sign(keyring, `${purpose}|${payload}`)}`;
    const refused = [
      list.csrf!,
      flashCookie!,
      await sealFlash(keyring, { tone: "ok", message: "hello" }, new Date()),
      // ...signed as a CSRF token or a flash message is: another purpose.
      await signedAs("token-management/console-csrf/v1"),
      await signedAs("token-management/console-flash/v1"),
    ];
    for (const cookie of refused) {
      const page = await call("/console", { headers: { cookie: `tm_console=${cookie}` } });
      expect(page.status, cookie).toBe(303);
      expect(page.headers.get("location")).toBe("/token-management/console/sign-in");
    }
    const control = await signedAs("token-management/console-session/v1");
    expect((await call("/console", { headers: { cookie: `tm_console=${control}` } })).status).toBe(200);
  });

  it("ends when its admin key is removed from ADMIN_API_KEY; sessions of the other key go on", async () => {
    const first = new ConsoleBrowser();
    await first.signIn(TEST_ADMIN_KEY);
    const second = new ConsoleBrowser();
    await second.signIn(SECOND_ADMIN_KEY);
    const envOverrides = { ADMIN_API_KEY: TEST_ADMIN_KEY };
    expect((await first.get("", { envOverrides })).status).toBe(200);
    expect((await second.get("", { envOverrides })).status).toBe(303);
  });
});

describe("CSRF", () => {
  it("refuses a POST without the session's token, with another session's token, or as JSON", async () => {
    const operator = new ConsoleBrowser();
    await operator.signIn();
    const other = new ConsoleBrowser();
    await other.signIn();
    const otherToken = (await other.get("")).csrf!;

    const missing = await operator.post("/sign-out", {});
    expect(missing.status).toBe(403);
    expect(missing.html).toContain("CSRF token");
    expect((await operator.post("/sign-out", { csrf: otherToken })).status).toBe(403);
    const json = await operator.post("/sign-out", {}, { headers: { "content-type": "application/json" } });
    expect(json.status).toBe(403);
    // Still signed in: none of them signed out.
    expect((await operator.get("")).status).toBe(200);
  });

  it("refuses a POST with the right token from a foreign Origin, and one with no Origin at all", async () => {
    const operator = new ConsoleBrowser();
    await operator.signIn();
    const token = (await operator.get("")).csrf!;
    const foreign = await operator.post("/sign-out", { csrf: token }, { origin: "https://evil.example" });
    expect(foreign.status).toBe(403);
    expect(foreign.html).toContain("another site");
    expect((await operator.post("/sign-out", { csrf: token }, { origin: null })).status).toBe(403);
    expect((await operator.get("")).status).toBe(200);
    // The same form from this origin works.
    expect((await operator.post("/sign-out", { csrf: token })).status).toBe(303);
  });

  it("a POST without any session is a 401 page, not an action", async () => {
    const visitor = new ConsoleBrowser();
    const answer = await visitor.post("/sign-out", { csrf: "x" });
    expect(answer.status).toBe(401);
    expect(answer.response.headers.get("content-type")).toMatch(/^text\/html/);
  });
});

describe("malformed form bodies", () => {
  /** POSTs `body` as a browser form would be sent, with a content type that does not match it. */
  const postRaw = async (operator: ConsoleBrowser, path: string, contentType: string, body: string) => {
    const response = await operator.browser.open(`/console${path}`, {
      method: "POST",
      headers: { "content-type": contentType, origin: operator.origin },
      body,
    });
    return { status: response.status, html: await response.text() };
  };
  const MALFORMED: [string, string][] = [
    ["multipart/form-data", "api_key=x"],
    ["multipart/form-data; boundary=zzz", "not a multipart body"],
    ["multipart/form-data; boundary=zzz", '--zzz\r\nContent-Disposition: form-data; name="api_key"\r\n\r\nx'],
  ];

  it("are a 400 page on the unauthenticated sign-in, not a 500", async () => {
    for (const [type, body] of MALFORMED) {
      const answer = await postRaw(new ConsoleBrowser(), "/sign-in", type, body);
      expect(answer.status, `${type}: ${answer.html}`).toBe(400);
      expect(answer.html).toContain("does not parse");
    }
  });

  it("are a 400 page on a signed-in operator's action, which changes nothing", async () => {
    const operator = new ConsoleBrowser();
    await operator.signIn();
    for (const [type, body] of MALFORMED) {
      for (const path of ["/sign-out", "/branches", "/branches/1/refresh"]) {
        const answer = await postRaw(operator, path, type, body);
        expect(answer.status, `${path} ${type}: ${answer.html}`).toBe(400);
      }
    }
    expect((await operator.get("")).status).toBe(200);
  });
});

describe("every console response", () => {
  it("has a strict CSP with a fresh nonce that its style element carries, no framing, no caching, no referrer", async () => {
    const operator = new ConsoleBrowser();
    await operator.signIn();
    const nonces = new Set<string>();
    const pages = [
      await new ConsoleBrowser().get("/sign-in"),
      await operator.get(""),
      await operator.get("/events"),
      await operator.get("/branches/new"),
      await operator.get("/branches/2147483647"),
      await operator.get("/no-such-page"),
      await new ConsoleBrowser().get(""),
      await operator.post("/sign-out", {}),
    ];
    for (const { response, html } of pages) {
      const policy = response.headers.get("content-security-policy") ?? "";
      const nonce = /script-src 'nonce-([^']+)'/.exec(policy)?.[1];
      expect(nonce, policy).toBeDefined();
      nonces.add(nonce!);
      expect(policy).toBe(
        `default-src 'none'; style-src 'nonce-${nonce}'; script-src 'nonce-${nonce}'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'`,
      );
      expect(response.headers.get("x-frame-options")).toBe("DENY");
      expect(response.headers.get("cache-control")).toBe("no-store");
      expect(response.headers.get("referrer-policy")).toBe("no-referrer");
      if (response.status !== 303) {
        expect(response.headers.get("content-type")).toMatch(/^text\/html/);
        expect(html).toContain(`<style nonce="${nonce}">`);
        expect(html).toMatch(/^<!doctype html><html lang="en">/);
        // No inline script or style without the nonce, nothing from elsewhere.
        expect(html.match(/<script(?![^>]*nonce=)/g)).toBeNull();
        expect(html).not.toMatch(/\ssrc="https?:/);
      }
    }
    expect(nonces.size).toBe(pages.length);
  });

  it("is read only by a navigation, never by a script of this origin (the docs page's renderer), nor opened for it", async () => {
    const operator = new ConsoleBrowser();
    await operator.signIn();
    const signedIn = await operator.get("");
    expect(signedIn.csrf).toBeDefined();
    // What a browser sends for fetch()/XHR from a page of this origin (credentials included), an
    // <img>/<script> load, and a frame: refused, with nothing of the page in the answer.
    const scripted: Record<string, string>[] = [
      { "sec-fetch-mode": "cors", "sec-fetch-dest": "empty", "sec-fetch-site": "same-origin" },
      { "sec-fetch-mode": "same-origin", "sec-fetch-dest": "empty", "sec-fetch-site": "same-origin" },
      { "sec-fetch-mode": "no-cors", "sec-fetch-dest": "script", "sec-fetch-site": "same-origin" },
      { "sec-fetch-mode": "navigate", "sec-fetch-dest": "iframe", "sec-fetch-site": "same-origin" },
    ];
    for (const headers of scripted) {
      for (const path of ["", "/events", "/sign-in"]) {
        const answer = await operator.get(path, { headers });
        expect(answer.status, `${path} ${JSON.stringify(headers)}`).toBe(403);
        expect(answer.html).not.toContain(signedIn.csrf!);
        expect(answer.html).not.toContain('<table id="branches">');
      }
      const post = await operator.post("/sign-out", { csrf: signedIn.csrf! }, { headers });
      expect(post.status).toBe(403);
    }
    // A navigation (typing the address, following a link, submitting a form) is answered.
    const navigate = { "sec-fetch-mode": "navigate", "sec-fetch-dest": "document", "sec-fetch-site": "none" };
    const page = await operator.get("", { headers: navigate });
    expect(page.status).toBe(200);
    // Opened by a script (window.open from the docs page), a console page gets a browsing context
    // group of its own (COOP same-origin; the docs page has none): its opener cannot reach it.
    expect(page.response.headers.get("cross-origin-opener-policy")).toBe("same-origin");
    const docs = await call("/docs");
    expect(docs.status).toBe(200);
    expect(docs.headers.get("cross-origin-opener-policy")).not.toBe("same-origin");
    // Still signed in: the refused POSTs signed nobody out.
    expect((await operator.get("")).status).toBe(200);
  });

  it("an unknown console page is an HTML 404 and a bad id a 422, never a 500", async () => {
    const operator = new ConsoleBrowser();
    await operator.signIn();
    const missing = await operator.get("/branches/2147483647");
    expect(missing.status).toBe(404);
    expect(flashOf(missing.html)?.text).toBe("No client with id 2147483647.");
    expect((await operator.get("/branches/abc")).status).toBe(422);
    expect((await operator.get("/branches/-1")).status).toBe(422);
    expect((await operator.get("?status=bogus")).status).toBe(422);
    expect((await operator.get("/nothing-here")).status).toBe(404);
  });
});

describe("Cloudflare Access", () => {
  const team = uniqueId("team");
  const teamDomain = `${team}.cloudflareaccess.com`;
  const issuer = `https://${teamDomain}`;
  const audience = "aud-tag-0123456789abcdef";
  let envOverrides: Record<string, string>;
  let teamKey: CryptoKey;
  let strangerKey: CryptoKey;

  beforeAll(async () => {
    const pair = await generateKeyPair("RS256", { extractable: true });
    teamKey = pair.privateKey;
    strangerKey = (await generateKeyPair("RS256")).privateKey;
    const jwk = { ...(await exportJWK(pair.publicKey)), kid: "team-key-1", alg: "RS256", use: "sig" };
    const certsUrl = `${accessJwksUrl()}/teams/${team}/certs`;
    const stored = await fetch(certsUrl, { method: "PUT", body: JSON.stringify({ keys: [jwk] }) });
    expect(stored.status).toBe(204);
    envOverrides = { CF_ACCESS_TEAM_DOMAIN: teamDomain, CF_ACCESS_AUD: audience, CF_ACCESS_CERTS_URL: certsUrl };
  });

  async function accessJwt(
    options: {
      key?: CryptoKey;
      aud?: string;
      iss?: string;
      expiresInSeconds?: number;
      kid?: string;
      sub?: string;
      email?: string;
      issuedSecondsAgo?: number;
      alg?: string;
    } = {},
  ) {
    const now = Math.floor(Date.now() / 1000);
    return new SignJWT({ email: options.email ?? "operator@example.com", type: "app" })
      .setProtectedHeader({ alg: options.alg ?? "RS256", kid: options.kid ?? "team-key-1" })
      .setSubject(options.sub ?? "user-1234")
      .setIssuer(options.iss ?? issuer)
      .setAudience(options.aud ?? audience)
      .setIssuedAt(now - (options.issuedSecondsAgo ?? 60))
      .setExpirationTime(now + (options.expiresInSeconds ?? 3600))
      .sign(options.key ?? teamKey);
  }

  const open = (path: string, jwt: string | undefined) =>
    call(`${BASE}/console${path}`, {
      envOverrides,
      headers: jwt ? { "cf-access-jwt-assertion": jwt } : {},
    });

  it("accepts the team's JWT for the right audience and shows who is signed in", async () => {
    const page = await open("", await accessJwt());
    const html = await page.text();
    expect(page.status, html).toBe(200);
    expect(html).toContain("Signed in: operator@example.com");
  });

  it("refuses a wrong audience, another issuer, an expired token, a stranger's signature, or none", async () => {
    const refused = [
      await accessJwt({ aud: "another-application" }),
      await accessJwt({ iss: "https://other-team.cloudflareaccess.com" }),
      await accessJwt({ expiresInSeconds: -10 }),
      await accessJwt({ key: strangerKey }),
      await accessJwt({ key: strangerKey, kid: "unknown-kid" }),
      "not.a.jwt",
      undefined,
    ];
    for (const jwt of refused) {
      const page = await open("", jwt);
      expect(page.status, String(jwt)).toBe(303);
      expect(page.headers.get("location")).toBe("/token-management/console/sign-in");
    }
  });

  it("refuses a token without a person: an Access service token's empty sub", async () => {
    const service = await accessJwt({ sub: "", email: "" });
    const page = await open("", service);
    expect(page.status).toBe(303);
    expect(page.headers.get("location")).toBe("/token-management/console/sign-in");
    expect((await open("", await accessJwt({ sub: "user-1234", email: "" }))).status).toBe(200);
  });

  it("pins RS256: a PS256 token signed with the team's own RSA key is refused", async () => {
    // A key set whose key does not name its algorithm: the pin alone refuses the other one.
    const pinTeam = uniqueId("team-pin");
    const pair = await generateKeyPair("RS256", { extractable: true });
    const jwk = { ...(await exportJWK(pair.publicKey)), kid: "pin-key-1", use: "sig" };
    const certsUrl = `${accessJwksUrl()}/teams/${pinTeam}/certs`;
    expect((await fetch(certsUrl, { method: "PUT", body: JSON.stringify({ keys: [jwk] }) })).status).toBe(204);
    const pinIssuer = `https://${pinTeam}.cloudflareaccess.com`;
    const pinEnv: Record<string, string> = {
      CF_ACCESS_TEAM_DOMAIN: `${pinTeam}.cloudflareaccess.com`,
      CF_ACCESS_AUD: audience,
      CF_ACCESS_CERTS_URL: certsUrl,
    };
    // The same RSA private key, imported for each algorithm (a CryptoKey serves one).
    const privateJwk = await exportJWK(pair.privateKey);
    const tokenWith = async (alg: string) =>
      accessJwt({ key: (await importJWK(privateJwk, alg)) as CryptoKey, kid: "pin-key-1", iss: pinIssuer, alg });
    const openWith = async (jwt: string) =>
      call(`${BASE}/console`, { envOverrides: pinEnv, headers: { "cf-access-jwt-assertion": jwt } });
    expect((await openWith(await tokenWith("RS256"))).status).toBe(200);
    const ps256 = await openWith(await tokenWith("PS256"));
    expect(ps256.status).toBe(303);
    expect(ps256.headers.get("location")).toBe("/token-management/console/sign-in");
  });

  it("CF_ACCESS_CERTS_URL must be on the team's origin or a loopback stand-in, whatever OAUTH_ALLOW_INSECURE_HTTP says", async () => {
    const productionBindings: Record<string, string> = {
      OAUTH_ALLOW_INSECURE_HTTP: "false",
      OAUTH_ISSUER: "https://issuer.example",
      OAUTH_AUTHORIZATION_URL: "https://issuer.example/authorize",
      OAUTH_TOKEN_URL: "https://issuer.example/token",
      OAUTH_REVOCATION_URL: "",
      RISC_CONFIGURATION_URL: "",
      BUSINESS_PROFILE_API_BASE_URLS: "",
      CF_ACCESS_TEAM_DOMAIN: teamDomain,
      CF_ACCESS_AUD: audience,
    };
    const production = { ...testEnv, ...productionBindings };
    expect(parseEnv({ ...production, CF_ACCESS_CERTS_URL: `${issuer}/cdn-cgi/access/certs` }).CF_ACCESS_CERTS_URL).toBe(
      `${issuer}/cdn-cgi/access/certs`,
    );
    expect(parseEnv(production).CF_ACCESS_CERTS_URL).toBeUndefined();
    for (const certsUrl of [
      "https://keys.attacker.example/certs",
      `http://${teamDomain}/cdn-cgi/access/certs`,
      `https://other-team.cloudflareaccess.com/cdn-cgi/access/certs`,
    ]) {
      for (const flag of ["false", "true"]) {
        expect(
          () => parseEnv({ ...production, OAUTH_ALLOW_INSECURE_HTTP: flag, CF_ACCESS_CERTS_URL: certsUrl }),
          `${certsUrl} with OAUTH_ALLOW_INSECURE_HTTP=${flag}`,
        ).toThrow(/CF_ACCESS_CERTS_URL: must be on the origin of CF_ACCESS_TEAM_DOMAIN/);
      }
    }
    // Without a team domain there is no origin it could be on.
    const { CF_ACCESS_TEAM_DOMAIN: _team, CF_ACCESS_AUD: _aud, ...noAccess } = production;
    expect(() => parseEnv({ ...noAccess, CF_ACCESS_CERTS_URL: `${issuer}/cdn-cgi/access/certs` })).toThrow(
      /CF_ACCESS_CERTS_URL/,
    );
    // The Worker refuses to serve with it, as with any bad binding: a configuration error, the URL not echoed.
    const broken: Record<string, string> = {
      ...productionBindings,
      CF_ACCESS_CERTS_URL: "https://keys.attacker.example/certs",
    };
    const answer = await call("https://tokens.example.com/token-management/health", {
      key: "admin",
      envOverrides: broken,
    });
    const text = await answer.text();
    expect(answer.status, text).toBe(500);
    expect(text).toContain("configuration_error");
    expect(text).toContain("CF_ACCESS_CERTS_URL: must be on the origin");
    expect(text).not.toContain("keys.attacker.example");
    // These tests' local stand-in (plain http on loopback) is accepted, without the flag.
    expect(new URL(envOverrides.CF_ACCESS_CERTS_URL!).hostname).toBe("127.0.0.1");
    expect(parseEnv({ ...production, ...envOverrides }).CF_ACCESS_CERTS_URL).toBe(envOverrides.CF_ACCESS_CERTS_URL);
  });

  it("refuses everyone when the team's keys cannot be fetched", async () => {
    const unreachable: Record<string, string> = {
      ...envOverrides,
      CF_ACCESS_CERTS_URL: `${accessJwksUrl()}/teams/${uniqueId("nobody")}/certs`,
    };
    const page = await call(`${BASE}/console`, {
      envOverrides: unreachable,
      headers: { "cf-access-jwt-assertion": await accessJwt() },
    });
    expect(page.status).toBe(303);
    expect(page.headers.get("location")).toBe("/token-management/console/sign-in");
  });

  it("turns the key sign-in off: the admin key opens nothing, and a key session cookie is ignored", async () => {
    const form = await call("/console/sign-in", { envOverrides });
    expect(form.status).toBe(401);
    expect(await form.text()).toContain("behind Cloudflare Access");
    const keyring = await loadKeyring(TEST_ENCRYPTION_KEY);
    const { value } = await createKeySession(keyring, TEST_ADMIN_KEY, new Date(), 3600);
    const withCookie = await call("/console", { envOverrides, headers: { cookie: `tm_console=${value}` } });
    expect(withCookie.status).toBe(303);
  });

  it("a form posted under Access needs the token bound to the Access identity", async () => {
    const jwt = await accessJwt();
    const page = await open("", jwt);
    const token = /name="csrf" value="([^"]*)"/.exec(await page.text())![1]!;
    const post = (csrf: string, as: string = jwt) =>
      call(`${BASE}/console/sign-out`, {
        method: "POST",
        envOverrides,
        headers: {
          "cf-access-jwt-assertion": as,
          origin: new URL(BASE).origin,
          "content-type": "application/x-www-form-urlencoded",
        },
        body: new URLSearchParams({ csrf }).toString(),
      });
    expect((await post("forged")).status).toBe(403);
    // Another identity's JWT with this identity's token: refused.
    const other = await accessJwt({ sub: "user-5678", email: "someone-else@example.com" });
    expect((await open("", other)).status).toBe(200);
    expect((await post(token, other)).status).toBe(403);
    // The same identity after a new Access login (another iat): the old page's token is refused.
    const later = await accessJwt({ issuedSecondsAgo: 5 });
    expect((await open("", later)).status).toBe(200);
    expect((await post(token, later)).status).toBe(403);
    const out = await post(token);
    expect(out.status).toBe(303);
    expect(out.headers.get("location")).toBe("/cdn-cgi/access/logout");
  });
});
