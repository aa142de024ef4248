/**
 * The metrics endpoint: renders an {@linkcode EchoServer}'s counters in the
 * Prometheus text exposition format (version 0.0.4) and serves them over
 * HTTP/1.1 with a small responder of its own on `Deno.listen`, with a
 * health check for load balancers.
 *
 * - `GET /metrics`: the exposition.
 * - `GET /healthz`: `200 ok` while accepting, `503 draining` once
 *   {@linkcode MetricsServer.setDraining} was called.
 * - Any other path: 404; another method on those two paths: 405.
 *
 * Every response ends its connection (`Connection: close`). The port is
 * built so that nobody who can reach it can take the echo port's file
 * descriptors or memory, or the health check: it holds at most
 * {@linkcode MetricsOptions.maxConnections} connections (a newcomer beyond
 * them closes the oldest), each for at most
 * {@linkcode MetricsOptions.requestTimeoutMs} from accept to close, and
 * reads at most {@linkcode MetricsOptions.maxHeaderBytes} of request head
 * (431 past it). `Deno.serve` has none of these limits.
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
import { acceptErrorKind } from "./accept_errors.ts";
import { describe, errorMessage } from "./_errors.ts";
import type { AccessLogStats } from "./access_log.ts";
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
   * Receives one-line diagnostics: accepting failed (out of file
   * descriptors) and works again, a response could not be made (500).
   * @default {console.error}
   */
  onDiagnostic?: (message: string) => void;
  /**
   * The access log whose backlog, drops and write errors are exposed
   * (`AccessLog` from access_log.ts).
   * @default {none: those metrics read 0}
   */
  accessLog?: { readonly stats: AccessLogStats };
  /**
   * Connections held at once. A newcomer beyond them closes the oldest, so
   * the port never holds more file descriptors than this (plus its
   * listener, and the newcomer for the moment of the swap).
   * @default {16}
   */
  maxConnections?: number;
  /**
   * Milliseconds from accept to close: a connection still there then (its
   * request unfinished, its response unread) is closed.
   * @default {5000}
   */
  requestTimeoutMs?: number;
  /**
   * Bytes of request line and headers read at most; a longer head is
   * answered 431.
   * @default {8192}
   */
  maxHeaderBytes?: number;
}

/** A running metrics endpoint. */
export interface MetricsServer extends AsyncDisposable {
  /** The address it listens on (useful with port 0). */
  readonly addr: Deno.NetAddr;
  /** Whether `/healthz` answers 503 (after {@linkcode setDraining}). */
  readonly draining: boolean;
  /** Connections closed without a request served, by reason. */
  readonly cutoffs: Readonly<Record<MetricsPortCutoffReason, number>>;
  /** From now on `/healthz` answers `503 draining`, so a load balancer
   * stops sending clients while those in flight finish. */
  setDraining(): void;
  /**
   * Stops listening and closes every connection at once, without waiting
   * for requests in flight; resolves once nothing of the port is left.
   */
  shutdown(): Promise<void>;
}

/** Default for {@linkcode MetricsOptions.port}. */
export const DEFAULT_METRICS_PORT = 9400;

/** Default for {@linkcode MetricsOptions.maxConnections}. */
export const DEFAULT_METRICS_MAX_CONNECTIONS = 16;

/** Default for {@linkcode MetricsOptions.requestTimeoutMs}. */
export const DEFAULT_METRICS_REQUEST_TIMEOUT_MS = 5000;

/** Default for {@linkcode MetricsOptions.maxHeaderBytes}. */
export const DEFAULT_METRICS_MAX_HEADER_BYTES = 8192;

/** The media type of the text exposition format, version 0.0.4. */
export const EXPOSITION_CONTENT_TYPE =
  "text/plain; version=0.0.4; charset=utf-8";

// Accepting again after it failed for want of descriptors or memory: the
// delay doubles up to the maximum while accepts keep failing, and is reset
// by one that succeeds.
const RETRY_MIN_MS = 100;
const RETRY_MAX_MS = 5000;
// While connections keep queuing every accept succeeds at once, and Deno
// would not poll other sockets: a timer turn every this many accepts.
const ACCEPTS_PER_YIELD = 64;
// After a response, what the client still sends (a body, a pipelined
// request) is read and dropped up to this many bytes until its EOF, so that
// closing does not reset the connection under the response; past it, the
// connection is closed as is.
const LINGER_BYTES = 64 * 1024;
// Where those bytes are read to: one buffer for every connection, since
// nothing reads what is in it.
const discarded = new Uint8Array(16 * 1024);

/** What a line of the metrics server was about, as a summary counts it. */
type LineKind =
  | "accept_failed"
  | "accepting"
  | "request_failed"
  | "connection_failed";

/**
 * Starts serving `/metrics` and `/healthz` for `server`. Throws the
 * `Deno.listen` error (e.g. `Deno.errors.AddrInUse`) if the address cannot
 * be bound, and a `RangeError` for a limit that is not a positive number. If accepting fails (out of file descriptors), it is retried
 * with a back-off, and the echo server is never affected.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { serveEcho } from "./server.ts";
 *
 * const server = serveEcho(() => {}, { port: 0 });
 * const metrics = serveMetrics(server, { port: 0 });
 * const conn = await Deno.connect({ port: metrics.addr.port });
 * await conn.write(new TextEncoder().encode("GET /healthz HTTP/1.1\r\n\r\n"));
 * const response = new TextDecoder().decode(
 *   await new Response(conn.readable).arrayBuffer(),
 * );
 * assert.match(response, /^HTTP\/1\.1 200 OK\r\n[^]*\r\n\r\nok\n$/);
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

class Metrics implements MetricsServer {
  readonly addr: Deno.NetAddr;
  #server: EchoServer;
  #accessLog: { readonly stats: AccessLogStats } | undefined;
  #listener: Deno.TcpListener;
  #maxConnections: number;
  #requestTimeoutMs: number;
  #maxHeaderBytes: number;
  // Oldest first (a Map keeps insertion order): the one a newcomer closes.
  // The value: whether its response has been written.
  #connections = new Map<Deno.TcpConn, { answered: boolean }>();
  #cutoffs: Record<MetricsPortCutoffReason, number> = {
    newcomer: 0,
    deadline: 0,
    header_too_large: 0,
    bad_request: 0,
  };
  // Every connection's handler until it has ended, those closed by a
  // newcomer included: the shutdown waits for them all.
  #handlers = new Set<Promise<void>>();
  // Like every repeated line, these go through the one rate limit.
  #lines: RateLimitedReporter<LineKind>;
  #acceptLoop: Promise<void>;
  #retryMs = RETRY_MIN_MS;
  #retryWait:
    | { timer: ReturnType<typeof setTimeout>; resolve: () => void }
    | undefined;
  #draining = false;
  #stopped = false;
  #closed: Promise<void> | undefined;

  constructor(server: EchoServer, options: MetricsOptions) {
    this.#server = server;
    this.#accessLog = options.accessLog;
    this.#maxConnections = options.maxConnections ??
      DEFAULT_METRICS_MAX_CONNECTIONS;
    this.#requestTimeoutMs = options.requestTimeoutMs ??
      DEFAULT_METRICS_REQUEST_TIMEOUT_MS;
    this.#maxHeaderBytes = options.maxHeaderBytes ??
      DEFAULT_METRICS_MAX_HEADER_BYTES;
    // Checked before listening: 0 connections would make the first accept
    // throw where nothing catches it (an exit), NaN would lift the cap.
    for (
      const [name, value] of [
        ["maxConnections", this.#maxConnections],
        ["maxHeaderBytes", this.#maxHeaderBytes],
      ] as const
    ) {
      if (!Number.isSafeInteger(value) || value < 1) {
        throw new RangeError(
          `${name} must be a whole number of at least 1, not ${value}`,
        );
      }
    }
    if (!(this.#requestTimeoutMs > 0 && this.#requestTimeoutMs < 2 ** 31)) {
      throw new RangeError(
        `requestTimeoutMs must be from 1 to ${
          2 ** 31 - 1
        }, not ${this.#requestTimeoutMs}`,
      );
    }
    this.#listener = Deno.listen({
      hostname: options.hostname ?? "127.0.0.1",
      port: options.port ?? DEFAULT_METRICS_PORT,
    });
    this.addr = this.#listener.addr;
    this.#lines = new RateLimitedReporter(
      options.onDiagnostic ?? console.error,
      {
        kinds: [
          "accept_failed",
          "accepting",
          "request_failed",
          "connection_failed",
        ],
        label: "metrics server line",
      },
    );
    this.#acceptLoop = this.#accept();
  }

  get draining(): boolean {
    return this.#draining;
  }

  get cutoffs(): Readonly<Record<MetricsPortCutoffReason, number>> {
    return this.#cutoffs;
  }

  setDraining(): void {
    this.#draining = true;
  }

  shutdown(): Promise<void> {
    return this.#closed ??= this.#close();
  }

  async #close(): Promise<void> {
    this.#stopped = true;
    this.#listener.close();
    if (this.#retryWait !== undefined) {
      clearTimeout(this.#retryWait.timer);
      this.#retryWait.resolve();
    }
    await this.#acceptLoop;
    // Not waiting for requests in flight: closing ends each at once, and a
    // scrape cut short costs nothing here.
    for (const conn of this.#connections.keys()) closeQuietly(conn);
    await Promise.all(this.#handlers);
    this.#lines.close();
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.shutdown();
  }

  async #accept(): Promise<void> {
    let acceptsSinceYield = 0;
    let failing = false;
    while (!this.#stopped) {
      let conn: Deno.TcpConn;
      try {
        conn = await this.#listener.accept();
      } catch (error) {
        if (this.#stopped) return; // the listener was closed
        // A client that left while queued: nothing lost, accept the next.
        if (acceptErrorKind(error) === "client") continue;
        // Out of descriptors or memory (or unknown): the connection stays
        // queued; accepting at once would fail again at once.
        failing = true;
        const delay = this.#retryMs;
        this.#retryMs = Math.min(this.#retryMs * 2, RETRY_MAX_MS);
        this.#lines.report(
          "accept_failed",
          `metrics server: accept failed: ${
            errorMessage(error)
          }; accepting again in ${delay} ms`,
        );
        await new Promise<void>((resolve) => {
          this.#retryWait = { timer: setTimeout(resolve, delay), resolve };
        });
        this.#retryWait = undefined;
        continue;
      }
      if (failing) {
        failing = false;
        this.#retryMs = RETRY_MIN_MS;
        this.#lines.report(
          "accepting",
          "metrics server: accepting again",
        );
      }
      if (this.#connections.size >= this.#maxConnections) {
        // A timer turn first, so that those whose request has arrived are
        // answered, not closed; it also paces a flood of newcomers to one a
        // turn of the event loop, which the echo port shares.
        acceptsSinceYield = 0;
        await new Promise((resolve) => setTimeout(resolve, 0));
        if (this.#connections.size >= this.#maxConnections) {
          // The oldest has had the longest to finish its request.
          const [[oldest, { answered }]] = this.#connections;
          this.#connections.delete(oldest);
          if (!answered) this.#cutoffs.newcomer++;
          closeQuietly(oldest);
        }
      }
      if (this.#stopped) {
        conn.close();
        return;
      }
      const state = { answered: false };
      this.#connections.set(conn, state);
      const handler = this.#serve(conn, state).finally(() => {
        this.#connections.delete(conn);
        this.#handlers.delete(handler);
      });
      this.#handlers.add(handler);
      if (++acceptsSinceYield >= ACCEPTS_PER_YIELD) {
        acceptsSinceYield = 0;
        await new Promise((resolve) => setTimeout(resolve, 0));
      }
    }
  }

  async #serve(
    conn: Deno.TcpConn,
    state: { answered: boolean },
  ): Promise<void> {
    const deadline = setTimeout(() => {
      if (!state.answered) this.#cutoffs.deadline++;
      closeQuietly(conn);
    }, this.#requestTimeoutMs);
    try {
      const head = await readHead(conn, this.#maxHeaderBytes);
      if (head === undefined) return; // left before a whole request
      let response;
      if (typeof head === "number") {
        this.#cutoffs[head === 431 ? "header_too_large" : "bad_request"]++;
        response = errorResponse(head);
      } else {
        response = this.#respondOr500(head);
      }
      await writeAll(conn, response);
      state.answered = true;
      await conn.closeWrite();
      for (let drained = 0; drained < LINGER_BYTES;) {
        const n = await conn.read(discarded);
        if (n === null) break;
        drained += n;
      }
    } catch (error) {
      // Closed under the read or write by the deadline, a newcomer or the
      // shutdown, or by the client: either way this connection is over. An
      // error of another kind ends it too (the process serves the echo port
      // first), but is worth a line.
      if (!isConnectionEnd(error)) {
        this.#lines.report(
          "connection_failed",
          `metrics server: UNEXPECTED connection error (please report it): ${
            describe(error)
          }`,
        );
      }
    } finally {
      clearTimeout(deadline);
      closeQuietly(conn);
    }
  }

  /** The response to `head`, or a 500 (and a line) if making it failed. */
  #respondOr500(head: RequestHead): Uint8Array {
    try {
      return this.#respond(head);
    } catch (error) {
      this.#lines.report(
        "request_failed",
        `metrics server: ${head.method} ${head.pathname} failed: ${
          describe(error)
        }`,
      );
      return response(head.method, 500, "internal server error\n");
    }
  }

  #respond(head: RequestHead): Uint8Array {
    const { method, pathname } = head;
    if (pathname !== "/metrics" && pathname !== "/healthz") {
      return response(method, 404, "not found\n");
    }
    if (method !== "GET" && method !== "HEAD") {
      return response(method, 405, "method not allowed\n", undefined, {
        allow: "GET, HEAD",
      });
    }
    if (pathname === "/healthz") {
      return this.#draining
        ? response(method, 503, "draining\n")
        : response(method, 200, "ok\n");
    }
    return response(
      method,
      200,
      renderMetrics(this.#server, {
        draining: this.#draining,
        accessLog: this.#accessLog?.stats,
        metricsPortCutoffs: this.#cutoffs,
      }),
      EXPOSITION_CONTENT_TYPE,
    );
  }
}

/** What a request asks for: its method and its target's path. */
interface RequestHead {
  method: string;
  pathname: string;
}

/**
 * Reads a request head (request line and headers, up to the empty line)
 * from `conn`: the request, or the status to refuse it with (400 for a
 * request line that is not HTTP/1.x, 431 for a head over `maxBytes`), or
 * `undefined` if the client ended its side first.
 */
async function readHead(
  conn: Deno.Conn,
  maxBytes: number,
): Promise<RequestHead | 400 | 431 | undefined> {
  // Grown as needed: most heads (a scrape's, a health check's) fit in the
  // first, and a connection that sends nothing costs no more than that.
  let buffer = new Uint8Array(Math.min(INITIAL_HEAD_BUFFER_BYTES, maxBytes));
  let length = 0;
  for (;;) {
    if (length === maxBytes) return 431;
    if (length === buffer.length) {
      const grown = new Uint8Array(Math.min(buffer.length * 2, maxBytes));
      grown.set(buffer);
      buffer = grown;
    }
    const n = await conn.read(buffer.subarray(length));
    if (n === null) return undefined;
    const from = length;
    length += n;
    // The request line's end, or the bytes of it so far: only visible
    // ASCII and spaces, so that garbage is refused at once. (From one byte
    // back: a CR that ended the last read is only allowed before an LF.)
    let lineEnd = buffer.subarray(0, length).indexOf(LF);
    const checked = lineEnd === -1 ? length : lineEnd;
    for (let i = Math.min(Math.max(from - 1, 0), checked); i < checked; i++) {
      const byte = buffer[i];
      if ((byte < 0x20 || byte > 0x7e) && !(byte === CR && i === checked - 1)) {
        return 400;
      }
    }
    if (lineEnd === -1) continue;
    const end = headEnd(buffer, Math.max(lineEnd, from - 2), length);
    if (end === -1) continue;
    if (buffer[lineEnd - 1] === CR) lineEnd--;
    return parseRequestLine(
      new TextDecoder().decode(buffer.subarray(0, lineEnd)),
    ) ?? 400;
  }
}

const INITIAL_HEAD_BUFFER_BYTES = 1024;
const CR = 0x0d;
const LF = 0x0a;

/** Where the empty line ending a head lies within `from`..`to`, or -1. */
function headEnd(buffer: Uint8Array, from: number, to: number): number {
  for (let i = buffer.indexOf(LF, from); i !== -1 && i < to;) {
    const next = buffer[i + 1] === CR ? i + 2 : i + 1;
    if (next < to && buffer[next] === LF) return next + 1;
    i = buffer.indexOf(LF, i + 1);
  }
  return -1;
}

const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;

/** `GET /metrics HTTP/1.1` as method and path, or undefined if malformed. */
function parseRequestLine(line: string): RequestHead | undefined {
  const parts = line.split(" ");
  if (parts.length !== 3) return undefined;
  const [method, target, version] = parts;
  if (!TOKEN.test(method) || !/^HTTP\/1\.[01]$/.test(version)) {
    return undefined;
  }
  // Origin form (`/metrics?x=1`) or absolute form (`http://host/metrics`).
  if (!target.startsWith("/") && !/^https?:\/\//i.test(target)) {
    return undefined;
  }
  try {
    return { method, pathname: new URL(target, "http://localhost").pathname };
  } catch {
    return undefined;
  }
}

const REASONS: Record<number, string> = {
  200: "OK",
  400: "Bad Request",
  404: "Not Found",
  405: "Method Not Allowed",
  500: "Internal Server Error",
  431: "Request Header Fields Too Large",
  503: "Service Unavailable",
};

const encoder = new TextEncoder();

/** A whole response, the body left out for HEAD, ending the connection. */
function response(
  method: string,
  status: number,
  body: string,
  contentType = "text/plain; charset=utf-8",
  headers: Record<string, string> = {},
): Uint8Array {
  const bytes = encoder.encode(body);
  let head = `HTTP/1.1 ${status} ${REASONS[status]}\r\n` +
    `content-type: ${contentType}\r\n` +
    `content-length: ${bytes.length}\r\n`;
  for (const [name, value] of Object.entries(headers)) {
    head += `${name}: ${value}\r\n`;
  }
  head += `date: ${new Date().toUTCString()}\r\nconnection: close\r\n\r\n`;
  const headBytes = encoder.encode(head);
  if (method === "HEAD") return headBytes;
  const whole = new Uint8Array(headBytes.length + bytes.length);
  whole.set(headBytes);
  whole.set(bytes, headBytes.length);
  return whole;
}

function errorResponse(status: 400 | 431): Uint8Array {
  return response(
    "GET",
    status,
    status === 400 ? "bad request\n" : "request header fields too large\n",
  );
}

async function writeAll(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
  for (let written = 0; written < bytes.length;) {
    written += await conn.write(bytes.subarray(written));
  }
}

/** Whether `error` is how a read or write ends on a closed connection. */
function isConnectionEnd(error: unknown): boolean {
  return error instanceof Deno.errors.BadResource ||
    error instanceof Deno.errors.Interrupted ||
    error instanceof Deno.errors.ConnectionReset ||
    error instanceof Deno.errors.ConnectionAborted ||
    error instanceof Deno.errors.BrokenPipe ||
    error instanceof Deno.errors.NotConnected ||
    error instanceof Deno.errors.TimedOut;
}

function closeQuietly(conn: Deno.Conn): void {
  try {
    conn.close();
  } catch (error) {
    // Closed already (by the deadline, a newcomer or the shutdown).
    if (!(error instanceof Deno.errors.BadResource)) throw error;
  }
}

/** Options for {@linkcode renderMetrics}. */
export interface RenderOptions {
  /**
   * Exposed as `echo_draining`: whether the server is draining.
   * @default {false}
   */
  draining?: boolean;
  /**
   * The access log's totals, exposed as `echo_log_*`.
   * @default {none: those metrics read 0}
   */
  accessLog?: AccessLogStats;
  /**
   * The metrics port's own cut-offs, exposed as
   * `echo_metrics_port_cutoffs_total`.
   * @default {none: every reason reads 0}
   */
  metricsPortCutoffs?: Readonly<Record<MetricsPortCutoffReason, number>>;
}

/**
 * Why the metrics port closed a connection without serving a request: for
 * a `newcomer` beyond {@linkcode MetricsOptions.maxConnections}, its
 * `deadline` ({@linkcode MetricsOptions.requestTimeoutMs}) passed, its head
 * was over {@linkcode MetricsOptions.maxHeaderBytes}
 * (`header_too_large`, 431), or not HTTP/1.x (`bad_request`, 400).
 */
export type MetricsPortCutoffReason =
  | "newcomer"
  | "deadline"
  | "header_too_large"
  | "bad_request";

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
    "Clients accepted whose end is not yet logged, those just cut off included.",
    server.connections,
  );
  family(
    "echo_connections_max",
    "gauge",
    "The --max-connections limit on clients served at once.",
    server.limits.maxConnections,
  );
  family(
    "echo_connections_accepted_total",
    "counter",
    "Clients accepted.",
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
    "Clients cut off, by reason.",
    { label: "reason", counts: stats.cutoffs },
  );
  family(
    "echo_proxy_headers_total",
    "counter",
    "PROXY protocol headers accepted, by version and command (local: the proxy's own connection, such as a health check).",
  );
  for (const [kind, count] of Object.entries(stats.proxyHeaders)) {
    const [version, command] = kind.split("_");
    out.push(
      `echo_proxy_headers_total{version="${
        version.slice(1)
      }",command="${command}"} ${count}`,
    );
  }
  family(
    "echo_accept_errors_total",
    "counter",
    "Accepts that failed, by kind: exhaustion (out of file descriptors or memory), client or unknown.",
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
    "The --max-buffered limit on echo_buffered_bytes.",
    server.limits.maxBufferedBytes,
  );
  family(
    "echo_spare_buffer_bytes",
    "gauge",
    "Freed read buffers kept for reuse.",
    server.spareBufferBytes,
  );
  const log = options.accessLog;
  family(
    "echo_log_write_errors_total",
    "counter",
    "Access log writes that failed, each retry counted.",
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
    "Bytes of access log lines waiting in memory, counted against --log-backlog.",
    log?.backlogBytes ?? 0,
  );
  family(
    "echo_log_dropped_lines_total",
    "counter",
    "Access log lines dropped because the backlog was full.",
    log?.droppedLines ?? 0,
  );
  family(
    "echo_log_reopen_pending",
    "gauge",
    "1 while a failed SIGHUP reopen of the access log is being retried, else 0.",
    log?.reopenPending ? 1 : 0,
  );
  family(
    "echo_draining",
    "gauge",
    "1 once a signal started the shutdown, else 0.",
    options.draining ? 1 : 0,
  );
  family(
    "echo_metrics_port_cutoffs_total",
    "counter",
    "Connections to this metrics port closed without a request served, by reason.",
    {
      label: "reason",
      counts: options.metricsPortCutoffs ??
        { newcomer: 0, deadline: 0, header_too_large: 0, bad_request: 0 },
    },
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
