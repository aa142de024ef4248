/**
 * One-line diagnostics to stderr that never block the event loop.
 *
 * `console.error` is a blocking `write(2)`: once nobody reads stderr (a
 * stalled log shipper, a paused terminal) and its pipe is full, the next
 * line stops the whole process. {@linkcode Diagnostics} instead queues lines
 * and writes them with `Deno.stderr.write`, which Deno runs on a blocking
 * thread (`StdFileResourceInner::write` in deno's `ext/io/lib.rs`), one
 * write at a time. If stderr stalls the queue fills, further lines are
 * dropped and counted, and the count is reported once stderr is read again.
 *
 * A synchronous write to stderr (`console.error`) while such a write is
 * stuck waits for it, since both hold Rust's stderr lock: once a program
 * writes through {@linkcode Diagnostics}, every line should go through it.
 *
 * @module
 */

import { concat } from "./_bytes.ts";

/** Where {@linkcode Diagnostics} writes: `Deno.stderr`, or a test's stand-in. */
export interface DiagnosticsOutput {
  /** Writes some of `bytes`; resolves with how many. */
  write(bytes: Uint8Array): Promise<number>;
}

/** Options for {@linkcode Diagnostics}. */
export interface DiagnosticsOptions {
  /**
   * Where the lines go.
   * @default {Deno.stderr}
   */
  output?: DiagnosticsOutput;
  /**
   * Bytes that may wait to be written, the one write in progress included;
   * a line that would pass this is dropped.
   * @default {65536}
   */
  maxQueuedBytes?: number;
}

/** Options for {@linkcode Diagnostics.flush}. */
export interface FlushOptions {
  /**
   * Give up waiting after this long, so that a stalled stderr cannot hold
   * up an exit for ever.
   * @default {5000}
   */
  timeoutMs?: number;
}

/** Default for {@linkcode DiagnosticsOptions.maxQueuedBytes}: 64 KiB. */
export const DEFAULT_MAX_QUEUED_BYTES = 64 * 1024;
/** Default for {@linkcode FlushOptions.timeoutMs}: 5 s. */
export const DEFAULT_FLUSH_TIMEOUT_MS = 5000;

const encoder = new TextEncoder();

/**
 * A queue of one-line diagnostics written to stderr in order, in the
 * background; {@linkcode Diagnostics.write} never blocks.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const written: string[] = [];
 * const diagnostics = new Diagnostics({
 *   output: {
 *     write(bytes) {
 *       written.push(new TextDecoder().decode(bytes));
 *       return Promise.resolve(bytes.length);
 *     },
 *   },
 * });
 * diagnostics.write("listening on 127.0.0.1:4000");
 * assert.equal(await diagnostics.flush(), true);
 * assert.deepEqual(written, ["listening on 127.0.0.1:4000\n"]);
 * ```
 */
export class Diagnostics {
  #output: DiagnosticsOutput;
  #maxQueuedBytes: number;
  #queue: Uint8Array[] = [];
  // Bytes queued plus those of the write in progress.
  #queuedBytes = 0;
  #droppedUnreported = 0;
  #dropped = 0;
  #failed = false;
  #writing: Promise<void> | undefined;

  /** Starts an empty queue; nothing is written until a line is. */
  constructor(options: DiagnosticsOptions = {}) {
    this.#output = options.output ?? Deno.stderr;
    this.#maxQueuedBytes = options.maxQueuedBytes ?? DEFAULT_MAX_QUEUED_BYTES;
  }

  /** Lines dropped so far because the queue was full or stderr failed. */
  get dropped(): number {
    return this.#dropped;
  }

  /** Queues `message` and a newline, or drops it if the queue is full. */
  write(message: string): void {
    const bytes = encoder.encode(`${message}\n`);
    if (
      this.#failed || this.#queuedBytes + bytes.length > this.#maxQueuedBytes
    ) {
      this.#dropped++;
      this.#droppedUnreported++;
      return;
    }
    this.#enqueue(bytes);
  }

  /**
   * Resolves with true once every line queued so far (and any queued
   * meanwhile) is written, or false if that takes longer than the timeout.
   */
  async flush(options: FlushOptions = {}): Promise<boolean> {
    const writing = this.#writing;
    if (writing === undefined) return true;
    const { timeoutMs = DEFAULT_FLUSH_TIMEOUT_MS } = options;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timedOut = new Promise<boolean>((resolve) => {
      timer = setTimeout(() => resolve(false), timeoutMs);
    });
    try {
      return await Promise.race([writing.then(() => true), timedOut]);
    } finally {
      clearTimeout(timer);
    }
  }

  #enqueue(bytes: Uint8Array): void {
    this.#queue.push(bytes);
    this.#queuedBytes += bytes.length;
    this.#writing ??= this.#writeQueue();
  }

  /** Writes what is queued, all of it per write call, until none is left. */
  async #writeQueue(): Promise<void> {
    let lines = 0;
    try {
      while (this.#queue.length > 0) {
        lines = this.#queue.length;
        const batch = concat(this.#queue);
        this.#queue = [];
        for (let written = 0; written < batch.length;) {
          written += await this.#output.write(batch.subarray(written));
        }
        this.#queuedBytes -= batch.length;
        lines = 0;
        // All written: stderr is being read again, so say what was lost.
        if (this.#queue.length === 0 && this.#droppedUnreported > 0) {
          const count = this.#droppedUnreported;
          this.#droppedUnreported = 0;
          this.#enqueue(encoder.encode(
            `(${count} diagnostic ${
              count === 1 ? "line" : "lines"
            } dropped: stderr was not read fast enough)\n`,
          ));
        }
      }
    } catch {
      // stderr is closed or broken: nowhere left to write, or to say so.
      this.#failed = true;
      this.#dropped += lines + this.#queue.length;
      this.#queue = [];
      this.#queuedBytes = 0;
    } finally {
      this.#writing = undefined;
    }
  }
}
