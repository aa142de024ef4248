/**
 * The echo server: accepts TCP clients, reads each one's bytes to EOF, sends
 * them back, half-closes, and reports every client it served exactly once.
 *
 * @module
 */

import { BufferPool } from "./buffer_pool.ts";

/** Called once for every accepted client, however its connection ended. */
export type ClientDone = (clientId: number, bytesReceived: number) => void;

/** Options for {@linkcode serveEcho}. */
export interface ServeOptions {
  /**
   * Address to listen on.
   *
   * @default {"127.0.0.1"}
   */
  hostname?: string;
  /**
   * TCP port; 0 picks a free one.
   *
   * @default {4000}
   */
  port?: number;
  /**
   * Bytes one client may send; a client that sends more is cut off.
   *
   * @default {64 * 1024 * 1024}
   */
  maxClientBytes?: number;
  /**
   * Buffer memory held for all clients together; the client whose read
   * would pass it is cut off.
   *
   * @default {512 * 1024 * 1024}
   */
  maxBufferedBytes?: number;
  /**
   * Connections served at once; at the limit the server stops accepting
   * and the kernel's queue holds the rest.
   *
   * @default {16384}
   */
  maxConnections?: number;
  /**
   * A client that makes no progress reading or writing for this long is
   * cut off, in milliseconds.
   *
   * @default {30_000}
   */
  idleTimeoutMs?: number;
  /**
   * Which of several server instances sharing one access log this is, from
   * 1 to {@linkcode ServeOptions.instances}. Instance I of N numbers its
   * clients I, I+N, I+2N, ..., so no two instances hand out the same
   * number.
   *
   * @default {1}
   */
  instance?: number;
  /**
   * How many instances share the access log, from 1 to
   * {@linkcode MAX_INSTANCES}.
   *
   * @default {1}
   */
  instances?: number;
  /**
   * Receives one-line diagnostics (cut-offs, resets). Those about single
   * clients come at most 10 a second; the rest are counted into one line
   * at the end of the second.
   *
   * @default {console.error}
   */
  onDiagnostic?: (message: string) => void;
}

/**
 * Why a client was cut off, as counted in {@linkcode EchoStats.cutoffs}:
 * over `maxClientBytes`, over `maxBufferedBytes`, idle too long, still
 * connected when the drain ran out, or its connection failed under the
 * server (almost always a reset by the client).
 */
export type CutoffReason =
  | "client_limit"
  | "buffer_limit"
  | "idle"
  | "shutdown"
  | "reset";

/** Whose doing a failed accept was, as counted in {@linkcode EchoStats.acceptErrors}. */
export type AcceptErrorKind = ReturnType<typeof acceptErrorKind>;

/**
 * Upper bounds, in seconds, of the buckets of
 * {@linkcode EchoStats.durationCounts}: 100 µs to 60 s.
 */
export const DURATION_BUCKETS_SECONDS: readonly number[] = [
  0.0001,
  0.00025,
  0.0005,
  0.001,
  0.0025,
  0.005,
  0.01,
  0.025,
  0.05,
  0.1,
  0.25,
  0.5,
  1,
  2.5,
  5,
  10,
  30,
  60,
];

/**
 * Running totals kept by a server, cheap enough to keep always: plain
 * numbers incremented in place. Read them through
 * {@linkcode EchoServer.stats}.
 */
export interface EchoStats {
  /** Bytes read from clients. */
  readonly receivedBytes: number;
  /** Bytes written back to clients. */
  readonly sentBytes: number;
  /** Clients cut off, by reason. */
  readonly cutoffs: Readonly<Record<CutoffReason, number>>;
  /** Failed accepts, by whose doing. */
  readonly acceptErrors: Readonly<Record<AcceptErrorKind, number>>;
  /**
   * Served clients by how long they were connected: `durationCounts[i]`
   * counts those that took at most `DURATION_BUCKETS_SECONDS[i]` and more
   * than the bucket before (not cumulative); the last entry counts the rest.
   */
  readonly durationCounts: readonly number[];
  /** The sum of those durations, in seconds. */
  readonly durationSecondsSum: number;
  /** Times `onClientDone` threw (in main.ts: access log writes that failed). */
  readonly reportErrors: number;
}

/** Options for {@linkcode EchoServer.shutdown}. */
export interface ShutdownOptions {
  /**
   * How long clients in flight may take to finish before they are cut
   * off, in milliseconds. A later call can only bring that deadline
   * forward: the drain ends at the earliest "now + drainTimeoutMs" of all
   * calls, so a shorter time cuts sooner and a longer one changes nothing.
   *
   * @default {10_000}
   */
  drainTimeoutMs?: number;
}

/** A running echo server. */
export interface EchoServer {
  /** The address the listener is bound to (useful with port 0). */
  readonly addr: Deno.NetAddr;
  /** Connections being served right now. */
  readonly connections: number;
  /** Clients accepted so far (with one instance, the last id handed out). */
  readonly clientsAccepted: number;
  /** Buffer memory held for clients now, counted against `maxBufferedBytes`. */
  readonly bufferedBytes: number;
  /** Spare chunks kept for reuse; dropped first when clients need the room. */
  readonly spareBufferBytes: number;
  /** Running totals: bytes, cut-offs, accept errors, durations. */
  readonly stats: EchoStats;
  /**
   * Stops accepting, lets clients in flight finish within the drain timeout,
   * cuts off the rest, and resolves once every client has been reported.
   */
  shutdown(options?: ShutdownOptions): Promise<void>;
}

/** Default for {@linkcode ServeOptions.maxClientBytes}: 64 MiB. */
export const DEFAULT_MAX_CLIENT_BYTES = 64 * 1024 * 1024;
/** Default for {@linkcode ServeOptions.maxBufferedBytes}: 512 MiB. */
export const DEFAULT_MAX_BUFFERED_BYTES = 512 * 1024 * 1024;
/** Default for {@linkcode ServeOptions.maxConnections}. */
export const DEFAULT_MAX_CONNECTIONS = 16384;
/** Default for {@linkcode ServeOptions.idleTimeoutMs}: 30 s. */
export const DEFAULT_IDLE_TIMEOUT_MS = 30_000;
/** Default for {@linkcode ShutdownOptions.drainTimeoutMs}: 10 s. */
export const DEFAULT_DRAIN_TIMEOUT_MS = 10_000;
/**
 * Most instances {@linkcode ServeOptions.instances} allows: client ids grow
 * by N per client, and must stay below 2^53 to stay exact and distinct.
 * With 1024, one instance numbers 2^53 / 1024 = 8.8e12 clients; at 100,000
 * a second (ten times the ~10,000 measured in bench/README.md) that is 2.8
 * years without a restart, at the measured rate 28 years.
 */
export const MAX_INSTANCES = 1024;

// Reads go straight into chunks: 64 bytes first, because every idle client
// holds its first chunk (a 4 KiB one doubled an idle client's cost), then
// growing with the payload up to 1 MiB (large reads for bulk); see
// nextChunkBytes.
const FIRST_CHUNK_BYTES = 64;
const MAX_CHUNK_BYTES = 1024 * 1024;
const MIN_GROWN_CHUNK_BYTES = 16 * 1024;
// Out of fds or memory, accepting again waits for a client to finish, or
// this long if none does (the fds may be held by something else).
const ACCEPT_RETRY_MS = 100;
// Out of fds, at most one diagnostic line per this period.
const EXHAUSTION_REPORT_MS = 1000;
// While connections keep queuing, every accept succeeds at once and Deno
// may not poll the sockets for readiness (no epoll_wait for 22 s under
// strace): reads of new clients stayed pending with their bytes in the
// kernel until the idle timeout. A timer turn every this many accepts
// prevented it in every run; every 256 did not (bench/README.md).
const ACCEPTS_PER_YIELD = 64;
// Lines about single clients (resets, cut-offs, unknown accept errors, log
// write failures), at most this many per period; the rest are counted by
// kind into one line at the period's end. Resets are cheap for a client to
// cause, and a line each would let clients flood stderr; stats has every
// count.
const CLIENT_LINES_PER_PERIOD = 10;
const CLIENT_REPORT_PERIOD_MS = 1000;

/** What a line about a single client was about, as its summary counts it. */
type ClientLineKind = CutoffReason | "accept_unknown" | "not_logged";
// The order kinds appear in a summary.
const CLIENT_LINE_KINDS: readonly ClientLineKind[] = [
  "reset",
  "client_limit",
  "buffer_limit",
  "idle",
  "shutdown",
  "accept_unknown",
  "not_logged",
];

/**
 * Starts an echo server. Each client's bytes are read to EOF, written back,
 * and then its side is half-closed; `onClientDone` is called once per
 * accepted client with the bytes received, also when it was cut off.
 * Throws the `Deno.listen` error (e.g. `Deno.errors.AddrInUse`) if the
 * address cannot be bound.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const finished: Array<[number, number]> = [];
 * const server = serveEcho((clientId, bytesReceived) => {
 *   finished.push([clientId, bytesReceived]);
 * }, { port: 0 });
 * const conn = await Deno.connect({ port: server.addr.port });
 * await conn.write(new TextEncoder().encode("hello"));
 * await conn.closeWrite();
 * assert.equal(await new Response(conn.readable).text(), "hello");
 * await server.shutdown();
 * assert.deepEqual(finished, [[1, 5]]);
 * ```
 */
export function serveEcho(
  onClientDone: ClientDone,
  options: ServeOptions = {},
): EchoServer {
  return new Server(onClientDone, options);
}

/** Per-connection state, one object so the idle sweep can see every client. */
class Client {
  bytesReceived = 0;
  /** Buffer capacity this client holds, counted against maxBufferedBytes. */
  bufferedBytes = 0;
  lastActivity: number;
  cutOffReason: string | undefined = undefined;
  chunks: Uint8Array[] = [];
  readonly acceptedAt: number;

  constructor(readonly conn: Deno.TcpConn, readonly clientId: number) {
    this.acceptedAt = this.lastActivity = performance.now();
  }
}

/** The counters behind {@linkcode EchoStats}, mutable inside the server. */
class Stats implements EchoStats {
  receivedBytes = 0;
  sentBytes = 0;
  cutoffs: Record<CutoffReason, number> = {
    client_limit: 0,
    buffer_limit: 0,
    idle: 0,
    shutdown: 0,
    reset: 0,
  };
  acceptErrors: Record<AcceptErrorKind, number> = {
    exhaustion: 0,
    client: 0,
    unknown: 0,
  };
  durationCounts: number[] = new Array(DURATION_BUCKETS_SECONDS.length + 1)
    .fill(0);
  durationSecondsSum = 0;
  reportErrors = 0;

  recordDuration(seconds: number): void {
    let i = 0;
    while (
      i < DURATION_BUCKETS_SECONDS.length &&
      seconds > DURATION_BUCKETS_SECONDS[i]
    ) i++;
    this.durationCounts[i]++;
    this.durationSecondsSum += seconds;
  }
}

class Server implements EchoServer {
  readonly addr: Deno.NetAddr;
  #listener: Deno.TcpListener;
  #onClientDone: ClientDone;
  #diagnostic: (message: string) => void;
  #maxClientBytes: number;
  #maxBufferedBytes: number;
  #maxConnections: number;
  #idleTimeoutMs: number;

  #clients = new Set<Client>();
  #stats = new Stats();
  #clientsAccepted = 0;
  #firstClientId: number;
  #clientIdStep: number;
  #bufferedBytes = 0;
  // Freed chunks are reused (see buffer_pool.ts); spares left unused for a
  // sweep period are let go.
  #pool = new BufferPool();
  #stopping = false;
  #wakeAcceptLoop: (() => void) | undefined;
  #acceptsSinceYield = 0;
  // Accept failures from exhaustion not yet in a diagnostic line, the last
  // such error, and when the last line was written (monotonic).
  #exhaustionFailures = 0;
  #exhaustionError: unknown;
  #exhaustionReportedAt = -Infinity;
  #exhaustionTimer: ReturnType<typeof setTimeout> | undefined;
  // Lines about single clients in the current period, when it began, and
  // those held back since, by kind, to be summed up at its end.
  #clientLines = 0;
  #clientPeriodStart = -Infinity;
  #clientLinesHeld = new Map<ClientLineKind, number>();
  #clientLinesTimer: ReturnType<typeof setTimeout> | undefined;
  #acceptLoopDone = false;
  #drainExpired = false;
  #idleSweep: ReturnType<typeof setInterval>;
  #drainTimer: ReturnType<typeof setTimeout> | undefined;
  #drainDeadline = Infinity;
  #allServed: PromiseWithResolvers<void> | undefined;

  constructor(onClientDone: ClientDone, options: ServeOptions) {
    this.#onClientDone = onClientDone;
    this.#diagnostic = options.onDiagnostic ?? console.error;
    this.#maxClientBytes = options.maxClientBytes ?? DEFAULT_MAX_CLIENT_BYTES;
    this.#maxBufferedBytes = options.maxBufferedBytes ??
      DEFAULT_MAX_BUFFERED_BYTES;
    this.#maxConnections = options.maxConnections ?? DEFAULT_MAX_CONNECTIONS;
    this.#idleTimeoutMs = options.idleTimeoutMs ?? DEFAULT_IDLE_TIMEOUT_MS;
    const { instance = 1, instances = 1 } = options;
    if (
      !Number.isSafeInteger(instances) || !Number.isSafeInteger(instance) ||
      instance < 1 || instance > instances || instances > MAX_INSTANCES
    ) {
      throw new RangeError(
        `instance must be from 1 to instances (${instances}), and instances at most ${MAX_INSTANCES}, not ${instance}/${instances}`,
      );
    }
    this.#firstClientId = instance;
    this.#clientIdStep = instances;
    this.#listener = Deno.listen({
      hostname: options.hostname ?? "127.0.0.1",
      port: options.port ?? 4000,
    });
    this.addr = this.#listener.addr;
    // One sweep for all clients instead of a timer per read or write.
    this.#idleSweep = setInterval(
      () => this.#sweep(),
      Math.max(10, Math.min(1000, this.#idleTimeoutMs / 2)),
    );
    this.#accept().finally(() => {
      this.#acceptLoopDone = true;
      this.#resolveIfAllServed();
    });
  }

  get connections(): number {
    return this.#clients.size;
  }

  get clientsAccepted(): number {
    return this.#clientsAccepted;
  }

  /** Numbers the next accepted client: instance, instance + instances, ... */
  #nextClientId(): number {
    return this.#firstClientId + this.#clientIdStep * this.#clientsAccepted++;
  }

  get bufferedBytes(): number {
    return this.#bufferedBytes;
  }

  get spareBufferBytes(): number {
    return this.#pool.spareBytes;
  }

  get stats(): EchoStats {
    return this.#stats;
  }

  shutdown(options: ShutdownOptions = {}): Promise<void> {
    if (!this.#stopping) {
      this.#stopping = true;
      this.#listener.close();
      this.#wakeAcceptLoop?.();
      this.#allServed = Promise.withResolvers();
      this.#resolveIfAllServed();
    }
    // A later call may only bring the deadline forward: a second SIGTERM's
    // 0 cuts off at once, but a retry with the default must not extend it.
    const timeoutMs = options.drainTimeoutMs ?? DEFAULT_DRAIN_TIMEOUT_MS;
    const deadline = performance.now() + timeoutMs;
    if (deadline < this.#drainDeadline) {
      this.#drainDeadline = deadline;
      clearTimeout(this.#drainTimer);
      this.#drainTimer = setTimeout(() => {
        this.#drainExpired = true;
        for (const client of this.#clients) {
          this.#cutOff(client, "shutdown", "still connected at shutdown");
        }
      }, timeoutMs);
    }
    return this.#allServed!.promise.then(() => {
      clearTimeout(this.#drainTimer);
      clearInterval(this.#idleSweep);
      clearTimeout(this.#exhaustionTimer);
      this.#reportExhaustion();
      clearTimeout(this.#clientLinesTimer);
      this.#reportClientLinesHeld();
    });
  }

  /** Once stopping, resolves shutdown when the accept loop has ended (so no
   * client can still be added) and every client has been reported. */
  #resolveIfAllServed(): void {
    if (this.#acceptLoopDone && this.#clients.size === 0) {
      this.#allServed?.resolve();
    }
  }

  async #accept(): Promise<void> {
    while (!this.#stopping) {
      if (this.#clients.size >= this.#maxConnections) {
        // Leave the rest in the kernel's accept queue until a client finishes.
        await new Promise<void>((resolve) => this.#wakeAcceptLoop = resolve);
        this.#wakeAcceptLoop = undefined;
        continue;
      }
      let conn: Deno.TcpConn;
      try {
        conn = await this.#listener.accept();
      } catch (error) {
        if (this.#stopping) return;
        const kind = acceptErrorKind(error);
        this.#stats.acceptErrors[kind]++;
        if (kind === "exhaustion") {
          // The connection stays queued; retry once a client's fd is free.
          this.#noteExhaustion(error);
          await this.#pauseAccepting();
          continue;
        }
        // The kernel accepted a connection that then failed (e.g. reset
        // while queued, denoland/deno#8499): a client that sent nothing.
        const clientId = this.#nextClientId();
        if (kind === "client") {
          this.#clientDiagnostic(
            "reset",
            `client ${clientId}: failed before it was accepted: ${
              describe(error)
            }`,
          );
        } else {
          this.#clientDiagnostic(
            "accept_unknown",
            `client ${clientId}: UNEXPECTED accept error (please report it), counted as a client: ${
              describe(error)
            }`,
          );
        }
        this.#report(clientId, 0);
        // An error we cannot sort may come back at once, every time: without
        // a pause the loop would spin, numbering and logging a client each
        // pass.
        if (kind === "unknown") await this.#pauseAccepting();
        continue;
      }
      const client = new Client(conn, this.#nextClientId());
      this.#serve(client);
      // Accepted just as the drain ran out: it is logged, but not waited for.
      if (this.#drainExpired) {
        this.#cutOff(client, "shutdown", "still connected at shutdown");
      }
      if (++this.#acceptsSinceYield >= ACCEPTS_PER_YIELD) {
        this.#acceptsSinceYield = 0;
        await new Promise((resolve) => setTimeout(resolve, 0));
      }
    }
  }

  /** Waits until a client finishes, shutdown starts, or ACCEPT_RETRY_MS. */
  async #pauseAccepting(): Promise<void> {
    await new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, ACCEPT_RETRY_MS);
      this.#wakeAcceptLoop = () => {
        clearTimeout(timer);
        resolve();
      };
    });
    this.#wakeAcceptLoop = undefined;
  }

  async #serve(client: Client): Promise<void> {
    this.#clients.add(client);
    const { conn } = client;
    try {
      // Read to EOF here, not in an async helper awaited from here: every
      // idle client waits in this loop, and a second suspended async
      // function per client cost 0.4 KiB each (bench/idle_memory.ts).
      let chunk = this.#allocate(client, FIRST_CHUNK_BYTES);
      let filled = 0;
      while (chunk !== undefined) {
        const n = await conn.read(
          filled === 0 ? chunk : chunk.subarray(filled),
        );
        if (n === null) {
          this.#keepLast(client, chunk, filled);
          break;
        }
        if (!this.#count(client, n)) break;
        filled += n;
        if (filled === chunk.length) {
          client.chunks.push(chunk);
          chunk = this.#allocate(client, nextChunkBytes(client.bytesReceived));
          filled = 0;
        }
      }
      // Not cut off (by a limit, the idle sweep or shutdown): at EOF.
      if (client.cutOffReason === undefined) {
        await this.#writeBack(client);
        await conn.closeWrite();
      }
    } catch (error) {
      // A cut-off closes the connection under a pending read or write; that
      // rejection is expected and was already reported.
      if (client.cutOffReason === undefined) {
        this.#stats.cutoffs.reset++;
        this.#clientDiagnostic(
          "reset",
          `client ${client.clientId}: ${describe(error)}`,
        );
      }
    } finally {
      this.#release(client, client.bufferedBytes);
      client.chunks = [];
      if (client.cutOffReason === undefined) conn.close();
      this.#clients.delete(client);
      this.#stats.recordDuration(
        (performance.now() - client.acceptedAt) / 1000,
      );
      this.#report(client.clientId, client.bytesReceived);
      this.#wakeAcceptLoop?.();
      if (this.#stopping) this.#resolveIfAllServed();
    }
  }

  /** Counts `n` bytes received; false if that cut the client off. */
  #count(client: Client, n: number): boolean {
    client.bytesReceived += n;
    this.#stats.receivedBytes += n;
    client.lastActivity = performance.now();
    if (client.bytesReceived <= this.#maxClientBytes) return true;
    this.#cutOff(
      client,
      "client_limit",
      `sent more than the limit of ${this.#maxClientBytes} bytes`,
    );
    return false;
  }

  /** At EOF: keeps the last chunk's filled part, or frees it if empty. */
  #keepLast(client: Client, chunk: Uint8Array, filled: number): void {
    if (filled > 0) {
      client.chunks.push(this.#trim(client, chunk, filled));
    } else {
      this.#release(client, chunk.length);
      this.#recycle(chunk);
    }
  }

  async #writeBack(client: Client): Promise<void> {
    const { conn, chunks } = client;
    for (let i = 0; i < chunks.length; i++) {
      const chunk = chunks[i];
      for (let written = 0; written < chunk.length;) {
        const n = await conn.write(
          written === 0 ? chunk : chunk.subarray(written),
        );
        written += n;
        this.#stats.sentBytes += n;
        client.lastActivity = performance.now();
      }
      // Free each chunk once it is sent rather than holding all to the end.
      chunks[i] = EMPTY;
      this.#release(client, chunk.buffer.byteLength);
      this.#recycle(chunk);
    }
  }

  /** A new read chunk, or undefined (client cut off) if over a limit. */
  #allocate(client: Client, size: number): Uint8Array | undefined {
    // Never buffer more than one byte past the per-client limit.
    size = Math.min(size, this.#maxClientBytes + 1 - client.bytesReceived);
    if (this.#bufferedBytes + size > this.#maxBufferedBytes) {
      this.#cutOff(
        client,
        "buffer_limit",
        `server buffer limit of ${this.#maxBufferedBytes} bytes reached`,
      );
      return undefined;
    }
    this.#bufferedBytes += size;
    client.bufferedBytes += size;
    // A reused chunk holds an earlier client's bytes, but only the part a
    // read fills is ever written back.
    const chunk = this.#pool.take(size);
    // Spares count against the limit too; live buffers win over them.
    if (this.#bufferedBytes + this.#pool.spareBytes > this.#maxBufferedBytes) {
      this.#pool.clear();
    }
    return chunk;
  }

  /**
   * Keeps a partly filled last chunk, or a tight copy if much is unused. The
   * copy takes in a lone first chunk too, so a payload of a few KiB still
   * goes back in one write, not two.
   */
  #trim(client: Client, chunk: Uint8Array, filled: number): Uint8Array {
    const unused = chunk.length - filled;
    if (unused <= client.bytesReceived / 16) return chunk.subarray(0, filled);
    this.#release(client, unused);
    const { chunks } = client;
    let tight: Uint8Array;
    if (chunks.length === 1 && chunks[0].length === FIRST_CHUNK_BYTES) {
      const first = chunks.pop()!;
      tight = new Uint8Array(first.length + filled);
      tight.set(first);
      tight.set(chunk.subarray(0, filled), first.length);
      this.#recycle(first);
    } else {
      tight = chunk.slice(0, filled);
    }
    this.#recycle(chunk);
    return tight;
  }

  /** Keeps a freed chunk as a spare only if spares still fit the limit. */
  #recycle(chunk: Uint8Array): void {
    const total = this.#bufferedBytes + this.#pool.spareBytes +
      chunk.buffer.byteLength;
    if (total <= this.#maxBufferedBytes) this.#pool.give(chunk);
  }

  #release(client: Client, bytes: number): void {
    this.#bufferedBytes -= bytes;
    client.bufferedBytes -= bytes;
  }

  #cutOff(client: Client, kind: CutoffReason, reason: string): void {
    if (client.cutOffReason !== undefined) return;
    client.cutOffReason = reason;
    this.#stats.cutoffs[kind]++;
    this.#clientDiagnostic(
      kind,
      `client ${client.clientId}: cut off after ${client.bytesReceived} bytes: ${reason}`,
    );
    // Closing with unread input makes the kernel send a reset, and rejects
    // any read or write still pending on the connection.
    client.conn.close();
  }

  /** The periodic sweep: cuts off idle clients, lets unused spares go. */
  #sweep(): void {
    this.#pool.trim();
    // Monotonic: a wall-clock jump must not cut everyone off.
    const deadline = performance.now() - this.#idleTimeoutMs;
    for (const client of this.#clients) {
      if (client.lastActivity <= deadline) {
        this.#cutOff(
          client,
          "idle",
          `idle for more than ${this.#idleTimeoutMs / 1000} s`,
        );
      }
    }
  }

  /** Counts an exhaustion failure; reports at most once per period. */
  #noteExhaustion(error: unknown): void {
    this.#exhaustionFailures++;
    this.#exhaustionError = error;
    if (this.#exhaustionTimer !== undefined) return;
    const wait = this.#exhaustionReportedAt + EXHAUSTION_REPORT_MS -
      performance.now();
    if (wait <= 0) {
      this.#reportExhaustion();
      return;
    }
    // Failures within the period go into one line at its end.
    this.#exhaustionTimer = setTimeout(() => {
      this.#exhaustionTimer = undefined;
      this.#reportExhaustion();
    }, wait);
  }

  #reportExhaustion(): void {
    const failures = this.#exhaustionFailures;
    if (failures === 0) return;
    this.#exhaustionFailures = 0;
    this.#exhaustionReportedAt = performance.now();
    this.#diagnostic(
      `accept failed ${failures} ${failures === 1 ? "time" : "times"}: ${
        describe(this.#exhaustionError)
      }; accepting again as soon as a client finishes`,
    );
  }

  /**
   * Passes on a line about a single client, or holds it back if this
   * period has had its share; the first one held back schedules the
   * period's summary.
   */
  #clientDiagnostic(kind: ClientLineKind, message: string): void {
    const now = performance.now();
    // A period with lines held back lasts until its summary is written.
    if (
      this.#clientLinesTimer === undefined &&
      now - this.#clientPeriodStart >= CLIENT_REPORT_PERIOD_MS
    ) {
      this.#clientPeriodStart = now;
      this.#clientLines = 0;
    }
    if (this.#clientLines < CLIENT_LINES_PER_PERIOD) {
      this.#clientLines++;
      this.#diagnostic(message);
      return;
    }
    this.#clientLinesHeld.set(kind, (this.#clientLinesHeld.get(kind) ?? 0) + 1);
    this.#clientLinesTimer ??= setTimeout(() => {
      this.#clientLinesTimer = undefined;
      this.#reportClientLinesHeld();
    }, this.#clientPeriodStart + CLIENT_REPORT_PERIOD_MS - now);
  }

  /** One line for the client lines held back: how many, by kind. */
  #reportClientLinesHeld(): void {
    if (this.#clientLinesHeld.size === 0) return;
    let total = 0;
    const kinds: string[] = [];
    for (const kind of CLIENT_LINE_KINDS) {
      const count = this.#clientLinesHeld.get(kind);
      if (count === undefined) continue;
      total += count;
      kinds.push(`${kind} ${count}`);
    }
    this.#clientLinesHeld.clear();
    this.#diagnostic(
      `... and ${total} more client ${
        total === 1 ? "diagnostic" : "diagnostics"
      } in the last second (${kinds.join(", ")})`,
    );
  }

  #report(clientId: number, bytesReceived: number): void {
    try {
      this.#onClientDone(clientId, bytesReceived);
    } catch (error) {
      this.#stats.reportErrors++;
      this.#clientDiagnostic(
        "not_logged",
        `client ${clientId}: could not be logged: ${describe(error)}`,
      );
    }
  }
}

const EMPTY = new Uint8Array(0);

/**
 * The next chunk: an eighth of what was received so far, as a power of two
 * (so the pool can reuse it), from 16 KiB to 1 MiB. The unused end of the
 * last chunk is then never more than 1/8 of the payload (or 16 KiB), even
 * before EOF, so a client never holds much more than 1.125x its bytes.
 */
function nextChunkBytes(bytesReceived: number): number {
  const eighth = bytesReceived / 8;
  let size = MIN_GROWN_CHUNK_BYTES;
  while (size * 2 <= eighth && size < MAX_CHUNK_BYTES) size *= 2;
  return size;
}

/**
 * How the accept loop treats an error from `listener.accept()`:
 *
 * - `"exhaustion"`: the server is out of file descriptors or memory
 *   (EMFILE, ENFILE, ENOBUFS, ENOMEM). The connection stays queued; accept
 *   again once a client finishes.
 * - `"client"`: the kernel accepted a connection that then failed, e.g. it
 *   reset while queued (ENOTCONN from Deno's getpeername,
 *   denoland/deno#8499), or a network error Linux passes on from the new
 *   socket (see accept(2)). A client that sent nothing; accept again at once.
 * - `"unknown"`: anything else. Counted as a client too, but worth a report.
 *
 * Sorted by the error's `code` (or the os error number in its message),
 * the way Go's net package and nginx sort them, not by its class.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const emfile = Object.assign(new Error("Too many open files (os error 24)"), {
 *   code: "EMFILE",
 * });
 * assert.equal(acceptErrorKind(emfile), "exhaustion");
 * assert.equal(
 *   acceptErrorKind(new Deno.errors.NotConnected("os error 107")),
 *   "client",
 * );
 * assert.equal(acceptErrorKind(new Error("something new")), "unknown");
 * ```
 */
export function acceptErrorKind(
  error: unknown,
): "exhaustion" | "client" | "unknown" {
  const code = errorCode(error);
  if (code !== undefined) {
    if (EXHAUSTION_CODES.has(code)) return "exhaustion";
    if (CLIENT_CODES.has(code)) return "client";
  }
  // Deno gives these classes only to these client codes; errors made
  // without a code (as in tests) are still sorted by them.
  if (
    error instanceof Deno.errors.NotConnected ||
    error instanceof Deno.errors.ConnectionReset ||
    error instanceof Deno.errors.ConnectionAborted
  ) return "client";
  return "unknown";
}

// Linux numbers, for an error that carries no code.
const OS_ERROR_CODES: Record<number, string> = {
  12: "ENOMEM",
  23: "ENFILE",
  24: "EMFILE",
  105: "ENOBUFS",
};
const EXHAUSTION_CODES = new Set(["EMFILE", "ENFILE", "ENOBUFS", "ENOMEM"]);
// ECONNABORTED, ECONNRESET and ENOTCONN: the client left while queued.
// EPERM: a firewall rule refused it. The rest: network errors Linux's
// accept(2) passes on from the new socket and says to retry.
const CLIENT_CODES = new Set([
  "ECONNABORTED",
  "ECONNRESET",
  "ENOTCONN",
  "EPERM",
  "ETIMEDOUT",
  "EPROTO",
  "ENOPROTOOPT",
  "ENETDOWN",
  "ENETUNREACH",
  "EHOSTDOWN",
  "EHOSTUNREACH",
  "ENONET",
  "EOPNOTSUPP",
]);

function errorCode(error: unknown): string | undefined {
  if (!(error instanceof Error)) return undefined;
  const { code } = error as Error & { code?: unknown };
  if (typeof code === "string") return code;
  const number = /\(os error (\d+)\)/.exec(error.message)?.[1];
  return number === undefined ? undefined : OS_ERROR_CODES[Number(number)];
}

function describe(error: unknown): string {
  if (error instanceof Error) return `${error.name}: ${error.message}`;
  return String(error);
}
