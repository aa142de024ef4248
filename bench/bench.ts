/**
 * A verifying load client for the echo server (`deno task bench`).
 *
 * It keeps a number of connections in flight; each one connects, sends a
 * payload while already reading the reply, half-closes, reads to EOF and
 * checks every byte it got back against what it sent. Each connection's
 * payload starts at its own offset of a pseudo-random pattern, so a server
 * that hands one client's bytes to another is caught too.
 *
 * With `--mix` it runs misbehaving clients beside the verified ones (resets,
 * slowloris, idle, oversize, ...; see `mix.ts`), and with `--log PATH` it
 * then checks the server's access log: one well-formed line per connection
 * that succeeded, no client number twice (see `log_check.ts`).
 *
 * ```sh
 * deno run --allow-net --allow-read bench/bench.ts --port 4000 --mix \
 *   --log /var/log/echo-server/access.log
 * ```
 *
 * It connects to the one host and port it is given and nowhere else. It is
 * meant for loopback and for servers you run yourself: do not point it at
 * other people's machines.
 *
 * @module
 */

import { controlRun } from "./_run.ts";
import { connectSlots, MAX_CONNECTING } from "./_connect_slots.ts";
import { parseCommand } from "./_cli.ts";
import { checkInteger, describe } from "../_errors.ts";
import {
  formatSize,
  parseCommandLine,
  parseInteger,
  parseSeconds,
  parseSize,
  stringFlags,
  UsageError,
} from "../flags.ts";
import {
  CHUNK_BYTES,
  PatternBuffer,
  patternSlice,
  phaseOf,
} from "./pattern.ts";
import { formatLogReport } from "./log_check.ts";
import { DEFAULTS } from "../options.ts";
import {
  ATTACK_KINDS,
  CLIENT_KINDS,
  type ClientKind,
  formatMixResult,
  type MixOptions,
  runMix,
  SOURCE_ATTACK_KINDS,
} from "./mix.ts";

/** Options for {@linkcode runBench}. */
export interface BenchOptions {
  /**
   * Server address.
   *
   * @default {"127.0.0.1"}
   */
  hostname?: string;
  /**
   * Server port.
   *
   * @default {4000}
   */
  port?: number;
  /**
   * Connections kept in flight at once.
   *
   * @default {16}
   */
  concurrency?: number;
  /**
   * Payload bytes sent (and expected back) per connection.
   *
   * @default {5}
   */
  size?: number;
  /**
   * Seconds to start new connections for. Connections in flight then get
   * up to 5 s more to finish; any still going after that are cut off and
   * counted as unfinished. No time limit when
   * {@linkcode BenchOptions.connections} is given.
   *
   * @default {10}
   */
  duration?: number;
  /** Stop after this many connections (attempts, good or bad). */
  connections?: number;
  /** Stops the run at once: connections in flight are cut off. */
  signal?: AbortSignal;
  /** Called about once a second while the run lasts. */
  onProgress?: (progress: BenchProgress) => void;
}

/** A snapshot passed to {@linkcode BenchOptions.onProgress}. */
export interface BenchProgress {
  /** Seconds since the run started. */
  elapsedSeconds: number;
  /** Connections completed with a correct reply so far. */
  connections: number;
  /** Connections completed per second since the previous snapshot. */
  connectionsPerSecond: number;
  /** Connections that failed so far. */
  errors: number;
}

/**
 * Latency from the start of the connect to the reply's EOF, in ms. A
 * connection waiting for its turn to connect (see
 * {@linkcode BenchResult.peakOpen}) is not timed while it waits.
 */
export interface LatencyMs {
  /** Median. */
  p50: number;
  /** 90th percentile. */
  p90: number;
  /** 99th percentile. */
  p99: number;
  /** Slowest. */
  max: number;
}

/** What {@linkcode runBench} measured. */
export interface BenchResult {
  /** Connections completed with exactly the bytes sent echoed back. */
  connections: number;
  /** Failed connections: the sum of the four kinds below. */
  errors: number;
  /** Connections that could not be opened. */
  connectErrors: number;
  /**
   * Connects that took 1 s or more; not errors. On loopback that is a SYN
   * the server's kernel dropped and the client's resent after 1 s, most
   * likely because the server's listen queue was full: the server accepts
   * slower than clients arrive.
   */
  slowConnects: number;
  /**
   * Most connections open at once. Below the concurrency when the client is
   * the bottleneck: the other connections were waiting their turn to
   * connect (at most 32 connects are in progress at once, see
   * `_connect_slots.ts`), with no socket.
   */
  peakOpen: number;
  /**
   * Connections that broke while sending or reading: reset, or closed by
   * the server before the whole request was sent.
   */
  resets: number;
  /** Replies with a wrong byte, or longer than the request. */
  mismatches: number;
  /** Replies that ended before all the bytes sent came back. */
  shortReplies: number;
  /** Connections cut off by the end of the run or the signal; not errors. */
  unfinished: number;
  /** Payload bytes sent by completed and unfinished connections. */
  bytesSent: number;
  /** Payload bytes received (and verified) by completed and unfinished connections. */
  bytesReceived: number;
  /** Seconds from the start until the last connection ended or was cut off. */
  elapsedSeconds: number;
  /** `connections / elapsedSeconds`. */
  connectionsPerSecond: number;
  /** Echo throughput, `(bytesSent + bytesReceived) / 2 / elapsedSeconds`, in 10^6 B/s. */
  megabytesPerSecond: number;
  /** Latency of completed connections; all 0 when none completed. */
  latencyMs: LatencyMs;
  /** Descriptions of the first few errors. */
  errorSamples: string[];
}

const MAX_ERROR_SAMPLES = 5;
/** The initial SYN retransmission timeout: a connect this slow was resent. */
const SLOW_CONNECT_MS = 1000;

type Failure = "reset" | "mismatch" | "short" | "unfinished";

/** One connection in flight. */
class Flight {
  failure: Failure | undefined = undefined;
  message = "";
  sent = 0;
  received = 0;
  /** Set as the write side is shut down, i.e. the whole request was sent. */
  requestSent = false;
  #closed = false;

  constructor(
    readonly conn: Deno.TcpConn,
    readonly seq: number,
    readonly phase: number,
  ) {}

  /** Records the first failure and closes, which ends any pending I/O. */
  fail(failure: Failure, message: string): void {
    if (this.failure !== undefined) return;
    this.failure = failure;
    this.message = message;
    this.close();
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.conn.close();
  }
}

class Run {
  readonly #hostname: string;
  readonly #port: number;
  readonly #size: number;
  readonly #limit: number;
  readonly #readBytes: number;
  #started = 0;
  #everConnected = false;
  #finishing = false;
  #stopped = false;
  #stopTime = 0;
  readonly #flights = new Set<Flight>();
  readonly #connectAbort = new AbortController();

  ok = 0;
  connectErrors = 0;
  slowConnects = 0;
  peakOpen = 0;
  resets = 0;
  mismatches = 0;
  shortReplies = 0;
  unfinished = 0;
  bytesSent = 0;
  bytesReceived = 0;
  latencies = new Float64Array(1024);
  errorSamples: string[] = [];

  constructor(hostname: string, port: number, size: number, limit: number) {
    this.#hostname = hostname;
    this.#port = port;
    this.#size = size;
    this.#limit = limit;
    // One byte more than expected is enough to catch a reply that is too long.
    this.#readBytes = Math.min(CHUNK_BYTES, Math.max(64, size + 1));
  }

  get errors(): number {
    return this.connectErrors + this.resets + this.mismatches +
      this.shortReplies;
  }

  /** Starts no more connections; those in flight may finish. */
  finish(): void {
    this.#finishing = true;
  }

  /** Starts no more connections and cuts off those in flight. */
  stop(): void {
    if (this.#stopped) return;
    this.#finishing = true;
    this.#stopped = true;
    this.#stopTime = performance.now();
    this.#connectAbort.abort();
    for (const flight of this.#flights) {
      flight.fail("unfinished", "cut off at the end of the run");
    }
  }

  /** When the run was stopped early, else undefined. */
  get stopTime(): number | undefined {
    return this.#stopped ? this.#stopTime : undefined;
  }

  async worker(): Promise<void> {
    const buffer = new PatternBuffer(this.#readBytes);
    while (!this.#finishing && this.#started < this.#limit) {
      await this.#connection(this.#started++, buffer);
    }
  }

  async #connection(seq: number, buffer: PatternBuffer): Promise<void> {
    // Waiting for a slot (see _connect_slots.ts) is not timed.
    if (!await connectSlots.acquire(this.#connectAbort.signal)) return;
    if (this.#finishing) {
      // Finished while waiting: this connection never starts.
      connectSlots.release();
      return;
    }
    const start = performance.now();
    let conn: Deno.TcpConn;
    try {
      conn = await Deno.connect({
        hostname: this.#hostname,
        port: this.#port,
        signal: this.#connectAbort.signal,
      });
    } catch (error) {
      connectSlots.release();
      if (this.#stopped) return;
      this.connectErrors++;
      this.#sample(`connection ${seq + 1}: connect: ${describe(error)}`);
      // Nothing listening at all: say so once rather than retry for the
      // whole duration.
      if (!this.#everConnected) this.stop();
      return;
    }
    connectSlots.release();
    if (performance.now() - start >= SLOW_CONNECT_MS) this.slowConnects++;
    this.#everConnected = true;
    const flight = new Flight(conn, seq, phaseOf(seq));
    if (this.#stopped) {
      flight.close();
      return;
    }
    this.#flights.add(flight);
    this.peakOpen = Math.max(this.peakOpen, this.#flights.size);
    // Read while writing: a server that streams its reply would otherwise
    // fill both directions' buffers and deadlock with a large payload.
    const reading = this.#receive(flight, buffer);
    await this.#send(flight);
    await reading;
    this.#flights.delete(flight);

    switch (flight.failure) {
      case undefined:
        flight.close();
        this.#recordLatency(performance.now() - start);
        this.ok++;
        this.bytesSent += flight.sent;
        this.bytesReceived += flight.received;
        return;
      case "unfinished":
        this.unfinished++;
        this.bytesSent += flight.sent;
        this.bytesReceived += flight.received;
        return;
      case "reset":
        this.resets++;
        break;
      case "mismatch":
        this.mismatches++;
        break;
      case "short":
        this.shortReplies++;
        break;
    }
    this.#sample(`connection ${seq + 1}: ${flight.message}`);
  }

  async #send(flight: Flight): Promise<void> {
    const { conn, phase } = flight;
    const size = this.#size;
    try {
      let sent = 0;
      while (sent < size) {
        const n = Math.min(CHUNK_BYTES, size - sent);
        sent += await conn.write(patternSlice(phase, sent, n));
        flight.sent = sent;
      }
      flight.requestSent = true;
      await conn.closeWrite();
    } catch (error) {
      flight.fail(
        "reset",
        `write after ${flight.sent} bytes: ${describe(error)}`,
      );
    }
  }

  async #receive(flight: Flight, buffer: PatternBuffer): Promise<void> {
    const { conn, phase } = flight;
    const size = this.#size;
    let received = 0;
    try {
      for (;;) {
        const n = await conn.read(buffer.bytes);
        if (n === null) break;
        if (received + n > size) {
          flight.fail(
            "mismatch",
            `reply longer than the ${size} bytes sent`,
          );
          return;
        }
        const at = buffer.firstDifference(n, phase, received);
        if (at >= 0) {
          flight.fail(
            "mismatch",
            `reply byte ${received + at} is ${hex(buffer.bytes[at])}, sent ${
              hex(PatternBuffer.expected(phase, received + at))
            }`,
          );
          return;
        }
        received += n;
        flight.received = received;
      }
    } catch (error) {
      flight.fail("reset", `read after ${received} bytes: ${describe(error)}`);
      return;
    }
    if (!flight.requestSent) {
      // Deno reports a reset as EOF on read, so a reply that ends while the
      // request is still being sent is counted as what it most likely is.
      flight.fail(
        "reset",
        `closed or reset by the server after ${flight.sent} of ${size} bytes were sent`,
      );
    } else if (received < size) {
      flight.fail(
        "short",
        `reply ended after ${received} of ${size} bytes`,
      );
    }
  }

  #recordLatency(ms: number): void {
    if (this.ok === this.latencies.length) {
      const grown = new Float64Array(this.latencies.length * 2);
      grown.set(this.latencies);
      this.latencies = grown;
    }
    this.latencies[this.ok] = ms;
  }

  #sample(message: string): void {
    if (this.errorSamples.length < MAX_ERROR_SAMPLES) {
      this.errorSamples.push(message);
    }
  }
}

/**
 * Runs a load test against an echo server and resolves with what it
 * measured. It never rejects because of the server: failures are counted
 * in the result. If the very first connection cannot be opened (nothing
 * listening, say), the run stops there with one connect error rather than
 * retrying for the whole duration. Rejects with a `RangeError` for invalid
 * options.
 *
 * @example
 * ```ts ignore
 * const result = await runBench({ port: 4000, connections: 1000, size: 64 });
 * console.log(formatResult(result));
 * if (result.errors > 0) Deno.exit(1);
 * ```
 */
export async function runBench(
  options: BenchOptions = {},
): Promise<BenchResult> {
  const hostname = options.hostname ?? "127.0.0.1";
  const port = options.port ?? 4000;
  const concurrency = options.concurrency ?? 16;
  const size = options.size ?? 5;
  const limit = options.connections ?? Infinity;
  const duration = options.duration ??
    (options.connections === undefined ? 10 : undefined);
  checkInteger("port", port, 1, 65535);
  checkInteger("concurrency", concurrency, 1, Number.MAX_SAFE_INTEGER);
  checkInteger("size", size, 0, Number.MAX_SAFE_INTEGER);
  if (options.connections !== undefined) {
    checkInteger("connections", limit, 1, Number.MAX_SAFE_INTEGER);
  }
  if (duration !== undefined && !(duration > 0 && duration <= 2_147_483)) {
    throw new RangeError(`duration must be above 0 seconds, not ${duration}`);
  }

  const run = new Run(hostname, port, size, limit);
  const start = performance.now();
  using _control = controlRun(run, { signal: options.signal, duration });
  let lastTime = start;
  let lastOk = 0;
  const onProgress = options.onProgress;
  const ticker = onProgress === undefined ? undefined : setInterval(() => {
    const now = performance.now();
    onProgress({
      elapsedSeconds: (now - start) / 1000,
      connections: run.ok,
      connectionsPerSecond: (run.ok - lastOk) / ((now - lastTime) / 1000),
      errors: run.errors,
    });
    lastTime = now;
    lastOk = run.ok;
  }, 1000);
  try {
    const workers = [];
    for (let i = 0; i < Math.min(concurrency, limit); i++) {
      workers.push(run.worker());
    }
    await Promise.all(workers);
  } finally {
    clearInterval(ticker);
  }
  const end = run.stopTime ?? performance.now();
  const elapsedSeconds = Math.max(end - start, 1e-6) / 1000;
  return {
    connections: run.ok,
    errors: run.errors,
    connectErrors: run.connectErrors,
    slowConnects: run.slowConnects,
    peakOpen: run.peakOpen,
    resets: run.resets,
    mismatches: run.mismatches,
    shortReplies: run.shortReplies,
    unfinished: run.unfinished,
    bytesSent: run.bytesSent,
    bytesReceived: run.bytesReceived,
    elapsedSeconds,
    connectionsPerSecond: run.ok / elapsedSeconds,
    megabytesPerSecond: (run.bytesSent + run.bytesReceived) / 2 /
      elapsedSeconds / 1e6,
    latencyMs: percentiles(run.latencies.subarray(0, run.ok)),
    errorSamples: run.errorSamples,
  };
}

function percentiles(latencies: Float64Array): LatencyMs {
  if (latencies.length === 0) return { p50: 0, p90: 0, p99: 0, max: 0 };
  const sorted = latencies.slice().sort();
  const at = (p: number) => sorted[Math.floor((sorted.length - 1) * p / 100)];
  return { p50: at(50), p90: at(90), p99: at(99), max: at(100) };
}

/**
 * Formats a {@linkcode BenchResult} as the multi-line summary the command
 * line prints.
 *
 * @example
 * ```ts ignore
 * console.log(formatResult(await runBench({ connections: 100 })));
 * ```
 */
export function formatResult(result: BenchResult): string {
  const ms = (value: number) => `${value.toFixed(3)} ms`;
  const { latencyMs } = result;
  return [
    `connections  ${result.connections} ok, ${result.unfinished} unfinished`,
    `errors       ${result.errors} (connect ${result.connectErrors}, reset ${result.resets}, mismatch ${result.mismatches}, short ${result.shortReplies})`,
    `connects     ${result.slowConnects} slow (1 s or more: SYN resent, the server's listen queue was full), at most ${result.peakOpen} open at once`,
    `elapsed      ${result.elapsedSeconds.toFixed(3)} s`,
    `throughput   ${result.connectionsPerSecond.toFixed(1)} conn/s, ${
      result.megabytesPerSecond.toFixed(1)
    } MB/s`,
    `latency      p50 ${ms(latencyMs.p50)}, p90 ${ms(latencyMs.p90)}, p99 ${
      ms(latencyMs.p99)
    }, max ${ms(latencyMs.max)}`,
  ].join("\n");
}

function hex(byte: number): string {
  return `0x${byte.toString(16).padStart(2, "0")}`;
}

// ---------------------------------------------------------------------------
// Command line

const USAGE = `Usage: deno task bench [options]

A verifying load client for the echo server. It keeps --concurrency
connections in flight; each sends --size bytes, half-closes, reads the reply
to EOF and checks every byte. It connects only to --host:--port: use it on
loopback or on servers you run yourself.

Options:
  --host HOST          server address (default 127.0.0.1)
  --port PORT          server port (default 4000)
  --concurrency N      connections in flight (default 16), at most
                       ${MAX_CONNECTING} of them connecting at once; with --mix,
                       the echo clients in flight
  --size SIZE          payload bytes per connection, optionally with a
                       suffix KiB, MiB or GiB, e.g. 16MiB (default 5)
  --duration SECONDS   how long to start connections for; those in flight
                       then get up to 5 s to finish (default 10; with
                       --connections, no limit unless given)
  --connections N      stop after N connections (with --mix, N of each kind)
  -h, --help           show this help

Fault injection:
  --mix                run misbehaving clients beside the good ones:
                       ${CLIENT_KINDS.join(", ")}
  --kinds LIST         with --mix, only these kinds (comma-separated)
  --attacks            with --mix, add the attacks: ${ATTACK_KINDS.join(", ")},
                       scaled to the limits below (${
  SOURCE_ATTACK_KINDS.join(" and ")
} only
                       with --attacker-address); a good client not served
                       within --good-within fails the run
  --max-connections N  the server's --max-connections (default ${DEFAULTS.maxConnections})
  --max-buffered SIZE  the server's --max-buffered (default ${
  formatSize(DEFAULTS.maxBufferedBytes)
})
  --max-client-bytes SIZE
                       the server's --max-client-bytes (default ${
  formatSize(DEFAULTS.maxClientBytes)
})
  --good-within SECONDS
                       bound on a good client's connect-to-echo time (default
                       5 with --attacks, else none)
  --large-size SIZE    payload of an echo-large client (default 1MiB)
  --oversize SIZE      bytes an oversize client sends, to be more than the
                       server's --max-client-bytes (default 65MiB)
  --attacker-address ADDRESS
                       with --mix, the local address the attackers connect
                       from (e.g. 127.0.0.2, another source than the good
                       clients on 127.0.0.1)
  --log PATH           with --mix, the access log of the server under test:
                       at the end, check one well-formed line per connection
                       that succeeded, no client number twice, and the byte
                       count of every verified client

Progress goes to stderr once a second, the summary to stdout. MB/s is
(bytes sent + bytes received) / 2 per second, in 10^6 B/s; latency is from
connect to the reply's EOF. A connect of 1 s or more (a SYN resent) is counted
as slow, not as an error. Exit status: 0 if every connection was echoed
correctly (and, with --log, every line is there), 1 if any failed or a line
is missing (or nothing completed), 2 for bad flags.`;

/** Options of a `--mix` run, as {@linkcode parseBenchArgs} returns them. */
export interface MixCommandOptions extends MixOptions {
  /** Marks a `--mix` run. */
  mix: true;
}

// The flags with a value that only `--mix` takes (and `--attacks`).
const MIX_ONLY_FLAGS = [
  "kinds",
  "max-connections",
  "max-buffered",
  "max-client-bytes",
  "good-within",
  "large-size",
  "oversize",
  "log",
  "attacker-address",
] as const;

/**
 * Parses `deno task bench` flags into {@linkcode BenchOptions}, or with
 * `--mix` into {@linkcode MixCommandOptions}, or returns `"help"`. Throws a
 * `UsageError` with a one-line message for bad flags.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const options = parseBenchArgs(["--port", "4777", "--size", "16MiB"]);
 * assert.ok(options !== "help" && !("mix" in options));
 * assert.equal(options.size, 16 * 1024 * 1024);
 * const mix = parseBenchArgs(["--mix", "--log", "/tmp/access.log"]);
 * assert.ok(mix !== "help" && "mix" in mix);
 * assert.equal(mix.logPath, "/tmp/access.log");
 * ```
 */
export function parseBenchArgs(
  args: string[],
): BenchOptions | MixCommandOptions | "help" {
  const { values } = parseCommandLine(args, {
    ...stringFlags([
      "host",
      "port",
      "concurrency",
      "size",
      "duration",
      "connections",
      ...MIX_ONLY_FLAGS,
    ]),
    mix: { type: "boolean" },
    attacks: { type: "boolean" },
    help: { type: "boolean", short: "h" },
  });
  if (values.help) return "help";
  if (values.host === "") throw new UsageError("--host must not be empty");
  const options: BenchOptions = {
    hostname: values.host ?? "127.0.0.1",
    port: parseInteger("--port", values.port, {
      default: 4000,
      min: 1,
      max: 65535,
    }),
    concurrency: parseInteger("--concurrency", values.concurrency, {
      default: 16,
      min: 1,
      max: 100_000,
    }),
    size: parseSize("--size", values.size, { default: 5 }),
  };
  if (values.connections !== undefined) {
    options.connections = parseInteger("--connections", values.connections, {
      min: 1,
    });
  }
  // Without --connections a run lasts 10 s unless --duration says otherwise.
  if (values.duration !== undefined || options.connections === undefined) {
    options.duration = parseSeconds("--duration", values.duration, {
      default: 10,
    });
  }
  if (!values.mix) {
    for (const flag of ["attacks", ...MIX_ONLY_FLAGS] as const) {
      if (values[flag] !== undefined) {
        throw new UsageError(`--${flag} needs --mix`);
      }
    }
    return options;
  }
  const mix: MixCommandOptions = {
    mix: true,
    hostname: options.hostname,
    port: options.port,
    concurrency: options.concurrency,
    size: options.size,
    largeSize: parseSize("--large-size", values["large-size"], {
      default: 1024 * 1024,
    }),
    oversize: parseSize("--oversize", values.oversize, {
      default: 65 * 1024 * 1024,
      min: 1,
    }),
  };
  if (options.duration !== undefined) mix.duration = options.duration;
  if (options.connections !== undefined) {
    mix.connections = options.connections;
  }
  if (values.kinds !== undefined) mix.kinds = parseKinds(values.kinds);
  if (values.attacks) {
    // The silent floods from the good clients' own address would measure
    // the limit of fairness between sources, not pass or fail a server.
    const attacks = values["attacker-address"] === undefined
      ? ATTACK_KINDS.filter((kind) => !SOURCE_ATTACK_KINDS.includes(kind))
      : ATTACK_KINDS;
    mix.kinds = [
      ...(mix.kinds ??
        CLIENT_KINDS.filter((kind) => !ATTACK_KINDS.includes(kind))),
      ...attacks,
    ];
  }
  const limitFlags = [
    values["max-connections"],
    values["max-buffered"],
    values["max-client-bytes"],
  ];
  if (limitFlags.some((value) => value !== undefined)) {
    mix.limits = {
      maxConnections: parseInteger(
        "--max-connections",
        values["max-connections"],
        { default: DEFAULTS.maxConnections, min: 1, max: 1_000_000 },
      ),
      maxBufferedBytes: parseSize("--max-buffered", values["max-buffered"], {
        default: DEFAULTS.maxBufferedBytes,
        min: 1,
      }),
      maxClientBytes: parseSize(
        "--max-client-bytes",
        values["max-client-bytes"],
        { default: DEFAULTS.maxClientBytes, min: 1 },
      ),
    };
  }
  if (values["good-within"] !== undefined) {
    mix.goodWithinMs = parseSeconds("--good-within", values["good-within"]) *
      1000;
  }
  if (values.log !== undefined) {
    if (values.log === "") throw new UsageError("--log must not be empty");
    mix.logPath = values.log;
  }
  if (values["attacker-address"] !== undefined) {
    if (values["attacker-address"] === "") {
      throw new UsageError("--attacker-address must not be empty");
    }
    mix.attackerAddress = values["attacker-address"];
  }
  return mix;
}

function parseKinds(text: string): ClientKind[] {
  const kinds = text.split(",").map((kind) => kind.trim());
  for (const kind of kinds) {
    if (!(CLIENT_KINDS as readonly string[]).includes(kind)) {
      throw new UsageError(
        `--kinds must list kinds from ${CLIENT_KINDS.join(",")}, not '${kind}'`,
      );
    }
  }
  return kinds as ClientKind[];
}

function formatBytes(bytes: number): string {
  for (
    const [unit, factor] of [["GiB", 1024 ** 3], ["MiB", 1024 ** 2]] as const
  ) {
    if (bytes >= factor && bytes % factor === 0) {
      return `${bytes / factor} ${unit}`;
    }
  }
  if (bytes >= 1024 && bytes % 1024 === 0) return `${bytes / 1024} KiB`;
  return `${bytes} B`;
}

const encoder = new TextEncoder();

function writeStderr(text: string): void {
  const bytes = encoder.encode(text);
  for (let written = 0; written < bytes.length;) {
    written += Deno.stderr.writeSync(bytes.subarray(written));
  }
}

async function main(args: string[]): Promise<number> {
  const options = parseCommand("bench", USAGE, () => parseBenchArgs(args));
  if (typeof options === "number") return options;
  const tty = Deno.stderr.isTerminal();
  const limits = [
    options.duration === undefined ? undefined : `${options.duration} s`,
    options.connections === undefined
      ? undefined
      : `${options.connections} connections${
        "mix" in options ? " of each kind" : ""
      }`,
  ].filter((limit) => limit !== undefined).join(" or ");
  let progressShown = false;
  // One line a second: seconds, counts and rates, failures.
  const progress = (seconds: number, counts: string, failures: string) => {
    progressShown = true;
    const text = `${seconds.toFixed(0).padStart(3)} s  ${counts}  ${failures}`;
    writeStderr(`${tty ? "\r" : ""}${text}${tty ? "\x1b[K" : "\n"}`);
  };
  // Ends the progress line, then shows the run's sample errors.
  const finished = (errorSamples: readonly string[]) => {
    if (tty && progressShown) writeStderr("\n");
    for (const sample of errorSamples) writeStderr(`bench: ${sample}\n`);
  };
  const abort = new AbortController();
  // Ctrl-C stops the run and still prints the summary; a second one quits.
  const onInterrupt = () => {
    if (abort.signal.aborted) Deno.exit(130);
    abort.abort();
  };
  Deno.addSignalListener("SIGINT", onInterrupt);
  try {
    if ("mix" in options) {
      writeStderr(
        `bench: ${options.hostname}:${options.port}, mix of ${
          (options.kinds ?? CLIENT_KINDS).join(", ")
        }; echo ${formatBytes(options.size ?? 5)}, ${
          options.concurrency ?? 16
        } in flight; for ${limits}${
          options.logPath === undefined ? "" : `; checking ${options.logPath}`
        }\n`,
      );
      let result;
      try {
        result = await runMix({
          ...options,
          signal: abort.signal,
          onProgress: (p) =>
            progress(
              p.elapsedSeconds,
              `${String(p.connected).padStart(8)} connected  ${
                p.echoesPerSecond.toFixed(0).padStart(6)
              } echo/s`,
              `${p.failures} failures`,
            ),
        });
      } catch (error) {
        // The log could not be opened: the one mistake runMix rejects for.
        if (!(error instanceof Deno.errors.NotFound)) throw error;
        console.error(
          `bench: cannot read --log ${options.logPath}: ${error.message}`,
        );
        return 1;
      }
      finished(result.errorSamples);
      console.log(formatMixResult(result));
      if (result.log !== undefined) console.log(formatLogReport(result.log));
      return result.ok ? 0 : 1;
    }
    writeStderr(
      `bench: ${options.hostname}:${options.port}, ${options.concurrency} in flight, ${
        formatBytes(options.size ?? 5)
      } each, for ${limits}\n`,
    );
    const result = await runBench({
      ...options,
      signal: abort.signal,
      onProgress: (p) =>
        progress(
          p.elapsedSeconds,
          `${String(p.connections).padStart(8)} conns  ${
            p.connectionsPerSecond.toFixed(0).padStart(6)
          } conn/s`,
          `${p.errors} errors`,
        ),
    });
    finished(result.errorSamples);
    console.log(formatResult(result));
    return result.errors > 0 || result.connections === 0 ? 1 : 0;
  } finally {
    Deno.removeSignalListener("SIGINT", onInterrupt);
  }
}

if (import.meta.main) {
  Deno.exit(await main(Deno.args));
}
