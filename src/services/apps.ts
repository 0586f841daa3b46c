import { and, asc, eq, like, sql } from "drizzle-orm";
import type { Db } from "../db/client";
import { type AppProfile, type AppRow, apps, clients, tokens } from "../db/schema";
import { AppError, constraintName, sqlState } from "../errors";
import { type Keyring, matchesAny, open, seal } from "../lib/crypto";
import type { ClientCredentials } from "../oauth/provider";
import { connectionStatusOf, type EventContext, noteEvents, withEvents } from "./events";

/** The last_error prefix of a parked grant (kept here: tokens.ts imports this file). */
export const SEALED_VALUE_PARKED = "sealed value unreadable";

/**
 * Apps: OAuth clients at a provider. Many branches use one app; its secret is sealed once, bound to
 * the app's id (label `clients.client_secret`, as before apps, so rows migrated from per-branch
 * clients open unchanged), and rotating it is one change for every branch.
 */

export interface NewApp {
  name: string;
  profile: AppProfile;
  clientId: string;
  clientSecret: string;
  /** The `oauth2` profile's provider settings (validated by src/oauth/profiles.ts). */
  settings?: Record<string, unknown> | null | undefined;
}

export interface AppChanges {
  name?: string | undefined;
  clientSecret?: string | undefined;
  settings?: Record<string, unknown> | undefined;
}

export interface AppSummary {
  app: AppRow;
  branches: number;
  grants: number;
}

// Written out qualified: in a select from one table drizzle renders columns unqualified, and
// `app_id = id` inside the subquery would then compare the branch's own columns.
const SUMMARY = {
  app: apps,
  branches: sql<number>`(select count(*) from clients c where c.app_id = "apps"."id")`.mapWith(Number),
  grants:
    sql<number>`(select count(*) from tokens t where t.app_id = "apps"."id" and t.is_valid and t.status = 'active')`.mapWith(
      Number,
    ),
};

export async function createApp(db: Db, keyring: Keyring, input: NewApp): Promise<AppRow> {
  const id = await nextAppId(db);
  try {
    const [row] = await db
      .insert(apps)
      .values({
        id,
        name: input.name,
        profile: input.profile,
        clientId: input.clientId,
        clientSecret: await sealSecret(keyring, id, input.clientSecret),
        settings: input.settings ?? null,
      })
      .returning();
    return row!;
  } catch (error) {
    if (sqlState(error) === "23505" && (constraintName(error) ?? "").includes("client_id")) {
      throw new AppError("conflict", `An app with client_id ${input.clientId} is already registered.`, {
        errors: [{ field: "client_id", message: "already registered" }],
      });
    }
    throw error;
  }
}

/**
 * POST /clients (the old API): the app a new branch uses. A client_id already known is that app
 * when the secret matches, a 409 naming the secret when it does not; an unknown one becomes a new
 * app of the `google` profile, named after the branch's workspace.
 */
export async function appForRegistration(
  db: Db,
  keyring: Keyring,
  input: { clientId: string; clientSecret: string; name: string },
): Promise<AppRow> {
  for (let attempt = 0; attempt < 2; attempt++) {
    const [known] = await db.select().from(apps).where(eq(apps.clientId, input.clientId));
    if (known) {
      if (await matchesAny(input.clientSecret, [await openSecret(keyring, known)])) return known;
      throw new AppError(
        "conflict",
        `client_id ${input.clientId} is already registered (app ${known.id}) with another client_secret. Register the branch with the app's current secret, or rotate the app's secret with PATCH /token-management/apps/${known.id}.`,
        { errors: [{ field: "client_secret", message: "does not match the registered app's secret" }] },
      );
    }
    try {
      return await createApp(db, keyring, { ...input, profile: "google" });
    } catch (error) {
      // Another registration created it meanwhile: compare against that one.
      if (!(error instanceof AppError && error.code === "conflict") || attempt > 0) throw error;
    }
  }
  throw new AppError("conflict", `client_id ${input.clientId} is being registered concurrently; retry.`);
}

export async function listApps(db: Db): Promise<AppSummary[]> {
  return db.select(SUMMARY).from(apps).orderBy(asc(apps.id));
}

/** The branches using an app, oldest first, at most `limit` (the console's app page). */
export async function listAppBranches(db: Db, appId: number, limit: number) {
  return db
    .select({
      id: clients.id,
      branchId: clients.branchId,
      grantId: clients.grantId,
      providerResource: clients.providerResource,
      isActive: clients.isActive,
    })
    .from(clients)
    .where(eq(clients.appId, appId))
    .orderBy(asc(clients.id))
    .limit(limit);
}

export async function getApp(db: Db, id: number): Promise<AppSummary> {
  const [row] = await db.select(SUMMARY).from(apps).where(eq(apps.id, id));
  if (!row) throw appNotFound(id);
  return row;
}

/**
 * PATCH /apps/{id}. A new secret clears the provider's rejection of the old one; every branch whose
 * connection that changes (credentials_rejected before) gets connection.recovered, in the same
 * transaction as the change.
 */
export async function updateApp(
  db: Db,
  keyring: Keyring,
  events: EventContext,
  id: number,
  changes: AppChanges,
  now: Date,
): Promise<AppRow> {
  const values: Partial<typeof apps.$inferInsert> = { updatedAt: now };
  if (changes.name !== undefined) values.name = changes.name;
  if (changes.settings !== undefined) values.settings = changes.settings;
  const update = db.update(apps).set(values).where(eq(apps.id, id)).returning();
  if (changes.clientSecret === undefined) {
    const [row] = await update;
    if (!row) throw appNotFound(id);
    return row;
  }
  const results = await db.batch([
    ...(await secretRotation(db, keyring, events, id, changes.clientSecret, now)),
    update,
  ]);
  for (const result of results.slice(0, -1)) if (!Array.isArray(result)) noteEvents(events, result);
  const [row] = results.at(-1) as AppRow[];
  if (!row) throw appNotFound(id);
  return row;
}

/**
 * connection.recovered for each branch of the app that stood credentials_rejected, from that to
 * what the connection is without the flag. Runs before the update in its batch (it reads the flag
 * the update clears).
 */
export function secretRecoveryEvents(db: Db, events: EventContext, appId: number, now: Date) {
  const after = sql`(select ${connectionStatusOf("t", "false")} from (select 1) one left join ${tokens} t on t.id = c.grant_id)`;
  return withEvents(
    db,
    events,
    sql`update ${clients} c set event_seq = c.event_seq + 1
      from ${apps} a
      where a.id = ${appId} and c.app_id = a.id and a.credentials_rejected_at is not null
        and not exists (select 1 from ${tokens} rt where rt.id = c.grant_id and rt.status = 'revoked')
      returning c.id as client_id, c.branch_id, c.event_seq as seq, 'connection.recovered' as event_type,
        'credentials_rejected' as status_before, ${after} as status_after,
        'the app''s client secret was replaced' as reason`,
    now,
    "returned",
  );
}

/**
 * The statements that give an app a new secret, to run first in one batch (PATCH /apps/{id}, and
 * PATCH /clients/{id} of any of its branches): the app's lock, connection.recovered for each branch
 * that stood credentials_rejected, its parked grants back in the schedule, the sealed secret with
 * the provider's rejection of the old one cleared.
 */
export async function secretRotation(
  db: Db,
  keyring: Keyring,
  events: EventContext,
  appId: number,
  secret: string,
  now: Date,
) {
  return [
    lockApp(db, appId),
    secretRecoveryEvents(db, events, appId, now),
    unparkGrants(db, appId),
    db
      .update(apps)
      .set({ clientSecret: await sealSecret(keyring, appId, secret), credentialsRejectedAt: null, updatedAt: now })
      .where(eq(apps.id, appId)),
  ] as const;
}

/**
 * The first statement of a batch that changes an app's secret: concurrent changes of one app then
 * run one after the other (each statement after the lock sees what the previous change committed),
 * so of six simultaneous rotations of a rejected app one writes the recovery events, and none
 * deadlocks on the branch rows the events bump.
 */
export function lockApp(db: Db, appId: number) {
  return db.execute(sql`select id from ${apps} where id = ${appId} for update`);
}

/**
 * A new secret is the fix for grants the scheduler parked because a stored value did not open: they
 * are tried again at the next run (src/services/tokens.ts parkedStatements).
 */
export function unparkGrants(db: Db, appId: number) {
  return db
    .update(tokens)
    .set({ nextAttemptAt: null })
    .where(and(eq(tokens.appId, appId), like(tokens.lastError, `${SEALED_VALUE_PARKED}%`)));
}

export async function appCredentials(keyring: Keyring, app: Pick<AppRow, "id" | "clientId" | "clientSecret">) {
  return { clientId: app.clientId, clientSecret: await openSecret(keyring, app) } satisfies ClientCredentials;
}

export function openSecret(keyring: Keyring, app: Pick<AppRow, "id" | "clientSecret">): Promise<string> {
  return open(keyring, app.clientSecret, { column: "clients.client_secret", clientId: app.id });
}

function sealSecret(keyring: Keyring, appId: number, secret: string): Promise<string> {
  return seal(keyring, secret, { column: "clients.client_secret", clientId: appId });
}

/** The app's id is drawn first: its sealed secret is bound to it. */
async function nextAppId(db: Db): Promise<number> {
  const result = await db.execute<{ id: string | number }>(
    sql`select nextval(pg_get_serial_sequence('apps', 'id')) as id`,
  );
  return Number(result.rows[0]!.id);
}

export function appNotFound(id: number | string): AppError {
  return new AppError("not_found", `No app with id ${id}.`);
}
