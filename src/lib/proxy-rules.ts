/**
 * The proxy's pure rules: which headers cross it, which upstream URLs it may call, which requests
 * edit a resource, and what an upstream Retry-After means. No I/O; src/services/proxy.ts applies them.
 */

/** RFC 9110 §7.6.1 connection-specific fields, and the older ones every proxy still drops. */
const HOP_BY_HOP = new Set([
  "connection",
  "keep-alive",
  "proxy-connection",
  "proxy-authenticate",
  "proxy-authorization",
  "te",
  "trailer",
  "transfer-encoding",
  "upgrade",
]);

/**
 * Never forwarded upstream beside the hop-by-hop fields: the caller's credentials for this service
 * (the API key comes as Authorization or X-API-Key), its cookies, the proxy's own control header,
 * Host (the runtime sets the upstream's), Content-Length (the body is streamed; the runtime frames
 * it) and Cloudflare's per-hop fields about the caller.
 */
const NOT_FORWARDED_UP = new Set(["authorization", "x-api-key", "cookie", "proxy-base-url", "host", "content-length"]);
/**
 * Never returned to the caller beside the hop-by-hop fields: cookies the provider sets for us,
 * and Content-Length (the body is streamed, and the runtime may decode and re-encode it).
 */
const NOT_FORWARDED_DOWN = new Set(["set-cookie", "set-cookie2", "content-length"]);

/** The header a caller names one of the allowed API bases with. */
export const BASE_URL_HEADER = "Proxy-Base-Url";

/** Field names listed in the message's Connection header(s), lower-cased. */
function connectionNamed(headers: Headers): Set<string> {
  const named = new Set<string>();
  for (const name of (headers.get("connection") ?? "").split(",")) {
    const trimmed = name.trim().toLowerCase();
    if (trimmed) named.add(trimmed);
  }
  return named;
}

function filtered(headers: Headers, drop: Set<string>, dropPrefix?: string): Headers {
  const named = connectionNamed(headers);
  const out = new Headers();
  headers.forEach((value, name) => {
    if (HOP_BY_HOP.has(name) || drop.has(name) || named.has(name)) return;
    if (dropPrefix !== undefined && name.startsWith(dropPrefix)) return;
    out.append(name, value);
  });
  return out;
}

/** The caller's end-to-end headers, as sent upstream (the token is added by the caller of this). */
export function upstreamRequestHeaders(incoming: Headers): Headers {
  return filtered(incoming, NOT_FORWARDED_UP, "cf-");
}

/** The upstream's end-to-end headers, as returned to the caller. */
export function callerResponseHeaders(upstream: Headers): Headers {
  return filtered(upstream, NOT_FORWARDED_DOWN);
}

/** An allowed API base: origin and path prefix (no trailing slash), compared exactly. */
export interface BaseUrl {
  origin: string;
  /** "" or "/v1"-like, never ending in "/". */
  path: string;
}

/** Why a configured base URL is not acceptable, or undefined when it is. */
export function baseUrlProblem(value: string, allowInsecureHttp: boolean): string | undefined {
  if (!URL.canParse(value)) return "is not an absolute URL";
  const url = new URL(value);
  if (url.protocol !== "https:" && !(url.protocol === "http:" && allowInsecureHttp)) {
    return "must be https (plain http only with OAUTH_ALLOW_INSECURE_HTTP=true, for a local server)";
  }
  if (url.username || url.password) return "must not carry a user name or password";
  if (url.search || url.hash || value.includes("?") || value.includes("#")) {
    return "must not carry a query or a fragment";
  }
  if (unsafePathProblem(url.pathname.slice(1)) !== undefined) return "has a path the proxy would refuse";
  return undefined;
}

export function parseBaseUrl(value: string): BaseUrl {
  const url = new URL(value);
  return { origin: url.origin, path: url.pathname.replace(/\/+$/, "") };
}

/**
 * The base the caller asked for: exactly one of the allowed ones (scheme, host, port and path
 * prefix; a trailing slash and the default port are the same URL), or undefined. A look-alike host,
 * user info, another port, a query or a longer path is no match.
 */
export function chooseBaseUrl(requested: string | null, allowed: readonly BaseUrl[]): BaseUrl | undefined {
  if (requested === null) return allowed[0];
  if (!URL.canParse(requested)) return undefined;
  const url = new URL(requested);
  if (url.username || url.password || url.search || url.hash || requested.includes("?") || requested.includes("#")) {
    return undefined;
  }
  const wanted = parseBaseUrl(requested);
  return allowed.find((base) => base.origin === wanted.origin && base.path === wanted.path);
}

/**
 * Why the path after the branch (as the caller sent it, still percent-encoded) cannot be
 * forwarded: anything that could mean another path upstream than here (an encoded slash, backslash
 * or dot, dot segments, a doubly encoded character, control characters).
 */
export function unsafePathProblem(rawPath: string): string | undefined {
  if (/%(2f|5c|2e|25)/i.test(rawPath)) return "an encoded slash, backslash, dot or percent sign";
  if (rawPath.includes("\\") || [...rawPath].some((c) => c.charCodeAt(0) < 0x20 || c.charCodeAt(0) === 0x7f)) {
    return "a backslash or a control character";
  }
  if (/%(0[0-9a-f]|1[0-9a-f]|7f)/i.test(rawPath)) return "an encoded control character";
  if (rawPath.split("/").some((segment) => segment === "." || segment === "..")) return "a dot segment";
  return undefined;
}

/**
 * The upstream URL for the caller's path (percent-encoded, without the leading slash) and query
 * under `base`, or undefined when the result would leave the base (checked after parsing, whatever
 * unsafePathProblem let through).
 */
export function upstreamUrl(base: BaseUrl, rawPath: string, search: string): URL | undefined {
  if (unsafePathProblem(rawPath) !== undefined) return undefined;
  const text = `${base.origin}${base.path}/${rawPath}${search}`;
  if (!URL.canParse(text)) return undefined;
  const url = new URL(text);
  if (url.origin !== base.origin || url.username || url.password) return undefined;
  if (url.pathname !== `${base.path}/${rawPath}` && url.pathname !== `${base.path}/`) return undefined;
  return url;
}

/** Methods whose request the provider does not act on a second time (RFC 9110 §9.2.2). */
export const IDEMPOTENT_METHODS = new Set(["GET", "HEAD", "OPTIONS", "PUT", "DELETE"]);
/** Methods that change nothing upstream (RFC 9110 §9.2.1), and that never carry a body here. */
const SAFE_METHODS = new Set(["GET", "HEAD", "OPTIONS"]);

export function isSafeMethod(method: string): boolean {
  return SAFE_METHODS.has(method);
}

/**
 * The resource a request edits, for the per-resource edit budget: a write (any unsafe method)
 * to a path naming a location (`locations/{id}`, as Google's Business Profile APIs name them,
 * alone or under an account) edits that location. Undefined for reads and other paths.
 */
export function editedResource(method: string, rawPath: string): string | undefined {
  if (isSafeMethod(method)) return undefined;
  // A custom method (`locations/1:clearLocationAssociation`) edits the location it names.
  const match = /(?:^|\/)locations\/([^/?#:]+)/.exec(rawPath);
  return match ? `locations/${match[1]}` : undefined;
}

/**
 * An upstream Retry-After (delay-seconds or an HTTP-date) in whole seconds from `now`, or
 * undefined when absent or unreadable. A date in the past is 0.
 */
export function retryAfterSeconds(value: string | null, now: Date): number | undefined {
  if (value === null) return undefined;
  const trimmed = value.trim();
  if (/^\d+$/.test(trimmed)) return Number(trimmed);
  // An HTTP-date is in GMT (RFC 9110 §5.6.7); Date.parse alone would take "-5" for a year.
  if (!/GMT$/.test(trimmed)) return undefined;
  const when = Date.parse(trimmed);
  if (Number.isNaN(when)) return undefined;
  return Math.max(0, Math.ceil((when - now.getTime()) / 1000));
}
