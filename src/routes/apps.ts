import { createRoute, z } from "@hono/zod-openapi";
import type { App } from "../app";
import { operatorOf } from "../context";
import type { AppRow } from "../db/schema";
import { type AppSummary, getApp, listApps } from "../services/apps";
import { addApp, changeApp } from "../services/operations";
import { requireKey } from "./api-key";
import { API_KEY_SECURITY, AppBody, AppPatch, AppView, IdParam, jsonContent as json, problem } from "./schemas";

/** Apps: the OAuth clients at providers that branches use (src/services/apps.ts). Admin key only. */

const security = API_KEY_SECURITY;
const errors = {
  401: problem("Missing or wrong API key"),
  403: problem("Service key on an admin route"),
  422: problem("Invalid body or parameters"),
};

const create = createRoute({
  method: "post",
  path: "/apps",
  tags: ["apps"],
  summary: "Register an app (an OAuth client at a provider)",
  security,
  middleware: [requireKey("admin")] as const,
  request: { body: { required: true, content: json(AppBody) } },
  responses: {
    201: {
      description: "Registered",
      content: json(AppView.extend({ success: z.literal(true), message: z.string() })),
    },
    ...errors,
    409: problem("client_id already registered"),
    502: problem("The discovery document could not be read"),
  },
});

const list = createRoute({
  method: "get",
  path: "/apps",
  tags: ["apps"],
  summary: "List apps",
  security,
  middleware: [requireKey("admin")] as const,
  responses: {
    200: {
      description: "Every app",
      content: json(z.object({ success: z.literal(true), message: z.string(), apps: z.array(AppView) })),
    },
    ...errors,
  },
});

const read = createRoute({
  method: "get",
  path: "/apps/{id}",
  tags: ["apps"],
  summary: "One app",
  security,
  middleware: [requireKey("admin")] as const,
  request: { params: IdParam },
  responses: {
    200: { description: "The app", content: json(AppView.extend({ success: z.literal(true), message: z.string() })) },
    ...errors,
    404: problem("No such app"),
  },
});

const patch = createRoute({
  method: "patch",
  path: "/apps/{id}",
  tags: ["apps"],
  summary: "Change an app: a new client secret is one change for every branch of the app",
  security,
  middleware: [requireKey("admin")] as const,
  request: { params: IdParam, body: { required: true, content: json(AppPatch) } },
  responses: {
    200: { description: "Changed", content: json(AppView.extend({ success: z.literal(true), message: z.string() })) },
    ...errors,
    404: problem("No such app"),
    409: problem("Settings for a google app"),
  },
});

export function registerAppRoutes(app: App): void {
  app.openapi(create, async (c) => {
    const created = await addApp(operatorOf(c), c.req.valid("json"), new Date());
    return c.json(
      { success: true as const, message: "App registered.", ...appView({ app: created, branches: 0, grants: 0 }) },
      201,
    );
  });
  app.openapi(list, async (c) => {
    const apps = await listApps(c.var.db);
    return c.json({ success: true as const, message: `${apps.length} app(s).`, apps: apps.map(appView) }, 200);
  });
  app.openapi(read, async (c) => {
    const summary = await getApp(c.var.db, c.req.valid("param").id);
    return c.json({ success: true as const, message: "App found.", ...appView(summary) }, 200);
  });
  app.openapi(patch, async (c) => {
    const { id } = c.req.valid("param");
    const body = c.req.valid("json");
    await changeApp(operatorOf(c), id, body, new Date());
    return c.json({ success: true as const, message: "App updated.", ...appView(await getApp(c.var.db, id)) }, 200);
  });
}

export function appView({ app, branches, grants }: AppSummary | { app: AppRow; branches: number; grants: number }) {
  return {
    app_id: app.id,
    name: app.name,
    profile: app.profile,
    client_id: app.clientId,
    settings: (app.settings as Record<string, unknown> | null) ?? null,
    credentials_rejected: app.credentialsRejectedAt !== null,
    testing_suspected_at: app.testingSuspectedAt?.toISOString() ?? null,
    branches,
    grants,
    created_at: app.createdAt.toISOString(),
    updated_at: app.updatedAt.toISOString(),
  };
}
