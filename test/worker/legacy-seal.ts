import { fromBase64, toBase64Url, utf8 } from "../../src/lib/encoding";

/**
 * Seals a value the way the service did before row binding (envelope v1: AES-256-GCM with the raw
 * key, the column name alone as additional data), written out here independently of
 * src/lib/crypto.ts so tests can hold the values an older deployment left in the database.
 */
export async function sealV1(base64Key: string, plaintext: string, column: string): Promise<string> {
  const raw = fromBase64(base64Key);
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", raw));
  const keyId = [...digest.slice(0, 4)].map((b) => b.toString(16).padStart(2, "0")).join("");
  const key = await crypto.subtle.importKey("raw", raw, "AES-GCM", false, ["encrypt"]);
  const iv = crypto.getRandomValues(new Uint8Array(12));
  const ciphertext = await crypto.subtle.encrypt(
    { name: "AES-GCM", iv, additionalData: utf8(column) },
    key,
    utf8(plaintext),
  );
  return ["v1", keyId, toBase64Url(iv), toBase64Url(ciphertext)].join(".");
}
