import { z } from "@hono/zod-openapi";
import type { ClientChanges, NewClient } from "../services/clients";

/** RFC 9457 problem details, plus `success`/`message` for callers of the old service. */
export const ProblemSchema = z
  .object({
    type: z.string(),
    title: z.string(),
    status: z.number().int(),
    detail: z.string(),
    code: z.string(),
    success: z.literal(false),
    message: z.string(),
    request_id: z.string().optional(),
    errors: z.array(z.object({ field: z.string(), message: z.string() })).optional(),
  })
  .openapi("Problem");

const problemContent = { "application/problem+json": { schema: ProblemSchema } } as const;

/** A documented problem response: `problem("No such client")`. */
export const problem = (description: string) => ({ description, content: problemContent });

export const jsonContent = <T extends z.ZodType>(schema: T) => ({ "application/json": { schema } });

/** Every route but the browser ones takes an API key (registered as `apiKey` in src/app.ts). */
export const API_KEY_SECURITY = [{ apiKey: [] }];

/** A positive int4 id in a path (`/apps/{id}`, `/grants/{id}`, `/clients/{id}`). */
export const IdParam = z.object({
  id: z.coerce
    .number()
    .int()
    .positive()
    .max(2_147_483_647)
    .openapi({ param: { name: "id", in: "path" }, example: 1 }),
});

/** A branch id in a path (`/tokens/{branch_id}`). */
export const BranchParam = z.object({
  branch_id: z
    .string()
    .min(1)
    .max(128)
    .openapi({ param: { name: "branch_id", in: "path" }, example: "branch-001" }),
});

/** Text a caller types: trimmed, not empty, at most `max` characters. */
const text = (max: number) =>
  z.string().trim().min(1, "must not be empty").max(max, `must be at most ${max} characters`);

const CLIENT_LIMITS = {
  id: 255,
  secret: 1024,
  url: 2048,
  branch: 128,
  email: 320,
  name: 255,
  scopes: 2048,
  resource: 512,
} as const;

const redirectUri = z
  .string()
  .max(CLIENT_LIMITS.url)
  .refine(isAllowedRedirectUri, "must be an https URL (http is allowed only for localhost and 127.0.0.1)");

/** POST /clients' body; the console's register form validates with this same schema. */
export const ClientBody = z
  .object({
    client_id: text(CLIENT_LIMITS.id),
    client_secret: text(CLIENT_LIMITS.secret),
    redirect_uri: redirectUri,
    branch_id: text(CLIENT_LIMITS.branch),
    workspace_email: z.email("must be an email address").max(CLIENT_LIMITS.email),
    workspace_name: text(CLIENT_LIMITS.name),
    scopes: text(CLIENT_LIMITS.scopes).optional(),
    provider_resource: text(CLIENT_LIMITS.resource)
      .optional()
      .describe("What the branch stands for at the provider (Google Business Profile: accounts/…/locations/…)."),
  })
  .strict()
  .openapi("NewClient");

export const ClientPatch = z
  .object({
    client_secret: text(CLIENT_LIMITS.secret),
    redirect_uri: redirectUri,
    workspace_email: z.email("must be an email address").max(CLIENT_LIMITS.email),
    workspace_name: text(CLIENT_LIMITS.name),
    scopes: text(CLIENT_LIMITS.scopes).nullable(),
    is_active: z.boolean(),
    provider_resource: text(CLIENT_LIMITS.resource).nullable(),
  })
  .partial()
  .strict()
  .refine((body) => Object.keys(body).length > 0, "give at least one field to change")
  .openapi("ClientChanges");

/** POST /clients' body as the registry takes it (the console's register form parses the same schema). */
export function newClientOf(body: z.infer<typeof ClientBody>): NewClient {
  return {
    clientId: body.client_id,
    clientSecret: body.client_secret,
    redirectUri: body.redirect_uri,
    branchId: body.branch_id,
    workspaceEmail: body.workspace_email,
    workspaceName: body.workspace_name,
    scopes: body.scopes,
    providerResource: body.provider_resource,
  };
}

/** PATCH /clients/{id}'s body as the registry takes it. */
export function clientChangesOf(body: z.infer<typeof ClientPatch>): ClientChanges {
  return {
    clientSecret: body.client_secret,
    redirectUri: body.redirect_uri,
    workspaceEmail: body.workspace_email,
    workspaceName: body.workspace_name,
    scopes: body.scopes,
    isActive: body.is_active,
    providerResource: body.provider_resource,
  };
}

function isAllowedRedirectUri(value: string): boolean {
  let url: URL;
  try {
    url = new URL(value);
  } catch {
    return false;
  }
  if (url.hash || url.username || url.password) return false;
  if (url.protocol === "https:") return true;
  return url.protocol === "http:" && ["localhost", "127.0.0.1", "[::1]"].includes(url.hostname);
}

const httpsUrl = z.url({ protocol: /^https?$/ }).max(2048);

/** The `oauth2` profile's provider: explicit URLs, or a discovery document to read them from. */
export const OAuth2SettingsBody = z
  .object({
    issuer: httpsUrl.optional(),
    authorization_url: httpsUrl.optional(),
    token_url: httpsUrl.optional(),
    revocation_url: httpsUrl.optional(),
    discovery_url: httpsUrl
      .optional()
      .describe("An OpenID Connect discovery document (or RFC 8414 metadata): the URLs are read from it."),
    scopes: text(2000),
    extra_authorization_params: z.string().max(2000).optional(),
    client_auth_method: z.enum(["client_secret_basic", "client_secret_post"]).optional(),
    openid: z.boolean().optional(),
    issuer_aliases: z.array(text(300)).max(5).optional(),
    api_base_urls: z
      .array(httpsUrl)
      .max(10)
      .optional()
      .describe("The proxy's allowed API base URLs for this app (the first is the default)."),
    requests_per_minute: z.number().int().positive().max(1_000_000).optional(),
  })
  .strict()
  .refine(
    (body) => body.discovery_url !== undefined || (body.issuer && body.authorization_url && body.token_url),
    "give discovery_url, or issuer, authorization_url and token_url",
  )
  .openapi("OAuth2Settings");

/** POST /apps' body. */
export const AppBody = z
  .object({
    name: text(255),
    profile: z.enum(["google", "oauth2"]).default("google"),
    client_id: text(255),
    client_secret: text(1024),
    settings: OAuth2SettingsBody.optional().describe("Required for the oauth2 profile; not allowed for google."),
  })
  .strict()
  .refine((body) => (body.profile === "oauth2") === (body.settings !== undefined), {
    message: "settings are required for the oauth2 profile and not allowed for google",
    path: ["settings"],
  })
  .openapi("NewApp");

/** PATCH /apps/{id}'s body. */
export const AppPatch = z
  .object({
    name: text(255),
    client_secret: text(1024),
    settings: OAuth2SettingsBody,
  })
  .partial()
  .strict()
  .refine((body) => Object.keys(body).length > 0, "give at least one field to change")
  .openapi("AppChanges");

export const AppView = z
  .object({
    app_id: z.number().int(),
    name: z.string(),
    profile: z.enum(["google", "oauth2"]),
    client_id: z.string().describe("The OAuth client id at the provider (the secret is never returned)."),
    settings: z.record(z.string(), z.unknown()).nullable(),
    credentials_rejected: z.boolean(),
    testing_suspected_at: z
      .string()
      .nullable()
      .describe(
        "Set when a grant died about 7 days after its consent: the app is probably in Testing publishing status.",
      ),
    branches: z.number().int(),
    grants: z.number().int().describe("Connected grants."),
    created_at: z.string(),
    updated_at: z.string(),
  })
  .openapi("App");

export const GrantView = z
  .object({
    grant_id: z.number().int(),
    app_id: z.number().int(),
    app_name: z.string(),
    account: z
      .object({ subject: z.string().nullable(), email: z.string().nullable() })
      .describe("The provider account (OpenID Connect `sub`); null without OpenID Connect."),
    status: z.string(),
    expires_at: z.string(),
    last_refreshed_at: z.string().nullable(),
    last_error: z.string().nullable(),
    consented_at: z.string().nullable(),
    access_ends_at: z.string().nullable().describe("Time-limited access: when the refresh token stops working."),
    refresh_tokens_minted: z.number().int(),
    token_limit_near: z.boolean().describe("At or past the warning mark of Google's 100 tokens per account and app."),
    held_since: z
      .string()
      .nullable()
      .describe("Cross-Account Protection: Google disabled the account (hijacking); not served until it is enabled."),
    branches: z.array(z.object({ client_id: z.number().int(), branch_id: z.string() })),
  })
  .openapi("Grant");

/** PUT /clients/{id}/grant's body. */
export const AttachBody = z.object({ grant_id: z.number().int().positive().max(2_147_483_647) }).strict();
