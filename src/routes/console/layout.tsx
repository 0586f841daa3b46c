import type { Child } from "hono/jsx";
import { BASE_PATH } from "../../app";
import type { Flash } from "../../services/console-session";

/**
 * The console's frame: one stylesheet (inline, with the response's CSP nonce), a header with the
 * navigation and the sign-out form, the flash message of the last action. No script but the copy
 * button's (see pages), nothing loaded from anywhere.
 */

/** A path of the console. BASE_PATH is read when called: app.ts imports this module (a cycle). */
export const consolePath = (path = "") => `${BASE_PATH}/console${path}`;

const CSS = `
*{box-sizing:border-box}
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
a{color:#0550ae}
a:focus-visible,button:focus-visible,input:focus-visible,select:focus-visible{outline:3px solid #0969da;outline-offset:2px}
.skip{position:absolute;left:-999px}.skip:focus{left:1rem;top:1rem;background:#fff;padding:.5rem}
header{background:#24292f;color:#fff;padding:.6rem 1.25rem;display:flex;gap:1.5rem;align-items:center;flex-wrap:wrap}
header a{color:#fff}header nav ul{list-style:none;display:flex;gap:1rem;margin:0;padding:0}
header .who{margin-left:auto;display:flex;gap:.75rem;align-items:center}
header .who button{background:#fff;color:#24292f}
main{max-width:72rem;margin:0 auto;padding:1rem 1.25rem 3rem}
h1{font-size:1.5rem;margin:.5rem 0 1rem}h2{font-size:1.15rem;margin:1.75rem 0 .5rem}
.flash{padding:.6rem .9rem;border-radius:6px;background:#dafbe1;border:1px solid #1a7f37;color:#0f5323}
.flash.error{background:#ffebe9;border-color:#cf222e;color:#82071e}
table{border-collapse:collapse;width:100%;background:#fff}
th,td{text-align:left;padding:.4rem .6rem;border-bottom:1px solid #d0d7de;vertical-align:top}
th{background:#eaeef2;font-weight:600}
caption{text-align:left;font-weight:600;padding:.3rem 0}
.status{display:inline-block;padding:0 .5rem;border-radius:1rem;border:1px solid;font-size:.85rem;white-space:nowrap}
.status-connected{color:#0f5323;border-color:#1a7f37;background:#dafbe1}
.status-degraded{color:#6c3b00;border-color:#9a6700;background:#fff8c5}
.status-needs_reauth,.status-credentials_rejected,.status-account_disabled{color:#82071e;border-color:#cf222e;background:#ffebe9}
.status-revoked,.status-never_connected,.status-inactive{color:#424a53;border-color:#6e7781;background:#f6f8fa}
.counts ul{list-style:none;display:flex;flex-wrap:wrap;gap:.5rem;padding:0;margin:0 0 1rem}
.counts li a,.counts li span{display:block;padding:.35rem .7rem;background:#fff;border:1px solid #d0d7de;border-radius:6px}
form.inline{display:inline}
.filters{display:flex;flex-wrap:wrap;gap:.75rem;align-items:end;margin:0 0 1rem}
.filters div,.field{display:flex;flex-direction:column;gap:.2rem}
.field{margin:0 0 .8rem;max-width:36rem}
input,select,button{font:inherit;padding:.35rem .5rem;border:1px solid #8c959f;border-radius:6px}
button{background:#0969da;color:#fff;border-color:#0550ae;cursor:pointer}
button.danger{background:#cf222e;border-color:#a40e26}
.field-error{color:#82071e;margin:.1rem 0 0}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:.3rem 1rem;background:#fff;padding:.8rem;border:1px solid #d0d7de;border-radius:6px}
dl.facts dt{font-weight:600}dl.facts dd{margin:0;overflow-wrap:anywhere}
.actions{display:grid;grid-template-columns:repeat(auto-fill,minmax(20rem,1fr));gap:1rem}
.actions section{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:.8rem}
.actions h3{margin:0 0 .5rem;font-size:1rem}
.muted{color:#57606a}
.attention{margin:0 0 .4rem}
.warning{padding:.6rem .9rem;border-radius:6px;background:#fff8c5;border:1px solid #9a6700;color:#4d2d00}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:.9em;overflow-wrap:anywhere}
#login-link{width:100%}
`;

export interface LayoutProps {
  title: string;
  nonce: string;
  /** The signed-in operator (absent on the sign-in page). */
  who?: string | undefined;
  /** The session's CSRF token, for the sign-out form. */
  csrf?: string | undefined;
  flash?: Flash | null | undefined;
  children?: Child;
}

export function Layout(props: LayoutProps) {
  return (
    <html lang="en">
      <head>
        <meta charset="utf-8" />
        <meta name="viewport" content="width=device-width, initial-scale=1" />
        <meta name="robots" content="noindex" />
        <title>{`${props.title} · Token management console`}</title>
        <style nonce={props.nonce} dangerouslySetInnerHTML={{ __html: CSS }} />
      </head>
      <body>
        <a class="skip" href="#main">
          Skip to content
        </a>
        <header>
          <strong>Token management</strong>
          {props.who !== undefined && (
            <nav aria-label="Console">
              <ul>
                <li>
                  <a href={consolePath()}>Branches</a>
                </li>
                <li>
                  <a href={consolePath("/branches/new")}>Register a branch</a>
                </li>
                <li>
                  <a href={consolePath("/apps")}>Apps</a>
                </li>
                <li>
                  <a href={consolePath("/grants")}>Grants</a>
                </li>
                <li>
                  <a href={consolePath("/events")}>Events</a>
                </li>
                <li>
                  <a href={consolePath("/health")}>Health</a>
                </li>
              </ul>
            </nav>
          )}
          {props.who !== undefined && (
            <div class="who">
              <span>Signed in: {props.who}</span>
              {props.csrf !== undefined && (
                <form method="post" action={consolePath("/sign-out")} class="inline">
                  <input type="hidden" name="csrf" value={props.csrf} />
                  <button type="submit">Sign out</button>
                </form>
              )}
            </div>
          )}
        </header>
        <main id="main">
          <h1>{props.title}</h1>
          <FlashMessage flash={props.flash} />
          {props.children}
        </main>
      </body>
    </html>
  );
}

export function FlashMessage({ flash }: { flash: Flash | null | undefined }) {
  if (!flash) return null;
  return flash.tone === "error" ? (
    <p role="alert" class="flash error">
      {flash.message}
    </p>
  ) : (
    <p role="status" class="flash">
      {flash.message}
    </p>
  );
}

/** A hidden CSRF field: every form carries one. */
export function Csrf({ token }: { token: string }) {
  return <input type="hidden" name="csrf" value={token} />;
}

// ---------------------------------------------------------------------------------------------
// Formatting: words, never colour alone; times in UTC with a machine-readable datetime.

const STATUS_WORDS: Record<string, string> = {
  needs_reauth: "Needs reconnection",
  credentials_rejected: "Credentials rejected",
  account_disabled: "Account disabled",
  degraded: "Degraded",
  revoked: "Revoked",
  never_connected: "Never connected",
  connected: "Connected",
};

export function statusWords(status: string): string {
  return STATUS_WORDS[status] ?? status;
}

export function StatusBadge({ status, isActive = true }: { status: string; isActive?: boolean }) {
  return (
    <span>
      <span class={`status status-${status}`}>{statusWords(status)}</span>
      {!isActive && <span class="status status-inactive"> Inactive</span>}
    </span>
  );
}

const MINUTE_MS = 60_000;
const HOUR_MS = 60 * MINUTE_MS;
const DAY_MS = 24 * HOUR_MS;

/** "42 min", "3 h 5 min", "2 days": how far apart two instants are, roughly. */
export function duration(ms: number): string {
  const abs = Math.abs(ms);
  if (abs < MINUTE_MS) return `${Math.round(abs / 1000)} s`;
  if (abs < HOUR_MS) return `${Math.round(abs / MINUTE_MS)} min`;
  if (abs < DAY_MS) {
    const hours = Math.floor(abs / HOUR_MS);
    const minutes = Math.round((abs % HOUR_MS) / MINUTE_MS);
    return minutes ? `${hours} h ${minutes} min` : `${hours} h`;
  }
  const days = Math.round(abs / DAY_MS);
  return `${days} day${days === 1 ? "" : "s"}`;
}

/** Statuses whose token is still handed out (credentials_rejected serves it until it expires). */
const SERVED_STATUSES = new Set(["connected", "degraded", "credentials_rejected"]);

/**
 * The expiry as the operator needs it: "expires in 42 min", or that the token is no longer served
 * (a dead or revoked grant, a deactivated branch) whatever its row's expiry says.
 */
export function tokenExpiryWords(
  token: { expiresAt: Date | null } | null,
  status: string,
  isActive: boolean,
  now: Date,
): string {
  if (!token?.expiresAt) return "no token";
  if (!SERVED_STATUSES.has(status)) return `not served (${statusWords(status).toLowerCase()})`;
  if (!isActive) return "not served (inactive)";
  return expiryWords(token.expiresAt, now);
}

/** "expires in 42 min" or "expired 3 min ago". */
export function expiryWords(expiresAt: Date | null, now: Date): string {
  if (!expiresAt) return "no token";
  const left = expiresAt.getTime() - now.getTime();
  return left > 0 ? `expires in ${duration(left)}` : `expired ${duration(left)} ago`;
}

export function utc(date: Date): string {
  return `${date.toISOString().slice(0, 16).replace("T", " ")} UTC`;
}

export function When({ at, now }: { at: Date | null; now: Date }) {
  if (!at) return <span class="muted">never</span>;
  const ago = now.getTime() - at.getTime();
  return (
    <time datetime={at.toISOString()} title={utc(at)}>
      {ago >= 0 ? `${duration(ago)} ago` : `in ${duration(ago)}`}
    </time>
  );
}
