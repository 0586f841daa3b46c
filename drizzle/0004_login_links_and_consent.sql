ALTER TABLE "clients" ADD COLUMN "login_links_valid_after" timestamp with time zone;--> statement-breakpoint
ALTER TABLE "clients" ADD COLUMN "consent_problem" text;--> statement-breakpoint
ALTER TABLE "clients" ADD COLUMN "consent_problem_detail" text;--> statement-breakpoint
ALTER TABLE "clients" ADD COLUMN "consent_problem_at" timestamp with time zone;