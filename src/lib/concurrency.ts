/** Workers allow six simultaneous outbound connections per invocation. */
export const MAX_OUTBOUND_CONNECTIONS = 6;

/** Runs `run` over `items` with at most `concurrency` calls in flight (outbound connection limits). */
export async function forEachBounded<T>(
  items: readonly T[],
  concurrency: number,
  run: (item: T) => Promise<void>,
): Promise<void> {
  let next = 0;
  const lane = async () => {
    while (next < items.length) await run(items[next++]!);
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, items.length) }, lane));
}

/** Runs `lanes` copies of `run` to the end, all of them, even when one fails; then rethrows the first failure. */
export async function forEachLane(lanes: number, run: () => Promise<void>): Promise<void> {
  const settled = await Promise.allSettled(Array.from({ length: lanes }, run));
  const failed = settled.find((result) => result.status === "rejected");
  if (failed) throw failed.reason;
}
