CREATE TABLE "security_events" (
	"issuer" text NOT NULL,
	"jti" text NOT NULL,
	"audience" text NOT NULL,
	"event_types" text NOT NULL,
	"verification_state" text,
	"issued_at" timestamp with time zone NOT NULL,
	"received_at" timestamp with time zone NOT NULL,
	"receipt" text NOT NULL,
	CONSTRAINT "security_events_issuer_jti_pk" PRIMARY KEY("issuer","jti")
);
--> statement-breakpoint
CREATE INDEX "security_events_issued_at_idx" ON "security_events" USING btree ("issued_at");--> statement-breakpoint
CREATE INDEX "security_events_verification_state_idx" ON "security_events" USING btree ("verification_state") WHERE "security_events"."verification_state" is not null;