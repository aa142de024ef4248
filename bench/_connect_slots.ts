/**
 * A limit on TCP connects in progress for the load tools: at most
 * {@linkcode MAX_CONNECTING} at once in this process, the others wait their
 * turn.
 *
 * Under load Deno's event loop completes about 128 socket waits per turn
 * (tokio's cooperative budget), newly ready sockets before those it put off.
 * Hundreds of connects at once keep that budget full with the newest
 * connections while the rest wait: their kernel connect is done and the
 * server has accepted them, but `Deno.connect()` resolves seconds later, so
 * the server sees clients that send nothing. Well under the budget, each
 * turn has room for the waits put off before. The limit is per process, as
 * the event loop is. Measured in bench/README.md, "Connections in flight".
 *
 * @module
 */

/** Connects in progress at once, at most, through {@linkcode connectSlots}. */
export const MAX_CONNECTING = 32;

interface Waiter {
  grant: (granted: boolean) => void;
  settled: boolean;
}

/**
 * A fixed number of slots handed out first come, first served.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const slots = new ConnectSlots(1);
 * assert.equal(await slots.acquire(), true);
 * const abort = new AbortController();
 * const waiting = slots.acquire(abort.signal);
 * abort.abort();
 * assert.equal(await waiting, false);
 * slots.release();
 * assert.equal(await slots.acquire(), true);
 * ```
 */
export class ConnectSlots {
  #free: number;
  readonly #queue: Waiter[] = [];

  /** Starts with `slots` free slots. */
  constructor(slots: number) {
    this.#free = slots;
  }

  /**
   * Takes a slot, waiting for one if none is free; false (and no slot) if
   * `signal` aborts first. Give a slot taken back with
   * {@linkcode ConnectSlots.release} once the connect has settled.
   */
  acquire(signal?: AbortSignal): Promise<boolean> | boolean {
    if (signal?.aborted) return false;
    if (this.#free > 0) {
      this.#free--;
      return true;
    }
    return new Promise((resolve) => {
      const onAbort = () => waiter.grant(false);
      const waiter: Waiter = {
        grant: (granted) => {
          waiter.settled = true;
          signal?.removeEventListener("abort", onAbort);
          resolve(granted);
        },
        settled: false,
      };
      signal?.addEventListener("abort", onAbort);
      this.#queue.push(waiter);
    });
  }

  /** Gives a slot back: to the longest waiting, else to the free ones. */
  release(): void {
    // Handed over directly, so no newcomer can take it before the waiter
    // runs.
    for (let next = this.#queue.shift(); next; next = this.#queue.shift()) {
      if (!next.settled) {
        next.grant(true);
        return;
      }
    }
    this.#free++;
  }
}

/**
 * The process's connect slots: take one before `Deno.connect()` and give it
 * back once the connect has settled.
 *
 * @example
 * ```ts ignore
 * if (await connectSlots.acquire(signal)) {
 *   try {
 *     conn = await Deno.connect({ port: 4000, signal });
 *   } finally {
 *     connectSlots.release();
 *   }
 * }
 * ```
 */
export const connectSlots: ConnectSlots = new ConnectSlots(MAX_CONNECTING);
