CREATE TABLE "apps" (
	"id" serial PRIMARY KEY NOT NULL,
	"name" text NOT NULL,
	"profile" text DEFAULT 'google' NOT NULL,
	"client_id" text NOT NULL,
	"client_secret" text NOT NULL,
	"settings" jsonb,
	"credentials_rejected_at" timestamp with time zone,
	"testing_suspected_at" timestamp with time zone,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	"updated_at" timestamp with time zone DEFAULT now() NOT NULL,
	CONSTRAINT "apps_client_id_unique" UNIQUE("client_id")
);
--> statement-breakpoint
ALTER TABLE "tokens" DROP CONSTRAINT "tokens_client_id_clients_id_fk";
--> statement-breakpoint
DROP INDEX "tokens_one_valid_per_client_idx";--> statement-breakpoint
ALTER TABLE "clients" ALTER COLUMN "client_id" DROP NOT NULL;--> statement-breakpoint
ALTER TABLE "clients" ALTER COLUMN "client_secret" DROP NOT NULL;--> statement-breakpoint
ALTER TABLE "clients" ADD COLUMN "app_id" integer;--> statement-breakpoint
ALTER TABLE "clients" ADD COLUMN "grant_id" integer;--> statement-breakpoint
ALTER TABLE "clients" ADD COLUMN "provider_resource" text;--> statement-breakpoint
ALTER TABLE "events" ADD COLUMN "grant_id" integer;--> statement-breakpoint
ALTER TABLE "tokens" ADD COLUMN "app_id" integer;--> statement-breakpoint
ALTER TABLE "tokens" ADD COLUMN "subject" text;--> statement-breakpoint
ALTER TABLE "tokens" ADD COLUMN "email" text;--> statement-breakpoint
ALTER TABLE "tokens" ADD COLUMN "consented_at" timestamp with time zone;--> statement-breakpoint
ALTER TABLE "tokens" ADD COLUMN "refresh_token_expires_at" timestamp with time zone;--> statement-breakpoint
ALTER TABLE "tokens" ADD COLUMN "expiry_warned_at" timestamp with time zone;--> statement-breakpoint
ALTER TABLE "tokens" ADD COLUMN "refresh_tokens_minted" integer DEFAULT 0 NOT NULL;--> statement-breakpoint
ALTER TABLE "clients" ADD CONSTRAINT "clients_app_id_apps_id_fk" FOREIGN KEY ("app_id") REFERENCES "public"."apps"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "clients" ADD CONSTRAINT "clients_grant_id_tokens_id_fk" FOREIGN KEY ("grant_id") REFERENCES "public"."tokens"("id") ON DELETE set null ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "tokens" ADD CONSTRAINT "tokens_app_id_apps_id_fk" FOREIGN KEY ("app_id") REFERENCES "public"."apps"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
CREATE INDEX "clients_grant_id_idx" ON "clients" USING btree ("grant_id");--> statement-breakpoint
CREATE INDEX "clients_app_id_idx" ON "clients" USING btree ("app_id");--> statement-breakpoint
CREATE UNIQUE INDEX "tokens_app_subject_idx" ON "tokens" USING btree ("app_id","subject") WHERE "tokens"."subject" is not null;--> statement-breakpoint
-- Data (hand-written): every client of the previous release becomes an app of the `google` profile
-- with the same id (its sealed secret, bound to that id, opens unchanged), and the branch of that app;
-- every token row becomes a grant of its client's app, and each branch points at its latest one.
INSERT INTO "apps" ("id", "name", "profile", "client_id", "client_secret", "credentials_rejected_at", "created_at", "updated_at")
  SELECT "id", "workspace_name", 'google', "client_id", "client_secret", "credentials_rejected_at", "created_at", "updated_at"
  FROM "clients" WHERE "client_id" IS NOT NULL AND "client_secret" IS NOT NULL;--> statement-breakpoint
SELECT setval(pg_get_serial_sequence('apps', 'id'), GREATEST((SELECT max("id") FROM "apps"), (SELECT last_value FROM clients_id_seq), 1));--> statement-breakpoint
UPDATE "clients" SET "app_id" = "id" WHERE "client_id" IS NOT NULL AND "client_secret" IS NOT NULL;--> statement-breakpoint
UPDATE "tokens" SET "app_id" = "client_id" WHERE EXISTS (SELECT 1 FROM "apps" WHERE "apps"."id" = "tokens"."client_id");--> statement-breakpoint
UPDATE "clients" SET "grant_id" = (SELECT max("t"."id") FROM "tokens" "t" WHERE "t"."client_id" = "clients"."id");
