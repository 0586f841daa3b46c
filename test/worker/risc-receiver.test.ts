import { SignJWT } from "jose";
import { beforeAll, describe, expect, it } from "vitest";
import { parseEnv } from "../../src/env";
import { IAT_FUTURE_SKEW_SECONDS, MAX_SET_AGE_SECONDS, MAX_SET_BYTES, RISC_EVENT_TYPES } from "../../src/oauth/risc";
import {
  RISC_KEYS_MAX_AGE_MS,
  RISC_KEYS_REFETCH_INTERVAL_MS,
  RiscKeyStore,
  RiscKeysUnavailable,
} from "../../src/oauth/risc-keys";
import { SECURITY_EVENT_RETENTION_SECONDS } from "../../src/services/risc";
import { runEventCron } from "./event-helpers";
import { call, expectProblem, json, testEnv, uniqueId } from "./helpers";
import { registerBranch, sql } from "./oauth-helpers";
import {
  DAY_SECONDS,
  newSigner,
  nowSeconds,
  ownConfigurationUrl,
  postSet,
  publishKeys,
  type SetClaims,
  signSet,
  type TestSigner,
  tokensRevoked,
  transmitterIssuer,
  verification,
} from "./risc-helpers";

/**
 * The receiver's validation (POST /risc), as Google documents it: RS256 with a key of the
 * transmitter's JWKS, iss equal to the configuration document's issuer, aud an app's client id,
 * iat at most 7 days old and not in the future, exp NOT checked. Valid: 202. Anything else: 400
 * problem+json with RFC 8935's `err`.
 */

let signer: TestSigner;
let issuer: string;
let audience: string;

beforeAll(async () => {
  signer = await newSigner();
  await publishKeys(signer);
  issuer = await transmitterIssuer();
  audience = (await registerBranch({ atProvider: false })).oauthClientId;
});

const claims = (extra: SetClaims = {}): SetClaims => ({
  iss: issuer,
  aud: audience,
  events: tokensRevoked(issuer, uniqueId("unknown-sub")),
  ...extra,
});

async function expectRejected(response: Response, err: string) {
  const body = await expectProblem(response, 400, "security_event_rejected");
  expect((body as unknown as { err: string }).err).toBe(err);
  return body;
}

describe("a valid token", () => {
  it("is accepted with 202 and an empty body, without an API key", async () => {
    const response = await postSet(await signSet(signer, claims()));
    expect(response.status).toBe(202);
    expect(await response.text()).toBe("");
  });

  it("is accepted when it expired long ago (exp is not checked: events may be late)", async () => {
    const response = await postSet(await signSet(signer, claims({ exp: nowSeconds() - 3 * DAY_SECONDS })));
    expect(response.status).toBe(202);
  });

  it("is accepted with aud as an array holding one of our client ids", async () => {
    const response = await postSet(await signSet(signer, claims({ aud: ["someone-else.apps", audience] })));
    expect(response.status).toBe(202);
  });

  it("is accepted when 6 days old, or up to the skew in the future", async () => {
    for (const iat of [nowSeconds() - 6 * DAY_SECONDS, nowSeconds() + IAT_FUTURE_SKEW_SECONDS - 30]) {
      expect((await postSet(await signSet(signer, claims({ iat })))).status).toBe(202);
    }
  });

  it("with an unknown event type is accepted (202)", async () => {
    const events = { "https://schemas.openid.net/secevent/risc/event-type/account-purged": { subject: {} } };
    expect((await postSet(await signSet(signer, claims({ events })))).status).toBe(202);
  });

  it("with a content type parameter is accepted", async () => {
    const response = await postSet(await signSet(signer, claims()), {
      headers: { "content-type": "Application/SecEvent+JWT; charset=utf-8" },
    });
    expect(response.status).toBe(202);
  });
});

describe("a token is rejected with 400 problem+json", () => {
  it("older than 7 days (iat)", async () => {
    const iat = nowSeconds() - MAX_SET_AGE_SECONDS - 60;
    await expectRejected(await postSet(await signSet(signer, claims({ iat }))), "invalid_request");
  });

  it("issued in the future beyond the skew", async () => {
    const iat = nowSeconds() + IAT_FUTURE_SKEW_SECONDS + 60;
    await expectRejected(await postSet(await signSet(signer, claims({ iat }))), "invalid_request");
  });

  it("from another issuer, even the OAuth issuer (the RISC document's issuer is what counts)", async () => {
    for (const iss of ["https://accounts.google.com/", testEnv.OAUTH_ISSUER as string, `${issuer}x`]) {
      await expectRejected(await postSet(await signSet(signer, claims({ iss }))), "invalid_issuer");
    }
  });

  it("addressed to a client id that is not ours", async () => {
    for (const aud of ["someone-else.apps.googleusercontent.com", ["a", "b"]]) {
      await expectRejected(await postSet(await signSet(signer, claims({ aud }))), "invalid_audience");
    }
    await expectRejected(await postSet(await signSet(signer, claims({ aud: undefined }))), "invalid_audience");
  });

  it("signed by a key the transmitter does not publish, under its own or a published kid", async () => {
    const stranger = await newSigner();
    await expectRejected(await postSet(await signSet(stranger, claims())), "invalid_key");
    await expectRejected(await postSet(await signSet(stranger, claims(), { kid: signer.kid })), "invalid_key");
  });

  it("with a tampered payload", async () => {
    const [header, , signature] = (await signSet(signer, claims())).split(".");
    const forged = btoa(JSON.stringify({ ...claims(), iat: nowSeconds(), jti: "forged" }))
      .replaceAll("+", "-")
      .replaceAll("/", "_")
      .replaceAll("=", "");
    await expectRejected(await postSet(`${header}.${forged}.${signature}`), "invalid_key");
  });

  it("not RS256: alg none, HS256 with the public key as secret, RS512", async () => {
    const unsigned = `${b64url({ alg: "none", kid: signer.kid })}.${b64url(claims({ iat: nowSeconds() }))}.`;
    await expectRejected(await postSet(unsigned), "invalid_request");
    const hmacKey = new TextEncoder().encode(JSON.stringify(signer.publicJwk));
    const hs256 = await new SignJWT(claims({ iat: nowSeconds() }))
      .setProtectedHeader({ alg: "HS256", kid: signer.kid })
      .sign(hmacKey);
    await expectRejected(await postSet(hs256), "invalid_request");
    // An RS256 signature under a header claiming RS512: refused on the header alone.
    const rs512 = await signRaw({ alg: "RS512", kid: signer.kid }, claims({ iat: nowSeconds(), jti: uniqueId("jti") }));
    await expectRejected(await postSet(rs512), "invalid_request");
  });

  it("without a kid, or carrying its own key in the header", async () => {
    await expectRejected(await postSet(await signSet(signer, claims(), { kid: null })), "invalid_key");
    await expectRejected(
      await postSet(await signSet(signer, claims(), { extraHeader: { jwk: signer.publicJwk } })),
      "invalid_request",
    );
  });

  it("without jti, iat or events, or with a malformed event", async () => {
    const token = async (payload: Record<string, unknown>) =>
      `${b64url({ alg: "RS256", kid: signer.kid })}.${b64url(payload)}`;
    const sign = async (payload: Record<string, unknown>) => {
      const input = await token(payload);
      const signature = await crypto.subtle.sign(
        "RSASSA-PKCS1-v1_5",
        signer.privateKey,
        new TextEncoder().encode(input),
      );
      return `${input}.${bytesToB64url(new Uint8Array(signature))}`;
    };
    const base = {
      iss: issuer,
      aud: audience,
      iat: nowSeconds(),
      jti: uniqueId("jti"),
      events: tokensRevoked(issuer, "1"),
    };
    const { jti: _jti, ...noJti } = base;
    const { iat: _iat, ...noIat } = base;
    const { events: _events, ...noEvents } = base;
    for (const payload of [
      noJti,
      noIat,
      noEvents,
      { ...base, iat: "yesterday" },
      { ...base, events: {} },
      { ...base, events: [] },
      { ...base, events: { [RISC_EVENT_TYPES.tokensRevoked]: { subject: { subject_type: "email", email: "a@b" } } } },
      {
        ...base,
        events: { [RISC_EVENT_TYPES.tokenRevoked]: { subject: { subject_type: "oauth_token", token: "x" } } },
      },
      { ...base, events: { [RISC_EVENT_TYPES.verification]: { state: 42 } } },
      { ...base, events: { [RISC_EVENT_TYPES.accountDisabled]: "hijacking" } },
    ]) {
      await expectRejected(await postSet(await sign(payload)), "invalid_request");
    }
  });

  it("sent with another content type, or as something other than a compact JWS", async () => {
    const jwt = await signSet(signer, claims());
    for (const type of ["application/json", "application/jwt", "text/plain", ""]) {
      await expectRejected(await postSet(jwt, { headers: { "content-type": type } }), "invalid_request");
    }
    for (const body of ["", "not a token", `${jwt}.extra`, jwt.replace(".", ".."), JSON.stringify({ token: jwt })]) {
      await expectRejected(await postSet(body), "invalid_request");
    }
  });

  it("over 16 KiB, with or without Content-Length, and over 64 KiB too (400, not 413)", async () => {
    const big = await signSet(signer, claims({ padding: "x".repeat(MAX_SET_BYTES) }));
    await expectRejected(await postSet(big), "invalid_request");
    const huge = "a".repeat(200 * 1024);
    await expectRejected(await postSet(huge), "invalid_request");
    const streamed = new ReadableStream<Uint8Array>({
      start(controller) {
        for (let i = 0; i < 8; i++) controller.enqueue(new TextEncoder().encode("b".repeat(4096)));
        controller.close();
      },
    });
    await expectRejected(await postSet(streamed), "invalid_request");
  });
});

describe("each jti is acted on once", () => {
  const rowsOf = (jti: string) =>
    sql(
      "select audience, event_types, verification_state, received_at::text, receipt from security_events where jti = $1",
      [jti],
    );

  it("a redelivery is a 202 that changes nothing", async () => {
    const jti = uniqueId("jti");
    const jwt = await signSet(signer, claims({ jti }));
    expect((await postSet(jwt)).status).toBe(202);
    const first = await rowsOf(jti);
    expect(first).toHaveLength(1);
    expect(first[0]![0]).toBe(audience);
    expect(first[0]![1]).toBe(RISC_EVENT_TYPES.tokensRevoked);
    for (let i = 0; i < 3; i++) expect((await postSet(jwt)).status).toBe(202);
    // Concurrent redeliveries too.
    const together = await Promise.all(Array.from({ length: 5 }, () => postSet(jwt)));
    expect(together.map((r) => r.status)).toEqual([202, 202, 202, 202, 202]);
    expect(await rowsOf(jti)).toEqual(first);
  });

  it("the same jti from the first delivery wins even when redelivered with other content", async () => {
    const jti = uniqueId("jti");
    expect((await postSet(await signSet(signer, claims({ jti })))).status).toBe(202);
    const first = await rowsOf(jti);
    expect((await postSet(await signSet(signer, claims({ jti, events: verification("other") })))).status).toBe(202);
    expect(await rowsOf(jti)).toEqual(first);
  });

  it("a verification event is recorded with its state", async () => {
    const jti = uniqueId("jti");
    const state = uniqueId("state");
    expect((await postSet(await signSet(signer, claims({ jti, events: verification(state) })))).status).toBe(202);
    const [row] = await rowsOf(jti);
    expect(row?.[1]).toBe(RISC_EVENT_TYPES.verification);
    expect(row?.[2]).toBe(state);
    // What npm run risc:verify polls: admin key only.
    const path = `/risc/verifications/${encodeURIComponent(state)}`;
    const arrived = await call(path, { key: "admin" });
    expect(arrived.status).toBe(200);
    expect(await json(arrived)).toMatchObject({ success: true, received_at: expect.any(String) });
    await expectProblem(await call("/risc/verifications/never-sent", { key: "admin" }), 404, "not_found");
    await expectProblem(await call(path), 401, "unauthorized");
    await expectProblem(await call(path, { key: "service" }), 403, "forbidden");
  });

  it("the cron forgets a jti once its token would be refused for its age anyway", async () => {
    const [oldJti, recentJti] = [uniqueId("old"), uniqueId("recent")];
    expect(SECURITY_EVENT_RETENTION_SECONDS).toBeGreaterThan(MAX_SET_AGE_SECONDS + IAT_FUTURE_SKEW_SECONDS);
    for (const [jti, ageSeconds] of [
      [oldJti, SECURITY_EVENT_RETENTION_SECONDS + 60],
      [recentJti, SECURITY_EVENT_RETENTION_SECONDS - 3600],
    ] as const) {
      await sql(
        `insert into security_events (issuer, jti, audience, event_types, issued_at, received_at, receipt)
         values ($1, $2, $3, 'x', now() - make_interval(secs => $4), now() - make_interval(secs => $4), 'r')`,
        [issuer, jti, audience, ageSeconds],
      );
    }
    const summary = await runEventCron();
    expect(summary.securityEventsPruned).toBeGreaterThanOrEqual(1);
    expect(await rowsOf(oldJti)).toHaveLength(0);
    expect(await rowsOf(recentJti)).toHaveLength(1);
  });
});

describe("the transmitter's keys", () => {
  it("an unknown kid fetches the keys again, at most once per interval", async () => {
    const store = new RiscKeyStore();
    const url = ownConfigurationUrl("refetch");
    let fetches = 0;
    const counting: typeof fetch = (input, init) => {
      fetches++;
      return fetch(input, init);
    };
    const options = { fetch: counting, timeoutMs: 2000, allowInsecureHttp: true };
    const t0 = new Date();
    const first = await store.lookup(url, signer.kid, t0, options);
    expect(first.key).toBeDefined();
    expect(fetches).toBe(2); // the document, then jwks_uri

    const rotated = await newSigner();
    await publishKeys(rotated);
    // Within the interval: made-up kids and the new one cost no fetch.
    for (let i = 0; i < 50; i++) {
      const at = new Date(t0.getTime() + 1000 + i);
      expect((await store.lookup(url, `made-up-${i}`, at, options)).key).toBeUndefined();
    }
    expect((await store.lookup(url, rotated.kid, new Date(t0.getTime() + 2000), options)).key).toBeUndefined();
    expect(fetches).toBe(2);
    // Known kids are served from the cache meanwhile.
    expect((await store.lookup(url, signer.kid, new Date(t0.getTime() + 3000), options)).key).toBeDefined();
    expect(fetches).toBe(2);
    // After the interval, the unknown kid refetches once and is found.
    const later = new Date(t0.getTime() + RISC_KEYS_REFETCH_INTERVAL_MS + 1);
    expect((await store.lookup(url, rotated.kid, later, options)).key).toBeDefined();
    expect(fetches).toBe(4);
    // Past the maximum age, even a known kid fetches again.
    const old = new Date(later.getTime() + RISC_KEYS_MAX_AGE_MS + 1);
    expect((await store.lookup(url, signer.kid, old, options)).key).toBeDefined();
    expect(fetches).toBe(6);
  });

  it("keys that cannot be fetched: RiscKeysUnavailable without a copy, the stale copy with one", async () => {
    const store = new RiscKeyStore();
    const options = { fetch, timeoutMs: 2000, allowInsecureHttp: true };
    await expect(
      store.lookup("http://127.0.0.1:9/.well-known/risc-configuration", "k", new Date(), options),
    ).rejects.toBeInstanceOf(RiscKeysUnavailable);
    const url = ownConfigurationUrl("stale");
    const t0 = new Date();
    await store.lookup(url, signer.kid, t0, options);
    const failing: typeof fetch = async () => new Response("down", { status: 503 });
    const later = new Date(t0.getTime() + RISC_KEYS_MAX_AGE_MS + 1);
    const stale = await store.lookup(url, signer.kid, later, { ...options, fetch: failing });
    expect(stale.key).toBeDefined();
    expect(stale.staleBecause).toMatch(/503/);
  });

  it("a jwks_uri over plain http is refused unless insecure http is allowed", async () => {
    const store = new RiscKeyStore();
    await expect(
      store.lookup(ownConfigurationUrl("https-only"), signer.kid, new Date(), {
        fetch,
        timeoutMs: 2000,
        allowInsecureHttp: false,
      }),
    ).rejects.toBeInstanceOf(RiscKeysUnavailable);
  });

  it("the receiver answers 503 with Retry-After when the keys cannot be fetched", async () => {
    const response = await postSet(await signSet(signer, claims()), {
      envOverrides: { RISC_CONFIGURATION_URL: "http://127.0.0.1:9/.well-known/risc-configuration" },
    });
    await expectProblem(response, 503, "provider_unavailable");
    expect(response.headers.get("retry-after")).toBeTruthy();
  });

  it("RISC_CONFIGURATION_URL over plain http is a configuration error without OAUTH_ALLOW_INSECURE_HTTP", () => {
    const https = {
      ...testEnv,
      OAUTH_ALLOW_INSECURE_HTTP: "false",
      OAUTH_ISSUER: "https://accounts.google.com",
      OAUTH_AUTHORIZATION_URL: "https://accounts.google.com/o/oauth2/v2/auth",
      OAUTH_TOKEN_URL: "https://oauth2.googleapis.com/token",
      OAUTH_REVOCATION_URL: "https://oauth2.googleapis.com/revoke",
      BUSINESS_PROFILE_API_BASE_URLS: "",
    };
    expect(parseEnv({ ...https, RISC_CONFIGURATION_URL: "" }).RISC_CONFIGURATION_URL).toBe(
      "https://accounts.google.com/.well-known/risc-configuration",
    );
    expect(() => parseEnv({ ...https, RISC_CONFIGURATION_URL: "http://example.com/risc" })).toThrow(
      /RISC_CONFIGURATION_URL: must be https/,
    );
  });
});

/** Any header and payload, signed RS256 by the test's key (what jose would refuse to produce). */
async function signRaw(header: Record<string, unknown>, payload: Record<string, unknown>): Promise<string> {
  const input = `${b64url(header)}.${b64url(payload)}`;
  const signature = await crypto.subtle.sign("RSASSA-PKCS1-v1_5", signer.privateKey, new TextEncoder().encode(input));
  return `${input}.${bytesToB64url(new Uint8Array(signature))}`;
}

function b64url(value: unknown): string {
  return bytesToB64url(new TextEncoder().encode(JSON.stringify(value)));
}

function bytesToB64url(bytes: Uint8Array): string {
  let binary = "";
  for (const byte of bytes) binary += String.fromCharCode(byte);
  return btoa(binary).replaceAll("+", "-").replaceAll("/", "_").replaceAll("=", "");
}
