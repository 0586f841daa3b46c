import { describe, expect, it } from "vitest";
import { AUTH_FAILURE_LIMIT, AUTH_FAILURE_PERIOD_SECONDS } from "../../src/lib/rate-limit";
import { TEST_ADMIN_KEY } from "./bindings";
import { ConsoleBrowser } from "./console-helpers";
import { call, expectProblem } from "./helpers";

/**
 * Failed credential checks are rate limited per client address (CF-Connecting-IP) with the Workers
 * rate-limiting binding AUTH_FAILURES (wrangler.toml [[ratelimits]], run locally by Miniflare). Each
 * test uses addresses of its own, so no other test's failures count against them; requests without
 * the header (every other test file's) are not limited.
 *
 * The binding's windows are aligned to the clock, so a window may roll over during a test: the first
 * AUTH_FAILURE_LIMIT failures are always answered as failures, and the 429 comes within one more
 * window's worth.
 */

const BAD_KEY = "not-a-key-but-long-enough-00000";
/** A documentation address (RFC 5737) no other test uses. */
const newAddress = () => `2001:db8::${crypto.getRandomValues(new Uint16Array(3)).join(":")}`;
const from = (address: string) => ({ "cf-connecting-ip": address });

/** Sends `send()` until it answers 429; returns the statuses before. */
async function untilLimited(send: () => Promise<number>): Promise<number[]> {
  const before: number[] = [];
  for (let i = 0; i <= 2 * AUTH_FAILURE_LIMIT + 1; i++) {
    const status = await send();
    if (status === 429) return before;
    before.push(status);
  }
  throw new Error(`no 429 after ${before.length} failures: ${before.join(",")}`);
}

describe("API-key failures", () => {
  it("are limited per address: 429 with Retry-After after the limit, then even a valid key waits; other addresses unaffected", async () => {
    const address = newAddress();
    const before = await untilLimited(
      async () => (await call("/clients", { key: BAD_KEY, headers: from(address) })).status,
    );
    expect(before.length).toBeGreaterThanOrEqual(AUTH_FAILURE_LIMIT);
    expect(new Set(before)).toEqual(new Set([401]));

    const limited = await call("/clients", { key: BAD_KEY, headers: from(address) });
    expect(limited.headers.get("retry-after")).toBe(String(AUTH_FAILURE_PERIOD_SECONDS));
    const body = await expectProblem(limited, 429, "rate_limited");
    expect(body.detail).not.toContain(address);
    // A right guess from that address is not told apart from the wrong ones for the period.
    await expectProblem(await call("/clients", { key: "admin", headers: from(address) }), 429, "rate_limited");

    // Another address: its own count, and a valid key works.
    const other = newAddress();
    expect((await call("/clients", { key: "admin", headers: from(other) })).status).toBe(200);
    await expectProblem(await call("/clients", { key: BAD_KEY, headers: from(other) }), 401, "unauthorized");
  });

  it("a valid key never counts, however many requests; the service key on an admin route is not a failure", async () => {
    const address = newAddress();
    for (let i = 0; i < AUTH_FAILURE_LIMIT + 5; i++) {
      expect((await call("/clients", { key: "admin", headers: from(address) })).status).toBe(200);
      expect((await call("/clients", { key: "service", headers: from(address) })).status).toBe(403);
    }
    await expectProblem(await call("/clients", { key: BAD_KEY, headers: from(address) }), 401, "unauthorized");
  });

  it("without a client address (outside Cloudflare's edge) nothing is limited", async () => {
    for (let i = 0; i < AUTH_FAILURE_LIMIT + 5; i++) {
      expect((await call("/clients", { key: BAD_KEY })).status).toBe(401);
    }
  });
});

describe("console sign-in failures", () => {
  it("are limited per address: a 429 page after the limit, then even the admin key waits", async () => {
    const address = newAddress();
    const operator = new ConsoleBrowser();
    const tryKey = async (key: string) => {
      const form = await operator.get("/sign-in", { headers: from(address) });
      return operator.post("/sign-in", { csrf: form.csrf ?? "", api_key: key }, { headers: from(address) });
    };
    const before = await untilLimited(async () => (await tryKey(BAD_KEY)).status);
    expect(before.length).toBeGreaterThanOrEqual(AUTH_FAILURE_LIMIT);
    expect(new Set(before)).toEqual(new Set([401]));

    const limited = await tryKey(TEST_ADMIN_KEY);
    expect(limited.status).toBe(429);
    expect(limited.response.headers.get("retry-after")).toBe(String(AUTH_FAILURE_PERIOD_SECONDS));
    expect(limited.html).toContain("Too many failed sign-ins");
    expect(limited.response.headers.getSetCookie().some((c) => c.startsWith("tm_console="))).toBe(false);

    // Another address signs in.
    const other = new ConsoleBrowser();
    await other.signIn(TEST_ADMIN_KEY, { headers: from(newAddress()) });
  });
});
