/**
 * The drain of a server that stops: the deadline for its clients in flight,
 * which a later call can only bring forward, whether it ran out, and the
 * promise that says everyone was served. Apart from the server so that the
 * deadline's rules are tested on a clock of their own, without sockets.
 *
 * @module
 */

import { REAL_CLOCK, type ReporterClock } from "./reporter.ts";

/** Options for {@linkcode Drain}. */
export interface DrainOptions {
  /**
   * Clock and timer.
   *
   * @default {globalThis's performance.now, setTimeout, clearTimeout}
   */
  clock?: ReporterClock;
}

/**
 * A drain's deadline and end. {@linkcode Drain.endWithin} sets the deadline,
 * and only ever brings it forward: a second SIGTERM's 0 cuts off at once,
 * but a retry with the default does not extend the first. When the deadline
 * passes, `onExpire` runs once (it cuts off whoever is left);
 * {@linkcode Drain.finish} ends the drain and resolves
 * {@linkcode Drain.done}.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * let cutOff = false;
 * const drain = new Drain(() => cutOff = true);
 * drain.endWithin(10_000);
 * drain.endWithin(0); // brings it forward
 * await new Promise((resolve) => setTimeout(resolve, 0));
 * assert.ok(drain.expired && cutOff);
 * drain.finish();
 * await drain.done;
 * ```
 */
export class Drain {
  /** Resolves once {@linkcode Drain.finish} is called. */
  readonly done: Promise<void>;
  #onExpire: () => void;
  #clock: ReporterClock;
  #deadline = Infinity;
  #timer: unknown;
  #expired = false;
  #finished = false;
  #resolve: () => void;

  /** A drain not yet started: no deadline until `endWithin()`. */
  constructor(onExpire: () => void, options: DrainOptions = {}) {
    this.#onExpire = onExpire;
    this.#clock = options.clock ?? REAL_CLOCK;
    const { promise, resolve } = Promise.withResolvers<void>();
    this.done = promise;
    this.#resolve = resolve;
  }

  /** Whether the deadline passed before the drain finished. */
  get expired(): boolean {
    return this.#expired;
  }

  /**
   * Ends the drain `timeoutMs` milliseconds from now, unless it already
   * ends sooner or is finished.
   */
  endWithin(timeoutMs: number): void {
    if (this.#finished) return;
    const deadline = this.#clock.now() + timeoutMs;
    if (deadline >= this.#deadline) return;
    this.#deadline = deadline;
    if (this.#timer !== undefined) this.#clock.clearTimeout(this.#timer);
    this.#timer = this.#clock.setTimeout(() => {
      this.#timer = undefined;
      this.#expired = true;
      this.#onExpire();
    }, timeoutMs);
  }

  /** Everyone was served: cancels the deadline and resolves `done`. */
  finish(): void {
    if (this.#finished) return;
    this.#finished = true;
    if (this.#timer !== undefined) this.#clock.clearTimeout(this.#timer);
    this.#timer = undefined;
    this.#resolve();
  }
}
