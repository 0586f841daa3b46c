import type { AppSummary } from "../../services/apps";
import type { GrantView } from "../../services/grants";
import { Csrf, consolePath, Layout, StatusBadge, utc } from "./layout";
import type { PageContext } from "./pages";

/** Apps: the OAuth clients at providers that branches use (src/services/apps.ts). */

/** What an operator does about an app that is probably in Google's Testing publishing status. */
export const TESTING_ADVICE =
  "Google's refresh tokens of an app in Testing publishing status die 7 days after the consent. In the Google Cloud console, open Google Auth Platform → Audience and press “Publish app” (the business.manage scope may need verification), then send the affected branches a new login link.";

export interface AppBranch {
  id: number;
  branchId: string;
  grantId: number | null;
  providerResource: string | null;
  isActive: boolean;
}

export function AppListView(props: { page: PageContext; apps: AppSummary[] }) {
  const { page } = props;
  return (
    <Layout title="Apps" nonce={page.nonce} who={page.who} csrf={page.csrf} flash={page.flash}>
      <p>
        <a href={consolePath("/apps/new")}>Register an app</a>
      </p>
      <table id="apps">
        <caption>{props.apps.length === 0 ? "No apps yet." : "Apps (OAuth clients at a provider)"}</caption>
        <thead>
          <tr>
            <th scope="col">App</th>
            <th scope="col">Profile</th>
            <th scope="col">Client ID</th>
            <th scope="col">Branches</th>
            <th scope="col">Connected grants</th>
            <th scope="col">Attention</th>
          </tr>
        </thead>
        <tbody>
          {props.apps.map(({ app, branches, grants }) => (
            <tr>
              <td>
                <a href={consolePath(`/apps/${app.id}`)}>{app.name}</a>
              </td>
              <td>{app.profile}</td>
              <td class="mono">{app.clientId}</td>
              <td>{branches}</td>
              <td>{grants}</td>
              <td>
                <AppAttention app={app} />
              </td>
            </tr>
          ))}
        </tbody>
      </table>
    </Layout>
  );
}

/** Credentials rejected, probably in Testing: each in words with what to do, or "none". */
function AppAttention({ app }: { app: AppSummary["app"] }) {
  if (!app.credentialsRejectedAt && !app.testingSuspectedAt) return <span class="muted">none</span>;
  return (
    <>
      {app.credentialsRejectedAt && (
        <p class="attention">
          <StatusBadge status="credentials_rejected" /> since {utc(app.credentialsRejectedAt)}: the provider refuses
          this client's secret. Rotate it on the app's page.
        </p>
      )}
      {app.testingSuspectedAt && (
        <p class="attention">
          <strong>Probably in Testing publishing status</strong> (a grant died about 7 days after its consent,{" "}
          {utc(app.testingSuspectedAt)}). {TESTING_ADVICE}
        </p>
      )}
    </>
  );
}

export function AppView(props: {
  page: PageContext;
  summary: AppSummary;
  grants: GrantView[];
  moreGrants: boolean;
  branches: AppBranch[];
  moreBranches: boolean;
}) {
  const { page, summary } = props;
  const { app } = summary;
  const base = consolePath(`/apps/${app.id}`);
  return (
    <Layout title={`App ${app.name}`} nonce={page.nonce} who={page.who} csrf={page.csrf} flash={page.flash}>
      <dl class="facts">
        <dt>Profile</dt>
        <dd>{app.profile}</dd>
        <dt>OAuth client ID</dt>
        <dd class="mono">{app.clientId}</dd>
        <dt>Branches</dt>
        <dd>{summary.branches}</dd>
        <dt>Connected grants</dt>
        <dd>{summary.grants}</dd>
        <dt>Attention</dt>
        <dd>
          <AppAttention app={app} />
        </dd>
        <dt>Internal id</dt>
        <dd>{app.id}</dd>
        <dt>Registered</dt>
        <dd>{utc(app.createdAt)}</dd>
      </dl>

      <h2>Grants</h2>
      <GrantsTable id="app-grants" caption="Grants of this app" grants={props.grants} showApp={false} />
      {props.moreGrants && (
        <p>
          <a href={`${consolePath("/grants")}?app_id=${app.id}`}>More grants of this app</a>
        </p>
      )}

      <h2>Branches</h2>
      <table id="app-branches">
        <caption>{props.branches.length === 0 ? "No branches use this app yet." : "Branches using this app"}</caption>
        <thead>
          <tr>
            <th scope="col">Branch</th>
            <th scope="col">Grant</th>
            <th scope="col">Provider resource</th>
            <th scope="col">Active</th>
          </tr>
        </thead>
        <tbody>
          {props.branches.map((branch) => (
            <tr>
              <td>
                <a href={consolePath(`/branches/${branch.id}`)}>{branch.branchId}</a>
              </td>
              <td>
                {branch.grantId === null ? (
                  <span class="muted">never connected</span>
                ) : (
                  <a href={consolePath(`/grants/${branch.grantId}`)}>{`grant ${branch.grantId}`}</a>
                )}
              </td>
              <td class="mono">{branch.providerResource ?? ""}</td>
              <td>{branch.isActive ? "yes" : "no"}</td>
            </tr>
          ))}
        </tbody>
      </table>
      {props.moreBranches && <p class="muted">Only the first {props.branches.length} branches are listed.</p>}

      <h2>Actions</h2>
      <div class="actions">
        <section aria-labelledby="act-app-secret">
          <h3 id="act-app-secret">Client secret</h3>
          <form method="post" action={`${base}/secret`}>
            <Csrf token={page.csrf ?? ""} />
            <p class="muted">One change for every branch of the app; the next refresh uses it.</p>
            <div class="field">
              <label for="app_client_secret">New client secret</label>
              <input id="app_client_secret" name="client_secret" type="password" autocomplete="off" required />
            </div>
            <button type="submit">Rotate secret</button>
          </form>
        </section>
      </div>
    </Layout>
  );
}

export function NewAppView(props: { page: PageContext; values: { name?: string; client_id?: string } }) {
  const { page } = props;
  return (
    <Layout title="Register an app" nonce={page.nonce} who={page.who} csrf={page.csrf} flash={page.flash}>
      <p>
        A Google OAuth client (profile <code>google</code>: the provider the <code>OAUTH_*</code> variables describe).
        Register it once; every branch of the business then uses it. Other providers: <code>POST /apps</code> with
        profile <code>oauth2</code>.
      </p>
      <form method="post" action={consolePath("/apps")}>
        <Csrf token={page.csrf ?? ""} />
        <div class="field">
          <label for="app_name">Name</label>
          <input id="app_name" name="name" type="text" required maxlength={255} value={props.values.name ?? ""} />
        </div>
        <div class="field">
          <label for="app_client_id">OAuth client ID</label>
          <input
            id="app_client_id"
            name="client_id"
            type="text"
            required
            maxlength={255}
            autocomplete="off"
            value={props.values.client_id ?? ""}
          />
        </div>
        <div class="field">
          <label for="app_secret">OAuth client secret</label>
          <input id="app_secret" name="client_secret" type="password" required maxlength={1024} autocomplete="off" />
        </div>
        <button type="submit">Register app</button>
      </form>
    </Layout>
  );
}

/** Grants as a table (the grants list, an app's page). */
export function GrantsTable(props: { id: string; caption: string; grants: GrantView[]; showApp: boolean }) {
  return (
    <table id={props.id}>
      <caption>{props.grants.length === 0 ? `${props.caption}: none yet.` : props.caption}</caption>
      <thead>
        <tr>
          <th scope="col">Grant</th>
          {props.showApp && <th scope="col">App</th>}
          <th scope="col">Account</th>
          <th scope="col">Status</th>
          <th scope="col">Refresh tokens minted</th>
          <th scope="col">Access ends</th>
          <th scope="col">Branches</th>
        </tr>
      </thead>
      <tbody>
        {props.grants.map((view) => (
          <tr>
            <td>
              <a href={consolePath(`/grants/${view.grant.id}`)}>{`grant ${view.grant.id}`}</a>
            </td>
            {props.showApp && (
              <td>
                <a href={consolePath(`/apps/${view.grant.appId}`)}>{view.appName}</a>
              </td>
            )}
            <td>{accountWords(view)}</td>
            <td>
              <StatusBadge status={view.status} />
            </td>
            <td>{view.grant.refreshTokensMinted}</td>
            <td>{view.grant.refreshTokenExpiresAt ? utc(view.grant.refreshTokenExpiresAt) : "no end"}</td>
            <td>{view.branches.length}</td>
          </tr>
        ))}
      </tbody>
    </table>
  );
}

/** The account as the operator knows it: its email, else its `sub`, else that there is no account id. */
export function accountWords(view: Pick<GrantView, "grant">): string {
  const { email, subject } = view.grant;
  if (email && subject) return `${email} (sub ${subject})`;
  if (email) return email;
  if (subject) return `sub ${subject}`;
  return "not identified (no OpenID Connect)";
}
