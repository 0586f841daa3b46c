import { describe, expect, it } from "vitest";
import { CryptoError, loadKeyring, matchesAny, open, seal, sign, verify } from "../../src/lib/crypto";
import { fromBase64Url, toBase64Url } from "../../src/lib/encoding";
import { checkLoginLink, createLoginLink } from "../../src/services/login-links";
import { TEST_ENCRYPTION_KEY } from "./bindings";
import { BASE, call } from "./helpers";
import { clientRow, connectBranch, runBrowserFlow, tokenRows } from "./oauth-helpers";

const keyOf = (start: number) => btoa(String.fromCharCode(...Array.from({ length: 32 }, (_, i) => start + i)));
const OLD_KEY = TEST_ENCRYPTION_KEY;
const NEW_KEY = keyOf(0x41);
const OTHER_KEY = keyOf(0x81);

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
      expect(await open(ring, await seal(ring, text, "tokens.access_token"), "tokens.access_token")).toBe(text);
    }
  });

  it("produces a v1 envelope with the key id, a 12-byte IV and a fresh IV every time", async () => {
    const ring = await oldRing();
    const a = await seal(ring, "same", "tokens.refresh_token");
    const b = await seal(ring, "same", "tokens.refresh_token");
    expect(a).not.toBe(b);
    const parts = envelopeParts(a);
    expect(parts.version).toBe("v1");
    expect(parts.kid).toMatch(/^[0-9a-f]{8}$/);
    expect(parts.kid).toBe(ring.current.id);
    expect(fromBase64Url(parts.iv)).toHaveLength(12);
    expect(envelopeParts(b).iv).not.toBe(parts.iv);
    expect(a).not.toContain("same");
  });

  it("rejects a tampered ciphertext, IV or key id", async () => {
    const ring = await oldRing();
    const envelope = await seal(ring, "secret", "clients.client_secret");
    const { version, kid, iv, ciphertext } = envelopeParts(envelope);
    const tampered = [
      [version, kid, iv, flipBit(ciphertext)],
      [version, kid, iv, flipBit(ciphertext, fromBase64Url(ciphertext).length - 1)], // the GCM tag
      [version, kid, flipBit(iv), ciphertext],
      [version, "00000000", iv, ciphertext],
      [version, kid, iv, ciphertext.slice(0, -4)],
    ];
    for (const parts of tampered) {
      await expect(open(ring, parts.join("."), "clients.client_secret")).rejects.toBeInstanceOf(CryptoError);
    }
  });

  it("rejects values that are not envelopes", async () => {
    const ring = await oldRing();
    for (const value of [
      "plain-text-token",
      "",
      "v1.a.b",
      "v2.x.y.z",
      `${await seal(ring, "s", "oauth.state")}.extra`,
    ]) {
      await expect(open(ring, value, "oauth.state")).rejects.toBeInstanceOf(CryptoError);
    }
  });

  it("rejects a value opened for another purpose (column), including the state sub-key", async () => {
    const ring = await oldRing();
    const access = await seal(ring, "token", "tokens.access_token");
    await expect(open(ring, access, "tokens.refresh_token")).rejects.toBeInstanceOf(CryptoError);
    await expect(open(ring, access, "clients.client_secret")).rejects.toBeInstanceOf(CryptoError);
    await expect(open(ring, access, "oauth.state")).rejects.toBeInstanceOf(CryptoError);
    const state = await seal(ring, "{}", "oauth.state");
    await expect(open(ring, state, "tokens.access_token")).rejects.toBeInstanceOf(CryptoError);
  });

  it("does not open a value sealed under another key", async () => {
    const value = await seal(await oldRing(), "secret", "tokens.access_token");
    await expect(open(await loadKeyring(OTHER_KEY), value, "tokens.access_token")).rejects.toThrow(/unknown key/);
  });
});

describe("key rotation", () => {
  it("opens values sealed with the old key when it is listed as a previous key", async () => {
    const old = await seal(await oldRing(), "old secret", "clients.client_secret");
    expect(await open(await rotatedRing(), old, "clients.client_secret")).toBe("old secret");
  });

  it("seals new values with the new key id", async () => {
    const rotated = await rotatedRing();
    const oldId = (await oldRing()).current.id;
    const fresh = await seal(rotated, "new secret", "clients.client_secret");
    expect(envelopeParts(fresh).kid).toBe(rotated.current.id);
    expect(rotated.current.id).not.toBe(oldId);
    expect(rotated.byId.has(oldId)).toBe(true);
    // A keyring that only knows the old key cannot open it.
    await expect(open(await oldRing(), fresh, "clients.client_secret")).rejects.toBeInstanceOf(CryptoError);
  });

  it("stops opening old values once the old key is dropped", async () => {
    const old = await seal(await oldRing(), "old secret", "tokens.refresh_token");
    await expect(open(await newOnlyRing(), old, "tokens.refresh_token")).rejects.toBeInstanceOf(CryptoError);
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

  it("checks login links: valid, expired, other client, tampered, missing", async () => {
    const ring = await oldRing();
    const now = new Date("2030-01-01T00:00:00Z");
    const link = await createLoginLink(ring, BASE, 42, now, 600);
    expect(link.expiresAt.toISOString()).toBe("2030-01-01T00:10:00.000Z");
    const url = new URL(link.url);
    expect(url.pathname).toBe("/token-management/oauth/login/42");
    const expires = url.searchParams.get("expires") ?? undefined;
    const signature = url.searchParams.get("signature") ?? undefined;

    expect(await checkLoginLink(ring, 42, expires, signature, now)).toBe("valid");
    expect(await checkLoginLink(ring, 42, expires, signature, new Date(now.getTime() + 599_000))).toBe("valid");
    expect(await checkLoginLink(ring, 42, expires, signature, new Date(now.getTime() + 600_000))).toBe("expired");
    expect(await checkLoginLink(ring, 43, expires, signature, now)).toBe("invalid");
    expect(await checkLoginLink(ring, 42, String(Number(expires) + 1), signature, now)).toBe("invalid");
    expect(await checkLoginLink(ring, 42, `${expires}.0`, signature, now)).toBe("invalid");
    expect(await checkLoginLink(ring, 42, expires, undefined, now)).toBe("missing");
    expect(await checkLoginLink(ring, 42, undefined, signature, now)).toBe("missing");
  });

  it("accepts login links signed before a rotation", async () => {
    const now = new Date();
    const link = new URL((await createLoginLink(await oldRing(), BASE, 9, now, 600)).url);
    const args = [link.searchParams.get("expires") ?? undefined, link.searchParams.get("signature") ?? undefined];
    expect(await checkLoginLink(await rotatedRing(), 9, args[0], args[1], now)).toBe("valid");
    expect(await checkLoginLink(await newOnlyRing(), 9, args[0], args[1], now)).toBe("invalid");
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

    // The login link signed with the old key and the secret sealed with it both still work.
    const { callback } = await runBrowserFlow(branch.loginUrl, "json", { envOverrides: rotated });
    expect(callback.status, await callback.clone().text()).toBe(200);

    const rows = await tokenRows(branch.clientId);
    const current = rows.filter((r) => r.is_valid);
    expect(current).toHaveLength(1);
    expect(current[0]?.access_token.split(".")[1]).toBe(newKid);
    expect(String((await clientRow(branch.clientId))?.client_secret).split(".")[1]).toBe(oldKid);

    // A secret rotated now is sealed under the new key.
    const patched = await call(`/clients/${branch.clientId}`, {
      method: "PATCH",
      key: "admin",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ client_secret: branch.clientSecret }),
      envOverrides: rotated,
    });
    expect(patched.status).toBe(200);
    expect(String((await clientRow(branch.clientId))?.client_secret).split(".")[1]).toBe(newKid);
  });

  it("rejects old login links once the old key is dropped", async () => {
    const branch = await connectBranch();
    const response = await call(branch.loginUrl, { envOverrides: { TOKEN_ENCRYPTION_KEY: NEW_KEY } });
    expect(response.status).toBe(401);
  });
});
