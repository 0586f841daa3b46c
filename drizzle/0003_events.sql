CREATE TABLE "events" (
	"id" bigserial PRIMARY KEY NOT NULL,
	"type" text NOT NULL,
	"client_id" integer NOT NULL,
	"branch_id" text NOT NULL,
	"seq" integer NOT NULL,
	"status_before" text NOT NULL,
	"status_after" text NOT NULL,
	"reason" text,
	"created_at" timestamp with time zone NOT NULL,
	"delivery_state" text NOT NULL,
	"attempts" integer DEFAULT 0 NOT NULL,
	"next_attempt_at" timestamp with time zone,
	"last_attempt_at" timestamp with time zone,
	"last_error" text,
	"delivered_at" timestamp with time zone
);
--> statement-breakpoint
ALTER TABLE "clients" ADD COLUMN "event_seq" integer DEFAULT 0 NOT NULL;--> statement-breakpoint
CREATE INDEX "events_client_id_id_idx" ON "events" USING btree ("client_id","id");--> statement-breakpoint
CREATE INDEX "events_branch_id_id_idx" ON "events" USING btree ("branch_id","id");--> statement-breakpoint
CREATE INDEX "events_type_id_idx" ON "events" USING btree ("type","id");--> statement-breakpoint
CREATE INDEX "events_delivery_due_idx" ON "events" USING btree ("next_attempt_at") WHERE "events"."delivery_state" = 'pending';--> statement-breakpoint
CREATE INDEX "events_created_at_idx" ON "events" USING btree ("created_at");