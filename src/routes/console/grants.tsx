import { GOOGLE_REFRESH_TOKEN_LIMIT, type GrantView, TOKEN_LIMIT_WARNING_AT } from "../../services/grants";
import type { LocationChoice } from "../../services/locations";
import { accountWords, GrantsTable } from "./apps";
import { Csrf, consolePath, duration, expiryWords, Layout, StatusBadge, utc, When } from "./layout";
import { NextPage, type PageContext } from "./pages";

/** Grants: a provider account's authorization on an app, shared by the branches served from it. */

export function GrantListView(props: {
  page: PageContext;
  grants: GrantView[];
  appId: number | undefined;
  nextHref: string | null;
}) {
  const { page } = props;
  return (
    <Layout title="Grants" nonce={page.nonce} who={page.who} csrf={page.csrf} flash={page.flash}>
      {props.appId !== undefined && (
        <p>
          Grants of <a href={consolePath(`/apps/${props.appId}`)}>{`app ${props.appId}`}</a> only.{" "}
          <a href={consolePath("/grants")}>All grants</a>
        </p>
      )}
      <GrantsTable id="grants" caption="Grants, oldest first" grants={props.grants} showApp={true} />
      <NextPage href={props.nextHref} />
    </Layout>
  );
}

/** The warning before Google's cap, naming the app and the account (null below the mark). */
export function tokenLimitWarning(view: Pick<GrantView, "grant" | "appName" | "appClientId">): string | null {
  const minted = view.grant.refreshTokensMinted;
  if (minted < TOKEN_LIMIT_WARNING_AT) return null;
  return `${minted} refresh tokens minted for ${accountWords(view)} on app ${view.appName} (${view.appClientId}). Google keeps ${GOOGLE_REFRESH_TOKEN_LIMIT} per account and OAuth client and silently revokes the oldest past that: connect this account's other locations by attaching them to this grant, not with new consents.`;
}

/** Time-limited access in words: when it ends, or that it ended. */
export function accessEndWords(endsAt: Date | null, now: Date): string {
  if (!endsAt) return "no end (access is not time-limited)";
  const left = endsAt.getTime() - now.getTime();
  return left > 0
    ? `time-limited: access ends in ${duration(left)} (${utc(endsAt)}); its branches then need a new consent`
    : `time-limited: access ended ${duration(left)} ago (${utc(endsAt)}); its branches need a new consent`;
}

export function GrantPageView(props: { page: PageContext; view: GrantView; isGoogle: boolean; now: Date }) {
  const { page, view, now } = props;
  const { grant } = view;
  const warning = tokenLimitWarning(view);
  return (
    <Layout title={`Grant ${grant.id}`} nonce={page.nonce} who={page.who} csrf={page.csrf} flash={page.flash}>
      {warning && (
        <p class="warning" id="token-limit-warning">
          <strong>Near Google's refresh token limit.</strong> {warning}
        </p>
      )}
      <dl class="facts">
        <dt>App</dt>
        <dd>
          <a href={consolePath(`/apps/${grant.appId}`)}>{view.appName}</a> <span class="mono">{view.appClientId}</span>
        </dd>
        <dt>Account</dt>
        <dd>{accountWords(view)}</dd>
        <dt>Status</dt>
        <dd>
          <StatusBadge status={view.status} />
        </dd>
        <dt>Access token</dt>
        <dd>
          {view.status === "connected" || view.status === "degraded" ? expiryWords(grant.expiresAt, now) : "not served"}
        </dd>
        <dt>Access</dt>
        <dd id="access-end">{accessEndWords(grant.refreshTokenExpiresAt, now)}</dd>
        <dt>Refresh tokens minted</dt>
        <dd id="minted">
          {grant.refreshTokensMinted} of Google's {GOOGLE_REFRESH_TOKEN_LIMIT} per account and app
        </dd>
        <dt>Last consent</dt>
        <dd>
          <When at={grant.consentedAt} now={now} />
        </dd>
        <dt>Last refresh</dt>
        <dd>
          <When at={grant.lastRefreshedAt} now={now} />
        </dd>
        <dt>Last error</dt>
        <dd>{grant.lastError ?? "none"}</dd>
      </dl>

      <h2>Branches</h2>
      <table id="grant-branches">
        <caption>
          {view.branches.length === 0 ? "No branch is served from this grant." : "Branches served from this grant"}
        </caption>
        <thead>
          <tr>
            <th scope="col">Branch</th>
          </tr>
        </thead>
        <tbody>
          {view.branches.map((branch) => (
            <tr>
              <td>
                <a href={consolePath(`/branches/${branch.id}`)}>{branch.branchId}</a>
              </td>
            </tr>
          ))}
        </tbody>
      </table>

      {props.isGoogle && (
        <>
          <h2>Locations</h2>
          <p>
            <a href={consolePath(`/grants/${grant.id}/locations`)}>Choose this account's locations</a> from the Business
            Profile API and create (or attach) one branch per location on this grant, with no consent.
          </p>
        </>
      )}
    </Layout>
  );
}

export function LocationsView(props: {
  page: PageContext;
  view: GrantView;
  locations: LocationChoice[];
  derivedBranchId: (name: string) => string;
}) {
  const { page, view } = props;
  const grantId = view.grant.id;
  return (
    <Layout
      title={`Locations of grant ${grantId}`}
      nonce={page.nonce}
      who={page.who}
      csrf={page.csrf}
      flash={page.flash}
    >
      <p>
        The locations {accountWords(view)} manages, from the Business Profile API. Tick the ones to serve from{" "}
        <a href={consolePath(`/grants/${grantId}`)}>{`grant ${grantId}`}</a>: each becomes a branch of app{" "}
        {view.appName} (or, when a branch already stands for it, that branch is attached), with no consent.
      </p>
      {props.locations.length === 0 ? (
        <p>This account has no locations.</p>
      ) : (
        <form method="post" action={consolePath(`/grants/${grantId}/locations`)}>
          <Csrf token={page.csrf ?? ""} />
          <table id="locations">
            <caption>{`${props.locations.length} location(s)`}</caption>
            <thead>
              <tr>
                <th scope="col">Attach</th>
                <th scope="col">Location</th>
                <th scope="col">Address</th>
                <th scope="col">Branch</th>
              </tr>
            </thead>
            <tbody>
              {props.locations.map((location, index) => {
                const served = location.branch?.grantId === grantId;
                return (
                  <tr>
                    <td>
                      <input
                        type="checkbox"
                        id={`location-${index}`}
                        name={`location_${index}`}
                        value={location.name}
                        disabled={served}
                        checked={served}
                      />
                    </td>
                    <td>
                      <label for={`location-${index}`}>{location.title || location.name}</label>
                      <br />
                      <span class="muted mono">{location.name}</span>
                    </td>
                    <td>{location.address ?? ""}</td>
                    <td>
                      {location.branch ? (
                        <>
                          <a href={consolePath(`/branches/${location.branch.id}`)}>{location.branch.branchId}</a>
                          {served ? " (served from this grant)" : ""}
                        </>
                      ) : (
                        <span class="muted">new: {props.derivedBranchId(location.name)}</span>
                      )}
                    </td>
                  </tr>
                );
              })}
            </tbody>
          </table>
          <p>
            <button type="submit">Attach the ticked locations</button>
          </p>
        </form>
      )}
    </Layout>
  );
}

/** The branch page's attach form: the app's connected grants, the branch's own left out. */
export function AttachForm(props: {
  clientId: number;
  csrf: string;
  grants: GrantView[];
  currentGrantId: number | null;
}) {
  const choices = props.grants.filter((view) => view.grant.id !== props.currentGrantId);
  return (
    <section aria-labelledby="act-attach">
      <h3 id="act-attach">Attach to a grant</h3>
      {choices.length === 0 ? (
        <p class="muted">No other connected grant of this branch's app.</p>
      ) : (
        <form method="post" action={consolePath(`/branches/${props.clientId}/grant`)}>
          <Csrf token={props.csrf} />
          <p class="muted">Serve this branch from an account's existing grant at once, with no consent.</p>
          <div class="field">
            <label for="grant_id">Connected grant of this app</label>
            <select id="grant_id" name="grant_id" required>
              {choices.map((view) => (
                <option value={String(view.grant.id)}>
                  {`grant ${view.grant.id}: ${accountWords(view)}, ${view.branches.length} branch(es)`}
                </option>
              ))}
            </select>
          </div>
          <button type="submit">Attach</button>
        </form>
      )}
    </section>
  );
}
