ALTER TABLE "clients" ADD COLUMN "scopes" text;--> statement-breakpoint
ALTER TABLE "clients" ADD COLUMN "credentials_rejected_at" timestamp with time zone;--> statement-breakpoint
ALTER TABLE "tokens" ADD COLUMN "status" text DEFAULT 'active' NOT NULL;--> statement-breakpoint
ALTER TABLE "tokens" ADD COLUMN "lifetime_seconds" integer;--> statement-breakpoint
ALTER TABLE "tokens" ADD COLUMN "lease_owner" text;--> statement-breakpoint
ALTER TABLE "tokens" ADD COLUMN "lease_expires_at" timestamp with time zone;--> statement-breakpoint
ALTER TABLE "tokens" ADD COLUMN "failure_count" integer DEFAULT 0 NOT NULL;--> statement-breakpoint
ALTER TABLE "tokens" ADD COLUMN "last_error" text;--> statement-breakpoint
ALTER TABLE "tokens" ADD COLUMN "next_attempt_at" timestamp with time zone;--> statement-breakpoint
ALTER TABLE "tokens" ADD COLUMN "state_nonce" text;--> statement-breakpoint
CREATE INDEX "tokens_refresh_due_idx" ON "tokens" USING btree ("expires_at") WHERE "tokens"."is_valid" and "tokens"."status" = 'active';--> statement-breakpoint
ALTER TABLE "tokens" ADD CONSTRAINT "tokens_state_nonce_unique" UNIQUE("state_nonce");