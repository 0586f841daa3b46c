import { describe, expect, it } from "vitest";
import { createServices } from "../../src/context";
import { currentEnvelopePrefix, loadKeyring, open, type SealedColumn, seal } from "../../src/lib/crypto";
import { resealAll } from "../../src/services/reseal";
import { TEST_ENCRYPTION_KEY } from "./bindings";
import { call, json, type TestEnv, testEnv } from "./helpers";
import { connectBranch, currentTokens, introspect, setProviderBehavior, sql } from "./oauth-helpers";

/**
 * `npm run db:reseal` beside the running Worker, with a real refresh in flight: the refresh's write
 * is conditional on the sealed refresh token it used, so a reseal of that row meanwhile would make
 * it miss and drop the rotated refresh token (the grant then dies at the next refresh).
 *
 * Only this test's row is sealed with a previous key, so the reseal (run over the shared test
 * database with the tests' key as current) rewrites nothing of other tests: their values are under
 * the current key already, or do not open and are left alone.
 */

/** base64 of 32 bytes of 0x2a: the "previous" key this test's row is sealed with. */
const PREVIOUS_KEY = btoa(String.fromCharCode(...new Uint8Array(32).fill(0x2a)));

describe("a reseal while a refresh of the same row is in flight", () => {
  it("leaves the leased row to the refresh, whose rotated refresh token is kept, and ends with the row resealed", async () => {
    const branch = await connectBranch({ providerBehavior: { rotateRefreshTokens: true } });
    const before = await currentTokens(branch.clientId);
    // The row as an older deployment left it: sealed with the previous key.
    const current = await loadKeyring(TEST_ENCRYPTION_KEY);
    const previous = await loadKeyring(PREVIOUS_KEY);
    const resealWith = async (envelope: string, column: SealedColumn) =>
      seal(previous, await open(current, envelope, { column, clientId: branch.clientId }), {
        column,
        clientId: branch.clientId,
      });
    await sql(
      "update tokens set access_token = $2, refresh_token = $3, expires_at = now() - interval '60 seconds' where id = $1",
      [
        before.row.id,
        await resealWith(before.row.access_token, "tokens.access_token"),
        await resealWith(before.row.refresh_token!, "tokens.refresh_token"),
      ],
    );
    await setProviderBehavior(branch.oauthClientId, { tokenDelayMs: 1_000 });
    const env = {
      TOKEN_ENCRYPTION_PREVIOUS_KEYS: PREVIOUS_KEY,
      OAUTH_TIMEOUT_MS: "10000",
      TOKEN_CACHE_MAX_AGE_SECONDS: "0",
    };

    const read = call(`/tokens/${branch.branchId}`, { key: "service", envOverrides: env });
    for (let i = 0; ; i++) {
      const [row] = await sql("select lease_owner from tokens where id = $1", [before.row.id]);
      if (row?.[0]) break;
      if (i > 500) throw new Error("the refresh never leased the row");
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    const services = await createServices({ ...testEnv, ...env } as TestEnv);
    const result = await resealAll(services.db, services.keyring);
    const response = await read;
    expect(response.status).toBe(200);
    const served = await json<{ access_token: string; refreshed: boolean }>(response);
    expect(served.refreshed).toBe(true);

    // The rotated refresh token is the one stored, and it is the one the provider accepts.
    const after = await currentTokens(branch.clientId);
    expect(after.row.id).toBe(before.row.id);
    expect(after.accessToken).toBe(served.access_token);
    expect(after.refreshToken).not.toBe(before.refreshToken);
    expect((await introspect(after.refreshToken!, branch)).active).toBe(true);
    expect((await introspect(before.refreshToken!, branch)).active).toBe(false);
    // The reseal left the leased row alone, and the row ends under the current key.
    expect(result.leasedMeanwhile).toBeGreaterThanOrEqual(1);
    const prefix = currentEnvelopePrefix(services.keyring);
    expect(after.row.access_token.startsWith(prefix)).toBe(true);
    expect(after.row.refresh_token!.startsWith(prefix)).toBe(true);
    const [lease] = await sql("select lease_owner from tokens where id = $1", [before.row.id]);
    expect(lease?.[0]).toBeNull();
  });
});
