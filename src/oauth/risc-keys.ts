import { importJWK, type JWK } from "jose";

/**
 * The transmitter's issuer and signing keys, from its RISC configuration document (`issuer`,
 * `jwks_uri`), cached per isolate. Each request does its own fetches: no promise is shared across
 * requests (workerd ties I/O to the request that started it). What is cached are plain values and
 * imported CryptoKeys, stored only once their import finished.
 */

/** Keys are fetched again after this long even when every kid is known (a removed key stops working). */
export const RISC_KEYS_MAX_AGE_MS = 60 * 60_000;
/**
 * An unknown `kid` fetches the keys again (Google rotates them), but at most once per this interval
 * per isolate: a flood of tokens with made-up kids costs one fetch per interval, not one each.
 */
export const RISC_KEYS_REFETCH_INTERVAL_MS = 30_000;
/** After the keys could not be fetched, a cached copy this old is still used (logged by the caller). */
export const RISC_KEYS_STALE_LIMIT_MS = 24 * 60 * 60_000;
const MAX_DOCUMENT_BYTES = 256 * 1024;

export interface RiscKeyStoreOptions {
  fetch: typeof fetch;
  timeoutMs: number;
  /** Plain http for the document and jwks_uri (local transmitter only). */
  allowInsecureHttp: boolean;
}

/** The keys could not be fetched and no usable copy is cached: not the token's fault (503). */
export class RiscKeysUnavailable extends Error {
  override readonly name = "RiscKeysUnavailable";
}

interface Snapshot {
  issuer: string;
  jwks: Map<string, JWK>;
  fetchedAt: number;
}

export interface KeyLookup {
  issuer: string;
  /** Undefined when the kid is not among the transmitter's keys (after a refetch when one was allowed). */
  key: CryptoKey | undefined;
  /** Set when the keys are a stale copy because fetching failed. */
  staleBecause?: string;
}

export class RiscKeyStore {
  private readonly snapshots = new Map<string, Snapshot>();
  private readonly lastFetchStarted = new Map<string, number>();
  private readonly imported = new Map<string, CryptoKey>();

  /** The issuer and the key `kid` of the configuration at `configurationUrl`, fetching when needed. */
  async lookup(configurationUrl: string, kid: string, now: Date, options: RiscKeyStoreOptions): Promise<KeyLookup> {
    const t = now.getTime();
    let snapshot = this.snapshots.get(configurationUrl);
    const fresh = snapshot !== undefined && t - snapshot.fetchedAt < RISC_KEYS_MAX_AGE_MS;
    const unknownKid = snapshot !== undefined && !snapshot.jwks.has(kid);
    const lastStart = this.lastFetchStarted.get(configurationUrl);
    const mayRefetch = lastStart === undefined || t - lastStart >= RISC_KEYS_REFETCH_INTERVAL_MS;
    let staleBecause: string | undefined;
    if (snapshot === undefined || !fresh || (unknownKid && mayRefetch)) {
      if (snapshot === undefined || mayRefetch) {
        this.lastFetchStarted.set(configurationUrl, t);
        try {
          snapshot = await fetchSnapshot(configurationUrl, t, options);
          this.snapshots.set(configurationUrl, snapshot);
        } catch (error) {
          const reason = error instanceof Error ? error.message : String(error);
          if (snapshot === undefined || t - snapshot.fetchedAt > RISC_KEYS_STALE_LIMIT_MS) {
            throw new RiscKeysUnavailable(reason);
          }
          staleBecause = reason;
        }
      }
    }
    if (snapshot === undefined) throw new RiscKeysUnavailable("no keys fetched yet");
    const jwk = snapshot.jwks.get(kid);
    if (jwk === undefined)
      return { issuer: snapshot.issuer, key: undefined, ...(staleBecause ? { staleBecause } : {}) };
    return {
      issuer: snapshot.issuer,
      key: await this.importKey(configurationUrl, kid, jwk),
      ...(staleBecause ? { staleBecause } : {}),
    };
  }

  private async importKey(configurationUrl: string, kid: string, jwk: JWK): Promise<CryptoKey | undefined> {
    // Keyed by the key's content too: a kid reused for another key after a rotation is imported anew.
    const cacheKey = JSON.stringify([configurationUrl, kid, jwk.n, jwk.e]);
    const cached = this.imported.get(cacheKey);
    if (cached) return cached;
    try {
      const key = await importJWK({ ...jwk, ext: true }, "RS256");
      if (!(key instanceof CryptoKey) || key.type !== "public") return undefined;
      this.imported.set(cacheKey, key);
      return key;
    } catch {
      return undefined;
    }
  }
}

async function fetchSnapshot(configurationUrl: string, t: number, options: RiscKeyStoreOptions): Promise<Snapshot> {
  const document = await fetchJson(configurationUrl, options, "the RISC configuration document");
  const issuer = document.issuer;
  const jwksUri = document.jwks_uri;
  if (typeof issuer !== "string" || issuer === "" || typeof jwksUri !== "string") {
    throw new Error("the RISC configuration document has no issuer or jwks_uri");
  }
  const keySet = await fetchJson(checkedUrl(jwksUri, options, "jwks_uri"), options, "the JWKS");
  if (!Array.isArray(keySet.keys)) throw new Error("the JWKS has no keys array");
  const jwks = new Map<string, JWK>();
  for (const jwk of keySet.keys as unknown[]) {
    if (typeof jwk !== "object" || jwk === null) continue;
    const { kid, kty, use, alg } = jwk as JWK;
    if (typeof kid !== "string" || kty !== "RSA") continue;
    if ((use !== undefined && use !== "sig") || (alg !== undefined && alg !== "RS256")) continue;
    jwks.set(kid, jwk as JWK);
  }
  return { issuer, jwks, fetchedAt: t };
}

function checkedUrl(value: string, options: RiscKeyStoreOptions, what: string): string {
  if (!URL.canParse(value)) throw new Error(`${what} is not a URL`);
  const protocol = new URL(value).protocol;
  if (protocol !== "https:" && !(protocol === "http:" && options.allowInsecureHttp)) {
    throw new Error(`${what} must be https`);
  }
  return value;
}

async function fetchJson(url: string, options: RiscKeyStoreOptions, what: string): Promise<Record<string, unknown>> {
  let response: Response;
  // Called unbound: workerd's fetch refuses to run as a method of another object.
  const fetchFn = options.fetch;
  try {
    response = await fetchFn(url, {
      headers: { accept: "application/json" },
      signal: AbortSignal.timeout(options.timeoutMs),
      redirect: "manual",
    });
  } catch (error) {
    throw new Error(`fetching ${what} failed: ${error instanceof Error ? `${error.name}: ${error.message}` : "error"}`);
  }
  if (!response.ok) {
    await response.body?.cancel();
    throw new Error(`fetching ${what} answered HTTP ${response.status}`);
  }
  const text = await response.text();
  if (text.length > MAX_DOCUMENT_BYTES) throw new Error(`${what} is larger than ${MAX_DOCUMENT_BYTES} bytes`);
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch {
    throw new Error(`${what} is not JSON`);
  }
  if (typeof body !== "object" || body === null || Array.isArray(body)) throw new Error(`${what} is not a JSON object`);
  return body as Record<string, unknown>;
}

/** One store per isolate (module scope holds only values, never a pending promise). */
export const riscKeyStore = new RiscKeyStore();
