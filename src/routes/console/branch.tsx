import type { ClientRow, EventRow, TokenRow } from "../../db/schema";
import type { BranchStatus } from "../../services/branch-list";
import type { GrantView } from "../../services/grants";
import { AttachForm } from "./grants";
import { Csrf, consolePath, expiryWords, Layout, StatusBadge, tokenExpiryWords, utc, When } from "./layout";
import { EventsTable, type PageContext } from "./pages";

/** A branch's page: its state and why, its history, and every action on it. */

export interface BranchDetails {
  client: ClientRow;
  token: TokenRow | null;
  status: BranchStatus;
  /** First 8 hex digits of SHA-256 of the access token, or why there is none. */
  fingerprint: string | null;
  events: EventRow[];
  moreEvents: boolean;
  /** Connected grants of the branch's app (the attach form's choices). */
  attachGrants: GrantView[];
}

/** What a status means for the operator, and what to do about it. */
export function statusReason(details: Pick<BranchDetails, "status" | "token" | "client">): string {
  const { token, client } = details;
  switch (details.status) {
    case "never_connected":
      return "Nobody has consented yet: send the branch a login link.";
    case "connected":
      return "The token is valid and is refreshed ahead of expiry.";
    case "degraded":
      return `The last ${token?.failureCount ?? 0} refreshes failed with transient errors (the provider was slow or unavailable); the token is retried with backoff.`;
    case "credentials_rejected":
      return "The provider rejected this client's credentials (invalid_client): rotate the client secret.";
    case "needs_reauth":
      return byGoogle(token)
        ? `Ended by Google: ${googleSaid(token)}. Send a new login link.`
        : "The grant no longer works (the user revoked it or it expired at the provider): send a new login link.";
    case "account_disabled":
      return `Held by Google since ${token?.heldAt ? utc(token.heldAt) : "now"}: Google disabled the account behind the grant (Cross-Account Protection, reason ${token?.heldReason ?? "hijacking"}). Its token is neither served nor refreshed until Google enables the account again.`;
    case "revoked":
      if (byGoogle(token)) {
        return `Revoked by Google: ${googleSaid(token)}. Send a new login link to connect again.`;
      }
      return client.isActive
        ? "An operator revoked the grant: send a new login link to connect again."
        : "An operator revoked the grant.";
  }
}

/** The grant's status was set by a Cross-Account Protection event (src/services/risc.ts riscReason). */
function byGoogle(token: TokenRow | null): token is TokenRow & { lastError: string } {
  return token?.lastError?.includes("(Cross-Account Protection, ") ?? false;
}

/** What Google said and when it arrived (the code before the colon is for machines). */
function googleSaid(token: TokenRow & { lastError: string }): string {
  return token.lastError.slice(token.lastError.indexOf(":") + 1).trim();
}

export function BranchView(props: {
  page: PageContext;
  details: BranchDetails;
  now: Date;
  /** A login link just issued (from the redirect's flash), shown once. */
  link?: ShownLink | undefined;
}) {
  const { page, details, now } = props;
  const { client, token } = details;
  const base = consolePath(`/branches/${client.id}`);
  const csrf = page.csrf ?? "";
  return (
    <Layout title={`Branch ${client.branchId}`} nonce={page.nonce} who={page.who} csrf={page.csrf} flash={page.flash}>
      {props.link && <NewLink link={props.link} nonce={page.nonce} now={now} />}
      <h2>Connection</h2>
      <dl class="facts">
        <dt>Status</dt>
        <dd>
          <StatusBadge status={details.status} isActive={client.isActive} />
        </dd>
        <dt>Why</dt>
        <dd>{statusReason(details)}</dd>
        {client.consentProblem && (
          <>
            <dt>Last consent</dt>
            <dd>
              stored nothing ({client.consentProblem}): {client.consentProblemDetail ?? ""}
            </dd>
          </>
        )}
        <dt>Active</dt>
        <dd>{client.isActive ? "yes" : "no (tokens are not served or refreshed)"}</dd>
        <dt>Expiry</dt>
        <dd>
          {token
            ? `${tokenExpiryWords(token, details.status, client.isActive, now)} (${utc(token.expiresAt)})`
            : "no token"}
        </dd>
        <dt>Last refresh</dt>
        <dd>
          <When at={token?.lastRefreshedAt ?? null} now={now} />
        </dd>
        <dt>Failure count</dt>
        <dd>{token?.failureCount ?? 0}</dd>
        <dt>Next attempt</dt>
        <dd>{token?.nextAttemptAt ? <When at={token.nextAttemptAt} now={now} /> : "when due"}</dd>
        <dt>Last error</dt>
        <dd>{token?.lastError ?? "none"}</dd>
        <dt>Grant</dt>
        <dd>
          {client.grantId === null ? (
            "none yet"
          ) : (
            <a href={consolePath(`/grants/${client.grantId}`)}>{`grant ${client.grantId}`}</a>
          )}
        </dd>
        <dt>Provider resource</dt>
        <dd class="mono">{client.providerResource ?? "none"}</dd>
        <dt>Token fingerprint</dt>
        <dd class="mono">{details.fingerprint ?? "no token"}</dd>
      </dl>

      <h2>Client</h2>
      <dl class="facts">
        <dt>Workspace</dt>
        <dd>{client.workspaceName}</dd>
        <dt>Workspace email</dt>
        <dd>{client.workspaceEmail}</dd>
        <dt>App</dt>
        <dd>
          {client.appId === null ? "none" : <a href={consolePath(`/apps/${client.appId}`)}>{`app ${client.appId}`}</a>}
        </dd>
        <dt>OAuth client ID</dt>
        <dd class="mono">{client.clientId}</dd>
        <dt>Redirect URI</dt>
        <dd class="mono">{client.redirectUri}</dd>
        <dt>Scopes</dt>
        <dd class="mono">{client.scopes ?? "the service's default"}</dd>
        <dt>Internal id</dt>
        <dd>{client.id}</dd>
        <dt>Registered</dt>
        <dd>{utc(client.createdAt)}</dd>
      </dl>

      <h2>History</h2>
      <EventsTable
        id="events"
        caption="Events of this branch, oldest first"
        events={details.events}
        now={now}
        showBranch={false}
        canRedeliver={false}
      />
      {details.moreEvents && (
        <p>
          <a href={`${consolePath("/events")}?branch_id=${encodeURIComponent(client.branchId)}`}>
            More events in the event log
          </a>
        </p>
      )}

      <h2>Actions</h2>
      <div class="actions">
        <section aria-labelledby="act-link">
          <h3 id="act-link">Login link</h3>
          <form method="post" action={`${base}/login-link`}>
            <Csrf token={csrf} />
            <p>
              <input type="checkbox" id="revoke_previous" name="revoke_previous" value="true" />{" "}
              <label for="revoke_previous">Revoke earlier links</label>
            </p>
            <button type="submit">Copy new login link</button>
          </form>
          <form method="post" action={`${base}/login-links/revoke`}>
            <Csrf token={csrf} />
            <p class="muted">Links issued so far, and consents begun with them, stop working.</p>
            <button type="submit">Revoke all login links</button>
          </form>
        </section>
        <section aria-labelledby="act-refresh">
          <h3 id="act-refresh">Token</h3>
          <form method="post" action={`${base}/refresh`}>
            <Csrf token={csrf} />
            <button type="submit">Refresh now</button>
          </form>
          <form method="post" action={`${base}/revoke`}>
            <Csrf token={csrf} />
            <p class="muted">Revokes the grant at the provider and here; a new login link connects again.</p>
            <button type="submit" class="danger">
              Revoke grant
            </button>
          </form>
        </section>
        <AttachForm clientId={client.id} csrf={csrf} grants={details.attachGrants} currentGrantId={client.grantId} />
        <section aria-labelledby="act-active">
          <h3 id="act-active">{client.isActive ? "Deactivate" : "Activate"}</h3>
          <form method="post" action={`${base}/active`}>
            <Csrf token={csrf} />
            <input type="hidden" name="is_active" value={client.isActive ? "false" : "true"} />
            <p class="muted">
              {client.isActive
                ? "An inactive branch's token is neither served nor refreshed."
                : "Serve and refresh this branch's token again."}
            </p>
            <button type="submit">{client.isActive ? "Deactivate" : "Activate"}</button>
          </form>
        </section>
        <section aria-labelledby="act-secret">
          <h3 id="act-secret">Client secret</h3>
          <form method="post" action={`${base}/secret`}>
            <Csrf token={csrf} />
            <div class="field">
              <label for="client_secret">New client secret</label>
              <input id="client_secret" name="client_secret" type="password" autocomplete="off" required />
            </div>
            <button type="submit">Rotate secret</button>
          </form>
        </section>
        <section aria-labelledby="act-delete">
          <h3 id="act-delete">Delete</h3>
          <form method="post" action={`${base}/delete`}>
            <Csrf token={csrf} />
            <div class="field">
              <label for="confirm">Type the branch ID ({client.branchId}) to confirm</label>
              <input id="confirm" name="confirm" type="text" autocomplete="off" required />
            </div>
            <button type="submit" class="danger">
              Delete branch
            </button>
          </form>
        </section>
      </div>
    </Layout>
  );
}

export interface ShownLink {
  url: string;
  expiresAt: Date;
}

/** Copies the link to the clipboard; without JavaScript the field is still selectable. */
const COPY_SCRIPT = `
document.getElementById("copy-login-link").addEventListener("click", function () {
  var field = document.getElementById("login-link");
  var done = document.getElementById("copy-result");
  field.select();
  var ok = function () { done.textContent = "Copied."; };
  if (navigator.clipboard) navigator.clipboard.writeText(field.value).then(ok, function () { done.textContent = "Select the link and copy it."; });
  else { document.execCommand("copy"); ok(); }
});`;

function NewLink({ link, nonce, now }: { link: ShownLink; nonce: string; now: Date }) {
  return (
    <section aria-labelledby="new-link" class="actions">
      <section>
        <h2 id="new-link">New login link</h2>
        <div class="field">
          <label for="login-link">Send this link to the branch ({expiryWords(link.expiresAt, now)})</label>
          <input id="login-link" type="text" readonly value={link.url} />
        </div>
        <button type="button" id="copy-login-link">
          Copy
        </button>{" "}
        <span id="copy-result" role="status" />
        <script nonce={nonce} dangerouslySetInnerHTML={{ __html: COPY_SCRIPT }} />
      </section>
    </section>
  );
}
