import { describe, expect, it } from "vitest";
import {
  BACKOFF_BASE_SECONDS,
  BACKOFF_MAX_SECONDS,
  expiryOf,
  inBackoff,
  isServable,
  lifetimeOf,
  needsRefresh,
  nextAttemptAt,
  refreshWindowSeconds,
} from "../../src/services/refresh-policy";

const now = new Date("2030-01-01T00:00:00Z");
const inSeconds = (s: number) => new Date(now.getTime() + s * 1000);

describe("refresh window", () => {
  it("is REFRESH_AHEAD_SECONDS for tokens that live longer than it", () => {
    expect(refreshWindowSeconds(3600, 300)).toBe(300);
    expect(refreshWindowSeconds(null, 300)).toBe(300);
  });

  it("is half the lifetime for tokens that live shorter than the window", () => {
    expect(refreshWindowSeconds(120, 300)).toBe(60);
    expect(refreshWindowSeconds(300, 300)).toBe(150);
  });

  it("decides by the time left", () => {
    expect(needsRefresh({ expiresAt: inSeconds(301), lifetimeSeconds: 3600 }, now, 300)).toBe(false);
    expect(needsRefresh({ expiresAt: inSeconds(300), lifetimeSeconds: 3600 }, now, 300)).toBe(true);
    expect(needsRefresh({ expiresAt: inSeconds(61), lifetimeSeconds: 120 }, now, 300)).toBe(false);
    expect(needsRefresh({ expiresAt: inSeconds(59), lifetimeSeconds: 120 }, now, 300)).toBe(true);
    expect(needsRefresh({ expiresAt: inSeconds(-1), lifetimeSeconds: 3600 }, now, 300)).toBe(true);
  });

  it("serves a token only with a few seconds left to use it", () => {
    expect(isServable({ expiresAt: inSeconds(6) }, now)).toBe(true);
    expect(isServable({ expiresAt: inSeconds(5) }, now)).toBe(false);
    expect(isServable({ expiresAt: inSeconds(-10) }, now)).toBe(false);
  });
});

describe("backoff", () => {
  it("doubles from the base up to the cap", () => {
    const delay = (failures: number, retryAfter?: number) =>
      (nextAttemptAt(failures, now, retryAfter).getTime() - now.getTime()) / 1000;
    expect(delay(1)).toBe(BACKOFF_BASE_SECONDS);
    expect(delay(2)).toBe(BACKOFF_BASE_SECONDS * 2);
    expect(delay(3)).toBe(BACKOFF_BASE_SECONDS * 4);
    expect(delay(50)).toBe(BACKOFF_MAX_SECONDS);
  });

  it("waits at least what the provider asked for, within the cap", () => {
    const delay = (failures: number, retryAfter?: number) =>
      (nextAttemptAt(failures, now, retryAfter).getTime() - now.getTime()) / 1000;
    expect(delay(1, 120)).toBe(120);
    expect(delay(1, 10)).toBe(BACKOFF_BASE_SECONDS);
    expect(delay(1, 10 * BACKOFF_MAX_SECONDS)).toBe(BACKOFF_MAX_SECONDS);
  });

  it("is in force until next_attempt_at", () => {
    expect(inBackoff({ nextAttemptAt: null }, now)).toBe(false);
    expect(inBackoff({ nextAttemptAt: inSeconds(1) }, now)).toBe(true);
    expect(inBackoff({ nextAttemptAt: now }, now)).toBe(false);
  });
});

describe("expiry", () => {
  const issued = { accessToken: "a", refreshToken: undefined, tokenType: "Bearer", scope: undefined };
  it("counts from when the request was sent", () => {
    expect(expiryOf({ ...issued, expiresIn: 3599 }, now)).toEqual(inSeconds(3599));
  });

  it("assumes an hour when the provider does not say", () => {
    expect(lifetimeOf({ ...issued, expiresIn: undefined })).toBe(3600);
  });
});
