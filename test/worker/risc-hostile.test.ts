import fc from "fast-check";
import { beforeAll, describe, expect, it } from "vitest";
import { MAX_SET_AGE_SECONDS, MAX_SET_BYTES, RISC_EVENT_TYPES } from "../../src/oauth/risc";
import { uniqueId } from "./helpers";
import { registerBranch, sql } from "./oauth-helpers";
import {
  DAY_SECONDS,
  issSub,
  newSigner,
  nowSeconds,
  postSet,
  publishKeys,
  type SetClaims,
  signSet,
  type TestSigner,
  tokensRevoked,
  transmitterIssuer,
} from "./risc-helpers";

/**
 * Hostile input at the receiver: at least 200 malformed, oversized, wrongly signed, wrongly addressed
 * and replayed tokens. Every answer is a 202 or a 400 (problem+json, never a 5xx, no stack trace), and
 * nothing changes: no security event row but the one valid delivery's, the test's branch and its
 * events untouched. Every token targets the test's own branch's app (or claims to), with jtis of the
 * run's own prefix, so other test files running meanwhile cannot disturb the comparison.
 */

const STACK_FRAME = /^\s*at .+(:\d+:\d+\)?|\(native\)|<anonymous>)\s*$/m;

let signer: TestSigner;
let issuer: string;
let audience: string;
let clientId: number;
let run: string;
let counter = 0;
let sent = 0;
const statuses = new Map<number, number>();

beforeAll(async () => {
  signer = await newSigner();
  await publishKeys(signer);
  issuer = await transmitterIssuer();
  const branch = await registerBranch({ atProvider: false });
  audience = branch.oauthClientId;
  clientId = branch.clientId;
  run = uniqueId("hostile");
});

const jti = () => `${run}-${++counter}`;
const validClaims = (extra: SetClaims = {}): SetClaims => ({
  iss: issuer,
  aud: audience,
  jti: jti(),
  events: tokensRevoked(issuer, "100000000000000000001"),
  ...extra,
});

/** Sends one body; asserts 202 or 400 problem+json, never anything else. */
async function send(body: string | ReadableStream<Uint8Array>, contentType = "application/secevent+jwt") {
  const response = await postSet(body, { headers: { "content-type": contentType } });
  const text = await response.text();
  sent++;
  statuses.set(response.status, (statuses.get(response.status) ?? 0) + 1);
  const where = `${response.status} ${text.slice(0, 300)}`;
  expect([202, 400], where).toContain(response.status);
  expect(STACK_FRAME.test(text), where).toBe(false);
  if (response.status === 400) {
    expect(response.headers.get("content-type"), where).toMatch(/^application\/problem\+json/);
    const problem = JSON.parse(text) as { code: string; err: string; detail: string };
    expect(problem.code, where).toBe("security_event_rejected");
    expect(problem.err, where).toMatch(/^invalid_(request|key|issuer|audience)$/);
    expect(problem.detail.length, where).toBeGreaterThan(10);
  }
  return response.status;
}

/** What must not change: the run's security events, the branch, its events. */
async function snapshot() {
  const [[rows]] = (await sql(
    `select json_build_object(
      'security_events', (select coalesce(json_agg(row_to_json(s) order by jti), '[]') from security_events s where jti like $1),
      'client', (select row_to_json(c) from clients c where id = $2),
      'tokens', (select coalesce(json_agg(row_to_json(t) order by id), '[]') from tokens t where client_id = $2),
      'events', (select coalesce(json_agg(row_to_json(e) order by id), '[]') from events e where client_id = $2)
    )::text`,
    [`${run}-%`, clientId],
  )) as [[string]];
  return JSON.parse(rows);
}

const b64url = (text: string) => btoa(text).replaceAll("+", "-").replaceAll("/", "_").replaceAll("=", "");
const bytesB64url = (value: string) => b64url(String.fromCharCode(...new TextEncoder().encode(value).slice(0, 50_000)));

describe("hostile tokens at POST /risc", () => {
  let replayed: string;
  let before: unknown;

  beforeAll(async () => {
    // The one valid delivery: its replays below must change nothing.
    replayed = await signSet(signer, validClaims());
    expect(await send(replayed)).toBe(202);
    before = await snapshot();
  });

  it("malformed bodies (80)", async () => {
    const header = b64url(JSON.stringify({ alg: "RS256", kid: signer.kid }));
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(
          fc.string(),
          fc.string({ unit: "binary" }),
          fc.jsonValue().map((v) => JSON.stringify(v)),
          fc.tuple(fc.string(), fc.string(), fc.string()).map((parts) => parts.join(".")),
          fc.jsonValue().map((v) => `${header}.${bytesB64url(JSON.stringify(v))}.${b64url("sig")}`),
          fc.jsonValue().map((v) => `${bytesB64url(JSON.stringify(v))}.${bytesB64url("{}")}.`),
          fc.constantFrom("", ".", "..", "...", "a.b.c", "\u0000", `${header}..`, `${header}.e30.`),
        ),
        fc.constantFrom("application/secevent+jwt", "application/json", "text/plain", "application/jwt"),
        async (body, type) => {
          await send(body, type);
        },
      ),
      { numRuns: 80 },
    );
  });

  it("oversized tokens, with and without Content-Length (20)", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.integer({ min: MAX_SET_BYTES + 1, max: 256 * 1024 }),
        fc.boolean(),
        async (size, streamed) => {
          const jwt = await signSet(signer, validClaims({ padding: "x".repeat(size) }));
          const bytes = new TextEncoder().encode(jwt);
          const body = streamed
            ? new ReadableStream<Uint8Array>({
                start(controller) {
                  for (let i = 0; i < bytes.length; i += 8192) controller.enqueue(bytes.slice(i, i + 8192));
                  controller.close();
                },
              })
            : jwt;
          expect(await send(body)).toBe(400);
        },
      ),
      { numRuns: 20 },
    );
  });

  it("wrongly signed tokens (40)", async () => {
    const stranger = await newSigner();
    await fc.assert(
      fc.asyncProperty(
        fc.constantFrom("stranger-own-kid", "stranger-published-kid", "flipped-signature", "swapped-payload", "no-kid"),
        fc.nat(),
        async (how, n) => {
          let jwt: string;
          if (how === "stranger-own-kid") jwt = await signSet(stranger, validClaims());
          else if (how === "stranger-published-kid") jwt = await signSet(stranger, validClaims(), { kid: signer.kid });
          else if (how === "no-kid") jwt = await signSet(signer, validClaims(), { kid: null });
          else {
            const [h, p, s] = (await signSet(signer, validClaims())).split(".") as [string, string, string];
            if (how === "flipped-signature") {
              const i = n % s.length;
              const flipped = s[i] === "A" ? "B" : "A";
              jwt = `${h}.${p}.${s.slice(0, i)}${flipped}${s.slice(i + 1)}`;
            } else {
              const other = (await signSet(signer, validClaims({ aud: audience }))).split(".")[1];
              jwt = `${h}.${other}.${s}`;
            }
          }
          expect(await send(jwt)).toBe(400);
        },
      ),
      { numRuns: 40 },
    );
  });

  it("wrongly addressed or out-of-date tokens (40)", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(
          fc.string({ minLength: 1 }).map((aud) => ({ aud: `${aud}.apps.googleusercontent.com` })),
          fc.array(fc.string({ minLength: 1 }), { minLength: 1, maxLength: 3 }).map((aud) => ({ aud })),
          fc.string().map((iss) => ({ iss: `${issuer}${iss || "x"}` })),
          fc.constantFrom({ iss: "https://accounts.google.com/" }, { iss: "https://accounts.google.com" }),
          fc
            .integer({ min: MAX_SET_AGE_SECONDS + 60, max: 10 * 365 * DAY_SECONDS })
            .map((age) => ({ iat: nowSeconds() - age })),
          fc.integer({ min: 3600, max: 365 * DAY_SECONDS }).map((ahead) => ({ iat: nowSeconds() + ahead })),
        ),
        async (wrong) => {
          expect(await send(await signSet(signer, validClaims(wrong as SetClaims)))).toBe(400);
        },
      ),
      { numRuns: 40 },
    );
  });

  it("malformed events in correctly signed tokens (20)", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.constantFrom(...Object.values(RISC_EVENT_TYPES).filter((t) => t !== RISC_EVENT_TYPES.verification)),
        fc.oneof(
          fc.jsonValue().filter((v) => typeof v !== "object" || v === null || Array.isArray(v)),
          fc.jsonValue().map((subject) => ({ subject })),
          fc.constant({ subject: { subject_type: "email", email: "user@example.com" } }),
          fc.constant(issSub("", "")),
        ),
        async (type, body) => {
          const subjectOk =
            typeof body === "object" &&
            body !== null &&
            !Array.isArray(body) &&
            JSON.stringify((body as { subject?: unknown }).subject ?? null).includes('"iss-sub"');
          if (subjectOk) return;
          expect(await send(await signSet(signer, validClaims({ events: { [type]: body } })))).toBe(400);
        },
      ),
      { numRuns: 20 },
    );
  });

  it("replays of the valid token (30), sequential and concurrent", async () => {
    for (let i = 0; i < 10; i++) expect(await send(replayed)).toBe(202);
    const together = await Promise.all(Array.from({ length: 20 }, () => send(replayed)));
    expect(together.every((status) => status === 202)).toBe(true);
  });

  it("changed nothing, after at least 200 tokens", async () => {
    expect(sent).toBeGreaterThanOrEqual(200);
    expect([...statuses.keys()].sort()).toEqual([202, 400]);
    expect(await snapshot()).toEqual(before);
  });
});
