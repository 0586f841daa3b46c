import { defineConfig } from "drizzle-kit";

// `npm run db:generate` writes SQL into drizzle/ from src/db/schema.ts; commit it, never edit a
// migration that shipped. Migrations are applied by scripts/migrate.ts (`npm run db:migrate`),
// which goes through the same Neon HTTP driver as the Worker.
export default defineConfig({
  dialect: "postgresql",
  schema: "./src/db/schema.ts",
  out: "./drizzle",
  casing: "snake_case",
  strict: true,
  verbose: true,
});
