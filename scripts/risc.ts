/**
 * Registration of the Cross-Account Protection receiver with Google's RISC API:
 *
 *   npm run risc:register   stream:update: push delivery to the receiver, every event type it acts on
 *   npm run risc:status     GET stream: the registered receiver and event types
 *   npm run risc:verify     stream:verify with a fresh state, then waits until the receiver recorded
 *                           the verification event carrying it (GET /risc/verifications/{state})
 *
 * Authenticated as a service account with the RISC Configuration Admin role: a JWT it signs itself
 * (RS256, its private key) with audience RISC_MANAGEMENT_AUDIENCE, no OAuth exchange.
 *
 * Configuration, from the environment, else from .dev.vars (DEV_VARS_FILE):
 *   RISC_SERVICE_ACCOUNT_KEY_FILE  the service account's JSON key file (required)
 *   RISC_RECEIVER_URL              the receiver (default PUBLIC_BASE_URL + /risc)
 *   PUBLIC_BASE_URL, ADMIN_API_KEY the service, for risc:verify's polling
 *   RISC_API_URL                   default https://risc.googleapis.com (a stand-in locally)
 *   RISC_VERIFY_TIMEOUT_SECONDS    how long risc:verify waits (default 60)
 *
 * Exit codes: 0 done, 1 the verification event did not arrive in time, 2 a configuration or API error
 * (one line on stderr, no stack trace).
 */
import { randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import { resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { importPKCS8, SignJWT } from "jose";
import { REQUESTED_EVENT_TYPES, RISC_DELIVERY_METHOD_PUSH } from "../src/oauth/risc.ts";
import { readDevVars } from "./migrate.ts";

export const RISC_MANAGEMENT_AUDIENCE = "https://risc.googleapis.com/google.identity.risc.v1beta.RiscManagementService";
export const DEFAULT_RISC_API_URL = "https://risc.googleapis.com";
const SELF_SIGNED_JWT_LIFETIME_SECONDS = 60 * 60;
const DEFAULT_VERIFY_TIMEOUT_SECONDS = 60;
const VERIFY_POLL_MS = 500;
const REQUEST_TIMEOUT_MS = 15_000;

export const EXIT_OK = 0;
export const EXIT_NOT_VERIFIED = 1;
export const EXIT_ERROR = 2;

/** A problem the user can fix: one line, no stack trace. */
export class RiscScriptError extends Error {}

export interface ServiceAccountKey {
  client_email: string;
  private_key_id: string;
  private_key: string;
}

export interface RiscScriptConfig {
  key: ServiceAccountKey;
  apiUrl: string;
  receiverUrl: string | undefined;
  publicBaseUrl: string | undefined;
  adminKey: string | undefined;
  verifyTimeoutSeconds: number;
}

/** The configuration from `env`, each missing variable taken from .dev.vars. */
export function riscConfig(env: Record<string, string | undefined> = process.env): RiscScriptConfig {
  const file = readDevVars(env.DEV_VARS_FILE || ".dev.vars");
  const get = (name: string) => (env[name] || file[name] || undefined)?.trim() || undefined;
  const keyFile = get("RISC_SERVICE_ACCOUNT_KEY_FILE");
  if (!keyFile) {
    throw new RiscScriptError(
      "RISC_SERVICE_ACCOUNT_KEY_FILE is not set: the JSON key of a service account with the RISC Configuration Admin role",
    );
  }
  const publicBaseUrl = get("PUBLIC_BASE_URL")?.replace(/\/+$/, "");
  const timeout = Number(get("RISC_VERIFY_TIMEOUT_SECONDS") ?? DEFAULT_VERIFY_TIMEOUT_SECONDS);
  if (!Number.isFinite(timeout) || timeout <= 0)
    throw new RiscScriptError("RISC_VERIFY_TIMEOUT_SECONDS must be a positive number");
  return {
    key: readServiceAccountKey(keyFile),
    apiUrl: (get("RISC_API_URL") ?? DEFAULT_RISC_API_URL).replace(/\/+$/, ""),
    receiverUrl: get("RISC_RECEIVER_URL") ?? (publicBaseUrl ? `${publicBaseUrl}/risc` : undefined),
    publicBaseUrl,
    adminKey: get("ADMIN_API_KEY")?.split(",")[0]?.trim(),
    verifyTimeoutSeconds: timeout,
  };
}

function readServiceAccountKey(path: string): ServiceAccountKey {
  let parsed: unknown;
  try {
    parsed = JSON.parse(readFileSync(path, "utf8"));
  } catch (error) {
    throw new RiscScriptError(
      `cannot read the service account key ${path}: ${(error as Error).message.split("\n")[0]}`,
    );
  }
  const key = parsed as Partial<ServiceAccountKey> | null;
  if (
    typeof key?.client_email !== "string" ||
    typeof key.private_key_id !== "string" ||
    typeof key.private_key !== "string"
  ) {
    throw new RiscScriptError(`${path} is not a service account key (client_email, private_key_id, private_key)`);
  }
  return { client_email: key.client_email, private_key_id: key.private_key_id, private_key: key.private_key };
}

/** The bearer token Google's RISC API takes: a JWT the service account signs itself. */
export async function selfSignedJwt(key: ServiceAccountKey, now = new Date()): Promise<string> {
  let privateKey: CryptoKey;
  try {
    privateKey = await importPKCS8(key.private_key, "RS256");
  } catch {
    throw new RiscScriptError("the service account key's private_key is not a PKCS #8 RSA key");
  }
  const iat = Math.floor(now.getTime() / 1000);
  return new SignJWT({})
    .setProtectedHeader({ alg: "RS256", typ: "JWT", kid: key.private_key_id })
    .setIssuer(key.client_email)
    .setSubject(key.client_email)
    .setAudience(RISC_MANAGEMENT_AUDIENCE)
    .setIssuedAt(iat)
    .setExpirationTime(iat + SELF_SIGNED_JWT_LIFETIME_SECONDS)
    .sign(privateKey);
}

async function riscApi(
  config: RiscScriptConfig,
  method: "GET" | "POST",
  path: string,
  body?: unknown,
): Promise<unknown> {
  const url = `${config.apiUrl}/v1beta/${path}`;
  let response: Response;
  try {
    response = await fetch(url, {
      method,
      headers: {
        authorization: `Bearer ${await selfSignedJwt(config.key)}`,
        ...(body === undefined ? {} : { "content-type": "application/json" }),
      },
      ...(body === undefined ? {} : { body: JSON.stringify(body) }),
      signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS),
    });
  } catch (error) {
    throw new RiscScriptError(`${method} ${url} failed: ${(error as Error).message}`);
  }
  const text = await response.text();
  if (!response.ok) {
    let message = text.slice(0, 500);
    try {
      const parsed = JSON.parse(text) as { error?: { message?: string; status?: string } };
      if (parsed.error?.message) message = `${parsed.error.status ?? ""} ${parsed.error.message}`.trim();
    } catch {}
    throw new RiscScriptError(`${method} ${url} answered ${response.status}: ${message}`);
  }
  try {
    return text.trim() === "" ? {} : JSON.parse(text);
  } catch {
    throw new RiscScriptError(`${method} ${url} answered something other than JSON`);
  }
}

/** What stream:update sends: push delivery to the receiver and every event type it acts on. */
export function streamConfiguration(receiverUrl: string) {
  return {
    delivery: { delivery_method: RISC_DELIVERY_METHOD_PUSH, url: receiverUrl },
    events_requested: [...REQUESTED_EVENT_TYPES],
  };
}

export async function register(config: RiscScriptConfig, print: (line: string) => void): Promise<number> {
  if (!config.receiverUrl)
    throw new RiscScriptError("set RISC_RECEIVER_URL (or PUBLIC_BASE_URL): where Google pushes events");
  await riscApi(config, "POST", "stream:update", streamConfiguration(config.receiverUrl));
  print(`registered ${config.receiverUrl} for ${REQUESTED_EVENT_TYPES.length} event types:`);
  for (const type of REQUESTED_EVENT_TYPES) print(`  ${type}`);
  return EXIT_OK;
}

export async function status(config: RiscScriptConfig, print: (line: string) => void): Promise<number> {
  print(JSON.stringify(await riscApi(config, "GET", "stream"), null, 2));
  return EXIT_OK;
}

export async function verify(config: RiscScriptConfig, print: (line: string) => void): Promise<number> {
  if (!config.publicBaseUrl || !config.adminKey) {
    throw new RiscScriptError(
      "set PUBLIC_BASE_URL and ADMIN_API_KEY: risc:verify asks the service whether the event arrived",
    );
  }
  const state = `verify-${randomBytes(12).toString("hex")}`;
  await riscApi(config, "POST", "stream:verify", { state });
  print(
    `asked Google to send a verification event with state ${state}; waiting up to ${config.verifyTimeoutSeconds} s`,
  );
  const deadline = Date.now() + config.verifyTimeoutSeconds * 1000;
  const url = `${config.publicBaseUrl}/risc/verifications/${encodeURIComponent(state)}`;
  while (Date.now() < deadline) {
    const response = await fetch(url, {
      headers: { authorization: `Bearer ${config.adminKey}`, accept: "application/json" },
      signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS),
    }).catch((error: Error) => {
      throw new RiscScriptError(`GET ${url} failed: ${error.message}`);
    });
    const body = (await response.json().catch(() => ({}))) as { received_at?: string; detail?: string };
    if (response.status === 200) {
      print(`the receiver recorded the verification event at ${body.received_at}`);
      return EXIT_OK;
    }
    if (response.status !== 404)
      throw new RiscScriptError(`GET ${url} answered ${response.status}: ${body.detail ?? ""}`);
    await new Promise((resolve) => setTimeout(resolve, VERIFY_POLL_MS));
  }
  print(
    `no verification event with state ${state} arrived within ${config.verifyTimeoutSeconds} s: check the receiver URL (npm run risc:status) and the Worker's logs (risc_event_rejected)`,
  );
  return EXIT_NOT_VERIFIED;
}

const COMMANDS = { register, status, verify } as const;

export async function main(argv: string[], env: Record<string, string | undefined> = process.env): Promise<number> {
  const command = argv[0] as keyof typeof COMMANDS | undefined;
  if (!command || !(command in COMMANDS)) {
    console.error("usage: tsx scripts/risc.ts register|status|verify");
    return EXIT_ERROR;
  }
  try {
    return await COMMANDS[command](riscConfig(env), (line) => console.log(line));
  } catch (error) {
    if (!(error instanceof RiscScriptError)) throw error;
    console.error(`risc:${command}: ${error.message}`);
    return EXIT_ERROR;
  }
}

if (process.argv[1] && fileURLToPath(import.meta.url) === resolve(process.argv[1])) {
  process.exitCode = await main(process.argv.slice(2));
}
