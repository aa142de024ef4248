/**
 * Graceful shutdown: SIGINT, SIGTERM and SIGHUP in; the echo server, the
 * metrics server and the access log stopped in order, and the exit status,
 * out.
 *
 * The first signal sets `/healthz` to 503, keeps accepting for
 * `shutdownDelayMs`, then drains the clients in flight for up to
 * `drainTimeoutMs`; the log's backlog gets what is left of that time. A
 * second signal after {@linkcode SAME_SIGNAL_WINDOW_MS} cuts all of it
 * short. SIGHUP reopens the access log, unless the terminal the server
 * started in has closed: then it stops the server as SIGINT does. Parts,
 * clock, terminal and signals are passed in, so tests drive it with
 * {@linkcode GracefulShutdown.onSignal} on a fake clock.
 *
 * @module
 */

import type { AccessLog, AccessLogStats } from "./access_log.ts";
import type { Diagnostics } from "./diagnostics.ts";
import type { MetricsServer } from "./metrics.ts";
import { REAL_CLOCK, type ReporterClock } from "./reporter.ts";
import { DEFAULTS } from "./options.ts";
import type { EchoServer } from "./server.ts";

/** The signals that stop the server, and cut off on a second one. */
export type StopSignal = "SIGINT" | "SIGTERM";

/**
 * The signals {@linkcode GracefulShutdown.onSignal} takes: SIGHUP reopens
 * the access log, or stops the server when its terminal has closed.
 */
export type ShutdownSignal = StopSignal | "SIGHUP";

const SIGNAL_NUMBERS: Record<StopSignal, number> = { SIGINT: 2, SIGTERM: 15 };

/**
 * A SIGINT/SIGTERM this soon after the first is the same request, not a
 * second one: a terminal's Ctrl-C reaches the whole foreground process
 * group, and `deno task` forwards its copy to the server 1-2 ms later.
 */
export const SAME_SIGNAL_WINDOW_MS = 500;

/** The parts a {@linkcode GracefulShutdown} stops, in this order. */
export interface ShutdownParts {
  /** The echo server: drained, then cut off on a second signal. */
  server: Pick<EchoServer, "shutdown" | "connections" | "clientsAccepted">;
  /**
   * The metrics server, whose `/healthz` answers 503 from the first signal
   * on and which stops once the drain is over; absent when off.
   */
  metrics?: Pick<MetricsServer, "setDraining" | "shutdown">;
  /** The access log: reopened on SIGHUP; its backlog flushed, then closed. */
  log: Pick<AccessLog, "flush" | "close" | "reopen"> & {
    readonly stats: Pick<AccessLogStats, "backlogLines">;
  };
  /** Where every line about the shutdown goes, flushed before the exit. */
  diagnostics: Pick<Diagnostics, "write" | "flush">;
}

/** Options for {@linkcode GracefulShutdown}. */
export interface GracefulShutdownOptions {
  /**
   * Time clients get to finish after the listener closes, in milliseconds;
   * the access log's backlog gets what is left of it.
   *
   * @default {10_000}
   */
  drainTimeoutMs?: number;
  /**
   * Time between the first signal and closing the listener, in
   * milliseconds, while `/healthz` answers 503 and clients are still
   * accepted.
   *
   * @default {0}
   */
  shutdownDelayMs?: number;
  /**
   * Whether the terminal the server started in has closed, asked on each
   * SIGHUP: if it has, the SIGHUP is the terminal's hangup and stops the
   * server as SIGINT does; if not, it asks to reopen the log (logrotate).
   * Absent when the server did not start in a terminal (a service,
   * `nohup`): every SIGHUP reopens the log.
   *
   * @default {undefined}
   */
  terminalGone?: () => boolean;
  /**
   * Clock and timer.
   *
   * @default {REAL_CLOCK from reporter.ts}
   */
  clock?: ReporterClock;
}

/**
 * Stops the echo server, then the metrics server, then the access log on
 * the signals given to {@linkcode GracefulShutdown.onSignal}, writing what
 * it does to the diagnostics, and resolves
 * {@linkcode GracefulShutdown.exitStatus}.
 *
 * The caller keeps its signal listeners installed until it exits: without
 * a listener Deno restores a signal's default action, and a SIGHUP, SIGINT
 * or SIGTERM during the last flushes would end the process before its last
 * line is out.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const lines: string[] = [];
 * const shutdown = new GracefulShutdown({
 *   server: {
 *     connections: 0,
 *     clientsAccepted: 2,
 *     shutdown: () => Promise.resolve(),
 *   },
 *   log: {
 *     stats: { backlogLines: 0 },
 *     reopen: () => Promise.resolve(true),
 *     flush: () => Promise.resolve(0),
 *     close: () => 0,
 *   },
 *   diagnostics: {
 *     write: (line) => lines.push(line),
 *     flush: () => Promise.resolve(true),
 *   },
 * }, { drainTimeoutMs: 1000 });
 * shutdown.onSignal("SIGTERM");
 * assert.equal(await shutdown.exitStatus, 0);
 * assert.deepEqual(lines, [
 *   "SIGTERM: stopping; 0 connections get up to 1 s to finish",
 *   "stopped after 2 clients",
 * ]);
 * ```
 */
export class GracefulShutdown {
  /**
   * Resolves once everything has stopped, with the status to exit with: 0,
   * after a terminal's hangup too; 128 + the signal's number (130, 143)
   * when a second signal cut the shutdown short; 1 when access log lines
   * were lost, whatever stopped the server.
   */
  readonly exitStatus: Promise<number>;
  #server: ShutdownParts["server"];
  #metrics: ShutdownParts["metrics"];
  #log: ShutdownParts["log"];
  #diagnostics: ShutdownParts["diagnostics"];
  #drainTimeoutMs: number;
  #shutdownDelayMs: number;
  #clock: ReporterClock;
  #terminalGone: (() => boolean) | undefined;
  #stopping = false;
  #firstSignalAt = 0;
  #delayTimer: unknown;
  #drainEnds = Infinity;
  #forcedBy: StopSignal | undefined;
  #drained = Promise.withResolvers<void>();
  // A second signal during the exit's log flush (a full disk) ends it too.
  #cutFlush = new AbortController();

  /** Waits for the first signal; nothing stops before it. */
  constructor(
    parts: ShutdownParts,
    options: GracefulShutdownOptions = {},
  ) {
    this.#server = parts.server;
    this.#metrics = parts.metrics;
    this.#log = parts.log;
    this.#diagnostics = parts.diagnostics;
    this.#drainTimeoutMs = options.drainTimeoutMs ?? DEFAULTS.drainTimeoutMs;
    this.#shutdownDelayMs = options.shutdownDelayMs ?? DEFAULTS.shutdownDelayMs;
    this.#clock = options.clock ?? REAL_CLOCK;
    this.#terminalGone = options.terminalGone;
    this.exitStatus = this.#run();
  }

  /**
   * Takes a signal. A SIGINT or SIGTERM: the first starts the shutdown; one
   * within {@linkcode SAME_SIGNAL_WINDOW_MS} of it is the same request; one
   * after cuts everyone off at once; any later one changes nothing. A
   * SIGHUP reopens the access log, in a shutdown too; but once the
   * terminal has closed ({@linkcode GracefulShutdownOptions.terminalGone})
   * a SIGHUP is its hangup: the first starts the shutdown as a first
   * SIGINT does, later ones change nothing. SIGHUP never cuts off.
   */
  onSignal(signal: ShutdownSignal): void {
    if (signal === "SIGHUP") {
      if (this.#terminalGone?.() === true) {
        // The hangup reaches the server up to three times (the shell's
        // copy to its job, the kernel's, deno task's): one request.
        if (!this.#stopping) this.#start("SIGHUP, terminal closed");
      } else {
        // access_log.ts reports the reopen, and retries it until it works;
        // it never rejects.
        void this.#log.reopen();
      }
    } else if (!this.#stopping) {
      this.#start(signal);
    } else if (
      this.#forcedBy === undefined &&
      this.#clock.now() - this.#firstSignalAt >= SAME_SIGNAL_WINDOW_MS
    ) {
      this.#cutOff(signal);
    }
  }

  /** Starts the shutdown; `cause` begins its stderr lines. */
  #start(cause: string): void {
    this.#stopping = true;
    this.#firstSignalAt = this.#clock.now();
    // A load balancer's health check sees 503 and stops sending clients;
    // those it sends meanwhile are still served during the delay.
    this.#metrics?.setDraining();
    if (this.#shutdownDelayMs === 0) return this.#closeAndDrain(cause);
    this.#diagnostics.write(
      `${cause}: stopping in ${
        this.#shutdownDelayMs / 1000
      } s; accepting until then${
        this.#metrics === undefined ? "" : ", /healthz answers 503"
      }`,
    );
    this.#delayTimer = this.#clock.setTimeout(() => {
      this.#delayTimer = undefined;
      this.#closeAndDrain(cause);
    }, this.#shutdownDelayMs);
  }

  #closeAndDrain(cause: string): void {
    this.#drainEnds = this.#clock.now() + this.#drainTimeoutMs;
    this.#drained.resolve(
      this.#server.shutdown({ drainTimeoutMs: this.#drainTimeoutMs }),
    );
    this.#diagnostics.write(
      `${cause}: stopping; ${count(this.#server.connections, "connection")} ${
        this.#server.connections === 1 ? "gets" : "get"
      } up to ${this.#drainTimeoutMs / 1000} s to finish`,
    );
  }

  #cutOff(signal: StopSignal): void {
    this.#forcedBy = signal;
    const { backlogLines } = this.#log.stats;
    this.#diagnostics.write(
      `${signal} again: cutting off ${
        count(this.#server.connections, "connection")
      } now${
        backlogLines === 0
          ? ""
          : ` and the access log's ${count(backlogLines, "waiting line")}`
      }`,
    );
    this.#cutFlush.abort();
    if (this.#delayTimer !== undefined) {
      this.#clock.clearTimeout(this.#delayTimer);
      this.#delayTimer = undefined;
    }
    this.#drained.resolve(this.#server.shutdown({ drainTimeoutMs: 0 }));
  }

  async #run(): Promise<number> {
    await this.#drained.promise;
    await this.#metrics?.shutdown();
    // The backlog (a full disk) gets what is left of the drain time: a
    // second drain time would outlast systemd's TimeoutStopSec (delay +
    // drain, deploy/), whose SIGKILL loses the backlog without a count.
    const flushMs = this.#forcedBy
      ? 0
      : Math.max(0, this.#drainEnds - this.#clock.now());
    const { backlogLines } = this.#log.stats;
    if (backlogLines > 0 && flushMs > 0) {
      this.#diagnostics.write(
        `access log: writing ${count(backlogLines, "waiting line")} for up to ${
          (flushMs / 1000).toFixed(1)
        } s; a second SIGINT/SIGTERM cuts this off`,
      );
    }
    await this.#log.flush({
      timeoutMs: flushMs,
      signal: this.#cutFlush.signal,
    });
    this.#diagnostics.write(
      `stopped after ${count(this.#server.clientsAccepted, "client")}`,
    );
    // Every line out before the exit, unless stderr stays stalled for 5 s.
    // Until then a second SIGINT/SIGTERM still ends with 130/143.
    await this.#diagnostics.flush();
    const linesLost = this.#log.close();
    if (linesLost > 0) {
      // Lines never written (dropped, or still waiting): close() said how
      // many; that line out too, and status 1 whatever stopped the server.
      await this.#diagnostics.flush();
      return 1;
    }
    return this.#forcedBy === undefined
      ? 0
      : 128 + SIGNAL_NUMBERS[this.#forcedBy];
  }
}

/** `n` and `noun`, plural unless `n` is 1: "1 client", "2 clients". */
function count(n: number, noun: string): string {
  return `${n} ${noun}${n === 1 ? "" : "s"}`;
}

/** Options for {@linkcode TerminalWatch}. */
export interface TerminalWatchOptions {
  /**
   * Receives the line said once the terminal has closed without its
   * hangup stopping the server.
   *
   * @default {console.error}
   */
  onDetached?: (line: string) => void;
  /**
   * Clock and timer.
   *
   * @default {REAL_CLOCK from reporter.ts}
   */
  clock?: ReporterClock;
}

/** How often a {@linkcode TerminalWatch} looks at its terminal. */
export const TERMINAL_POLL_MS = 1000;

/**
 * How long after a {@linkcode TerminalWatch} saw its terminal gone a SIGHUP
 * still counts as the terminal's hangup.
 */
export const HANGUP_WINDOW_MS = 3000;

/**
 * Tells the terminal's hangup from a later SIGHUP, for
 * {@linkcode GracefulShutdownOptions.terminalGone}. The hangup comes as the
 * terminal closes; a server that outlives it (started with `&` and
 * `disown`, so the shell sends its jobs no SIGHUP) is a service from then
 * on, and logrotate's SIGHUP hours later must reopen the log, not stop it.
 * So it looks at the terminal every {@linkcode TERMINAL_POLL_MS}; a SIGHUP
 * is the hangup while the terminal is gone and was seen gone for less than
 * {@linkcode HANGUP_WINDOW_MS} (or not yet seen gone): a stalled event loop
 * delays the poll and the signal alike. After that it says so once.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { FakeClock } from "./test_util.ts";
 * const clock = new FakeClock();
 * const stdin = { open: true, isTerminal() { return this.open; } };
 * const lines: string[] = [];
 * const options = { clock, onDetached: (line: string) => lines.push(line) };
 *
 * // Closed, and no SIGHUP came: a later one reopens the log.
 * const survivor = new TerminalWatch([stdin], options);
 * stdin.open = false;
 * clock.advance(TERMINAL_POLL_MS);
 * clock.advance(HANGUP_WINDOW_MS);
 * assert.equal(survivor.hungUp(), false);
 * assert.equal(lines.length, 1);
 *
 * // Its SIGHUP comes as it closes: the hangup, and the watch is done.
 * stdin.open = true;
 * const foreground = new TerminalWatch([stdin], options);
 * stdin.open = false;
 * assert.equal(foreground.hungUp(), true);
 * assert.equal(clock.pending, 0);
 * ```
 */
export class TerminalWatch {
  #files: { isTerminal(): boolean }[];
  #clock: ReporterClock;
  #onDetached: (line: string) => void;
  #timer: unknown;
  #detached = false;

  /** Starts looking at `files`, the terminal the server started in. */
  constructor(
    files: { isTerminal(): boolean }[],
    options: TerminalWatchOptions = {},
  ) {
    this.#files = files;
    this.#clock = options.clock ?? REAL_CLOCK;
    this.#onDetached = options.onDetached ?? console.error;
    this.#poll();
  }

  /**
   * Whether a SIGHUP now is the terminal's hangup; once it is, the watch
   * stops (the server is stopping: no line to say).
   */
  hungUp(): boolean {
    if (this.#detached || this.#files.some((file) => file.isTerminal())) {
      return false;
    }
    this.close();
    return true;
  }

  /** Stops looking. */
  close(): void {
    this.#clock.clearTimeout(this.#timer);
    this.#timer = undefined;
  }

  #poll(): void {
    const gone = !this.#files.some((file) => file.isTerminal());
    this.#timer = this.#clock.setTimeout(
      gone ? () => this.#detach() : () => this.#poll(),
      gone ? HANGUP_WINDOW_MS : TERMINAL_POLL_MS,
    );
    // It never keeps the process alive by itself.
    if (this.#clock === REAL_CLOCK) Deno.unrefTimer(this.#timer as number);
  }

  #detach(): void {
    this.#timer = undefined;
    this.#detached = true;
    this.#onDetached(
      "the terminal closed and its hangup did not reach the server: " +
        "serving on; SIGHUP reopens the access log",
    );
  }
}
