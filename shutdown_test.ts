import assert from "node:assert/strict";
import type { ReporterClock } from "./reporter.ts";
import {
  GracefulShutdown,
  type GracefulShutdownOptions,
  SAME_SIGNAL_WINDOW_MS,
  type ShutdownParts,
} from "./shutdown.ts";

/** A clock that moves only when told to; timers fire as it passes them. */
class FakeClock implements ReporterClock {
  #now = 1000;
  #nextHandle = 1;
  #timers = new Map<number, { at: number; callback: () => void }>();

  now(): number {
    return this.#now;
  }

  setTimeout(callback: () => void, ms: number): number {
    const handle = this.#nextHandle++;
    this.#timers.set(handle, { at: this.#now + ms, callback });
    return handle;
  }

  clearTimeout(handle: unknown): void {
    if (typeof handle === "number") this.#timers.delete(handle);
  }

  /** Timers set and neither fired nor cleared. */
  get pendingTimers(): number {
    return this.#timers.size;
  }

  /** Moves `ms` on, firing each timer due on the way at its own time. */
  advance(ms: number): void {
    const end = this.#now + ms;
    for (;;) {
      const due = [...this.#timers].filter(([, timer]) => timer.at <= end)
        .sort(([, a], [, b]) => a.at - b.at)[0];
      if (due === undefined) break;
      const [handle, timer] = due;
      this.#timers.delete(handle);
      this.#now = timer.at;
      timer.callback();
    }
    this.#now = end;
  }
}

/**
 * Stand-ins for the echo server, the metrics server, the access log and
 * stderr that record every call in order (`calls`) and every stderr line
 * (`lines`). The drain ends when the test says so, or at once when cut.
 */
class FakeParts {
  calls: string[] = [];
  lines: string[] = [];
  droppedLines = 0;
  /** Settles with the options of the log's flush once it starts. */
  flushStarted = Promise.withResolvers<
    { timeoutMs?: number; signal?: AbortSignal }
  >();
  /** Settles once the last stderr flush starts (with `stallStderr`). */
  stderrFlushStarted = Promise.withResolvers<void>();
  #drained = Promise.withResolvers<void>();
  #flushed = Promise.withResolvers<void>();
  #stderrStalled: PromiseWithResolvers<void> | undefined;

  server = {
    connections: 1,
    clientsAccepted: 2,
    shutdown: (options?: { drainTimeoutMs?: number }) => {
      this.calls.push(`server.shutdown ${options?.drainTimeoutMs}`);
      if (options?.drainTimeoutMs === 0) this.finishDrain();
      return this.#drained.promise;
    },
  };

  log = {
    stats: { backlogLines: 0 },
    reopen: () => {
      this.calls.push("log.reopen");
      return Promise.resolve(true);
    },
    flush: (options: { timeoutMs?: number; signal?: AbortSignal } = {}) =>
      this.#flush(options),
    close: () => {
      this.calls.push("log.close");
      const lost = this.log.stats.backlogLines + this.droppedLines;
      if (lost > 0) this.lines.push(`(the log's own line: ${lost} lost)`);
      return lost;
    },
  };

  diagnostics = {
    write: (line: string) => {
      this.lines.push(line);
    },
    flush: async () => {
      this.calls.push(`diagnostics.flush after ${this.lines.length} lines`);
      if (this.#stderrStalled !== undefined) {
        this.stderrFlushStarted.resolve();
        await this.#stderrStalled.promise;
      }
      return true;
    },
  };

  metrics: ShutdownParts["metrics"];

  constructor(options: { metrics?: boolean; stallStderr?: boolean } = {}) {
    if (options.metrics) {
      this.metrics = {
        setDraining: () => {
          this.calls.push("metrics.setDraining");
        },
        shutdown: () => {
          this.calls.push("metrics.shutdown");
          return Promise.resolve();
        },
      };
    }
    if (options.stallStderr) this.#stderrStalled = Promise.withResolvers();
  }

  /** Every part, as {@linkcode GracefulShutdown} takes them. */
  get parts(): ShutdownParts {
    const { server, metrics, log, diagnostics } = this;
    return { server, metrics, log, diagnostics };
  }

  /** The clients in flight finish. */
  finishDrain(): void {
    this.server.connections = 0;
    this.#drained.resolve();
  }

  /** The disk takes the backlog again: the log's flush writes it all. */
  finishFlush(): void {
    this.log.stats.backlogLines = 0;
    this.#flushed.resolve();
  }

  /** stderr is read again. */
  resumeStderr(): void {
    this.#stderrStalled?.resolve();
  }

  async #flush(
    options: { timeoutMs?: number; signal?: AbortSignal },
  ): Promise<number> {
    this.calls.push(`log.flush ${options.timeoutMs}`);
    this.flushStarted.resolve(options);
    if (this.log.stats.backlogLines > 0 && (options.timeoutMs ?? 0) > 0) {
      const aborted = Promise.withResolvers<void>();
      options.signal?.addEventListener("abort", () => aborted.resolve());
      await Promise.race([this.#flushed.promise, aborted.promise]);
    }
    return this.log.stats.backlogLines;
  }
}

/**
 * A {@linkcode GracefulShutdown} on a fake clock and fake parts; `parts`
 * says which fakes.
 */
function start(
  options: GracefulShutdownOptions = {},
  parts: ConstructorParameters<typeof FakeParts>[0] = {},
): { fake: FakeParts; clock: FakeClock; shutdown: GracefulShutdown } {
  const fake = new FakeParts(parts);
  const clock = new FakeClock();
  const shutdown = new GracefulShutdown(fake.parts, { clock, ...options });
  return { fake, clock, shutdown };
}

/** Lets every pending promise callback run, to see what did not happen. */
function settle(): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, 0));
}

Deno.test("GracefulShutdown on one SIGINT drains, stops the metrics server, flushes the log and exits 0", async () => {
  const { fake, shutdown } = start({ drainTimeoutMs: 10_000 }, {
    metrics: true,
  });
  shutdown.onSignal("SIGINT");
  assert.deepEqual(fake.calls, [
    "metrics.setDraining",
    "server.shutdown 10000",
  ]);
  await settle();
  assert.equal(fake.calls.length, 2, "stops nothing more before the drain");
  fake.finishDrain();
  assert.equal(await shutdown.exitStatus, 0);
  assert.deepEqual(fake.calls, [
    "metrics.setDraining",
    "server.shutdown 10000",
    "metrics.shutdown",
    "log.flush 10000",
    "diagnostics.flush after 2 lines",
    "log.close",
  ]);
  assert.equal((await fake.flushStarted.promise).signal?.aborted, false);
  assert.deepEqual(fake.lines, [
    "SIGINT: stopping; 1 connection gets up to 10 s to finish",
    "stopped after 2 clients",
  ]);
});

Deno.test("GracefulShutdown takes a second signal within SAME_SIGNAL_WINDOW_MS of the first as the same request", async () => {
  const { fake, clock, shutdown } = start({ drainTimeoutMs: 3_600_000 });
  shutdown.onSignal("SIGINT");
  shutdown.onSignal("SIGINT");
  clock.advance(SAME_SIGNAL_WINDOW_MS - 1);
  shutdown.onSignal("SIGTERM");
  assert.deepEqual(fake.calls, ["server.shutdown 3600000"]);
  fake.finishDrain();
  assert.equal(await shutdown.exitStatus, 0);
  assert.deepEqual(fake.lines, [
    "SIGINT: stopping; 1 connection gets up to 3600 s to finish",
    "stopped after 2 clients",
  ]);
});

Deno.test("GracefulShutdown on SIGHUP reopens the log and keeps serving, with no terminal or while its terminal is open", async () => {
  for (const terminalGone of [undefined, () => false]) {
    const { fake, clock, shutdown } = start({ terminalGone });
    shutdown.onSignal("SIGHUP");
    // A second SIGHUP is a second reopen, never a cut or a stop.
    clock.advance(SAME_SIGNAL_WINDOW_MS);
    shutdown.onSignal("SIGHUP");
    await settle();
    assert.deepEqual(fake.calls, ["log.reopen", "log.reopen"]);
    assert.deepEqual(fake.lines, []);
    shutdown.onSignal("SIGTERM");
    fake.finishDrain();
    assert.equal(await shutdown.exitStatus, 0);
    assert.deepEqual(fake.lines, [
      "SIGTERM: stopping; 1 connection gets up to 10 s to finish",
      "stopped after 2 clients",
    ]);
  }
});

Deno.test("GracefulShutdown on SIGHUP once its terminal has closed drains as on SIGINT and exits 0, taking later SIGHUPs as the same hangup", async () => {
  let terminalGone = false;
  const { fake, clock, shutdown } = start({
    drainTimeoutMs: 10_000,
    terminalGone: () => terminalGone,
  }, { metrics: true });
  // logrotate's SIGHUP while the terminal is open.
  shutdown.onSignal("SIGHUP");
  assert.deepEqual(fake.calls, ["log.reopen"]);
  terminalGone = true;
  shutdown.onSignal("SIGHUP");
  // The copies of the hangup (deno task's, the shell's), early or late.
  shutdown.onSignal("SIGHUP");
  clock.advance(SAME_SIGNAL_WINDOW_MS);
  shutdown.onSignal("SIGHUP");
  await settle();
  assert.deepEqual(fake.calls, [
    "log.reopen",
    "metrics.setDraining",
    "server.shutdown 10000",
  ]);
  fake.finishDrain();
  assert.equal(await shutdown.exitStatus, 0);
  assert.deepEqual(fake.calls.slice(3), [
    "metrics.shutdown",
    "log.flush 9500",
    "diagnostics.flush after 2 lines",
    "log.close",
  ]);
  assert.deepEqual(fake.lines, [
    "SIGHUP, terminal closed: stopping; 1 connection gets up to 10 s to finish",
    "stopped after 2 clients",
  ]);
});

Deno.test("GracefulShutdown after its terminal's hangup takes a SIGINT within SAME_SIGNAL_WINDOW_MS as the same request, and one after as a cut (exit 130)", async () => {
  const { fake, clock, shutdown } = start({
    shutdownDelayMs: 5000,
    terminalGone: () => true,
  });
  shutdown.onSignal("SIGHUP");
  shutdown.onSignal("SIGINT");
  assert.deepEqual(fake.calls, []);
  clock.advance(SAME_SIGNAL_WINDOW_MS);
  shutdown.onSignal("SIGINT");
  assert.equal(await shutdown.exitStatus, 130);
  assert.equal(clock.pendingTimers, 0);
  assert.deepEqual(fake.lines, [
    "SIGHUP, terminal closed: stopping in 5 s; accepting until then",
    "SIGINT again: cutting off 1 connection now",
    "stopped after 2 clients",
  ]);
});

for (const [signal, status] of [["SIGINT", 130], ["SIGTERM", 143]] as const) {
  Deno.test(`GracefulShutdown on a second ${signal} after SAME_SIGNAL_WINDOW_MS cuts everyone off, aborts the log's flush and exits ${status}`, async () => {
    const { fake, clock, shutdown } = start({ drainTimeoutMs: 10_000 }, {
      metrics: true,
    });
    shutdown.onSignal(signal);
    clock.advance(SAME_SIGNAL_WINDOW_MS);
    shutdown.onSignal(signal);
    // Any later signal changes nothing.
    clock.advance(SAME_SIGNAL_WINDOW_MS);
    shutdown.onSignal("SIGINT");
    assert.equal(await shutdown.exitStatus, status);
    assert.deepEqual(fake.calls, [
      "metrics.setDraining",
      "server.shutdown 10000",
      "server.shutdown 0",
      "metrics.shutdown",
      "log.flush 0",
      "diagnostics.flush after 3 lines",
      "log.close",
    ]);
    assert.equal((await fake.flushStarted.promise).signal?.aborted, true);
    assert.deepEqual(fake.lines, [
      `${signal}: stopping; 1 connection gets up to 10 s to finish`,
      `${signal} again: cutting off 1 connection now`,
      "stopped after 2 clients",
    ]);
  });
}

Deno.test("GracefulShutdown on a second SIGTERM during the log's flush aborts it, and exits 1 for the line still waiting", async () => {
  const { fake, clock, shutdown } = start({ drainTimeoutMs: 10_000 });
  fake.log.stats.backlogLines = 1;
  shutdown.onSignal("SIGTERM");
  clock.advance(4000);
  fake.finishDrain();
  const flush = await fake.flushStarted.promise;
  assert.equal(flush.signal?.aborted, false);
  shutdown.onSignal("SIGTERM");
  assert.equal(flush.signal?.aborted, true);
  assert.equal(await shutdown.exitStatus, 1);
  assert.deepEqual(fake.calls, [
    "server.shutdown 10000",
    "log.flush 6000",
    "server.shutdown 0",
    "diagnostics.flush after 4 lines",
    "log.close",
    "diagnostics.flush after 5 lines",
  ]);
  assert.deepEqual(fake.lines, [
    "SIGTERM: stopping; 1 connection gets up to 10 s to finish",
    "access log: writing 1 waiting line for up to 6.0 s; a second SIGINT/SIGTERM cuts this off",
    "SIGTERM again: cutting off 0 connections now and the access log's 1 waiting line",
    "stopped after 2 clients",
    "(the log's own line: 1 lost)",
  ]);
});

Deno.test("GracefulShutdown with shutdownDelayMs keeps accepting with /healthz draining, then drains and exits 0", async () => {
  const { fake, clock, shutdown } = start({
    drainTimeoutMs: 10_000,
    shutdownDelayMs: 2000,
  }, { metrics: true });
  shutdown.onSignal("SIGTERM");
  clock.advance(1999);
  assert.deepEqual(fake.calls, ["metrics.setDraining"]);
  assert.deepEqual(fake.lines, [
    "SIGTERM: stopping in 2 s; accepting until then, /healthz answers 503",
  ]);
  clock.advance(1);
  assert.deepEqual(fake.calls, [
    "metrics.setDraining",
    "server.shutdown 10000",
  ]);
  fake.finishDrain();
  assert.equal(await shutdown.exitStatus, 0);
  assert.deepEqual(fake.lines, [
    "SIGTERM: stopping in 2 s; accepting until then, /healthz answers 503",
    "SIGTERM: stopping; 1 connection gets up to 10 s to finish",
    "stopped after 2 clients",
  ]);
});

Deno.test("GracefulShutdown on a second SIGINT during shutdownDelayMs cuts off at once, without a drain, and exits 130", async () => {
  const { fake, clock, shutdown } = start({ shutdownDelayMs: 3_600_000 }, {
    metrics: true,
  });
  shutdown.onSignal("SIGINT");
  clock.advance(SAME_SIGNAL_WINDOW_MS);
  shutdown.onSignal("SIGINT");
  assert.equal(clock.pendingTimers, 0, "the delay's timer is cleared");
  assert.equal(await shutdown.exitStatus, 130);
  clock.advance(3_600_000);
  assert.deepEqual(fake.calls, [
    "metrics.setDraining",
    "server.shutdown 0",
    "metrics.shutdown",
    "log.flush 0",
    "diagnostics.flush after 3 lines",
    "log.close",
  ]);
  assert.deepEqual(fake.lines, [
    "SIGINT: stopping in 3600 s; accepting until then, /healthz answers 503",
    "SIGINT again: cutting off 1 connection now",
    "stopped after 2 clients",
  ]);
});

Deno.test("GracefulShutdown gives the log's flush only what is left of the drain time after shutdownDelayMs", async () => {
  const { fake, clock, shutdown } = start({
    drainTimeoutMs: 10_000,
    shutdownDelayMs: 250,
  });
  fake.log.stats.backlogLines = 2;
  shutdown.onSignal("SIGINT");
  clock.advance(250);
  // The drain takes 7 of its 10 s; the delay does not count.
  clock.advance(7000);
  fake.finishDrain();
  assert.equal((await fake.flushStarted.promise).timeoutMs, 3000);
  fake.finishFlush();
  assert.equal(await shutdown.exitStatus, 0);
  assert.deepEqual(fake.lines, [
    "SIGINT: stopping in 0.25 s; accepting until then",
    "SIGINT: stopping; 1 connection gets up to 10 s to finish",
    "access log: writing 2 waiting lines for up to 3.0 s; a second SIGINT/SIGTERM cuts this off",
    "stopped after 2 clients",
  ]);
});

Deno.test("GracefulShutdown gives the log's flush no time when the drain used all of it, and exits 1 for the lines still waiting", async () => {
  const { fake, clock, shutdown } = start({ drainTimeoutMs: 10_000 });
  fake.log.stats.backlogLines = 2;
  shutdown.onSignal("SIGTERM");
  clock.advance(10_001);
  fake.finishDrain();
  assert.equal(await shutdown.exitStatus, 1);
  assert.deepEqual(fake.calls, [
    "server.shutdown 10000",
    "log.flush 0",
    "diagnostics.flush after 2 lines",
    "log.close",
    "diagnostics.flush after 3 lines",
  ]);
  assert.deepEqual(fake.lines, [
    "SIGTERM: stopping; 1 connection gets up to 10 s to finish",
    "stopped after 2 clients",
    "(the log's own line: 2 lost)",
  ]);
});

for (
  const [signals, stoppedBy] of [[1, "a drain"], [2, "a cut-off"]] as const
) {
  Deno.test(`GracefulShutdown exits 1 when access log lines were dropped, after ${stoppedBy}`, async () => {
    const { fake, clock, shutdown } = start();
    fake.droppedLines = 5;
    shutdown.onSignal("SIGTERM");
    clock.advance(SAME_SIGNAL_WINDOW_MS);
    if (signals === 2) shutdown.onSignal("SIGTERM");
    else fake.finishDrain();
    assert.equal(await shutdown.exitStatus, 1);
    assert.deepEqual(fake.calls.slice(-3), [
      `diagnostics.flush after ${signals + 1} lines`,
      "log.close",
      `diagnostics.flush after ${signals + 2} lines`,
    ]);
    assert.deepEqual(fake.lines, [
      "SIGTERM: stopping; 1 connection gets up to 10 s to finish",
      ...(signals === 2 ? ["SIGTERM again: cutting off 1 connection now"] : []),
      "stopped after 2 clients",
      "(the log's own line: 5 lost)",
    ]);
  });
}

Deno.test("GracefulShutdown on a second SIGTERM while its last lines wait for stderr cuts off and exits 143", async () => {
  const { fake, clock, shutdown } = start({}, { stallStderr: true });
  shutdown.onSignal("SIGTERM");
  fake.finishDrain();
  await fake.stderrFlushStarted.promise;
  clock.advance(SAME_SIGNAL_WINDOW_MS);
  shutdown.onSignal("SIGTERM");
  fake.resumeStderr();
  assert.equal(await shutdown.exitStatus, 143);
  assert.deepEqual(fake.calls, [
    "server.shutdown 10000",
    "log.flush 10000",
    "diagnostics.flush after 2 lines",
    "server.shutdown 0",
    "log.close",
  ]);
  assert.deepEqual(fake.lines, [
    "SIGTERM: stopping; 1 connection gets up to 10 s to finish",
    "stopped after 2 clients",
    "SIGTERM again: cutting off 0 connections now",
  ]);
});

Deno.test("GracefulShutdown on its default clock clears the delay's timer on a cut, leaving no timer behind", async () => {
  const fake = new FakeParts();
  const shutdown = new GracefulShutdown(fake.parts, {
    shutdownDelayMs: 3_600_000,
  });
  shutdown.onSignal("SIGTERM");
  // Real time must pass for a second signal to count as a second request.
  await new Promise((resolve) =>
    setTimeout(resolve, SAME_SIGNAL_WINDOW_MS + 50)
  );
  shutdown.onSignal("SIGTERM");
  assert.equal(await shutdown.exitStatus, 143);
  // The ops sanitizer fails the test if the delay's timer is still set.
});
