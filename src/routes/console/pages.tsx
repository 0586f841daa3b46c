import type { EventRow } from "../../db/schema";
import { EVENT_TYPES } from "../../db/schema";
import { BRANCH_STATUSES, type BranchListPage, type BranchListQuery } from "../../services/branch-list";
import type { Flash } from "../../services/console-session";
import { Csrf, consolePath, Layout, StatusBadge, statusWords, tokenExpiryWords, When } from "./layout";

/** The console's pages other than a branch's own (src/routes/console/branch.tsx). */

export interface PageContext {
  nonce: string;
  who?: string | undefined;
  csrf?: string | undefined;
  flash?: Flash | null | undefined;
}

// ---------------------------------------------------------------------------------------------
// Sign-in and errors.

export function SignInPage(props: { page: PageContext; error?: string | undefined; accessOnly?: boolean }) {
  const { page } = props;
  return (
    <Layout
      title="Sign in"
      nonce={page.nonce}
      flash={props.error ? { tone: "error", message: props.error } : page.flash}
    >
      {props.accessOnly ? (
        <p>
          This console is behind Cloudflare Access: open it through your Access login. Signing in with an API key is
          turned off.
        </p>
      ) : (
        <form method="post" action={consolePath("/sign-in")}>
          <Csrf token={page.csrf ?? ""} />
          <div class="field">
            <label for="api_key">Admin API key</label>
            <input id="api_key" name="api_key" type="password" autocomplete="current-password" required />
          </div>
          <button type="submit">Sign in</button>
        </form>
      )}
    </Layout>
  );
}

export function ErrorPage(props: {
  page: PageContext;
  title: string;
  message: string;
  signIn?: boolean;
  /** Shown on a 5xx page: what the log line of the failure carries. */
  requestId?: string | undefined;
  /** Where the page's link leads instead of the branch list (the https console). */
  homeHref?: string | undefined;
}) {
  const { page } = props;
  return (
    <Layout title={props.title} nonce={page.nonce} who={page.who} csrf={page.csrf}>
      <p role="alert" class="flash error">
        {props.message}
      </p>
      {props.requestId !== undefined && (
        <p>
          Request ID: <code id="request-id">{props.requestId}</code>
        </p>
      )}
      <p>
        {props.signIn ? (
          <a href={consolePath("/sign-in")}>Sign in</a>
        ) : (
          <a href={props.homeHref ?? consolePath()}>Back to the branches</a>
        )}
      </p>
    </Layout>
  );
}

// ---------------------------------------------------------------------------------------------
// Branches.

export function BranchListView(props: {
  page: PageContext;
  list: BranchListPage;
  query: BranchListQuery;
  now: Date;
  nextHref: string | null;
}) {
  const { page, list, query, now } = props;
  const filtered = query.status !== undefined || query.active !== undefined || (query.search ?? "") !== "";
  return (
    <Layout title="Branches" nonce={page.nonce} who={page.who} csrf={page.csrf} flash={page.flash}>
      <section aria-label="Counts" class="counts">
        <ul>
          <li>
            <a href={consolePath()}>All: {list.counts.total}</a>
          </li>
          {BRANCH_STATUSES.map((status) => (
            <li>
              <a href={`${consolePath()}?status=${status}`} aria-current={query.status === status ? "true" : undefined}>
                {statusWords(status)}: {list.counts[status]}
              </a>
            </li>
          ))}
          <li>
            <span>Inactive: {list.counts.inactive}</span>
          </li>
        </ul>
      </section>

      <form method="get" action={consolePath()} class="filters" aria-label="Filter branches">
        <FilterSelect
          id="filter-status"
          name="status"
          label="Status"
          choices={[["", "Any"], ...BRANCH_STATUSES.map((status) => [status, statusWords(status)] as const)]}
          selected={query.status ?? ""}
        />
        <FilterSelect
          id="filter-active"
          name="active"
          label="Active"
          choices={[
            ["any", "Any"],
            ["true", "Active only"],
            ["false", "Inactive only"],
          ]}
          selected={query.active === undefined ? "any" : String(query.active)}
        />
        <div>
          <label for="filter-q">Search branch or workspace</label>
          <input id="filter-q" name="q" type="search" value={query.search ?? ""} maxlength={128} />
        </div>
        <button type="submit">Filter</button>
        {filtered && <a href={consolePath()}>Clear filters</a>}
      </form>

      <p>
        <a href={consolePath("/branches/new")}>Register a branch</a>
      </p>

      <table id="branches">
        <caption>
          {list.rows.length === 0
            ? "No branches match."
            : `Branches, those needing attention first${filtered ? " (filtered)" : ""}`}
        </caption>
        <thead>
          <tr>
            <th scope="col">Branch</th>
            <th scope="col">Workspace</th>
            <th scope="col">Status</th>
            <th scope="col">Expires in</th>
            <th scope="col">Last refresh</th>
            <th scope="col">Last error</th>
          </tr>
        </thead>
        <tbody>
          {list.rows.map((row) => (
            <tr>
              <td>
                <a href={consolePath(`/branches/${row.clientId}`)}>{row.branchId}</a>
              </td>
              <td>
                {row.workspaceName}
                <br />
                <span class="muted">{row.workspaceEmail}</span>
              </td>
              <td>
                <StatusBadge status={row.status} isActive={row.isActive} />
              </td>
              <td>{tokenExpiryWords(row, row.status, row.isActive, now)}</td>
              <td>
                <When at={row.lastRefreshedAt} now={now} />
              </td>
              <td>{row.lastError ?? <span class="muted">none</span>}</td>
            </tr>
          ))}
        </tbody>
      </table>
      <NextPage href={props.nextHref} />
    </Layout>
  );
}

// ---------------------------------------------------------------------------------------------
// Register a branch.

export const NEW_BRANCH_FIELDS = [
  { name: "client_id", label: "OAuth client ID", type: "text", required: true },
  { name: "client_secret", label: "OAuth client secret", type: "password", required: true },
  { name: "redirect_uri", label: "Redirect URI", type: "url", required: true },
  { name: "branch_id", label: "Branch ID", type: "text", required: true },
  { name: "workspace_email", label: "Workspace email", type: "email", required: true },
  { name: "workspace_name", label: "Workspace name", type: "text", required: true },
  {
    name: "scopes",
    label: "Scopes (optional, space-separated; default: the service's)",
    type: "text",
    required: false,
  },
] as const;

export type NewBranchField = (typeof NEW_BRANCH_FIELDS)[number]["name"];

export function NewBranchView(props: {
  page: PageContext;
  values: Partial<Record<NewBranchField, string>>;
  errors: Partial<Record<NewBranchField, string>>;
  defaultRedirectUri: string;
  formError?: string | undefined;
}) {
  const { page, values, errors } = props;
  return (
    <Layout title="Register a branch" nonce={page.nonce} who={page.who} csrf={page.csrf} flash={page.flash}>
      {props.formError && (
        <p role="alert" class="flash error">
          {props.formError}
        </p>
      )}
      <p>
        The same fields as <code>POST /clients</code>. Registering creates the branch's first login link, shown on its
        page.
      </p>
      <form method="post" action={consolePath("/branches")} novalidate>
        <Csrf token={page.csrf ?? ""} />
        {NEW_BRANCH_FIELDS.map((field) => {
          const error = errors[field.name];
          const value =
            field.name === "client_secret"
              ? ""
              : (values[field.name] ?? (field.name === "redirect_uri" ? props.defaultRedirectUri : ""));
          return (
            <div class="field">
              <label for={`f-${field.name}`}>{field.label}</label>
              <input
                id={`f-${field.name}`}
                name={field.name}
                type={field.type}
                value={value}
                required={field.required}
                autocomplete={field.name === "client_secret" ? "off" : undefined}
                aria-invalid={error ? "true" : undefined}
                aria-describedby={error ? `err-${field.name}` : undefined}
              />
              {error && (
                <p class="field-error" id={`err-${field.name}`}>
                  {error}
                </p>
              )}
            </div>
          );
        })}
        <button type="submit">Register</button>
      </form>
    </Layout>
  );
}

// ---------------------------------------------------------------------------------------------
// Events.

export function EventsTable(props: {
  id: string;
  caption: string;
  events: EventRow[];
  now: Date;
  csrf?: string | undefined;
  showBranch: boolean;
  canRedeliver: boolean;
}) {
  return (
    <table id={props.id}>
      <caption>{props.events.length === 0 ? `${props.caption}: none yet.` : props.caption}</caption>
      <thead>
        <tr>
          <th scope="col">Event</th>
          <th scope="col">When</th>
          {props.showBranch && <th scope="col">Branch</th>}
          <th scope="col">Type</th>
          <th scope="col">From</th>
          <th scope="col">To</th>
          <th scope="col">Reason</th>
          <th scope="col">Delivery</th>
          {props.canRedeliver && <th scope="col">Action</th>}
        </tr>
      </thead>
      <tbody>
        {props.events.map((event) => (
          <tr>
            <td class="mono">{`evt_${event.id}`}</td>
            <td>
              <When at={event.createdAt} now={props.now} />
            </td>
            {props.showBranch && (
              <td>
                <a href={`${consolePath("/events")}?branch_id=${encodeURIComponent(event.branchId)}`}>
                  {event.branchId}
                </a>
              </td>
            )}
            <td class="mono">{event.type}</td>
            <td>{statusWords(event.statusBefore)}</td>
            <td>{statusWords(event.statusAfter)}</td>
            <td>{event.reason ?? ""}</td>
            <td>
              {deliveryWords(event)}
              {event.lastError && (
                <>
                  <br />
                  <span class="muted">{event.lastError}</span>
                </>
              )}
            </td>
            {props.canRedeliver && (
              <td>
                <form method="post" action={consolePath(`/events/${event.id}/redeliver`)} class="inline">
                  <Csrf token={props.csrf ?? ""} />
                  <button type="submit" aria-label={`Redeliver evt_${event.id}`}>
                    Redeliver
                  </button>
                </form>
              </td>
            )}
          </tr>
        ))}
      </tbody>
    </table>
  );
}

function deliveryWords(event: EventRow): string {
  const attempts = `${event.attempts} attempt${event.attempts === 1 ? "" : "s"}`;
  switch (event.deliveryState) {
    case "delivered":
      return `delivered (${attempts})`;
    case "pending":
      return `pending (${attempts} so far)`;
    case "failed":
      return `failed after ${attempts}`;
    case "stopped":
      return "stopped (the receiver answered 410 Gone)";
    case "not_sent":
      return "not sent (no webhook configured)";
  }
}

export function EventLogView(props: {
  page: PageContext;
  events: EventRow[];
  filters: { branchId?: string | undefined; type?: string | undefined };
  now: Date;
  nextHref: string | null;
  canRedeliver: boolean;
}) {
  const { page, filters } = props;
  return (
    <Layout title="Events" nonce={page.nonce} who={page.who} csrf={page.csrf} flash={page.flash}>
      <form method="get" action={consolePath("/events")} class="filters" aria-label="Filter events">
        <div>
          <label for="filter-branch">Branch ID</label>
          <input id="filter-branch" name="branch_id" type="search" value={filters.branchId ?? ""} maxlength={128} />
        </div>
        <FilterSelect
          id="filter-type"
          name="type"
          label="Type"
          choices={[["", "Any"], ...EVENT_TYPES.map((type) => [type, type] as const)]}
          selected={filters.type ?? ""}
        />
        <button type="submit">Filter</button>
      </form>
      {!props.canRedeliver && (
        <p class="muted">No WEBHOOK_URL is configured: events are logged only, there is nothing to redeliver to.</p>
      )}
      <EventsTable
        id="event-log"
        caption="Events, oldest first"
        events={props.events}
        now={props.now}
        csrf={page.csrf}
        showBranch={true}
        canRedeliver={props.canRedeliver}
      />
      <NextPage href={props.nextHref} />
    </Layout>
  );
}

/** A labelled filter select; `choices` are [value, words] pairs, `selected` the current value. */
function FilterSelect(props: {
  id: string;
  name: string;
  label: string;
  choices: readonly (readonly [string, string])[];
  selected: string;
}) {
  return (
    <div>
      <label for={props.id}>{props.label}</label>
      <select id={props.id} name={props.name}>
        {props.choices.map(([value, words]) => (
          <option value={value} selected={props.selected === value}>
            {words}
          </option>
        ))}
      </select>
    </div>
  );
}

/** The "Next page" link of a cursor-paged list, when there is a next page. */
export function NextPage(props: { href: string | null | undefined }) {
  if (!props.href) return null;
  return (
    <p>
      <a href={props.href} rel="next">
        Next page
      </a>
    </p>
  );
}
