import { and, asc, desc, eq, gt, sql } from "drizzle-orm";
import type { Db } from "../db/client";
import { allTokenColumns, latestTokenOfClient } from "../db/queries";
import { type ClientRow, clients, type EventType, type TokenRow, tokens } from "../db/schema";
import { AppError, constraintName, sqlState } from "../errors";
import { type Keyring, open, seal } from "../lib/crypto";
import { describeError, logWarn } from "../lib/log";
import { type ClientCredentials, type Provider, revokeToken } from "../oauth/provider";
import { clientEvent, currentStatusSql, type EventContext, noteEvents, withEvents } from "./events";

/** The client registry: one OAuth client per branch, its secret sealed at rest. */

export interface NewClient {
  clientId: string;
  clientSecret: string;
  redirectUri: string;
  branchId: string;
  workspaceEmail: string;
  workspaceName: string;
  scopes?: string | undefined;
}

export interface ClientChanges {
  clientSecret?: string | undefined;
  redirectUri?: string | undefined;
  workspaceEmail?: string | undefined;
  workspaceName?: string | undefined;
  scopes?: string | null | undefined;
  isActive?: boolean | undefined;
}

export type ConnectionStatus = "never_connected" | "connected" | "needs_reauth" | "revoked";

export interface ClientWithToken {
  client: ClientRow;
  token: TokenRow | null;
}

export function connectionStatus(token: TokenRow | null): ConnectionStatus {
  if (!token) return "never_connected";
  if (token.status === "active" && token.isValid) return "connected";
  return token.status === "revoked" ? "revoked" : "needs_reauth";
}

export async function createClient(db: Db, keyring: Keyring, input: NewClient): Promise<ClientRow> {
  // The secret is bound to the row's id, so the id is drawn from the serial's sequence first.
  const id = await nextClientId(db);
  try {
    const [row] = await db
      .insert(clients)
      .values({
        ...input,
        id,
        scopes: input.scopes ?? null,
        clientSecret: await seal(keyring, input.clientSecret, { column: "clients.client_secret", clientId: id }),
      })
      .returning();
    return row!;
  } catch (error) {
    throw duplicateOr(error);
  }
}

async function nextClientId(db: Db): Promise<number> {
  const result = await db.execute<{ id: string | number }>(
    sql`select nextval(pg_get_serial_sequence('clients', 'id')) as id`,
  );
  return Number(result.rows[0]!.id);
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
  if (changes.clientSecret !== undefined) {
    values.clientSecret = await seal(keyring, changes.clientSecret, { column: "clients.client_secret", clientId: id });
    // New credentials: whatever the provider said about the old ones no longer applies.
    values.credentialsRejectedAt = null;
  }
  if (changes.redirectUri !== undefined) values.redirectUri = changes.redirectUri;
  if (changes.workspaceEmail !== undefined) values.workspaceEmail = changes.workspaceEmail;
  if (changes.workspaceName !== undefined) values.workspaceName = changes.workspaceName;
  if (changes.scopes !== undefined) values.scopes = changes.scopes;
  if (changes.isActive !== undefined) values.isActive = changes.isActive;
  const update = db.update(clients).set(values).where(eq(clients.id, id)).returning();
  try {
    let row: ClientRow | undefined;
    const [first, ...more] = [
      ...(changes.isActive === undefined ? [] : [activationEvent(db, events, id, changes.isActive, now)]),
      ...(changes.clientSecret === undefined ? [] : [newCredentialsEvent(db, events, id, now)]),
    ];
    if (!first) [row] = await update;
    else {
      // One transaction: the events (read before the update changes the row) and the update.
      const results = await db.batch([first, ...more, update]);
      for (const result of results.slice(0, -1)) noteEvents(events, result);
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

/**
 * A new secret clears a rejection of the old one: connection.recovered, from credentials_rejected
 * to whatever the connection is without the flag (connected, degraded, needs_reauth, never_connected).
 */
function newCredentialsEvent(db: Db, events: EventContext, id: number, now: Date) {
  const before = currentStatusSql("clients");
  const after = currentStatusSql("clients", "false");
  return clientEvent(
    db,
    events,
    id,
    {
      type: sql`case when ${before} is distinct from ${after} then 'connection.recovered' end`,
      before,
      after,
      reason: "the client secret was replaced",
    },
    now,
    { lock: true },
  );
}

/**
 * Revokes at the provider (best effort: the provider may be down or the grant already dead) every
 * grant this service still holds a token of: the current one and any earlier refresh token that a
 * later consent replaced. Then deletes the client and, by cascade, its tokens. Deletion never
 * depends on the provider, nor on the stored values still opening.
 */
export async function deleteClient(
  db: Db,
  keyring: Keyring,
  provider: Provider,
  events: EventContext,
  id: number,
  now: Date,
): Promise<{ branchId: string; revoked: number; revocationFailures: number }> {
  const { client } = await getClient(db, id);
  const held = await db.select().from(tokens).where(eq(tokens.clientId, id)).orderBy(desc(tokens.id));
  // Each refresh token once (a row without a new one carries the previous one over); an access
  // token only when it is current and has no refresh token (older ones expire on their own).
  const toRevoke = held.filter((token) => token.refreshToken !== null || token.isValid);
  let revoked = 0;
  let revocationFailures = 0;
  if (toRevoke.length > 0) {
    let credentials: ClientCredentials | undefined;
    try {
      credentials = await clientCredentials(keyring, client);
    } catch (error) {
      logWarn("revocation_failed", { client: id, error: describeError(error) });
    }
    const seen = new Set<string>();
    for (const token of toRevoke) {
      try {
        if (!credentials) throw new Error("the client secret cannot be opened");
        const value = token.refreshToken
          ? await open(keyring, token.refreshToken, { column: "tokens.refresh_token", clientId: id })
          : await open(keyring, token.accessToken, { column: "tokens.access_token", clientId: id });
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
  // One statement: the client goes (its tokens by cascade) and connection.deleted is written. The
  // event has no foreign key to the client, so it outlives it.
  const deleted = await withEvents(
    db,
    events,
    sql`delete from ${clients} c where c.id = ${id}
      returning c.id as client_id, c.branch_id, c.event_seq + 1 as seq, 'connection.deleted' as event_type,
        ${currentStatusSql("c")} as status_before, 'deleted' as status_after, ${reason}::text as reason`,
    now,
    "returned",
  );
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

export async function clientCredentials(keyring: Keyring, client: ClientRow): Promise<ClientCredentials> {
  return {
    clientId: client.clientId,
    clientSecret: await open(keyring, client.clientSecret, { column: "clients.client_secret", clientId: client.id }),
  };
}

export function clientNotFound(id: number | string): AppError {
  return new AppError("not_found", `No client with id ${id}.`);
}

/** Whole client rows with their whole latest token row (admin views; not the hot path). */
export function selectWithLatestToken(db: Db) {
  const latest = latestTokenOfClient(db);
  return db
    .select({ client: clients, token: allTokenColumns(latest) })
    .from(clients)
    .leftJoinLateral(latest, sql`true`);
}

function toClientWithToken(row: { client: ClientRow; token: TokenRow | null }): ClientWithToken {
  return { client: row.client, token: row.token ?? null };
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
