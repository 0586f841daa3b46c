import { and, asc, eq, gt, inArray, sql } from "drizzle-orm";
import type { Db } from "../db/client";
import { allTokenColumns, latestTokenOfClient } from "../db/queries";
import { apps, type ClientRow, clients, type EventType, type TokenRow, tokens } from "../db/schema";
import { AppError, constraintName, sqlState } from "../errors";
import { type Keyring, open } from "../lib/crypto";
import { describeError, logWarn } from "../lib/log";
import type { Providers } from "../oauth/profiles";
import { type ClientCredentials, type Provider, revokeToken } from "../oauth/provider";
import { appCredentials, appForRegistration, secretRotation } from "./apps";
import { clientEvent, currentStatusSql, type EventContext, noteEvents, withEvents } from "./events";

/**
 * The branch registry (the API's "clients"): each branch uses an app (src/services/apps.ts) and is
 * served from a grant (src/services/grants.ts). `client_id` in the API is the app's OAuth client id.
 */

export interface NewClient {
  clientId: string;
  clientSecret: string;
  redirectUri: string;
  branchId: string;
  workspaceEmail: string;
  workspaceName: string;
  scopes?: string | undefined;
  providerResource?: string | undefined;
}

export interface ClientChanges {
  clientSecret?: string | undefined;
  redirectUri?: string | undefined;
  workspaceEmail?: string | undefined;
  workspaceName?: string | undefined;
  scopes?: string | null | undefined;
  isActive?: boolean | undefined;
  providerResource?: string | null | undefined;
}

/** A branch with its app's OAuth client id (branches registered before apps kept their own). */
export type BranchRow = Omit<ClientRow, "clientId"> & { clientId: string };

export type ConnectionStatus = "never_connected" | "connected" | "needs_reauth" | "revoked" | "account_disabled";

export interface ClientWithToken {
  client: BranchRow;
  token: TokenRow | null;
}

export function connectionStatus(token: TokenRow | null): ConnectionStatus {
  if (!token) return "never_connected";
  // Held by Cross-Account Protection (src/services/risc.ts): not served until Google enables the account.
  if (token.heldAt && token.status !== "revoked") return "account_disabled";
  if (token.status === "active" && token.isValid) return "connected";
  return token.status === "revoked" ? "revoked" : "needs_reauth";
}

/**
 * POST /clients: a new branch of the app named by `client_id` (created on first use; a known one
 * must come with its secret, see appForRegistration). The branch stores no credentials of its own.
 */
export async function createClient(db: Db, keyring: Keyring, input: NewClient): Promise<BranchRow> {
  const app = await appForRegistration(db, keyring, {
    clientId: input.clientId,
    clientSecret: input.clientSecret,
    name: input.workspaceName,
  });
  try {
    const [row] = await db
      .insert(clients)
      .values({
        appId: app.id,
        redirectUri: input.redirectUri,
        branchId: input.branchId,
        workspaceEmail: input.workspaceEmail,
        workspaceName: input.workspaceName,
        scopes: input.scopes ?? null,
        providerResource: input.providerResource ?? null,
      })
      .returning();
    return { ...row!, clientId: app.clientId, credentialsRejectedAt: app.credentialsRejectedAt };
  } catch (error) {
    throw duplicateOr(error);
  }
}

export interface ListOptions {
  isActive?: boolean | undefined;
  limit: number;
  /** Internal id of the last client of the previous page. */
  after?: number | undefined;
}

export async function listClients(db: Db, options: ListOptions): Promise<ClientWithToken[]> {
  const conditions = [
    options.isActive === undefined ? undefined : eq(clients.isActive, options.isActive),
    options.after === undefined ? undefined : gt(clients.id, options.after),
  ].filter((c) => c !== undefined);
  const rows = await selectWithLatestToken(db)
    .where(conditions.length ? and(...conditions) : undefined)
    .orderBy(asc(clients.id))
    .limit(options.limit);
  return rows.map(toClientWithToken);
}

export async function getClient(db: Db, id: number): Promise<ClientWithToken> {
  const [row] = await selectWithLatestToken(db).where(eq(clients.id, id));
  if (!row) throw clientNotFound(id);
  return toClientWithToken(row);
}

export async function updateClient(
  db: Db,
  keyring: Keyring,
  events: EventContext,
  id: number,
  changes: ClientChanges,
  now: Date,
): Promise<ClientRow> {
  const values: Partial<typeof clients.$inferInsert> = { updatedAt: now };
  if (changes.providerResource !== undefined) values.providerResource = changes.providerResource;
  if (changes.redirectUri !== undefined) values.redirectUri = changes.redirectUri;
  if (changes.workspaceEmail !== undefined) values.workspaceEmail = changes.workspaceEmail;
  if (changes.workspaceName !== undefined) values.workspaceName = changes.workspaceName;
  if (changes.scopes !== undefined) values.scopes = changes.scopes;
  if (changes.isActive !== undefined) values.isActive = changes.isActive;
  const update = db.update(clients).set(values).where(eq(clients.id, id)).returning();
  // The secret is the app's: the old API's PATCH /clients/{id} rotates it for every branch of the app
  // (what PATCH /apps/{id} does), in the same transaction as the branch's other changes.
  const appId = changes.clientSecret === undefined ? undefined : await appIdOf(db, id);
  const secretWrites =
    appId === undefined ? [] : await secretRotation(db, keyring, events, appId, changes.clientSecret!, now);
  try {
    let row: ClientRow | undefined;
    const [first, ...more] = [
      // The app's lock first, as every change of an app's secret takes it: no deadlock with them.
      ...secretWrites,
      ...(changes.isActive === undefined ? [] : [activationEvent(db, events, id, changes.isActive, now)]),
    ];
    if (!first) [row] = await update;
    else {
      // One transaction: the events (read before the update changes the row) and the update.
      const results = await db.batch([first, ...more, update]);
      for (const result of results.slice(0, -1)) if (!Array.isArray(result)) noteEvents(events, result);
      [row] = results.at(-1) as ClientRow[];
    }
    if (!row) throw clientNotFound(id);
    return row;
  } catch (error) {
    throw duplicateOr(error);
  }
}

/** client.deactivated / client.reactivated, only when is_active actually changes. */
function activationEvent(db: Db, events: EventContext, id: number, isActive: boolean, now: Date) {
  const type: EventType = isActive ? "client.reactivated" : "client.deactivated";
  return clientEvent(
    db,
    events,
    id,
    {
      type: sql`case when ${clients.isActive} <> ${isActive} then ${type} end`,
      before: sql`case when ${clients.isActive} then 'active' else 'inactive' end`,
      after: isActive ? "active" : "inactive",
      reason: isActive ? "reactivated by an administrator" : "deactivated by an administrator",
    },
    now,
    // Concurrent changes of one client wait here, and each decides on the row the last one left:
    // of six simultaneous deactivations one writes the event.
    { lock: true },
  );
}

async function appIdOf(db: Db, id: number): Promise<number> {
  const [row] = await db.select({ appId: clients.appId }).from(clients).where(eq(clients.id, id));
  if (!row) throw clientNotFound(id);
  if (row.appId === null) throw new AppError("conflict", `Branch ${id} has no app.`);
  return row.appId;
}

/**
 * Deletes a branch. The grants only it used (its current one, and earlier ones a later consent of
 * the branch replaced) are revoked at the provider (best effort: the provider may be down or the
 * grant already dead) and deleted with it; a grant another branch is served from is kept. Deletion
 * never depends on the provider, nor on the stored values still opening.
 */
export async function deleteClient(
  db: Db,
  keyring: Keyring,
  providers: Providers,
  events: EventContext,
  id: number,
  now: Date,
): Promise<{ branchId: string; revoked: number; revocationFailures: number }> {
  const { client } = await getClient(db, id);
  const [app] = client.appId === null ? [] : await db.select().from(apps).where(eq(apps.id, client.appId));
  const held = await db
    .select()
    .from(tokens)
    .where(
      sql`(${tokens.clientId} = ${id} or ${tokens.id} = ${client.grantId ?? -1})
        and not exists (select 1 from ${clients} o where o.grant_id = ${tokens.id} and o.id <> ${id})`,
    )
    .orderBy(sql`${tokens.id} desc`);
  // Each refresh token once (a row without a new one carries the previous one over); an access
  // token only when it is current and has no refresh token (older ones expire on their own).
  const toRevoke = held.filter((token) => token.refreshToken !== null || token.isValid);
  let revoked = 0;
  let revocationFailures = 0;
  if (toRevoke.length > 0) {
    let credentials: ClientCredentials | undefined;
    let provider: Provider | undefined;
    try {
      if (!app) throw new Error("the branch has no app");
      provider = providers.of(app);
      credentials = await appCredentials(keyring, app);
    } catch (error) {
      logWarn("revocation_failed", { client: id, error: describeError(error) });
    }
    const seen = new Set<string>();
    for (const token of toRevoke) {
      try {
        if (!credentials || !provider) throw new Error("the app's secret cannot be opened");
        const value = token.refreshToken
          ? await open(keyring, token.refreshToken, { column: "tokens.refresh_token", clientId: token.clientId })
          : await open(keyring, token.accessToken, { column: "tokens.access_token", clientId: token.clientId });
        if (seen.has(value)) continue;
        seen.add(value);
        await revokeToken(provider, credentials, value, token.refreshToken ? "refresh_token" : "access_token");
        revoked++;
      } catch (error) {
        revocationFailures++;
        logWarn("revocation_failed", { client: id, token: token.id, error: describeError(error) });
      }
    }
  }
  const reason = `deleted by an administrator; ${revoked} grant(s) revoked at the provider${revocationFailures ? `, ${revocationFailures} revocation(s) failed` : ""}`;
  // One transaction: the branch goes with connection.deleted (the event has no foreign key to the
  // branch, so it outlives it), then the grants only it used.
  const [deleted] = await db.batch([
    withEvents(
      db,
      events,
      sql`delete from ${clients} c where c.id = ${id}
        returning c.id as client_id, c.branch_id, c.event_seq + 1 as seq, 'connection.deleted' as event_type,
          ${currentStatusSql("c")} as status_before, 'deleted' as status_after, ${reason}::text as reason`,
      now,
      "returned",
    ),
    db.delete(tokens).where(
      and(
        inArray(
          tokens.id,
          held.map((token) => token.id),
        ),
        sql`not exists (select 1 from ${clients} o where o.grant_id = ${tokens.id})`,
      ),
    ),
  ]);
  noteEvents(events, deleted);
  return { branchId: client.branchId, revoked, revocationFailures };
}

/** Revokes the refresh token when there is one (which revokes its access tokens), else the access token. */
export async function revokeGrant(
  keyring: Keyring,
  provider: Provider,
  credentials: ClientCredentials,
  token: TokenRow,
): Promise<void> {
  if (token.refreshToken) {
    await revokeToken(
      provider,
      credentials,
      await open(keyring, token.refreshToken, { column: "tokens.refresh_token", clientId: token.clientId }),
      "refresh_token",
    );
  } else {
    await revokeToken(
      provider,
      credentials,
      await open(keyring, token.accessToken, { column: "tokens.access_token", clientId: token.clientId }),
      "access_token",
    );
  }
}

export function clientNotFound(id: number | string): AppError {
  return new AppError("not_found", `No client with id ${id}.`);
}

/** Whole client rows with their whole latest token row (admin views; not the hot path). */
export function selectWithLatestToken(db: Db) {
  const latest = latestTokenOfClient(db);
  return db
    .select({
      client: clients,
      token: allTokenColumns(latest),
      appClientId: apps.clientId,
      appRejectedAt: apps.credentialsRejectedAt,
    })
    .from(clients)
    .leftJoin(apps, eq(apps.id, clients.appId))
    .leftJoinLateral(latest, sql`true`);
}

/** The branch as the API shows it: its app's client id and the app's rejection. */
function toClientWithToken(row: {
  client: ClientRow;
  token: TokenRow | null;
  appClientId: string | null;
  appRejectedAt: Date | null;
}): ClientWithToken {
  return {
    client: {
      ...row.client,
      clientId: row.appClientId ?? row.client.clientId ?? "",
      credentialsRejectedAt: row.appRejectedAt,
    },
    token: row.token ?? null,
  };
}

function duplicateOr(error: unknown): unknown {
  if (sqlState(error) !== "23505") return error;
  const constraint = constraintName(error) ?? "";
  if (constraint.includes("branch_id")) {
    return new AppError("conflict", "A client is already registered for this branch_id.", {
      errors: [{ field: "branch_id", message: "already registered" }],
    });
  }
  return new AppError("conflict", "This client_id is already registered.", {
    errors: [{ field: "client_id", message: "already registered" }],
  });
}
