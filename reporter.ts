/**
 * One rate limit for every line that can repeat without end (a client's
 * reset, running out of file descriptors, a restart, a failed log write):
 * at most `linesPerPeriod` lines a period are written as they come; the
 * rest are counted by kind and summed up in one line at the period's end.
 * Each caller used to keep its own counters, timer and period fields; one
 * small class keeps them the same everywhere and testable on plain data,
 * with the clock injected.
 *
 * @module
 */

/** A clock and timer, injectable so tests need not wait for real time. */
export interface ReporterClock {
  /** Monotonic milliseconds. */
  now(): number;
  /** Calls `callback` once after `ms` milliseconds; returns its handle. */
  setTimeout(callback: () => void, ms: number): unknown;
  /** Cancels a timer by the handle {@linkcode ReporterClock.setTimeout} gave. */
  clearTimeout(handle: unknown): void;
}

/** Options for {@linkcode RateLimitedReporter}. */
export interface RateLimitedReporterOptions<Kind extends string> {
  /**
   * Lines written as they come per period; the summary of lines held back
   * counts as the first line of the next period.
   *
   * @default {10}
   */
  linesPerPeriod?: number;
  /**
   * Length of a period, in milliseconds.
   *
   * @default {1000}
   */
  periodMs?: number;
  /**
   * Every kind, in the order a summary lists them.
   *
   * @default {[]}
   */
  kinds?: readonly Kind[];
  /**
   * What a held-back line is, as the default summary names it
   * (`"client diagnostic"` gives `... and 3 more client diagnostics in the
   * last second (reset 3)`).
   *
   * @default {"line"}
   */
  label?: string;
  /**
   * Makes the summary line from the counts held back, by kind in the order
   * of `kinds`, their total, and the last line held back; replaces the
   * default format.
   *
   * @default {undefined}
   */
  summarize?: (
    counts: ReadonlyArray<readonly [Kind, number]>,
    total: number,
    lastLine: string,
  ) => string;
  /**
   * Clock and timer.
   *
   * @default {globalThis's performance.now, setTimeout, clearTimeout}
   */
  clock?: ReporterClock;
}

/**
 * The real clock: `performance.now()` and the global timers.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const timer = REAL_CLOCK.setTimeout(() => {}, 1000);
 * REAL_CLOCK.clearTimeout(timer);
 * assert.ok(REAL_CLOCK.now() <= performance.now());
 * ```
 */
export const REAL_CLOCK: ReporterClock = {
  now: () => performance.now(),
  setTimeout: (callback, ms) => setTimeout(callback, ms),
  clearTimeout: (handle) =>
    clearTimeout(handle as ReturnType<typeof setTimeout>),
};

/**
 * Writes lines through `write`, at most `linesPerPeriod` a period; the rest
 * are counted by kind into one summary line, written when the period ends
 * (a timer), on {@linkcode RateLimitedReporter.flush} or on
 * {@linkcode RateLimitedReporter.close}. A period starts with the first
 * line after the last one ended; a period with lines held back lasts until
 * its summary is written, and that summary opens the next one.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const lines: string[] = [];
 * const reporter = new RateLimitedReporter((line) => lines.push(line), {
 *   linesPerPeriod: 2,
 *   kinds: ["reset", "idle"],
 *   label: "client diagnostic",
 * });
 * reporter.report("reset", "client 1: reset");
 * reporter.report("idle", "client 2: idle");
 * reporter.report("idle", "client 3: idle");
 * reporter.report("reset", "client 4: reset");
 * reporter.close();
 * assert.deepEqual(lines, [
 *   "client 1: reset",
 *   "client 2: idle",
 *   "... and 2 more client diagnostics in the last second (reset 1, idle 1)",
 * ]);
 * ```
 */
export class RateLimitedReporter<Kind extends string> {
  #write: (line: string) => void;
  #linesPerPeriod: number;
  #periodMs: number;
  #kinds: readonly Kind[];
  #label: string;
  #summarize: RateLimitedReporterOptions<Kind>["summarize"];
  #clock: ReporterClock;
  // Lines written in the current period, when it began, and the lines held
  // back since, by kind, to be summed up at its end.
  #lines = 0;
  #periodStart = -Infinity;
  #held = new Map<Kind, number>();
  #lastHeld = "";
  #timer: unknown;

  /** Creates a reporter that writes through `write`. */
  constructor(
    write: (line: string) => void,
    options: RateLimitedReporterOptions<Kind> = {},
  ) {
    this.#write = write;
    this.#linesPerPeriod = options.linesPerPeriod ?? 10;
    this.#periodMs = options.periodMs ?? 1000;
    this.#kinds = options.kinds ?? [];
    this.#label = options.label ?? "line";
    this.#summarize = options.summarize;
    this.#clock = options.clock ?? REAL_CLOCK;
  }

  /**
   * Writes `line`, or counts it under `kind` if this period has had its
   * share; the first one held back schedules the period's summary.
   */
  report(kind: Kind, line: string): void {
    const now = this.#clock.now();
    if (
      this.#timer === undefined && now - this.#periodStart >= this.#periodMs
    ) {
      this.#periodStart = now;
      this.#lines = 0;
    }
    if (this.#lines < this.#linesPerPeriod) {
      this.#lines++;
      this.#write(line);
      return;
    }
    this.#held.set(kind, (this.#held.get(kind) ?? 0) + 1);
    this.#lastHeld = line;
    this.#timer ??= this.#clock.setTimeout(() => {
      this.#timer = undefined;
      this.#writeSummary();
    }, this.#periodStart + this.#periodMs - now);
  }

  /** Writes the summary of the lines held back now, if there are any. */
  flush(): void {
    if (this.#timer !== undefined) {
      this.#clock.clearTimeout(this.#timer);
      this.#timer = undefined;
    }
    this.#writeSummary();
  }

  /**
   * Flushes, then forgets the period: the next line is written at once,
   * as if nothing had been reported before.
   */
  reset(): void {
    this.flush();
    this.#periodStart = -Infinity;
    this.#lines = 0;
  }

  /** Flushes, leaving no timer behind; call it when done reporting. */
  close(): void {
    this.flush();
  }

  #writeSummary(): void {
    if (this.#held.size === 0) return;
    let total = 0;
    const counts: Array<readonly [Kind, number]> = [];
    for (const kind of this.#kinds) {
      const count = this.#held.get(kind);
      if (count === undefined) continue;
      total += count;
      counts.push([kind, count]);
    }
    // Kinds not listed in `kinds` still count, after the listed ones.
    for (const [kind, count] of this.#held) {
      if (this.#kinds.includes(kind)) continue;
      total += count;
      counts.push([kind, count]);
    }
    this.#held.clear();
    // The summary is this period's last line and the next one's first.
    this.#periodStart = this.#clock.now();
    this.#lines = 1;
    this.#write(
      this.#summarize?.(counts, total, this.#lastHeld) ??
        `... and ${total} more ${this.#label}${
          total === 1 ? "" : "s"
        } in the last ${periodText(this.#periodMs)} (${
          counts.map(([kind, count]) => `${kind} ${count}`).join(", ")
        })`,
    );
  }
}

function periodText(ms: number): string {
  return ms === 1000 ? "second" : `${ms / 1000} s`;
}
