/**
 * Command line entry point: parses flags, opens the access log, starts the
 * server, and turns signals into log reopening and graceful shutdown.
 *
 * @module
 */

import { errorMessage } from "./_errors.ts";
import denoJson from "./deno.json" with { type: "json" };
import { AccessLog, DEFAULT_MAX_BACKLOG_BYTES } from "./access_log.ts";
import { Diagnostics } from "./diagnostics.ts";
import {
  DEFAULT_DRAIN_TIMEOUT_MS,
  DEFAULT_EVICTION_GRACE_MS,
  DEFAULT_IDLE_TIMEOUT_MS,
  DEFAULT_MAX_BUFFERED_BYTES,
  DEFAULT_MAX_CLIENT_BYTES,
  DEFAULT_MAX_CONNECTIONS,
  DEFAULT_MIN_RATE,
  DEFAULT_MIN_RATE_GRACE_MS,
  DEFAULT_MIN_READ_RATE,
  MAX_INSTANCES,
  serveEcho,
} from "./server.ts";
import {
  formatHostPort,
  type HostPort,
  parseCommandLine,
  parseHostPort,
  parseInstance,
  parseInteger,
  parseMilliseconds,
  parseSize,
  stringFlags,
  UsageError,
} from "./flags.ts";
import { type MetricsServer, serveMetrics } from "./metrics.ts";

/** Everything the command line can set. */
export interface Config {
  /** Address to listen on (`--host`). */
  hostname: string;
  /** TCP port; 0 picks a free one (`--port`). */
  port: number;
  /** Access log file (`--log`). */
  logPath: string;
  /** Bytes of log lines kept in memory while the file takes no writes
   * (`--log-backlog`). */
  logBacklogBytes: number;
  /** Bytes one client may send (`--max-client-bytes`). */
  maxClientBytes: number;
  /** Buffer memory for all clients together (`--max-buffered`). */
  maxBufferedBytes: number;
  /** Clients served at once (`--max-connections`). */
  maxConnections: number;
  /** A client idle this long is cut off (`--idle-timeout`, in ms). */
  idleTimeoutMs: number;
  /** Bytes per second a client must send until it half-closes (`--min-rate`); 0 is off. */
  minRate: number;
  /** How long a client may send below it (`--min-rate-grace`, in ms). */
  minRateGraceMs: number;
  /** Bytes per second a client must read its echo at (`--min-read-rate`); 0 is off. */
  minReadRate: number;
  /** Clients younger than this are never evicted (`--eviction-grace`, in ms); 0 turns eviction off. */
  evictionGraceMs: number;
  /** Time clients get to finish on SIGINT/SIGTERM (`--drain-timeout`, in ms). */
  drainTimeoutMs: number;
  /** Time between SIGINT/SIGTERM and closing the listener, while /healthz
   * answers 503 and clients are still accepted (`--shutdown-delay`, in ms). */
  shutdownDelayMs: number;
  /** This instance's number among those sharing the log (`--instance I/N`). */
  instance: number;
  /** How many instances share the log (`--instance I/N`). */
  instances: number;
  /** Where to serve /metrics and /healthz (`--metrics`); absent: off. */
  metrics?: HostPort;
}

/** Where the access log goes unless `--log` says otherwise. */
export const DEFAULT_LOG_PATH = "/var/log/echo-server/access.log";

const MIB = 1024 * 1024;

/** The `--help` text. */
export const USAGE = `Usage: echo-server [options]

A TCP echo server: each client's bytes are read until it half-closes, then
sent back, and one line per client is appended to the access log.

Options:
  --host HOST              address to listen on (default 127.0.0.1)
  --port PORT              TCP port; 0 picks a free one (default 4000)
  --log PATH               access log (default ${DEFAULT_LOG_PATH})
  --log-backlog SIZE       log lines kept in memory while the disk takes no
                           writes; past it they are dropped (default ${
  DEFAULT_MAX_BACKLOG_BYTES / MIB
}MiB)
  --max-client-bytes SIZE  bytes one client may send (default ${
  DEFAULT_MAX_CLIENT_BYTES / MIB
}MiB)
  --max-buffered SIZE      buffer memory for all clients together (default ${
  DEFAULT_MAX_BUFFERED_BYTES / MIB
}MiB)
  --max-connections N      clients served at once; at the limit a newcomer
                           evicts a client of the biggest source (IPv4
                           address or IPv6 /64) (default ${DEFAULT_MAX_CONNECTIONS})
  --idle-timeout SECONDS   cut off a client idle this long (default ${
  DEFAULT_IDLE_TIMEOUT_MS / 1000
})
  --min-rate SIZE          bytes a second a client must send on average until
                           it half-closes, after --min-rate-grace; 0 is off
                           (default ${DEFAULT_MIN_RATE})
  --min-rate-grace SECONDS time a client may send below --min-rate (default ${
  DEFAULT_MIN_RATE_GRACE_MS / 1000
})
  --min-read-rate SIZE     bytes a second a client must read its echo at, on
                           average, once idle; 0 is off (default ${
  DEFAULT_MIN_READ_RATE / 1024
}KiB)
  --eviction-grace SECONDS clients connected this long may be evicted for a
                           newcomer at --max-connections; 0 turns eviction
                           off, for --max-buffered too (default ${
  DEFAULT_EVICTION_GRACE_MS / 1000
})
  --drain-timeout SECONDS  on SIGINT/SIGTERM, time clients get to finish (default ${
  DEFAULT_DRAIN_TIMEOUT_MS / 1000
})
  --shutdown-delay SECONDS on SIGINT/SIGTERM, keep accepting this long with
                           /healthz answering 503 before the drain (default 0)
  --instance I/N           instance I of N (N at most ${MAX_INSTANCES}) sharing one
                           access log: numbers its clients I, I+N, I+2N, ...
                           (default 1/1)
  --metrics HOST:PORT      serve Prometheus /metrics and /healthz over HTTP
                           (default off; :PORT alone binds 127.0.0.1)
  -h, --help               show this help
  -V, --version            show the version

SIZE is a number of bytes, optionally with a suffix KiB, MiB or GiB.
SECONDS may have a fraction, down to 0.001 (one millisecond).
Signals: SIGHUP reopens the access log; SIGINT or SIGTERM stops accepting
(after --shutdown-delay) and drains; a second SIGINT or SIGTERM cuts everyone
off at once. Signals within 500 ms of the first count as one: one Ctrl-C under
deno task arrives twice.`;

/**
 * Parses command line flags into a {@linkcode Config}, or returns `"help"`
 * or `"version"` when those were asked for. Throws {@linkcode UsageError}.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const config = parseFlags(["--port", "0", "--log", "/tmp/access.log"]);
 * assert.ok(typeof config === "object");
 * assert.equal(config.port, 0);
 * assert.equal(config.logPath, "/tmp/access.log");
 * assert.equal(parseFlags(["--help"]), "help");
 * ```
 */
export function parseFlags(args: string[]): Config | "help" | "version" {
  const { values } = parseCommandLine(args, {
    ...stringFlags([
      "host",
      "port",
      "log",
      "log-backlog",
      "max-client-bytes",
      "max-buffered",
      "max-connections",
      "idle-timeout",
      "min-rate",
      "min-rate-grace",
      "min-read-rate",
      "eviction-grace",
      "drain-timeout",
      "shutdown-delay",
      "instance",
      "metrics",
    ]),
    help: { type: "boolean", short: "h" },
    version: { type: "boolean", short: "V" },
  });
  if (values.help) return "help";
  if (values.version) return "version";
  if (values.host === "") throw new UsageError("--host must not be empty");
  if (values.log === "") throw new UsageError("--log must not be empty");
  return {
    hostname: values.host ?? "127.0.0.1",
    port: parseInteger("--port", values.port, { default: 4000, max: 65535 }),
    logPath: values.log ?? DEFAULT_LOG_PATH,
    logBacklogBytes: parseSize("--log-backlog", values["log-backlog"], {
      default: DEFAULT_MAX_BACKLOG_BYTES,
      // Room for a line's remainder after a short write, and then some.
      min: 4096,
    }),
    maxClientBytes: parseSize(
      "--max-client-bytes",
      values["max-client-bytes"],
      { default: DEFAULT_MAX_CLIENT_BYTES, min: 1 },
    ),
    maxBufferedBytes: parseSize("--max-buffered", values["max-buffered"], {
      default: DEFAULT_MAX_BUFFERED_BYTES,
      // Below this every client would be cut off at its first read.
      min: 64 * 1024,
    }),
    maxConnections: parseInteger(
      "--max-connections",
      values["max-connections"],
      { default: DEFAULT_MAX_CONNECTIONS, min: 1, max: 1_000_000 },
    ),
    idleTimeoutMs: parseMilliseconds("--idle-timeout", values["idle-timeout"], {
      default: DEFAULT_IDLE_TIMEOUT_MS,
    }),
    minRate: parseSize("--min-rate", values["min-rate"], {
      default: DEFAULT_MIN_RATE,
    }),
    minRateGraceMs: parseMilliseconds(
      "--min-rate-grace",
      values["min-rate-grace"],
      {
        default: DEFAULT_MIN_RATE_GRACE_MS,
      },
    ),
    minReadRate: parseSize("--min-read-rate", values["min-read-rate"], {
      default: DEFAULT_MIN_READ_RATE,
    }),
    evictionGraceMs: parseMilliseconds(
      "--eviction-grace",
      values["eviction-grace"],
      {
        default: DEFAULT_EVICTION_GRACE_MS,
        allowZero: true,
      },
    ),
    drainTimeoutMs: parseMilliseconds(
      "--drain-timeout",
      values["drain-timeout"],
      {
        default: DEFAULT_DRAIN_TIMEOUT_MS,
        allowZero: true,
      },
    ),
    shutdownDelayMs: parseMilliseconds(
      "--shutdown-delay",
      values["shutdown-delay"],
      {
        default: 0,
        allowZero: true,
      },
    ),
    ...parseInstance("--instance", values.instance, { max: MAX_INSTANCES }),
    ...(values.metrics === undefined ? {} : {
      metrics: parseHostPort("--metrics", values.metrics, "127.0.0.1"),
    }),
  };
}

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
