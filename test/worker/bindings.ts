/** Fixed secrets for the test Worker (nothing here protects anything real). */
export const TEST_ADMIN_KEY = "test-admin-key-0000000000000001";
export const TEST_SERVICE_KEY = "test-service-key-000000000000001";
/** base64 of 32 bytes 0x01..0x20 */
export const TEST_ENCRYPTION_KEY = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=";

export const TEST_BINDINGS = {
  TOKEN_ENCRYPTION_KEY: TEST_ENCRYPTION_KEY,
  ADMIN_API_KEY: `${TEST_ADMIN_KEY},test-admin-key-0000000000000002`,
  SERVICE_API_KEY: TEST_SERVICE_KEY,
  OAUTH_ALLOW_INSECURE_HTTP: "true",
  OAUTH_TIMEOUT_MS: "2000",
} as const;
