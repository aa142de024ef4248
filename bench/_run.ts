/**
 * How a load run is stopped, shared by `bench.ts` and `mix.ts`: at once
 * when the caller's signal aborts, or, after `duration` seconds, by asking
 * the run to finish (no new connections) and stopping it a grace period
 * later if clients are still out.
 *
 * @module
 */

/** What {@linkcode controlRun} drives. */
export interface StoppableRun {
  /** Starts no new connections; those in flight may finish. */
  finish(): void;
  /** Ends the run now, cutting off what is in flight. */
  stop(): void;
}

/** Options for {@linkcode controlRun}. */
export interface RunControlOptions {
  /**
   * Stops the run at once when it aborts.
   *
   * @default {undefined}
   */
  signal?: AbortSignal;
  /**
   * Seconds after which the run is asked to finish; none if undefined.
   *
   * @default {undefined}
   */
  duration?: number;
  /**
   * Milliseconds between asking to finish and stopping: the time clients in
   * flight at the end of the duration get to finish.
   *
   * @default {5000}
   */
  graceMs?: number;
}

/**
 * Wires the signal and the deadline to `run`; disposing the result removes
 * both (call it once the run is over).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const calls: string[] = [];
 * const abort = new AbortController();
 * {
 *   using _control = controlRun({
 *     finish: () => calls.push("finish"),
 *     stop: () => calls.push("stop"),
 *   }, { signal: abort.signal });
 *   abort.abort();
 * }
 * assert.deepEqual(calls, ["stop"]);
 * ```
 */
export function controlRun(
  run: StoppableRun,
  options: RunControlOptions = {},
): Disposable {
  const { signal, duration, graceMs = 5000 } = options;
  const stop = () => run.stop();
  signal?.addEventListener("abort", stop);
  if (signal?.aborted) stop();
  let grace: ReturnType<typeof setTimeout> | undefined;
  const deadline = duration === undefined ? undefined : setTimeout(() => {
    run.finish();
    grace = setTimeout(stop, graceMs);
  }, duration * 1000);
  return {
    [Symbol.dispose]() {
      clearTimeout(deadline);
      clearTimeout(grace);
      signal?.removeEventListener("abort", stop);
    },
  };
}
