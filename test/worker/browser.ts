import { BASE, type CallOptions, call, testEnv } from "./helpers";

/**
 * A cookie jar that behaves like a browser's (RFC 6265bis): a cookie is sent only to its host, on
 * paths under its Path (default: the directory of the URL that set it), over https when Secure,
 * until Max-Age runs out; `__Host-` cookies are kept only when Secure, Path=/ and without Domain,
 * and an http page cannot set a Secure cookie (localhost excepted). Requests to the local
 * authorization server go over the network; the rest goes through the Worker's fetch handler.
 */

interface StoredCookie {
  name: string;
  value: string;
  host: string;
  path: string;
  secure: boolean;
  expiresAt: number | null;
}

const LOOPBACK = new Set(["localhost", "127.0.0.1", "[::1]"]);
const isSecureOrigin = (url: URL) => url.protocol === "https:" || LOOPBACK.has(url.hostname);

export class Browser {
  private cookies: StoredCookie[] = [];

  /** `base`: the API root that relative paths (and the helpers' callback URLs) start from. */
  constructor(readonly base: string = BASE) {}

  /** GET (or `options.method`) without following redirects, sending and storing cookies. */
  async open(target: string | URL, options: CallOptions = {}): Promise<Response> {
    const url =
      typeof target === "string" && target.startsWith("/") ? new URL(`${this.base}${target}`) : new URL(target);
    const headers = new Headers(options.headers);
    const cookie = this.cookieHeader(url);
    if (cookie) headers.set("cookie", cookie);
    const response =
      url.origin === new URL(testEnv.OAUTH_SERVER_URL).origin
        ? await fetch(url, { ...options, headers, redirect: "manual" })
        : await call(url.toString(), { ...options, headers });
    this.receive(url, response);
    return response;
  }

  /** The Cookie header this browser sends to `url`. */
  cookieHeader(target: string | URL): string {
    const url = new URL(target);
    const now = Date.now();
    this.cookies = this.cookies.filter((c) => c.expiresAt === null || c.expiresAt > now);
    return this.cookies
      .filter((c) => c.host === url.hostname && pathMatches(url.pathname, c.path) && (!c.secure || isSecureOrigin(url)))
      .sort((a, b) => b.path.length - a.path.length)
      .map((c) => `${c.name}=${c.value}`)
      .join("; ");
  }

  /** Names of the cookies currently held (any host, any path). */
  names(): string[] {
    return this.cookies.map((c) => c.name);
  }

  private receive(url: URL, response: Response): void {
    for (const header of response.headers.getSetCookie()) this.store(url, header);
  }

  private store(url: URL, header: string): void {
    const [pair = "", ...attributes] = header.split(";").map((part) => part.trim());
    const eq = pair.indexOf("=");
    if (eq <= 0) return;
    const cookie: StoredCookie = {
      name: pair.slice(0, eq),
      value: pair.slice(eq + 1),
      host: url.hostname,
      path: defaultPath(url.pathname),
      secure: false,
      expiresAt: null,
    };
    let hasDomain = false;
    let pathGiven = false;
    for (const attribute of attributes) {
      const [rawName = "", ...rest] = attribute.split("=");
      const name = rawName.toLowerCase();
      const value = rest.join("=");
      if (name === "path" && value.startsWith("/")) {
        cookie.path = value;
        pathGiven = true;
      } else if (name === "secure") cookie.secure = true;
      else if (name === "domain") hasDomain = true;
      else if (name === "max-age") cookie.expiresAt = Date.now() + Number(value) * 1000;
    }
    if (cookie.secure && !isSecureOrigin(url)) return;
    if (cookie.name.startsWith("__Host-") && (!cookie.secure || hasDomain || !pathGiven || cookie.path !== "/")) return;
    this.cookies = this.cookies.filter(
      (c) => !(c.name === cookie.name && c.host === cookie.host && c.path === cookie.path),
    );
    if (cookie.expiresAt === null || cookie.expiresAt > Date.now()) this.cookies.push(cookie);
  }
}

function defaultPath(path: string): string {
  const last = path.lastIndexOf("/");
  return last <= 0 ? "/" : path.slice(0, last);
}

function pathMatches(requestPath: string, cookiePath: string): boolean {
  if (requestPath === cookiePath) return true;
  if (!requestPath.startsWith(cookiePath)) return false;
  return cookiePath.endsWith("/") || requestPath[cookiePath.length] === "/";
}
