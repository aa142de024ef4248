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
import { GracefulShutdown, TerminalWatch } from "./shutdown.ts";
import { parseFlags, USAGE } from "./options.ts";

export { SAME_SIGNAL_WINDOW_MS } from "./shutdown.ts";

/** The flags a listen error points the user at. */
interface ListenFlags {
  /** The flag that set the address: `--host`, or `--metrics`. */
  host: string;
  /** The flag that set the port: `--port`, or `--metrics`. */
  port: string;
}

function describeListenError(
  error: unknown,
  address: string,
  flags: ListenFlags,
): string {
  const prefix = `cannot listen on ${address}`;
  if (error instanceof Deno.errors.AddrInUse) {
    return `${prefix}: address already in use (is another server running? pick another ${flags.port})`;
  }
  if (error instanceof Deno.errors.AddrNotAvailable) {
    return `${prefix}: address not available on this machine (check ${flags.host})`;
  }
  if (error instanceof Deno.errors.NotCapable) {
    return `${prefix}: permission to use the network was not granted (run with --allow-net)`;
  }
  if (error instanceof Deno.errors.PermissionDenied) {
    return `${prefix}: permission denied (ports below 1024 need privileges; pick another ${flags.port})`;
  }
  // A name the resolver does not know (or an address such as 999.1.1.1 that
  // is none): Deno throws a plain Error for it.
  if (/^failed to lookup address/.test(errorMessage(error))) {
    return `${prefix}: no such host (check ${flags.host}; an address such as 127.0.0.1 or ::1 needs no lookup)`;
  }
  return `${prefix}: ${errorMessage(error)}`;
}

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
    console.error(
      `echo-server: ${
        describeListenError(error, address, { host: "--host", port: "--port" })
      }`,
    );
    return 1;
  }
  diagnostic(
    `listening on ${
      formatHostPort(server.addr.hostname, server.addr.port)
    }, access log ${config.logPath}${
      config.proxyProtocol === undefined
        ? ""
        : `, PROXY protocol from ${config.proxyProtocol}`
    }`,
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
        `echo-server: --metrics: ${
          describeListenError(error, address, {
            host: "--metrics",
            port: "--metrics",
          })
        }`,
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

  // Under a file-size limit (LimitFSIZE=, ulimit -f), a write past it raises
  // SIGXFSZ, whose default action ends the process; handled, the write
  // fails with EFBIG instead and the line waits in the log's backlog.
  Deno.addSignalListener("SIGXFSZ", () => {});
  // Started in a terminal when stdin, stdout or stderr is one. Closing the
  // terminal hangs them all up (isTerminal() false) before its SIGHUP.
  const terminals = [Deno.stdin, Deno.stdout, Deno.stderr]
    .filter((file) => file.isTerminal());
  const terminal = terminals.length === 0
    ? undefined
    : new TerminalWatch(terminals, { onDetached: diagnostic });
  const shutdown = new GracefulShutdown(
    { server, metrics, log, diagnostics },
    { ...config, terminalGone: terminal && (() => terminal.hungUp()) },
  );
  // Every listener stays installed to the exit: without one Deno restores
  // a signal's default action, and a SIGHUP in the exit's flushes
  // (logrotate's postrotate during a restart) would end the process (129)
  // before its last line is out.
  for (const signal of ["SIGINT", "SIGTERM", "SIGHUP"] as const) {
    Deno.addSignalListener(signal, () => shutdown.onSignal(signal));
  }
  return await shutdown.exitStatus;
}

if (import.meta.main) {
  Deno.exit(await main(Deno.args));
}
