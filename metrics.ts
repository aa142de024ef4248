/**
 * The metrics endpoint: renders an {@linkcode EchoServer}'s counters in the
 * Prometheus text exposition format (version 0.0.4) and serves them over
 * HTTP with `Deno.serve`, with a health check for load balancers.
 *
 * - `GET /metrics`: the exposition.
 * - `GET /healthz`: `200 ok` while accepting, `503 draining` once
 *   {@linkcode MetricsServer.setDraining} was called.
 * - Any other path: 404; another method on those two paths: 405.
 *
 * It needs no permission beyond `--allow-net`. Deno 2.9 lets only
 * `--allow-all` read `/proc/self`, so `process_open_fds` and
 * `process_max_fds` (from `/proc/self/fd` and `/proc/self/limits`) appear
 * only under `--allow-all`; the other process
 * metrics come from `Deno.memoryUsage()`, `node:process` and
 * `performance.timeOrigin`, which need none.
 *
 * @module
 */

import process from "node:process";
import { errorMessage } from "./_errors.ts";
import type { AccessLogStats } from "./access_log.ts";
import { formatHostPort } from "./flags.ts";
import { RateLimitedReporter } from "./reporter.ts";
import { DURATION_BUCKETS_SECONDS, type EchoServer } from "./server.ts";

/** Options for {@linkcode serveMetrics}. */
export interface MetricsOptions {
  /**
   * Address to listen on.
   * @default {"127.0.0.1"}
   */
  hostname?: string;
  /**
   * TCP port; 0 picks a free one.
   * @default {9400}
   */
  port?: number;
  /**
   * Receives one-line diagnostics (the HTTP server failed and is being
   * restarted).
   * @default {console.error}
   */
  onDiagnostic?: (message: string) => void;
  /**
   * The access log whose backlog, drops and write errors are reported
   * (`AccessLog` from access_log.ts).
   * @default {none: those metrics read 0}
   */
  accessLog?: { readonly stats: AccessLogStats };
}

/** A running metrics endpoint. */
export interface MetricsServer extends AsyncDisposable {
  /** The address it listens on (useful with port 0). */
  readonly addr: Deno.NetAddr;
  /** Whether `/healthz` answers 503 (after {@linkcode setDraining}). */
  readonly draining: boolean;
  /** From now on `/healthz` answers `503 draining`, so a load balancer
   * stops sending clients while those in flight finish. */
  setDraining(): void;
  /**
   * Stops listening and closes every connection at once, without waiting
   * for requests in flight (a client whose request body never ends would
   * otherwise hold it up forever); resolves once the HTTP server has
   * stopped.
   */
  shutdown(): Promise<void>;
}

/** Default for {@linkcode MetricsOptions.port}. */
export const DEFAULT_METRICS_PORT = 9400;

/** The media type of the text exposition format, version 0.0.4. */
export const EXPOSITION_CONTENT_TYPE =
  "text/plain; version=0.0.4; charset=utf-8";

// Restarting after a failure (Deno.serve stops for good when its accept
// fails, e.g. with EMFILE): the delay doubles up to the maximum while
// restarts keep failing, and is reset by a request served.
const RESTART_MIN_MS = 100;
const RESTART_MAX_MS = 5000;

/** What a line about the HTTP server was about, as a summary counts it. */
type RestartLineKind = "stopped" | "restart_failed" | "restarted";

/**
 * Starts serving `/metrics` and `/healthz` for `server`. Throws the
 * `Deno.serve` error (e.g. `Deno.errors.AddrInUse`) if the address cannot
 * be bound. If the HTTP server later stops on its own (its accept failed,
 * e.g. out of file descriptors), it is restarted on the same address with a
 * back-off, and the echo server is never affected.
 *
 * @example
 * ```ts ignore
 * const server = serveEcho(() => {}, { port: 0 });
 * const metrics = serveMetrics(server, { port: 0 });
 * const response = await fetch(`http://127.0.0.1:${metrics.addr.port}/healthz`);
 * console.log(response.status, await response.text()); // 200 "ok\n"
 * await metrics.shutdown();
 * await server.shutdown();
 * ```
 */
export function serveMetrics(
  server: EchoServer,
  options: MetricsOptions = {},
): MetricsServer {
  return new Metrics(server, options);
}

/** One `Deno.serve` server, and how to stop it without waiting. */
interface Serving {
  http: Deno.HttpServer<Deno.NetAddr>;
  abort: AbortController;
  /** Whether `http.finished` has settled (aborting then would throw). */
  ended: boolean;
}

class Metrics implements MetricsServer {
  readonly addr: Deno.NetAddr;
  #server: EchoServer;
  // The back-off keeps these few, but like every repeated line they go
  // through the one rate limit (reporter.ts).
  #restartLines: RateLimitedReporter<RestartLineKind>;
  #accessLog: { readonly stats: AccessLogStats } | undefined;
  #serving: Serving | undefined;
  #draining = false;
  #stopped = false;
  #closed: Promise<void> | undefined;
  #restartMs = RESTART_MIN_MS;
  #restartTimer: ReturnType<typeof setTimeout> | undefined;

  constructor(server: EchoServer, options: MetricsOptions) {
    this.#server = server;
    this.#restartLines = new RateLimitedReporter(
      options.onDiagnostic ?? console.error,
      {
        kinds: ["stopped", "restart_failed", "restarted"],
        label: "metrics server line",
      },
    );
    this.#accessLog = options.accessLog;
    this.#serving = this.#listen(
      options.hostname ?? "127.0.0.1",
      options.port ?? DEFAULT_METRICS_PORT,
    );
    this.addr = this.#serving.http.addr;
  }

  get draining(): boolean {
    return this.#draining;
  }

  setDraining(): void {
    this.#draining = true;
  }

  shutdown(): Promise<void> {
    return this.#closed ??= this.#close();
  }

  async #close(): Promise<void> {
    this.#stopped = true;
    clearTimeout(this.#restartTimer);
    this.#restartLines.close();
    const serving = this.#serving;
    this.#serving = undefined;
    if (serving === undefined) return;
    // Not http.shutdown(): that waits for every connection to end, and one
    // whose request body never completes never does. Aborting the serve
    // signal closes them all now; a scrape cut short costs nothing here.
    if (!serving.ended) serving.abort.abort();
    await serving.http.finished.catch(() => {});
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.shutdown();
  }

  #listen(hostname: string, port: number): Serving {
    const abort = new AbortController();
    const http = Deno.serve({
      hostname,
      port,
      signal: abort.signal,
      onListen: () => {}, // no "Listening on" line on stdout
    }, (request) => this.#handle(request));
    const serving: Serving = { http, abort, ended: false };
    // Deno.serve stops for good when an accept fails (EMFILE), and its
    // `finished` rejects; unhandled, that would end the process. Whatever
    // stopped it, serving again is the only way back, so restart.
    http.finished.then(() => {
      serving.ended = true;
    }, (error) => {
      serving.ended = true;
      if (this.#stopped) return;
      this.#serving = undefined;
      this.#restartLater(
        "stopped",
        `metrics server stopped: ${errorMessage(error)}`,
        hostname,
        http.addr.port,
      );
    });
    return serving;
  }

  #restartLater(
    kind: RestartLineKind,
    why: string,
    hostname: string,
    port: number,
  ): void {
    const delay = this.#restartMs;
    this.#restartMs = Math.min(this.#restartMs * 2, RESTART_MAX_MS);
    this.#restartLines.report(kind, `${why}; restarting in ${delay} ms`);
    this.#restartTimer = setTimeout(() => {
      this.#restartTimer = undefined;
      if (this.#stopped) return;
      try {
        this.#serving = this.#listen(hostname, port);
      } catch (error) {
        // Binding again can fail the same way (EMFILE), or the port was
        // taken meanwhile: keep trying, more and more slowly.
        this.#restartLater(
          "restart_failed",
          `metrics server could not restart: ${errorMessage(error)}`,
          hostname,
          port,
        );
        return;
      }
      this.#restartLines.report(
        "restarted",
        `metrics server restarted on ${formatHostPort(hostname, port)}`,
      );
    }, delay);
  }

  #handle(request: Request): Response {
    this.#restartMs = RESTART_MIN_MS;
    const { pathname } = new URL(request.url);
    if (pathname !== "/metrics" && pathname !== "/healthz") {
      return text(404, "not found\n");
    }
    if (request.method !== "GET" && request.method !== "HEAD") {
      return text(405, "method not allowed\n", { allow: "GET, HEAD" });
    }
    if (pathname === "/healthz") {
      return this.#draining ? text(503, "draining\n") : text(200, "ok\n");
    }
    return text(
      200,
      renderMetrics(this.#server, {
        draining: this.#draining,
        accessLog: this.#accessLog?.stats,
      }),
      {
        "content-type": EXPOSITION_CONTENT_TYPE,
      },
    );
  }
}

function text(
  status: number,
  body: string,
  headers: Record<string, string> = {},
): Response {
  return new Response(body, {
    status,
    headers: { "content-type": "text/plain; charset=utf-8", ...headers },
  });
}

/** Options for {@linkcode renderMetrics}. */
export interface RenderOptions {
  /**
   * Reported as `echo_draining`: whether the server is draining.
   * @default {false}
   */
  draining?: boolean;
  /**
   * The access log's totals, reported as `echo_log_*`.
   * @default {none: those metrics read 0}
   */
  accessLog?: AccessLogStats;
}

/**
 * The Prometheus text exposition (version 0.0.4) of `server`'s counters and
 * of this process: `# HELP` and `# TYPE` for every family, base units,
 * `_total` on counters.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { serveEcho } from "./server.ts";
 *
 * const server = serveEcho(() => {}, { port: 0 });
 * const text = renderMetrics(server);
 * assert.match(text, /^echo_connections_accepted_total 0$/m);
 * assert.match(text, /^echo_cutoffs_total\{reason="idle"\} 0$/m);
 * await server.shutdown();
 * ```
 */
export function renderMetrics(
  server: EchoServer,
  options: RenderOptions = {},
): string {
  const { stats } = server;
  const out: string[] = [];
  // A family's HELP and TYPE lines, and its one sample, or one sample per
  // entry of `counts` labelled by its key.
  const family = (
    name: string,
    type: "counter" | "gauge" | "histogram",
    help: string,
    value?: number | { label: string; counts: Record<string, number> },
  ) => {
    out.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);
    if (typeof value === "number") {
      out.push(`${name} ${value}`);
    } else if (value !== undefined) {
      for (const [key, count] of Object.entries(value.counts)) {
        out.push(`${name}{${value.label}="${key}"} ${count}`);
      }
    }
  };

  family(
    "echo_connections_active",
    "gauge",
    "Clients accepted and not yet reported, those just cut off included: while newcomers evict clients it can briefly read above echo_connections_max.",
    server.connections,
  );
  family(
    "echo_connections_max",
    "gauge",
    "--max-connections: at it, a newcomer evicts the slowest client past its grace.",
    server.limits.maxConnections,
  );
  family(
    "echo_connections_accepted_total",
    "counter",
    "Clients accepted; equals access log lines written plus lines in echo_log_backlog_lines plus echo_log_dropped_lines_total plus echo_connections_active.",
    server.clientsAccepted,
  );
  family(
    "echo_received_bytes_total",
    "counter",
    "Bytes read from clients.",
    stats.receivedBytes,
  );
  family(
    "echo_sent_bytes_total",
    "counter",
    "Bytes echoed back to clients.",
    stats.sentBytes,
  );
  family(
    "echo_cutoffs_total",
    "counter",
    "Clients cut off, by reason: client_limit (over --max-client-bytes), buffer_limit (over --max-buffered, nobody to evict), idle, min_rate (sent below --min-rate), slow_reader (read its echo below --min-read-rate), slot_eviction (evicted for a newcomer at --max-connections), memory_eviction (evicted for memory at --max-buffered), shutdown (drain ran out), reset (connection failed, e.g. reset by the client), turned_away (at --max-connections from the biggest source, none of its own evictable).",
    { label: "reason", counts: stats.cutoffs },
  );
  family(
    "echo_accept_errors_total",
    "counter",
    "Failed accepts, by kind: exhaustion (out of file descriptors or memory), client (the connection failed while queued), unknown; both of the latter are logged as clients.",
    { label: "kind", counts: stats.acceptErrors },
  );
  family(
    "echo_connection_duration_seconds",
    "histogram",
    "Time from accept to the end of the connection, of clients served.",
  );
  let cumulative = 0;
  for (let i = 0; i < DURATION_BUCKETS_SECONDS.length; i++) {
    cumulative += stats.durationCounts[i];
    out.push(
      `echo_connection_duration_seconds_bucket{le="${
        DURATION_BUCKETS_SECONDS[i]
      }"} ${cumulative}`,
    );
  }
  cumulative += stats.durationCounts[DURATION_BUCKETS_SECONDS.length];
  out.push(
    `echo_connection_duration_seconds_bucket{le="+Inf"} ${cumulative}`,
    `echo_connection_duration_seconds_sum ${stats.durationSecondsSum}`,
    `echo_connection_duration_seconds_count ${cumulative}`,
  );
  family(
    "echo_buffered_bytes",
    "gauge",
    "Buffer memory held for clients, counted against --max-buffered.",
    server.bufferedBytes,
  );
  family(
    "echo_buffered_bytes_max",
    "gauge",
    "--max-buffered: past it, the clients holding the most for the least progress are evicted.",
    server.limits.maxBufferedBytes,
  );
  family(
    "echo_spare_buffer_bytes",
    "gauge",
    "Freed read buffers kept for reuse; dropped first when clients need the room.",
    server.spareBufferBytes,
  );
  const log = options.accessLog;
  family(
    "echo_log_write_errors_total",
    "counter",
    "Access log writes that failed (ENOSPC, EDQUOT, EFBIG, EIO; each retry counts); their lines wait in the backlog.",
    stats.reportErrors + (log?.writeErrors ?? 0),
  );
  family(
    "echo_log_backlog_lines",
    "gauge",
    "Access log lines waiting in memory for the file to take writes.",
    log?.backlogLines ?? 0,
  );
  family(
    "echo_log_backlog_bytes",
    "gauge",
    "Bytes of those lines, counted against --log-backlog.",
    log?.backlogBytes ?? 0,
  );
  family(
    "echo_log_dropped_lines_total",
    "counter",
    "Access log lines dropped, never written: the backlog was full.",
    log?.droppedLines ?? 0,
  );
  family(
    "echo_log_reopen_pending",
    "gauge",
    "1 while a SIGHUP reopen of the access log failed and is being retried (lines go to the old file), else 0.",
    log?.reopenPending ? 1 : 0,
  );
  family(
    "echo_draining",
    "gauge",
    "1 once SIGINT or SIGTERM started the drain (/healthz answers 503), else 0.",
    options.draining ? 1 : 0,
  );

  const memory = Deno.memoryUsage();
  const cpu = process.cpuUsage();
  family(
    "process_cpu_seconds_total",
    "counter",
    "Total user and system CPU time spent in seconds.",
    (cpu.user + cpu.system) / 1e6,
  );
  family(
    "process_start_time_seconds",
    "gauge",
    "Start time of the process since unix epoch in seconds.",
    performance.timeOrigin / 1000,
  );
  family(
    "process_resident_memory_bytes",
    "gauge",
    "Resident memory size in bytes.",
    memory.rss,
  );
  const fds = openFds();
  if (fds !== undefined) {
    family(
      "process_open_fds",
      "gauge",
      "Number of open file descriptors.",
      fds,
    );
  }
  // Readable where /proc/self/fd was (Deno asks for the same permission).
  const maxFds = fds === undefined ? undefined : maxOpenFds();
  if (maxFds !== undefined) {
    family(
      "process_max_fds",
      "gauge",
      "Maximum number of open file descriptors.",
      maxFds,
    );
  }
  family(
    "deno_heap_used_bytes",
    "gauge",
    "V8 heap in use, from Deno.memoryUsage().",
    memory.heapUsed,
  );
  family(
    "deno_heap_total_bytes",
    "gauge",
    "V8 heap allocated, from Deno.memoryUsage().",
    memory.heapTotal,
  );
  family(
    "deno_external_memory_bytes",
    "gauge",
    "Memory outside the V8 heap held by JavaScript objects (e.g. buffers), from Deno.memoryUsage().",
    memory.external,
  );
  return out.join("\n") + "\n";
}

// Whether /proc/self/fd can be read: Deno 2.9 asks for --allow-all. Checked
// once, without a prompt (querySync never asks).
let procReadable: boolean | undefined;

/** Open file descriptors from /proc/self/fd, or undefined if not allowed. */
function openFds(): number | undefined {
  if (procReadable === undefined) {
    procReadable =
      Deno.permissions.querySync({ name: "read", path: "/proc/self/fd" })
        .state === "granted";
  }
  if (!procReadable) return undefined;
  try {
    let count = 0;
    for (const _ of Deno.readDirSync("/proc/self/fd")) count++;
    return count - 1; // the directory's own descriptor
  } catch (error) {
    if (
      error instanceof Deno.errors.NotCapable ||
      error instanceof Deno.errors.NotFound
    ) {
      procReadable = false;
      return undefined;
    }
    throw error;
  }
}

/**
 * The soft limit on open files from /proc/self/limits, or undefined if not
 * allowed or unlimited.
 */
function maxOpenFds(): number | undefined {
  let limits;
  try {
    limits = Deno.readTextFileSync("/proc/self/limits");
  } catch (error) {
    if (
      error instanceof Deno.errors.NotCapable ||
      error instanceof Deno.errors.NotFound
    ) {
      return undefined;
    }
    throw error;
  }
  // "Max open files            1024                 4096                 files"
  const soft = /^Max open files\s+(\d+)\s/m.exec(limits)?.[1];
  return soft === undefined ? undefined : Number(soft);
}
