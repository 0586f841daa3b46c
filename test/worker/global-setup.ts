import type { TestProject } from "vitest/node";
import { startAccessJwksServer } from "../../dev/access-jwks/server";
import { startNeonLocal } from "../../dev/neon-local/server";
import { startOAuthServer } from "../../dev/oauth-server/server";
import { startWebhookReceiver } from "../../dev/webhook-receiver/server";
import { applyMigrations } from "../../scripts/migrate";
import { startUpstream } from "./upstream";

declare module "vitest" {
  export interface ProvidedContext {
    databaseUrl: string;
    sqlEndpoint: string;
    neonLocalUrl: string;
    oauthServerUrl: string;
    oauthIssuer: string;
    webhookReceiverUrl: string;
    accessJwksUrl: string;
    upstreamUrl: string;
  }
}

/**
 * Starts, on free ports, the local database (PGlite in memory, or the PostgreSQL server named by
 * TEST_DATABASE_URL) migrated from drizzle/, the local OAuth authorization server with its
 * Google profile (tests that need the textbook behaviours, e.g. rotation, set it per client) and
 * the local webhook receiver (dev/webhook-receiver: tests point WEBHOOK_URL at an inbox of their own).
 */
export default async function setup(project: TestProject) {
  const postgresUrl = process.env.TEST_DATABASE_URL;
  const db = await startNeonLocal({
    backend: postgresUrl ? { kind: "postgres", url: postgresUrl } : { kind: "pglite" },
  });
  if (postgresUrl) await resetPostgres(db.sqlEndpoint, db.connectionString);
  await applyMigrations(db.connectionString, db.sqlEndpoint);
  const oauth = await startOAuthServer({ profile: "google" });
  const receiver = await startWebhookReceiver();
  const accessJwks = await startAccessJwksServer();
  // A provider API stand-in for the proxy's tests (test/worker/upstream.ts).
  const upstream = await startUpstream();
  console.log(
    `worker tests: database ${postgresUrl ? "PostgreSQL" : "PGlite (memory)"} at ${db.url}, OAuth server at ${oauth.url}`,
  );

  project.provide("databaseUrl", db.connectionString);
  project.provide("sqlEndpoint", db.sqlEndpoint);
  project.provide("neonLocalUrl", db.url);
  project.provide("oauthServerUrl", oauth.url);
  project.provide("oauthIssuer", oauth.issuer);
  project.provide("webhookReceiverUrl", receiver.url);
  project.provide("accessJwksUrl", accessJwks.url);
  project.provide("upstreamUrl", upstream.url);

  return async () => {
    await upstream.close();
    await accessJwks.close();
    await receiver.close();
    await oauth.close();
    await db.close();
  };
}

/** A PostgreSQL server keeps data between runs: start each run from an empty schema. */
async function resetPostgres(sqlEndpoint: string, connectionString: string): Promise<void> {
  for (const query of ["DROP SCHEMA IF EXISTS drizzle CASCADE", "DROP SCHEMA public CASCADE", "CREATE SCHEMA public"]) {
    const response = await fetch(sqlEndpoint, {
      method: "POST",
      headers: {
        "Neon-Connection-String": connectionString,
        "Neon-Array-Mode": "true",
        "Neon-Raw-Text-Output": "true",
      },
      body: JSON.stringify({ query, params: [] }),
    });
    if (!response.ok) throw new Error(`resetting the test database failed: ${await response.text()}`);
  }
}
