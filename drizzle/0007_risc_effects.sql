ALTER TABLE "tokens" ADD COLUMN "refresh_token_prefix_digest" text;--> statement-breakpoint
ALTER TABLE "tokens" ADD COLUMN "refresh_token_digest" text;--> statement-breakpoint
ALTER TABLE "tokens" ADD COLUMN "held_at" timestamp with time zone;--> statement-breakpoint
ALTER TABLE "tokens" ADD COLUMN "held_reason" text;--> statement-breakpoint
CREATE INDEX "tokens_app_refresh_token_digest_idx" ON "tokens" USING btree ("app_id","refresh_token_digest") WHERE "tokens"."refresh_token_digest" is not null;--> statement-breakpoint
CREATE INDEX "tokens_app_refresh_token_prefix_digest_idx" ON "tokens" USING btree ("app_id","refresh_token_prefix_digest") WHERE "tokens"."refresh_token_prefix_digest" is not null;