import { sql } from "drizzle-orm";
import {
  type AnyPgColumn,
  bigserial,
  boolean,
  index,
  integer,
  jsonb,
  pgTable,
  primaryKey,
  serial,
  text,
  timestamp,
  uniqueIndex,
} from "drizzle-orm/pg-core";

export const TOKEN_STATUSES = ["active", "needs_reauth", "revoked"] as const;
/** Why the last consent stored nothing (see src/services/authorization.ts). */
export const CONSENT_PROBLEMS = ["scopes_not_granted", "no_refresh_token"] as const;

export const APP_PROFILES = ["google", "oauth2"] as const;
export type AppProfile = (typeof APP_PROFILES)[number];

/**
 * An OAuth client at a provider (src/services/apps.ts): its client id, its sealed secret and its
 * provider profile (src/oauth/profiles.ts). Many branches share one app.
 */
export const apps = pgTable("apps", {
  id: serial("id").primaryKey(),
  name: text("name").notNull(),
  /** `google`: the provider the OAUTH_* variables describe; `oauth2`: the provider in `settings`. */
  profile: text("profile", { enum: APP_PROFILES }).notNull().default("google"),
  clientId: text("client_id").notNull().unique(),
  /** Sealed with the token encryption key, bound to this row's id (label `clients.client_secret`). */
  clientSecret: text("client_secret").notNull(),
  /** The `oauth2` profile's provider (issuer, endpoints, scopes…); null for `google`. */
  settings: jsonb("settings"),
  /** Set when the provider answered `invalid_client`: the app's credentials need fixing. */
  credentialsRejectedAt: timestamp("credentials_rejected_at", { withTimezone: true }),
  /** A grant of this google app died about 7 days after its consent: probably in Testing publishing status. */
  testingSuspectedAt: timestamp("testing_suspected_at", { withTimezone: true }),
  createdAt: timestamp("created_at", { withTimezone: true }).notNull().defaultNow(),
  updatedAt: timestamp("updated_at", { withTimezone: true }).notNull().defaultNow(),
});

/**
 * Branches (business locations; the API calls them clients). A branch uses an app and points at the
 * grant it is served from (`grant_id`); many branches may share one grant.
 */
export const clients = pgTable(
  "clients",
  {
    id: serial("id").primaryKey(),
    /** Before apps (migration 0006): the branch's own OAuth client. Null for branches registered since. */
    clientId: text("client_id").unique(),
    /** Before apps: the branch's own sealed secret. Null for branches registered since. */
    clientSecret: text("client_secret"),
    appId: integer("app_id").references(() => apps.id),
    /** The grant this branch is served from; null while it was never connected. */
    grantId: integer("grant_id").references((): AnyPgColumn => tokens.id, { onDelete: "set null" }),
    /** What the branch stands for at the provider (Google Business Profile: `accounts/…/locations/…`). */
    providerResource: text("provider_resource"),
    redirectUri: text("redirect_uri").notNull(),
    branchId: text("branch_id").notNull().unique(),
    workspaceEmail: text("workspace_email").notNull(),
    workspaceName: text("workspace_name").notNull(),
    /** Space-separated scopes for this client; null means OAUTH_SCOPES. */
    scopes: text("scopes"),
    isActive: boolean("is_active").notNull().default(true),
    /**
     * Nonce of the last authorization state presented at the callback. Claiming it with one
     * conditional UPDATE lets only one of two concurrent callbacks for the same state exchange the code.
     */
    lastStateNonce: text("last_state_nonce"),
    /** Set when the provider answered `invalid_client`: the stored credentials need fixing. */
    credentialsRejectedAt: timestamp("credentials_rejected_at", { withTimezone: true }),
    /**
     * Sequence number of the branch's latest event (see `events.seq`). Bumped in the statement that
     * writes the event, so the row lock orders concurrent events of one branch.
     */
    eventSeq: integer("event_seq").notNull().default(0),
    /**
     * Login links issued (and admin-started consents begun) before this instant no longer work.
     * Revoking links moves it to now; a consent that stores tokens moves it past its link's issue
     * time in the same transaction, so a link is single use and of two racing callbacks one stores.
     */
    loginLinksValidAfter: timestamp("login_links_valid_after", { withTimezone: true }),
    /** The last consent stored nothing because of this (cleared when one stores tokens). */
    consentProblem: text("consent_problem", { enum: CONSENT_PROBLEMS }),
    consentProblemDetail: text("consent_problem_detail"),
    consentProblemAt: timestamp("consent_problem_at", { withTimezone: true }),
    createdAt: timestamp("created_at", { withTimezone: true }).notNull().defaultNow(),
    updatedAt: timestamp("updated_at", { withTimezone: true }).notNull().defaultNow(),
  },
  (t) => [index("clients_grant_id_idx").on(t.grantId), index("clients_app_id_idx").on(t.appId)],
);

/**
 * Grants (src/services/grants.ts): a provider account's authorization on an app, with its tokens,
 * status, refresh lease and failure record. Branches point at it (`clients.grant_id`).
 */
export const tokens = pgTable(
  "tokens",
  {
    id: serial("id").primaryKey(),
    /**
     * The branch whose consent created the grant. The sealed tokens are bound to this id (see
     * src/lib/crypto.ts), so it never changes, even when that branch is deleted.
     */
    clientId: integer("client_id").notNull(),
    appId: integer("app_id").references(() => apps.id),
    /** The account at the provider: the ID token's `sub`; null without OpenID Connect (one grant per consent). */
    subject: text("subject"),
    /** The account's email from the ID token, for display. */
    email: text("email"),
    /** The last consent that stored tokens on this grant. */
    consentedAt: timestamp("consented_at", { withTimezone: true }),
    /** Time-limited access (`refresh_token_expires_in`): when the refresh token stops working. */
    refreshTokenExpiresAt: timestamp("refresh_token_expires_at", { withTimezone: true }),
    /** When connection.expiring was written for the current end of access. */
    expiryWarnedAt: timestamp("expiry_warned_at", { withTimezone: true }),
    /** Refresh tokens the provider minted for this (app, account) through this service. */
    refreshTokensMinted: integer("refresh_tokens_minted").notNull().default(0),
    /** Sealed; see clients.clientSecret. */
    accessToken: text("access_token").notNull(),
    /** Sealed; null when the provider never issued one. */
    refreshToken: text("refresh_token"),
    /**
     * What a Cross-Account Protection token-revoked event names the refresh token by, never the token:
     * base64 SHA-256 of its first 16 characters (`prefix`), and base64 SHA-512 of its SHA-512 (Google's
     * `hash_base64_sha512_sha512`). Written with every refresh token; null for tokens stored before.
     */
    refreshTokenPrefixDigest: text("refresh_token_prefix_digest"),
    refreshTokenDigest: text("refresh_token_digest"),
    /**
     * Google disabled the account for hijacking (Cross-Account Protection): reads answer 409
     * account_disabled and refreshes pause until account-enabled clears it. The status stays as it was.
     */
    heldAt: timestamp("held_at", { withTimezone: true }),
    heldReason: text("held_reason"),
    tokenType: text("token_type").notNull().default("Bearer"),
    scope: text("scope"),
    expiresAt: timestamp("expires_at", { withTimezone: true }).notNull(),
    isValid: boolean("is_valid").notNull().default(true),
    createdAt: timestamp("created_at", { withTimezone: true }).notNull().defaultNow(),
    lastRefreshedAt: timestamp("last_refreshed_at", { withTimezone: true }),
    /** `active`, `needs_reauth` (the grant is dead) or `revoked` (by an operator). */
    status: text("status", { enum: TOKEN_STATUSES }).notNull().default("active"),
    /** Lifetime the provider granted at the last issue, for the refresh-ahead rule. */
    lifetimeSeconds: integer("lifetime_seconds"),
    /** Single-flight refresh: whoever holds an unexpired lease is the one refreshing. */
    leaseOwner: text("lease_owner"),
    leaseExpiresAt: timestamp("lease_expires_at", { withTimezone: true }),
    /** Transient refresh failures (429, 5xx, timeouts) and the backoff they imply. */
    failureCount: integer("failure_count").notNull().default(0),
    lastError: text("last_error"),
    nextAttemptAt: timestamp("next_attempt_at", { withTimezone: true }),
    /** Nonce of the authorization state that created the row: a state is usable once. */
    stateNonce: text("state_nonce").unique(),
  },
  (t) => [
    index("tokens_client_id_id_idx").on(t.clientId, t.id),
    index("tokens_refresh_due_idx").on(t.expiresAt).where(sql`${t.isValid} and ${t.status} = 'active'`),
    uniqueIndex("tokens_app_subject_idx").on(t.appId, t.subject).where(sql`${t.subject} is not null`),
    index("tokens_app_refresh_token_digest_idx")
      .on(t.appId, t.refreshTokenDigest)
      .where(sql`${t.refreshTokenDigest} is not null`),
    index("tokens_app_refresh_token_prefix_digest_idx")
      .on(t.appId, t.refreshTokenPrefixDigest)
      .where(sql`${t.refreshTokenPrefixDigest} is not null`),
  ],
);

export const EVENT_TYPES = [
  "connection.created",
  "connection.reauthorized",
  "connection.needs_reauth",
  "connection.credentials_rejected",
  "connection.degraded",
  "connection.recovered",
  "connection.revoked",
  "connection.account_disabled",
  "connection.deleted",
  "connection.expiring",
  "grant.token_limit_near",
  "client.deactivated",
  "client.reactivated",
] as const;
export type EventType = (typeof EVENT_TYPES)[number];

/**
 * `pending` (to deliver; `next_attempt_at` says when), `delivered` (a 2xx), `failed` (the retry
 * ladder ran out; redeliverable), `stopped` (the receiver answered 410 Gone), `not_sent` (no
 * WEBHOOK_URL was configured when it happened: logged only).
 */
export const DELIVERY_STATES = ["pending", "delivered", "failed", "stopped", "not_sent"] as const;
export type DeliveryState = (typeof DELIVERY_STATES)[number];

/**
 * Connection events: one row per change of a branch's state, written in the same statement or
 * batch as the change. No foreign key to clients on purpose: `connection.deleted` outlives its client.
 */
export const events = pgTable(
  "events",
  {
    /** Sortable: the log's cursor and the Standard Webhooks `webhook-id` (`evt_<id>`). */
    id: bigserial("id", { mode: "number" }).primaryKey(),
    type: text("type", { enum: EVENT_TYPES }).notNull(),
    /** Internal client id (the API's client_id). */
    clientId: integer("client_id").notNull(),
    /** The branch as callers name it in /tokens/{branch_id}; copied so it survives the client. */
    branchId: text("branch_id").notNull(),
    /** The grant the change happened to, when it was one. */
    grantId: integer("grant_id"),
    /** Per-branch order (1, 2, …), visible even when deliveries overtake each other. */
    seq: integer("seq").notNull(),
    statusBefore: text("status_before").notNull(),
    statusAfter: text("status_after").notNull(),
    reason: text("reason"),
    createdAt: timestamp("created_at", { withTimezone: true }).notNull(),
    deliveryState: text("delivery_state", { enum: DELIVERY_STATES }).notNull(),
    attempts: integer("attempts").notNull().default(0),
    /** When pending: the next attempt; while an attempt runs, the end of its claim. */
    nextAttemptAt: timestamp("next_attempt_at", { withTimezone: true }),
    lastAttemptAt: timestamp("last_attempt_at", { withTimezone: true }),
    /** The last attempt's failure (HTTP status or network error), never a secret. */
    lastError: text("last_error"),
    deliveredAt: timestamp("delivered_at", { withTimezone: true }),
  },
  (t) => [
    index("events_client_id_id_idx").on(t.clientId, t.id),
    index("events_branch_id_id_idx").on(t.branchId, t.id),
    index("events_type_id_idx").on(t.type, t.id),
    index("events_delivery_due_idx").on(t.nextAttemptAt).where(sql`${t.deliveryState} = 'pending'`),
    index("events_created_at_idx").on(t.createdAt),
  ],
);

/**
 * Security Event Tokens received from Google (Cross-Account Protection, src/services/risc.ts), one
 * row per (issuer, jti): a token is acted on once, in the statement batch that records it, so a
 * redelivery changes nothing. Pruned by the cron once a redelivery would be refused for its age
 * anyway (iat older than 7 days: see pruneSecurityEvents).
 */
export const securityEvents = pgTable(
  "security_events",
  {
    issuer: text("issuer").notNull(),
    jti: text("jti").notNull(),
    /** The app client id it was addressed to. */
    audience: text("audience").notNull(),
    /** The event type URIs it carried, space-separated. */
    eventTypes: text("event_types").notNull(),
    /** A verification event's `state` (`npm run risc:verify` waits for it). */
    verificationState: text("verification_state"),
    /** The token's `iat`. */
    issuedAt: timestamp("issued_at", { withTimezone: true }).notNull(),
    receivedAt: timestamp("received_at", { withTimezone: true }).notNull(),
    /** Random per delivery: the batch's later statements act only if this delivery's row was the one inserted. */
    receipt: text("receipt").notNull(),
  },
  (t) => [
    primaryKey({ columns: [t.issuer, t.jti] }),
    index("security_events_issued_at_idx").on(t.issuedAt),
    index("security_events_verification_state_idx")
      .on(t.verificationState)
      .where(sql`${t.verificationState} is not null`),
  ],
);

export type EventRow = typeof events.$inferSelect;
export type ClientRow = typeof clients.$inferSelect;
export type TokenRow = typeof tokens.$inferSelect;
export type AppRow = typeof apps.$inferSelect;
