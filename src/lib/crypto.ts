import { fromBase64, fromBase64Url, fromUtf8, toBase64Url, utf8 } from "./encoding";

/**
 * Secrets at rest, sealed OAuth state and signed login links, all from TOKEN_ENCRYPTION_KEY.
 *
 * - At rest: AES-256-GCM with the key itself. Envelope `v2.<kid>.<iv>.<ciphertext>` (base64url);
 *   the kid says which key sealed it, so a rotated-out key listed in TOKEN_ENCRYPTION_PREVIOUS_KEYS
 *   still opens old values while new writes use the current key (and `npm run db:reseal` moves
 *   every value to the current key). The additional authenticated data binds the value to its
 *   place: the column and the internal id of the client (branch) the row belongs to, so a value
 *   copied to another column or to another branch's row does not open.
 * - `v1` envelopes (before row binding: the column name alone was the additional data) open only
 *   when the keyring is told to accept them (TOKEN_ENCRYPTION_ACCEPT_V1, off by default: an upgraded
 *   deployment turns it on until `npm run db:reseal` has rewritten them all). New values are always v2.
 * - State, login links and the edge token cache use sub-keys derived with HKDF, one per purpose.
 *   A cache entry is bound to its branch (and its clear fields) as additional data, and its cache
 *   key is an HMAC of the branch id, so neither the key nor the value names the branch.
 */

const ENVELOPE_VERSION = "v2";
const LEGACY_ENVELOPE_VERSION = "v1";
const IV_BYTES = 12;
const KEY_ID_HEX_CHARS = 8;

/** The columns that hold sealed values. */
export type SealedColumn = "clients.client_secret" | "tokens.access_token" | "tokens.refresh_token";

/**
 * Where a sealed value is stored: its column and the internal id of its client (`clients.id`; for
 * tokens, `tokens.client_id`). Tokens are bound to their client, not to their own row, because a
 * consent that brings no new refresh token carries the sealed previous one over to the new row.
 */
export interface RowBinding {
  column: SealedColumn;
  clientId: number;
}

/** An edge cache entry (src/services/token-cache.ts), bound to what `tokenCache` says (its branch). */
export interface CacheBinding {
  tokenCache: string;
}

/**
 * A stored value's row binding, the OAuth state (never stored, so bound to nothing but its key),
 * or an edge cache entry.
 */
export type SealPurpose = RowBinding | "oauth.state" | CacheBinding;

function isCacheBinding(purpose: SealPurpose): purpose is CacheBinding {
  return typeof purpose === "object" && "tokenCache" in purpose;
}

interface KeyEntry {
  id: string;
  atRest: CryptoKey;
  state: CryptoKey;
  linkSigning: CryptoKey;
  tokenCache: CryptoKey;
  tokenCacheKey: CryptoKey;
}

export interface Keyring {
  current: KeyEntry;
  byId: ReadonlyMap<string, KeyEntry>;
  /** Whether v1 envelopes (bound to their column only) still open. */
  acceptV1: boolean;
}

export interface KeyringOptions {
  /** Open v1 envelopes too (default false: only an upgrade before `db:reseal` has finished needs it). */
  acceptV1?: boolean;
}

export class CryptoError extends Error {
  override readonly name = "CryptoError";
}

/** A stored value that does not open where it is: another row's value, an unknown key, or tampering. */
export class SealedValueError extends CryptoError {
  constructor(
    readonly binding: RowBinding,
    reason: string,
  ) {
    super(`${binding.column} of client ${binding.clientId}: ${reason}`);
  }
}

const keyrings = new Map<string, Promise<Keyring>>();

/** Keys are imported once per isolate and per configuration. */
export function loadKeyring(
  currentKey: string,
  previousKeys: readonly string[] = [],
  options: KeyringOptions = {},
): Promise<Keyring> {
  const acceptV1 = options.acceptV1 ?? false;
  const cacheKey = [currentKey, ...previousKeys, acceptV1].join(",");
  let keyring = keyrings.get(cacheKey);
  if (!keyring) {
    keyring = buildKeyring(currentKey, previousKeys, acceptV1);
    keyrings.set(cacheKey, keyring);
  }
  return keyring;
}

async function buildKeyring(currentKey: string, previousKeys: readonly string[], acceptV1: boolean): Promise<Keyring> {
  const entries = await Promise.all([currentKey, ...previousKeys].map((key) => importKeyEntry(fromBase64(key))));
  const byId = new Map<string, KeyEntry>();
  for (const entry of entries) if (!byId.has(entry.id)) byId.set(entry.id, entry);
  return { current: entries[0]!, byId, acceptV1 };
}

async function importKeyEntry(raw: Uint8Array<ArrayBuffer>): Promise<KeyEntry> {
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", raw));
  const id = [...digest]
    .map((b) => b.toString(16).padStart(2, "0"))
    .join("")
    .slice(0, KEY_ID_HEX_CHARS);
  const hkdfBase = await crypto.subtle.importKey("raw", raw, "HKDF", false, ["deriveKey"]);
  const derive = (
    info: string,
    algorithm: { name: "AES-GCM"; length: 256 } | { name: "HMAC"; hash: "SHA-256"; length: 256 },
    usages: ("encrypt" | "decrypt" | "sign" | "verify")[],
  ) =>
    crypto.subtle.deriveKey(
      { name: "HKDF", hash: "SHA-256", salt: new Uint8Array(0), info: utf8(info) },
      hkdfBase,
      algorithm,
      false,
      usages,
    );
  const [atRest, state, linkSigning, tokenCache, tokenCacheKey] = await Promise.all([
    crypto.subtle.importKey("raw", raw, "AES-GCM", false, ["encrypt", "decrypt"]),
    derive("token-management/oauth-state/v1", { name: "AES-GCM", length: 256 }, ["encrypt", "decrypt"]),
    derive("token-management/login-link/v1", { name: "HMAC", hash: "SHA-256", length: 256 }, ["sign", "verify"]),
    derive("token-management/token-cache/v1", { name: "AES-GCM", length: 256 }, ["encrypt", "decrypt"]),
    derive("token-management/token-cache-key/v1", { name: "HMAC", hash: "SHA-256", length: 256 }, ["sign"]),
  ]);
  return {
    id,
    atRest: atRest as CryptoKey,
    state: state as CryptoKey,
    linkSigning: linkSigning as CryptoKey,
    tokenCache: tokenCache as CryptoKey,
    tokenCacheKey: tokenCacheKey as CryptoKey,
  };
}

function aesKey(entry: KeyEntry, purpose: SealPurpose): CryptoKey {
  if (purpose === "oauth.state") return entry.state;
  return isCacheBinding(purpose) ? entry.tokenCache : entry.atRest;
}

/** v2 additional data: the column and the client's id (or the state's purpose). */
function additionalData(purpose: SealPurpose): Uint8Array<ArrayBuffer> {
  if (purpose === "oauth.state") return utf8("oauth.state");
  if (isCacheBinding(purpose)) return utf8(`token-cache|${purpose.tokenCache}`);
  return utf8(`${purpose.column}|client:${purpose.clientId}`);
}

/** v1 additional data: the column (or purpose) name alone. */
function legacyAdditionalData(purpose: SealPurpose): Uint8Array<ArrayBuffer> {
  if (purpose === "oauth.state" || isCacheBinding(purpose)) return additionalData(purpose);
  return utf8(purpose.column);
}

export async function seal(keyring: Keyring, plaintext: string, purpose: SealPurpose): Promise<string> {
  const iv = crypto.getRandomValues(new Uint8Array(IV_BYTES));
  const ciphertext = await crypto.subtle.encrypt(
    { name: "AES-GCM", iv, additionalData: additionalData(purpose) },
    aesKey(keyring.current, purpose),
    utf8(plaintext),
  );
  return [ENVELOPE_VERSION, keyring.current.id, toBase64Url(iv), toBase64Url(ciphertext)].join(".");
}

/** How every value sealed now begins: resealing rewrites whatever does not. */
export function currentEnvelopePrefix(keyring: Keyring): string {
  return `${ENVELOPE_VERSION}.${keyring.current.id}.`;
}

/**
 * Opens a sealed value for the place it is read from. A stored value that does not open throws a
 * SealedValueError naming the column and client (never the value); the state a plain CryptoError.
 */
export async function open(keyring: Keyring, envelope: string, purpose: SealPurpose): Promise<string> {
  const fail = (reason: string) =>
    purpose === "oauth.state" || isCacheBinding(purpose)
      ? new CryptoError(reason)
      : new SealedValueError(purpose, reason);
  const [version, keyId, iv, ciphertext, ...rest] = envelope.split(".");
  const legacy = version === LEGACY_ENVELOPE_VERSION;
  if ((version !== ENVELOPE_VERSION && !legacy) || !keyId || !iv || !ciphertext || rest.length > 0) {
    throw fail("not a sealed value");
  }
  if (legacy && !keyring.acceptV1) throw fail("v1 envelope (not bound to its row) no longer accepted");
  const entry = keyring.byId.get(keyId);
  if (!entry) throw fail(`sealed with unknown key ${keyId}`);
  let plaintext: ArrayBuffer;
  try {
    plaintext = await crypto.subtle.decrypt(
      {
        name: "AES-GCM",
        iv: fromBase64Url(iv),
        additionalData: legacy ? legacyAdditionalData(purpose) : additionalData(purpose),
      },
      aesKey(entry, purpose),
      fromBase64Url(ciphertext),
    );
  } catch {
    throw fail("sealed value failed authentication (altered, or sealed for another row)");
  }
  return fromUtf8(plaintext);
}

/**
 * The edge cache's key for a branch: HMAC-SHA-256 of the branch id with the current key's cache-key
 * sub-key (base64url), so cache keys do not reveal branch ids. A key rotation starts a new key space.
 */
export async function tokenCacheKey(keyring: Keyring, branchId: string): Promise<string> {
  return toBase64Url(await crypto.subtle.sign("HMAC", keyring.current.tokenCacheKey, utf8(branchId)));
}

/** HMAC-SHA-256 over `message` with the current key's link-signing sub-key (base64url). */
export async function sign(keyring: Keyring, message: string): Promise<string> {
  return toBase64Url(await crypto.subtle.sign("HMAC", keyring.current.linkSigning, utf8(message)));
}

/** Verifies against every known key, so links survive a key rotation until they expire. */
export async function verify(keyring: Keyring, message: string, signature: string): Promise<boolean> {
  let bytes: Uint8Array<ArrayBuffer>;
  try {
    bytes = fromBase64Url(signature);
  } catch {
    return false;
  }
  for (const entry of keyring.byId.values()) {
    if (await crypto.subtle.verify("HMAC", entry.linkSigning, bytes, utf8(message))) return true;
  }
  return false;
}

/** SHA-256 digests of configured keys, computed once per isolate (configuration, not requests). */
const acceptedDigests = new Map<string, Promise<Uint8Array>>();

function sha256(text: string): Promise<Uint8Array> {
  return crypto.subtle.digest("SHA-256", utf8(text)).then((digest) => new Uint8Array(digest));
}

function acceptedDigest(key: string): Promise<Uint8Array> {
  let digest = acceptedDigests.get(key);
  if (!digest) {
    digest = sha256(key);
    acceptedDigests.set(key, digest);
  }
  return digest;
}

/** Constant-time membership test: compares SHA-256 digests so length differences leak nothing. */
export async function matchesAny(candidate: string, accepted: readonly string[]): Promise<boolean> {
  const [found] = await matchesEach(candidate, accepted);
  return found!;
}

/**
 * For each list of keys, whether `candidate` is one of them: one digest of the candidate however
 * many lists (the API-key check asks admin and service at once). Every key of every list is
 * compared, match or not, so timing does not reveal which one matched.
 */
export async function matchesEach(candidate: string, ...lists: (readonly string[])[]): Promise<boolean[]> {
  const candidateDigest = await sha256(candidate);
  const found: boolean[] = [];
  for (const accepted of lists) {
    let inList = false;
    for (const key of accepted) if (equalDigests(candidateDigest, await acceptedDigest(key))) inList = true;
    found.push(inList);
  }
  return found;
}

/** Equal-length byte comparison whose time does not depend on where the bytes differ. */
function equalDigests(a: Uint8Array, b: Uint8Array): boolean {
  let difference = a.length ^ b.length;
  for (let i = 0; i < a.length; i++) difference |= a[i]! ^ (b[i] ?? 0);
  return difference === 0;
}
