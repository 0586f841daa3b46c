/**
 * Benchmarks seed thousands of branches in bulk the way the release before apps stored them (a
 * client row with its own OAuth client and sealed secret, token rows by client): these statements
 * then move them into apps, grants and branches exactly as migration 0006 moves a real database's
 * (drizzle/0006_apps_grants_branches.sql, its data section), so the bench runs on what an upgraded
 * deployment holds.
 */
export const ADOPT_LEGACY_ROWS = [
  `insert into apps (id, name, profile, client_id, client_secret, credentials_rejected_at, created_at, updated_at)
     select id, workspace_name, 'google', client_id, client_secret, credentials_rejected_at, created_at, updated_at
     from clients where app_id is null and client_id is not null and client_secret is not null`,
  `select setval(pg_get_serial_sequence('apps', 'id'), greatest((select max(id) from apps), (select last_value from clients_id_seq), 1))`,
  "update clients set app_id = id where app_id is null and client_id is not null and client_secret is not null",
  "update tokens set app_id = client_id where app_id is null and exists (select 1 from apps where apps.id = tokens.client_id)",
  "update clients set grant_id = (select max(t.id) from tokens t where t.client_id = clients.id) where grant_id is null",
];
