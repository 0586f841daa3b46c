import { describe, expect, it } from "vitest";
import { CryptoError, loadKeyring, matchesAny, open, SealedValueError, seal, sign, verify } from "../../src/lib/crypto";
import { fromBase64Url, toBase64Url } from "../../src/lib/encoding";
import { checkLoginLink, signLoginLink } from "../../src/services/login-links";
import { TEST_ENCRYPTION_KEY } from "./bindings";
import { BASE, call } from "./helpers";
import { sealV1 } from "./legacy-seal";
import { appRowOf, connectBranch, runBrowserFlow, tokenRows } from "./oauth-helpers";

const keyOf = (start: number) => btoa(String.fromCharCode(...Array.from({ length: 32 }, (_, i) => start + i)));
const OLD_KEY = TEST_ENCRYPTION_KEY;
const NEW_KEY = keyOf(0x41);
const OTHER_KEY = keyOf(0x81);

/** Where the values of these tests are "stored": client 1's columns. */
const ACCESS = { column: "tokens.access_token", clientId: 1 } as const;
const REFRESH = { column: "tokens.refresh_token", clientId: 1 } as const;
const SECRET = { column: "clients.client_secret", clientId: 1 } as const;

const oldRing = () => loadKeyring(OLD_KEY);
const rotatedRing = () => loadKeyring(NEW_KEY, [OLD_KEY]);
const newOnlyRing = () => loadKeyring(NEW_KEY);

/** Flips one bit of the decoded bytes of an envelope part. */
function flipBit(part: string, byteIndex = 0): string {
  const bytes = fromBase64Url(part);
  bytes[byteIndex] = (bytes[byteIndex] as number) ^ 0x01;
  return toBase64Url(bytes);
}

function envelopeParts(envelope: string) {
  const [version, kid, iv, ciphertext] = envelope.split(".") as [string, string, string, string];
  return { version, kid, iv, ciphertext };
}

describe("seal and open", () => {
  it("round-trips text, including non-ASCII and empty strings", async () => {
    const ring = await oldRing();
    for (const text of ["ya29.a0-access-token", "ünïcødé ✓ 🔑", "", "x".repeat(5000)]) {
      expect(await open(ring, await seal(ring, text, ACCESS), ACCESS)).toBe(text);
    }
  });

  it("produces a v2 envelope with the key id, a 12-byte IV and a fresh IV every time", async () => {
    const ring = await oldRing();
    const a = await seal(ring, "same", REFRESH);
    const b = await seal(ring, "same", REFRESH);
    expect(a).not.toBe(b);
    const parts = envelopeParts(a);
    expect(parts.version).toBe("v2");
    expect(parts.kid).toMatch(/^[0-9a-f]{8}$/);
    expect(parts.kid).toBe(ring.current.id);
    expect(fromBase64Url(parts.iv)).toHaveLength(12);
    expect(envelopeParts(b).iv).not.toBe(parts.iv);
    expect(a).not.toContain("same");
  });

  it("rejects a tampered ciphertext, IV or key id", async () => {
    const ring = await oldRing();
    const envelope = await seal(ring, "secret", SECRET);
    const { version, kid, iv, ciphertext } = envelopeParts(envelope);
    const tampered = [
      [version, kid, iv, flipBit(ciphertext)],
      [version, kid, iv, flipBit(ciphertext, fromBase64Url(ciphertext).length - 1)], // the GCM tag
      [version, kid, flipBit(iv), ciphertext],
      [version, "00000000", iv, ciphertext],
      [version, kid, iv, ciphertext.slice(0, -4)],
    ];
    for (const parts of tampered) {
      await expect(open(ring, parts.join("."), SECRET)).rejects.toBeInstanceOf(CryptoError);
    }
  });

  it("rejects values that are not envelopes", async () => {
    const ring = await oldRing();
    for (const value of [
      "plain-text-token",
      "",
      "v1.a.b",
      "v2.a.b",
      "v2.x.y.z",
      "v3.x.y.z",
      `${await seal(ring, "s", "oauth.state")}.extra`,
    ]) {
      await expect(open(ring, value, "oauth.state")).rejects.toBeInstanceOf(CryptoError);
    }
  });

  it("rejects a value opened for another purpose (column), including the state sub-key", async () => {
    const ring = await oldRing();
    const access = await seal(ring, "token", ACCESS);
    await expect(open(ring, access, REFRESH)).rejects.toBeInstanceOf(CryptoError);
    await expect(open(ring, access, SECRET)).rejects.toBeInstanceOf(CryptoError);
    await expect(open(ring, access, "oauth.state")).rejects.toBeInstanceOf(CryptoError);
    const state = await seal(ring, "{}", "oauth.state");
    await expect(open(ring, state, ACCESS)).rejects.toBeInstanceOf(CryptoError);
  });

  it("does not open a value sealed under another key", async () => {
    const value = await seal(await oldRing(), "secret", ACCESS);
    await expect(open(await loadKeyring(OTHER_KEY), value, ACCESS)).rejects.toThrow(/unknown key/);
  });
});

describe("row binding", () => {
  it("does not open a value copied to another client's row, in any column", async () => {
    const ring = await oldRing();
    for (const binding of [SECRET, ACCESS, REFRESH]) {
      const value = await seal(ring, "branch one's secret", binding);
      const elsewhere = { ...binding, clientId: 2 };
      const error = await open(ring, value, elsewhere).catch((e: unknown) => e);
      expect(error).toBeInstanceOf(SealedValueError);
      // The error names where the value was read, never the value.
      expect((error as SealedValueError).binding).toEqual(elsewhere);
      expect(String(error)).not.toContain("branch one's secret");
      expect(await open(ring, value, binding)).toBe("branch one's secret");
    }
  });

  it("does not open a client id that only shares a prefix (1 vs 12, 12 vs 1|2)", async () => {
    const ring = await oldRing();
    const value = await seal(ring, "s", { column: "tokens.access_token", clientId: 1 });
    await expect(open(ring, value, { column: "tokens.access_token", clientId: 12 })).rejects.toBeInstanceOf(
      SealedValueError,
    );
  });
});

describe("v1 envelopes (sealed before row binding)", () => {
  it("opens a v1 value in its column while v1 is accepted, for any row", async () => {
    const ring = await loadKeyring(OLD_KEY, [], { acceptV1: true });
    const legacy = await sealV1(OLD_KEY, "old token", "tokens.access_token");
    expect(legacy.split(".")[1]).toBe(ring.current.id);
    expect(await open(ring, legacy, ACCESS)).toBe("old token");
    await expect(open(ring, legacy, REFRESH)).rejects.toBeInstanceOf(SealedValueError);
  });

  it("refuses every v1 value once v1 is no longer accepted, and by default", async () => {
    const ring = await loadKeyring(OLD_KEY, [], { acceptV1: false });
    const legacy = await sealV1(OLD_KEY, "old token", "tokens.access_token");
    await expect(open(ring, legacy, ACCESS)).rejects.toThrow(/v1 envelope/);
    await expect(open(await loadKeyring(OLD_KEY), legacy, ACCESS)).rejects.toThrow(/v1 envelope/);
  });

  it("cannot be forged from a v2 value by relabelling it v1", async () => {
    const ring = await oldRing();
    const v2 = await seal(ring, "secret", SECRET);
    await expect(open(ring, v2.replace(/^v2\./, "v1."), SECRET)).rejects.toBeInstanceOf(SealedValueError);
  });
});

describe("key rotation", () => {
  it("opens values sealed with the old key when it is listed as a previous key", async () => {
    const old = await seal(await oldRing(), "old secret", SECRET);
    expect(await open(await rotatedRing(), old, SECRET)).toBe("old secret");
  });

  it("seals new values with the new key id", async () => {
    const rotated = await rotatedRing();
    const oldId = (await oldRing()).current.id;
    const fresh = await seal(rotated, "new secret", SECRET);
    expect(envelopeParts(fresh).kid).toBe(rotated.current.id);
    expect(rotated.current.id).not.toBe(oldId);
    expect(rotated.byId.has(oldId)).toBe(true);
    // A keyring that only knows the old key cannot open it.
    await expect(open(await oldRing(), fresh, SECRET)).rejects.toBeInstanceOf(CryptoError);
  });

  it("stops opening old values once the old key is dropped", async () => {
    const old = await seal(await oldRing(), "old secret", REFRESH);
    await expect(open(await newOnlyRing(), old, REFRESH)).rejects.toBeInstanceOf(CryptoError);
  });

  it("once the previous key is removed, nothing it sealed or signed is accepted: values, states, login links", async () => {
    const old = await oldRing();
    const [value, state, link] = await Promise.all([
      seal(old, "old token", ACCESS),
      seal(old, "{}", "oauth.state"),
      signLoginLink(old, BASE, 1, new Date(), 600),
    ]);
    const url = new URL(link.url);
    const parts = {
      issued: url.searchParams.get("issued") ?? undefined,
      expires: url.searchParams.get("expires") ?? undefined,
      signature: url.searchParams.get("signature") ?? undefined,
    };
    // During the rotation (old key listed as previous) all three still work...
    const rotated = await rotatedRing();
    expect(await open(rotated, value, ACCESS)).toBe("old token");
    expect(await open(rotated, state, "oauth.state")).toBe("{}");
    expect((await checkLoginLink(rotated, 1, parts, new Date())).result).toBe("valid");
    // ...and none once the previous keys are emptied.
    const after = await newOnlyRing();
    await expect(open(after, value, ACCESS)).rejects.toThrow(/unknown key/);
    await expect(open(after, state, "oauth.state")).rejects.toThrow(/unknown key/);
    expect((await checkLoginLink(after, 1, parts, new Date())).result).toBe("invalid");
  });

  it("keeps the current key first even when it is also listed as previous", async () => {
    const ring = await loadKeyring(NEW_KEY, [OLD_KEY, NEW_KEY]);
    expect(ring.current.id).toBe((await newOnlyRing()).current.id);
    expect(ring.byId.size).toBe(2);
  });
});

describe("signing and login links", () => {
  it("verifies its own signature and rejects another message or a tampered signature", async () => {
    const ring = await oldRing();
    const signature = await sign(ring, "login:1:100");
    expect(signature).toMatch(/^[A-Za-z0-9_-]{43}$/);
    expect(await verify(ring, "login:1:100", signature)).toBe(true);
    expect(await verify(ring, "login:1:101", signature)).toBe(false);
    expect(await verify(ring, "login:1:100", flipBit(signature, 5))).toBe(false);
    expect(await verify(ring, "login:1:100", "***")).toBe(false);
    expect(await verify(ring, "login:1:100", "")).toBe(false);
  });

  it("keeps old signatures valid after rotation; new ones use the new key", async () => {
    const oldSignature = await sign(await oldRing(), "login:7:100");
    expect(await verify(await rotatedRing(), "login:7:100", oldSignature)).toBe(true);
    expect(await verify(await newOnlyRing(), "login:7:100", oldSignature)).toBe(false);
    const newSignature = await sign(await rotatedRing(), "login:7:100");
    expect(newSignature).not.toBe(oldSignature);
    expect(await verify(await oldRing(), "login:7:100", newSignature)).toBe(false);
  });

  it("checks login links: valid, expired, other client, tampered, missing, outdated format", async () => {
    const ring = await oldRing();
    const now = new Date("2030-01-01T00:00:00Z");
    const link = await signLoginLink(ring, BASE, 42, now, 600);
    expect(link.expiresAt.toISOString()).toBe("2030-01-01T00:10:00.000Z");
    const url = new URL(link.url);
    expect(url.pathname).toBe("/token-management/oauth/login/42");
    const parts = {
      issued: url.searchParams.get("issued") ?? undefined,
      expires: url.searchParams.get("expires") ?? undefined,
      signature: url.searchParams.get("signature") ?? undefined,
    };
    expect(parts.issued).toBe(String(now.getTime()));
    const check = (clientId: number, changes: Partial<typeof parts>, at = now) =>
      checkLoginLink(ring, clientId, { ...parts, ...changes }, at);

    expect(await check(42, {})).toEqual({ result: "valid", issuedAt: now });
    expect((await check(42, {}, new Date(now.getTime() + 599_000))).result).toBe("valid");
    expect((await check(42, {}, new Date(now.getTime() + 600_000))).result).toBe("expired");
    expect((await check(43, {})).result).toBe("invalid");
    expect((await check(42, { expires: String(Number(parts.expires) + 1) })).result).toBe("invalid");
    expect((await check(42, { expires: `${parts.expires}.0` })).result).toBe("invalid");
    // The issue time is signed: moving it later (past a revocation) breaks the signature.
    expect((await check(42, { issued: String(now.getTime() + 1) })).result).toBe("invalid");
    expect((await check(42, { signature: undefined })).result).toBe("missing");
    expect((await check(42, { expires: undefined })).result).toBe("missing");
    // The first format had no issue time: it cannot be single use or revoked, so it is refused.
    expect((await check(42, { issued: undefined })).result).toBe("outdated");
  });

  it("accepts login links signed before a rotation", async () => {
    const now = new Date();
    const link = new URL((await signLoginLink(await oldRing(), BASE, 9, now, 600)).url);
    const parts = {
      issued: link.searchParams.get("issued") ?? undefined,
      expires: link.searchParams.get("expires") ?? undefined,
      signature: link.searchParams.get("signature") ?? undefined,
    };
    expect((await checkLoginLink(await rotatedRing(), 9, parts, now)).result).toBe("valid");
    expect((await checkLoginLink(await newOnlyRing(), 9, parts, now)).result).toBe("invalid");
  });
});

describe("API key matching", () => {
  it("matches any listed key exactly", async () => {
    const keys = ["first-key-0000000000", "second-key-000000000"];
    expect(await matchesAny("first-key-0000000000", keys)).toBe(true);
    expect(await matchesAny("second-key-000000000", keys)).toBe(true);
    expect(await matchesAny("second-key-00000000", keys)).toBe(false);
    expect(await matchesAny("second-key-0000000000", keys)).toBe(false);
    expect(await matchesAny("", keys)).toBe(false);
    expect(await matchesAny("anything", [])).toBe(false);
  });
});

describe("key rotation through the Worker", () => {
  const rotated = { TOKEN_ENCRYPTION_KEY: NEW_KEY, TOKEN_ENCRYPTION_PREVIOUS_KEYS: OLD_KEY };

  it("keeps old links and secrets working, writes new tokens under the new key", async () => {
    const branch = await connectBranch();
    const oldKid = (await oldRing()).current.id;
    const newKid = (await newOnlyRing()).current.id;
    expect((await tokenRows(branch.clientId))[0]?.access_token.split(".")[1]).toBe(oldKid);

    // A login link signed with the old key and the secret sealed with it both still work.
    const { callback } = await runBrowserFlow(await unusedLink(branch.clientId), "json", { envOverrides: rotated });
    expect(callback.status, await callback.clone().text()).toBe(200);

    const rows = await tokenRows(branch.clientId);
    const current = rows.filter((r) => r.is_valid);
    expect(current).toHaveLength(1);
    expect(current[0]?.access_token.split(".")[1]).toBe(newKid);
    expect(String((await appRowOf(branch.clientId))?.client_secret).split(".")[1]).toBe(oldKid);

    // A secret rotated now is sealed under the new key.
    const patched = await call(`/clients/${branch.clientId}`, {
      method: "PATCH",
      key: "admin",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ client_secret: branch.clientSecret }),
      envOverrides: rotated,
    });
    expect(patched.status).toBe(200);
    expect(String((await appRowOf(branch.clientId))?.client_secret).split(".")[1]).toBe(newKid);
  });

  it("rejects old login links once the old key is dropped", async () => {
    const branch = await connectBranch();
    const link = await unusedLink(branch.clientId);
    expect((await call(link, { envOverrides: rotated })).status).toBe(302);
    const response = await call(link, { envOverrides: { TOKEN_ENCRYPTION_KEY: NEW_KEY } });
    expect(response.status).toBe(401);
    expect(await response.text()).toMatch(/not valid/);
  });

  /** A fresh login link signed with the test (old) key: the registration's link was used to connect. */
  async function unusedLink(clientId: number): Promise<string> {
    const response = await call(`/clients/${clientId}/login-url`, { key: "admin" });
    return ((await response.json()) as { login_url: string }).login_url;
  }
});
