/**
 * Command line entry point: parses flags, opens the access log, starts the
 * server, and turns signals into log reopening and graceful shutdown.
 *
 * @module
 */

import { errorMessage } from "./_errors.ts";
import denoJson from "./deno.json" with { type: "json" };
import { AccessLog } from "./access_log.ts";
import { Diagnostics } from "./diagnostics.ts";
import { serveEcho } from "./server.ts";
import { formatHostPort, UsageError } from "./flags.ts";
import { type MetricsServer, serveMetrics } from "./metrics.ts";
import { parseFlags, USAGE } from "./options.ts";

function describeListenError(error: unknown, address: string): string {
  if (error instanceof Deno.errors.AddrInUse) {
    return `cannot listen on ${address}: address already in use (is another server running? pick another --port)`;
  }
  if (error instanceof Deno.errors.AddrNotAvailable) {
    return `cannot listen on ${address}: address not available on this machine (check --host)`;
  }
  if (error instanceof Deno.errors.NotCapable) {
    return `cannot listen on ${address}: permission to use the network was not granted (run with --allow-net)`;
  }
  if (error instanceof Deno.errors.PermissionDenied) {
    return `cannot listen on ${address}: permission denied (ports below 1024 need privileges; pick another --port)`;
  }
  return `cannot listen on ${address}: ${errorMessage(error)}`;
}

const SIGNAL_NUMBERS = { SIGINT: 2, SIGTERM: 15 } as const;

/**
 * A SIGINT/SIGTERM this soon after the first is the same request, not a
 * second one: a terminal's Ctrl-C reaches the whole foreground process
 * group, and `deno task` forwards its copy to the server 1-2 ms later.
 */
export const SAME_SIGNAL_WINDOW_MS = 500;

/**
 * Runs the server with the given command line until it is stopped by a
 * signal, and returns the exit status. Its signal listeners stay installed,
 * so that no SIGHUP, SIGINT or SIGTERM kills the process before the caller
 * exits with that status.
 *
 * @example
 * ```ts ignore
 * Deno.exit(await main(["--port", "0", "--log", "/tmp/access.log"]));
 * ```
 */
export async function main(args: string[]): Promise<number> {
  let config;
  try {
    config = parseFlags(args);
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    console.error(
      `echo-server: ${error.message}\nTry 'echo-server --help' for more information.`,
    );
    return 2;
  }
  if (config === "help") {
    console.log(USAGE);
    return 0;
  }
  if (config === "version") {
    console.log(`echo-server ${denoJson.version}`);
    return 0;
  }

  let log: AccessLog;
  // Set below, once serving; until then the log has written nothing.
  let diagnostic = (message: string) => console.error(message);
  try {
    log = AccessLog.open(config.logPath, {
      maxBacklogBytes: config.logBacklogBytes,
      onDiagnostic: (message) => diagnostic(message),
    });
  } catch (error) {
    console.error(`echo-server: ${errorMessage(error)}`);
    return 1;
  }

  // Once serving, every stderr line goes through one queue written in the
  // background: console.error blocks in write(2) when nobody reads stderr
  // (a stalled log shipper, a paused terminal), and that would stop
  // accepting, serving and signal handling. Lines about single clients
  // come at most 10 a second (server.ts), so the queue rarely fills; if it
  // does, lines are dropped and counted rather than block. Errors before
  // serving stay synchronous: they must be out before the exit.
  const diagnostics = new Diagnostics();
  diagnostic = (message: string) => diagnostics.write(message);
  let server;
  try {
    server = serveEcho((clientId, bytesReceived) => {
      log.record(clientId, bytesReceived);
    }, { ...config, onDiagnostic: diagnostic });
  } catch (error) {
    log.close();
    const address = formatHostPort(config.hostname, config.port);
    console.error(`echo-server: ${describeListenError(error, address)}`);
    return 1;
  }
  diagnostic(
    `listening on ${
      formatHostPort(server.addr.hostname, server.addr.port)
    }, access log ${config.logPath}`,
  );

  let metrics: MetricsServer | undefined;
  if (config.metrics !== undefined) {
    try {
      metrics = serveMetrics(server, {
        ...config.metrics,
        onDiagnostic: diagnostic,
        accessLog: log,
      });
    } catch (error) {
      await server.shutdown({ drainTimeoutMs: 0 });
      log.close();
      const address = formatHostPort(
        config.metrics.hostname,
        config.metrics.port,
      );
      diagnostic(
        `echo-server: --metrics: ${describeListenError(error, address)}`,
      );
      await diagnostics.flush();
      return 1;
    }
    diagnostic(
      `metrics on http://${
        formatHostPort(metrics.addr.hostname, metrics.addr.port)
      }/metrics and /healthz`,
    );
  }

  // access_log.ts reports the reopen, and retries it until it works.
  const reopenLog = () => log.reopen();
  // Under a file-size limit (LimitFSIZE=, ulimit -f), a write past it raises
  // SIGXFSZ, whose default action ends the process; handled, the write
  // fails with EFBIG instead and the line waits in the log's backlog.
  const ignore = () => {};
  Deno.addSignalListener("SIGXFSZ", ignore);
  let forcedBy: keyof typeof SIGNAL_NUMBERS | undefined;
  const drained = Promise.withResolvers<Promise<void>>();
  let stopping = false;
  let delayTimer: ReturnType<typeof setTimeout> | undefined;
  let firstSignalAt = 0;
  let drainEnds = Infinity;
  // A second signal during the exit's log flush (a full disk) ends it too.
  const cutFlush = new AbortController();
  const closeAndDrain = (signal: keyof typeof SIGNAL_NUMBERS) => {
    drainEnds = performance.now() + config.drainTimeoutMs;
    drained.resolve(
      server.shutdown({ drainTimeoutMs: config.drainTimeoutMs }),
    );
    diagnostic(
      `${signal}: stopping; ${server.connections} connections get up to ${
        config.drainTimeoutMs / 1000
      } s to finish`,
    );
  };
  const stop = (signal: keyof typeof SIGNAL_NUMBERS) => {
    if (!stopping) {
      stopping = true;
      firstSignalAt = performance.now();
      // A load balancer's health check sees 503 and stops sending clients;
      // those it sends meanwhile are still served during the delay.
      metrics?.setDraining();
      if (config.shutdownDelayMs === 0) return closeAndDrain(signal);
      diagnostic(
        `${signal}: stopping in ${
          config.shutdownDelayMs / 1000
        } s; accepting until then${
          metrics === undefined ? "" : ", /healthz answers 503"
        }`,
      );
      delayTimer = setTimeout(() => {
        delayTimer = undefined;
        closeAndDrain(signal);
      }, config.shutdownDelayMs);
    } else if (
      forcedBy === undefined &&
      performance.now() - firstSignalAt >= SAME_SIGNAL_WINDOW_MS
    ) {
      forcedBy = signal;
      const { backlogLines } = log.stats;
      diagnostic(
        `${signal} again: cutting off ${server.connections} connections now${
          backlogLines === 0
            ? ""
            : ` and the access log's ${backlogLines} waiting ${
              backlogLines === 1 ? "line" : "lines"
            }`
        }`,
      );
      cutFlush.abort();
      clearTimeout(delayTimer);
      delayTimer = undefined;
      drained.resolve(server.shutdown({ drainTimeoutMs: 0 }));
    }
  };
  const onInt = () => stop("SIGINT");
  const onTerm = () => stop("SIGTERM");
  Deno.addSignalListener("SIGINT", onInt);
  Deno.addSignalListener("SIGTERM", onTerm);
  Deno.addSignalListener("SIGHUP", reopenLog);
  await await drained.promise;

  await metrics?.shutdown();
  // The backlog (a full disk) gets what is left of the drain time: a
  // second drain time would outlast systemd's TimeoutStopSec (delay +
  // drain, deploy/), whose SIGKILL loses the backlog without a count.
  const flushMs = forcedBy ? 0 : Math.max(0, drainEnds - performance.now());
  const { backlogLines } = log.stats;
  if (backlogLines > 0 && flushMs > 0) {
    diagnostic(
      `access log: writing ${backlogLines} waiting ${
        backlogLines === 1 ? "line" : "lines"
      } for up to ${
        (flushMs / 1000).toFixed(1)
      } s; a second SIGINT/SIGTERM cuts this off`,
    );
  }
  await log.flush({ timeoutMs: flushMs, signal: cutFlush.signal });
  diagnostic(`stopped after ${server.clientsAccepted} clients`);
  // Every line out before the exit, unless stderr stays stalled for 5 s.
  // Until then a second SIGINT/SIGTERM still ends with 130/143.
  await diagnostics.flush();
  // The log stays open and every listener installed to the exit: without a
  // listener Deno restores a signal's default action, and a SIGHUP in the
  // flush above (logrotate's postrotate during a restart) killed the
  // process (129) before its last line was out. (SIGXFSZ too: a write past
  // a file-size limit would end the process.)
  const linesLost = log.close();
  if (linesLost > 0) {
    // Lines never written (dropped, or still waiting): close() said how
    // many; that line out too, and status 1 whatever stopped the server.
    await diagnostics.flush();
    return 1;
  }
  return forcedBy === undefined ? 0 : 128 + SIGNAL_NUMBERS[forcedBy];
}

if (import.meta.main) {
  Deno.exit(await main(Deno.args));
}
