import { DEGRADED_AFTER_FAILURES } from "../../services/events";
import { HEALTH_PERIOD_HOURS, type HealthReport } from "../../services/health-report";
import { consolePath, expiryWords, Layout, utc, When } from "./layout";
import type { PageContext } from "./pages";

/** The console's health page: the last 24 hours of refreshes, consents and webhooks, from the database. */
export function HealthView(props: { page: PageContext; report: HealthReport; now: Date; webhooks: boolean }) {
  const { page, report, now } = props;
  const { refreshes, consent, webhooks, oldestDue } = report;
  return (
    <Layout title="Health" nonce={page.nonce} who={page.who} csrf={page.csrf} flash={page.flash}>
      <p class="muted">
        The last {HEALTH_PERIOD_HOURS} hours, since{" "}
        <time datetime={report.since.toISOString()}>{utc(report.since)}</time>, from the database. Every single refresh
        and webhook attempt is counted in the METRICS Analytics Engine dataset (see the README for its SQL).
      </p>

      <h2 id="refreshes">Refreshes</h2>
      <table aria-labelledby="refreshes">
        <thead>
          <tr>
            <th scope="col">What</th>
            <th scope="col">Number</th>
          </tr>
        </thead>
        <tbody>
          <tr>
            <th scope="row">Grants refreshed at least once</th>
            <td id="health-refreshed">{refreshes.grantsRefreshed}</td>
          </tr>
          <tr>
            <th scope="row">Grants failing now (retrying in backoff)</th>
            <td id="health-failing">{refreshes.grantsFailing}</td>
          </tr>
          <tr>
            <th scope="row">… of which degraded ({DEGRADED_AFTER_FAILURES} or more failures in a row)</th>
            <td id="health-degraded">{refreshes.grantsDegraded}</td>
          </tr>
          <tr>
            <th scope="row">Connections lost (provider refused the grant)</th>
            <td id="health-lost">{refreshes.transitions.needs_reauth}</td>
          </tr>
          <tr>
            <th scope="row">Credentials rejected (invalid client)</th>
            <td id="health-rejected">{refreshes.transitions.credentials_rejected}</td>
          </tr>
          <tr>
            <th scope="row">Connections that became degraded</th>
            <td id="health-went-degraded">{refreshes.transitions.degraded}</td>
          </tr>
          <tr>
            <th scope="row">Connections that recovered</th>
            <td id="health-recovered">{refreshes.transitions.recovered}</td>
          </tr>
        </tbody>
      </table>

      <h2 id="consent">Grants needing consent</h2>
      <p id="health-needs-consent">
        {consent.needsReauth === 0 ? (
          "None: every connected branch's grant works."
        ) : (
          <>
            {consent.needsReauth} branch{consent.needsReauth === 1 ? "" : "es"} must be connected again with a new login
            link (<a href={`${consolePath()}?status=needs_reauth`}>all of them</a>).
          </>
        )}
        {consent.credentialsRejected > 0 &&
          ` ${consent.credentialsRejected} more ha${consent.credentialsRejected === 1 ? "s" : "ve"} rejected client credentials (fix the secret first).`}
      </p>
      {consent.branches.length > 0 && (
        <table aria-labelledby="consent">
          <thead>
            <tr>
              <th scope="col">Branch</th>
              <th scope="col">Workspace</th>
              <th scope="col">Last error</th>
            </tr>
          </thead>
          <tbody>
            {consent.branches.map((branch) => (
              <tr>
                <td>
                  <a href={consolePath(`/branches/${branch.clientId}`)}>{branch.branchId}</a>
                </td>
                <td>{branch.workspaceName}</td>
                <td>{branch.lastError ?? ""}</td>
              </tr>
            ))}
          </tbody>
        </table>
      )}

      <h2 id="webhooks">Webhook failures</h2>
      {!props.webhooks && <p class="muted">No WEBHOOK_URL is configured: events are logged, not sent.</p>}
      <p id="health-webhooks">
        {webhooks.failed} gave up (retries ran out) in the period; {webhooks.retrying} being retried now.
      </p>
      {webhooks.events.length > 0 && (
        <table aria-labelledby="webhooks">
          <thead>
            <tr>
              <th scope="col">Event</th>
              <th scope="col">Branch</th>
              <th scope="col">Type</th>
              <th scope="col">Delivery</th>
              <th scope="col">Last attempt</th>
              <th scope="col">Last error</th>
            </tr>
          </thead>
          <tbody>
            {webhooks.events.map((event) => (
              <tr>
                <td class="mono">{`evt_${event.id}`}</td>
                <td>
                  <a href={`${consolePath("/events")}?branch_id=${encodeURIComponent(event.branchId)}`}>
                    {event.branchId}
                  </a>
                </td>
                <td class="mono">{event.type}</td>
                <td>
                  {event.deliveryState === "failed"
                    ? `failed after ${event.attempts} attempts`
                    : `retrying (${event.attempts} so far)`}
                  {event.nextAttemptAt && event.deliveryState === "pending" && (
                    <>
                      , next <When at={event.nextAttemptAt} now={now} />
                    </>
                  )}
                </td>
                <td>
                  <When at={event.lastAttemptAt} now={now} />
                </td>
                <td>{event.lastError ?? ""}</td>
              </tr>
            ))}
          </tbody>
        </table>
      )}

      <h2 id="oldest-due">Oldest token still due</h2>
      {oldestDue === null ? (
        <p id="health-oldest-due">Nothing is due: the cron is keeping up.</p>
      ) : (
        <>
          <p class="muted">
            What the next cron run takes first (grants in backoff wait for their next attempt: see above).
          </p>
          <dl class="facts" id="health-oldest-due">
            <dt>Branch</dt>
            <dd>
              <a href={consolePath(`/branches/${oldestDue.clientId}`)}>{oldestDue.branchId}</a>
            </dd>
            <dt>Token</dt>
            <dd>
              {`${expiryWords(oldestDue.expiresAt, now)}, at `}
              <time datetime={oldestDue.expiresAt.toISOString()}>{utc(oldestDue.expiresAt)}</time>
            </dd>
            <dt>Last refreshed</dt>
            <dd>
              <When at={oldestDue.lastRefreshedAt} now={now} />
            </dd>
            <dt>Failures in a row</dt>
            <dd>{oldestDue.failureCount}</dd>
            {oldestDue.lastError && (
              <>
                <dt>Last error</dt>
                <dd>{oldestDue.lastError}</dd>
              </>
            )}
          </dl>
        </>
      )}
    </Layout>
  );
}
