/**
 * Fault injection for `deno task bench --mix`: misbehaving clients run beside
 * verified good ones, and the server's access log is checked afterwards.
 *
 * Each kind of client has its own workers, so slow kinds never hold up the
 * good ones. The kinds:
 *
 * | kind               | what it does                                               | the log must show           |
 * | ------------------ | ---------------------------------------------------------- | --------------------------- |
 * | `echo`             | sends `size` bytes, half-closes, verifies the echo         | `size` bytes                |
 * | `echo-large`       | the same with `largeSize` bytes                            | `largeSize` bytes           |
 * | `reset-on-connect` | resets (SO_LINGER 0) as soon as the connect completes      | 0 bytes                     |
 * | `reset-mid-send`   | sends 32 KiB, then resets                                  | a line (0 to 32 KiB)        |
 * | `vanish`           | connects, then closes without sending                      | 0 bytes                     |
 * | `no-read`          | sends 4 KiB, then closes without reading the reply         | 4096 bytes                  |
 * | `slowloris`        | sends a byte every `slowlorisIntervalMs`, 10 in all, then half-closes and verifies the echo | 10 bytes |
 * | `idle`             | sends nothing for `idleMs`, then half-closes; verifies the empty reply | 0 bytes        |
 * | `oversize`         | sends `oversize` bytes (more than the server's limit)      | a line (any size)           |
 * | `slot-hog`         | attack: a byte every `attackIntervalMs`, never half-closes  | a line (any size)           |
 * | `memory-hog`       | attack: sends `hogBytes` fast, then a byte every `attackIntervalMs`, never half-closes | a line (any size) |
 * | `slow-reader`      | attack: sends `readerBytes`, half-closes, reads 1 KiB every 10 s | a line (any size)     |
 * | `zero-byte`        | attack: connects, sends nothing, waits to be ended, reconnects at once | 0 bytes           |
 * | `grace-cycle`      | attack: connects, sends nothing, leaves after 1.8 s (inside the server's 2 s grace) unless ended first, reconnects | 0 bytes |
 *
 * The attacks run only when named in {@linkcode MixOptions.kinds}
 * (`--attacks` on the command line names them all). Each is scaled from the
 * limits of the server under test ({@linkcode MixOptions.limits}): as many
 * `slot-hog`s as `maxConnections`, enough `memory-hog`s and `slow-reader`s
 * to hold all of `maxBufferedBytes`, `maxConnections + 700` `zero-byte`s
 * and `grace-cycle`s. They connect from
 * {@linkcode MixOptions.attackerAddress} if given, to play another source
 * than the good clients. An attacker that the server cuts off
 * connects again, so the pressure lasts the whole run; how long each
 * lasted is reported. With {@linkcode MixOptions.goodWithinMs} (5 s when an
 * attack runs), a good client (`echo`, `echo-large`) that takes longer from
 * connect to the end of its echo is a failure.
 *
 * A connection "succeeded" when the kernel completed it: the connect call
 * returned. That includes the `reset-on-connect` clients: the server's
 * kernel accepted them, so the server has a client to number and log even
 * if it only learns of it as a failed `accept`. So the log must have one
 * line per connection that succeeded, whatever the client then did. A
 * connect still pending when the run is cut off may or may not have
 * completed; such connections are counted as uncertain.
 *
 * @module
 */

import { controlRun } from "./_run.ts";
import { connectSlots } from "./_connect_slots.ts";
import { writeAll } from "../_bytes.ts";
import { checkInteger, describe } from "../_errors.ts";
import { DEFAULTS } from "../options.ts";
import * as net from "node:net";
import { type LogReport, LogTail, type WaitOptions } from "./log_check.ts";
import {
  CHUNK_BYTES,
  PatternBuffer,
  patternSlice,
  phaseOf,
} from "./pattern.ts";

/** The kinds of client {@linkcode runMix} runs. */
export const CLIENT_KINDS = [
  "echo",
  "echo-large",
  "reset-on-connect",
  "reset-mid-send",
  "vanish",
  "no-read",
  "slowloris",
  "idle",
  "oversize",
  "slot-hog",
  "memory-hog",
  "slow-reader",
  "zero-byte",
  "grace-cycle",
] as const;

/** The attacks among {@linkcode CLIENT_KINDS}, run only when named. */
export const ATTACK_KINDS: readonly ClientKind[] = [
  "slot-hog",
  "memory-hog",
  "slow-reader",
  "zero-byte",
  "grace-cycle",
];

/**
 * The attacks among {@linkcode ATTACK_KINDS} that play another source than
 * the good clients when given {@linkcode MixOptions.attackerAddress}: from
 * the good clients' own address, they measure what fairness between
 * sources cannot do (bench/README.md).
 */
export const SOURCE_ATTACK_KINDS: readonly ClientKind[] = [
  "zero-byte",
  "grace-cycle",
];

/** One of {@linkcode CLIENT_KINDS}. */
export type ClientKind = typeof CLIENT_KINDS[number];

/** Options for {@linkcode runMix}. */
export interface MixOptions {
  /** Server address. @default {"127.0.0.1"} */
  hostname?: string;
  /** Server port. @default {4000} */
  port?: number;
  /** The kinds of client to run. @default {CLIENT_KINDS but ATTACK_KINDS} */
  kinds?: readonly ClientKind[];
  /**
   * The limits of the server under test, which the attacks scale to.
   * @default {echo-server's defaults}
   */
  limits?: MixLimits;
  /** Time between the bytes of a `slot-hog` or `memory-hog`. @default {2000} */
  attackIntervalMs?: number;
  /**
   * A good client (`echo`, `echo-large`) not served within this, from
   * connect to the end of its echo, is a failure.
   * @default {5000 when an attack runs, else no bound}
   */
  goodWithinMs?: number;
  /** `echo` clients in flight at once. @default {16} */
  concurrency?: number;
  /**
   * Clients in flight at once for the other kinds.
   * @default {{"echo-large": 2, oversize: 1, slowloris: 4, idle: 4, others 2}}
   */
  kindConcurrency?: Partial<Record<ClientKind, number>>;
  /** Payload bytes of an `echo` client. @default {5} */
  size?: number;
  /** Payload bytes of an `echo-large` client. @default {1048576} */
  largeSize?: number;
  /**
   * Bytes an `oversize` client sends: more than the server's per-client
   * limit. @default {68157440} (65 MiB, over echo-server's default 64 MiB)
   */
  oversize?: number;
  /** Time between the bytes of a `slowloris` client. @default {100} */
  slowlorisIntervalMs?: number;
  /** How long an `idle` client waits before it half-closes. @default {1000} */
  idleMs?: number;
  /**
   * Seconds to start new clients for; clients in flight then get up to 5 s
   * more to finish, and are cut off after that (counted as unfinished).
   * @default {10, or no limit when connections is given}
   */
  duration?: number;
  /** Stop after this many clients of each kind. */
  connections?: number;
  /**
   * The server's access log. When given, the lines appended during the run
   * are checked against the connections that succeeded.
   */
  logPath?: string;
  /** How long to wait for the server to write its last lines. */
  logWait?: WaitOptions;
  /** Stops the run at once: clients in flight are cut off. */
  signal?: AbortSignal;
  /** Called about once a second while clients run. */
  onProgress?: (progress: MixProgress) => void;
  /**
   * The local address the attackers connect from, e.g. `127.0.0.2` to play another source than the good clients
   * on loopback. @default {the system's choice}
   */
  attackerAddress?: string;
}

/** The limits of the server under test, for {@linkcode MixOptions.limits}. */
export interface MixLimits {
  /** Its `--max-connections`. @default {16384} */
  maxConnections?: number;
  /** Its `--max-buffered`. @default {536870912} */
  maxBufferedBytes?: number;
  /** Its `--max-client-bytes`. @default {67108864} */
  maxClientBytes?: number;
}

/** A snapshot passed to {@linkcode MixOptions.onProgress}. */
export interface MixProgress {
  /** Seconds since the run started. */
  elapsedSeconds: number;
  /** Connections that succeeded so far, all kinds. */
  connected: number;
  /** `echo` clients verified since the previous snapshot, per second. */
  echoesPerSecond: number;
  /** Failures so far, all kinds. */
  failures: number;
}

/** What happened to the clients of one kind. */
export interface KindResult {
  /** The kind. */
  kind: ClientKind;
  /** Clients of this kind in flight at once. */
  concurrency: number;
  /** Connections the kernel completed. */
  connected: number;
  /** Clients that behaved as the kind should and got what they should. */
  ok: number;
  /** Replies with a wrong byte, or longer than the request. */
  wrong: number;
  /**
   * Good clients the server reset or closed on, or whose reply ended short
   * (every byte that came being right).
   */
  broken: number;
  /** Connects that failed. */
  connectErrors: number;
  /** Clients cut off by the end of the run (connected); not failures. */
  unfinished: number;
  /** Connects cut off by the end of the run, which may have completed. */
  uncertain: number;
  /** `oversize` clients whose whole payload was echoed instead of cut off. */
  echoedInFull: number;
  /**
   * Good kinds: milliseconds from connect to the end of the echo, of each
   * client served; attacks: how long each attacker lasted until the server
   * cut it off (or the run ended).
   */
  durationsMs: number[];
  /** Good clients served later than `goodWithinMs` (failures). */
  late: number;
  /** Attackers still connected when the run ended. */
  outlasted: number;
}

/** What {@linkcode runMix} found. */
export interface MixResult {
  /** One entry per kind run, in {@linkcode CLIENT_KINDS} order. */
  kinds: KindResult[];
  /** Connections that succeeded, all kinds: each must have a log line. */
  connected: number;
  /** Connects that may or may not have completed, all kinds. */
  uncertain: number;
  /** Wrong replies, all kinds. */
  wrong: number;
  /** Broken good clients, all kinds. */
  broken: number;
  /** Failed connects, all kinds. */
  connectErrors: number;
  /** Seconds from the start until the last client ended. */
  elapsedSeconds: number;
  /** The check of the access log, if {@linkcode MixOptions.logPath} was given. */
  log?: LogReport;
  /** The bound on good clients' latency, if any. */
  goodWithinMs?: number;
  /** Descriptions of the first few failures. */
  errorSamples: string[];
  /** True when something connected and there was no failure or loss. */
  ok: boolean;
}

const RESET_MID_SEND_BYTES = 32 * 1024;
const NO_READ_BYTES = 4096;
const SLOWLORIS_BYTES = 10;
const MAX_ERROR_SAMPLES = 8;
const DEFAULT_KIND_CONCURRENCY: Record<ClientKind, number> = {
  "echo": 16,
  "echo-large": 2,
  "reset-on-connect": 1,
  "reset-mid-send": 1,
  "vanish": 1,
  "no-read": 1,
  "slowloris": 4,
  "idle": 4,
  "oversize": 1,
  // Scaled from the limits in runMix.
  "slot-hog": 1,
  "memory-hog": 1,
  "slow-reader": 1,
  "zero-byte": 1,
  "grace-cycle": 1,
};
const GOOD_KINDS: readonly ClientKind[] = ["echo", "echo-large"];
const DEFAULT_GOOD_WITHIN_MS = 5000;
const SLOW_READ_BYTES = 1024;
const SLOW_READ_INTERVAL_MS = 10_000;
// The server's own defaults.
// Inside the server's default 2 s eviction grace.
const GRACE_CYCLE_MS = 1800;
// Attackers beyond maxConnections for the silent attacks: enough to fill
// the kernel's accept queue (511) as well as every slot.
const SILENT_ATTACKERS_OVER_LIMIT = 700;
const DEFAULT_LIMITS: Required<MixLimits> = {
  maxConnections: DEFAULTS.maxConnections,
  maxBufferedBytes: DEFAULTS.maxBufferedBytes,
  maxClientBytes: DEFAULTS.maxClientBytes,
};

/** How one client ended. */
type Outcome =
  | { status: "connect failed"; message: string }
  | { status: "uncertain" }
  | {
    status: "ok";
    loggedBytes?: number;
    echoedInFull?: boolean;
    durationMs?: number;
  }
  | { status: "wrong" | "broken"; message: string }
  | { status: "unfinished"; durationMs?: number };

/** What a client needs: where to go, its payload, and the run's stop signal. */
interface Attempt {
  hostname: string;
  port: number;
  phase: number;
  /** Aborted when the run cuts off clients in flight. */
  stop: AbortSignal;
  /** A read buffer for this worker. */
  buffer: PatternBuffer;
  /** The local address an attacker binds to, if any. */
  attackerAddress?: string;
}

interface KindSettings {
  size: number;
  largeSize: number;
  oversize: number;
  slowlorisIntervalMs: number;
  idleMs: number;
  attackIntervalMs: number;
  hogBytes: number;
  readerBytes: number;
}

/**
 * Runs the mix of clients against an echo server and, given its access log,
 * checks the log. It never rejects because of the server: failures are
 * counted in the result. If no client could connect at all, the run stops
 * at the first failed connect. Rejects with a `RangeError` for invalid
 * options.
 *
 * @example
 * ```ts ignore
 * const result = await runMix({
 *   port: 4000,
 *   duration: 10,
 *   logPath: "/var/log/echo-server/access.log",
 * });
 * console.log(formatMixResult(result));
 * if (!result.ok) Deno.exit(1);
 * ```
 */
export async function runMix(options: MixOptions = {}): Promise<MixResult> {
  const hostname = options.hostname ?? "127.0.0.1";
  const port = options.port ?? 4000;
  const kinds = CLIENT_KINDS.filter((kind) =>
    options.kinds === undefined
      ? !ATTACK_KINDS.includes(kind)
      : options.kinds.includes(kind)
  );
  const attacking = kinds.some((kind) => ATTACK_KINDS.includes(kind));
  const goodWithinMs = options.goodWithinMs ??
    (attacking ? DEFAULT_GOOD_WITHIN_MS : undefined);
  const limits = { ...DEFAULT_LIMITS, ...options.limits };
  const attacks = scaleAttacks(limits);
  const settings: KindSettings = {
    size: options.size ?? 5,
    largeSize: options.largeSize ?? 1024 * 1024,
    oversize: options.oversize ?? 65 * 1024 * 1024,
    slowlorisIntervalMs: options.slowlorisIntervalMs ?? 100,
    idleMs: options.idleMs ?? 1000,
    attackIntervalMs: options.attackIntervalMs ?? 2000,
    hogBytes: attacks.hogBytes,
    readerBytes: attacks.readerBytes,
  };
  const limit = options.connections ?? Infinity;
  const duration = options.duration ??
    (options.connections === undefined ? 10 : undefined);
  checkInteger("port", port, 1, 65535);
  if (kinds.length === 0) throw new RangeError("no kind of client to run");
  for (const [name, value] of Object.entries(settings)) {
    checkInteger(name, value, 0, Number.MAX_SAFE_INTEGER);
  }
  if (options.connections !== undefined) {
    checkInteger("connections", limit, 1, Number.MAX_SAFE_INTEGER);
  }
  if (duration !== undefined && !(duration > 0 && duration <= 2_147_483)) {
    throw new RangeError(`duration must be above 0 seconds, not ${duration}`);
  }
  const concurrencyOf = (kind: ClientKind) =>
    (kind === "echo" ? options.concurrency : options.kindConcurrency?.[kind]) ??
      attacks.concurrency[kind] ?? DEFAULT_KIND_CONCURRENCY[kind];
  for (const kind of kinds) {
    checkInteger(`${kind} concurrency`, concurrencyOf(kind), 1, 100_000);
  }

  // Opened before the first connect, so every line of this run is after it.
  const tail = options.logPath === undefined
    ? undefined
    : await LogTail.open(options.logPath);
  try {
    const run = new MixRun(
      hostname,
      port,
      settings,
      limit,
      goodWithinMs,
      options.attackerAddress,
    );
    const start = performance.now();
    const control = controlRun(run, { signal: options.signal, duration });
    const onProgress = options.onProgress;
    let lastTime = start;
    let lastOk = 0;
    const ticker = onProgress === undefined ? undefined : setInterval(() => {
      const now = performance.now();
      const echoes = run.results.get("echo")?.ok ?? 0;
      onProgress({
        elapsedSeconds: (now - start) / 1000,
        connected: run.connected,
        echoesPerSecond: (echoes - lastOk) / ((now - lastTime) / 1000),
        failures: run.failures,
      });
      lastTime = now;
      lastOk = echoes;
    }, 1000);
    let end;
    try {
      const workers = [];
      for (const kind of kinds) {
        const concurrency = concurrencyOf(kind);
        run.results.set(kind, emptyResult(kind, concurrency));
        for (let i = 0; i < Math.min(concurrency, limit); i++) {
          workers.push(run.worker(kind));
        }
      }
      await Promise.all(workers);
      end = performance.now();
    } finally {
      clearInterval(ticker);
      control[Symbol.dispose]();
    }

    const kindResults = kinds.map((kind) => run.results.get(kind)!);
    const sum = (field: keyof KindResult) =>
      kindResults.reduce((total, result) => total + Number(result[field]), 0);
    const result: MixResult = {
      kinds: kindResults,
      connected: run.connected,
      uncertain: sum("uncertain"),
      wrong: sum("wrong"),
      broken: sum("broken"),
      connectErrors: sum("connectErrors"),
      elapsedSeconds: Math.max(end - start, 1e-6) / 1000,
      errorSamples: run.errorSamples,
      ok: false,
    };
    if (goodWithinMs !== undefined) result.goodWithinMs = goodWithinMs;
    if (tail !== undefined) {
      await tail.waitFor(result.connected, options.logWait);
      result.log = tail.check({
        connections: result.connected,
        uncertain: result.uncertain,
        requiredSizes: run.loggedSizes,
      });
    }
    result.ok = result.connected > 0 && result.wrong === 0 &&
      result.broken === 0 && result.connectErrors === 0 &&
      sum("late") === 0 && (result.log?.ok ?? true);
    return result;
  } finally {
    tail?.close();
  }
}

function emptyResult(kind: ClientKind, concurrency: number): KindResult {
  return {
    kind,
    concurrency,
    connected: 0,
    ok: 0,
    wrong: 0,
    broken: 0,
    connectErrors: 0,
    unfinished: 0,
    uncertain: 0,
    echoedInFull: 0,
    durationsMs: [],
    late: 0,
    outlasted: 0,
  };
}

/**
 * The attacks' sizes and clients in flight for a server's limits: every
 * connection slot for the slot hogs; memory hogs of up to 63 MiB (under the
 * per-client limit), and slow readers of up to 16 MiB, each enough to hold
 * all of `maxBufferedBytes` and one more (for the readers, counting the
 * ~4 MiB of each echo the kernels buffer).
 */
function scaleAttacks(limits: Required<MixLimits>): {
  hogBytes: number;
  readerBytes: number;
  concurrency: Partial<Record<ClientKind, number>>;
} {
  const MIB = 1024 * 1024;
  const hogBytes = Math.max(
    1,
    Math.min(
      63 * MIB,
      limits.maxClientBytes - MIB,
      limits.maxBufferedBytes / 4,
    ),
  );
  const readerBytes = Math.max(
    1,
    Math.min(16 * MIB, limits.maxClientBytes, limits.maxBufferedBytes / 4),
  );
  return {
    hogBytes: Math.floor(hogBytes),
    readerBytes: Math.floor(readerBytes),
    concurrency: {
      "slot-hog": limits.maxConnections,
      "memory-hog": Math.ceil(limits.maxBufferedBytes / hogBytes) + 1,
      // The kernels take ~4 MiB of each echo off the server's hands.
      "slow-reader": Math.ceil(
        limits.maxBufferedBytes /
          Math.max(readerBytes / 4, readerBytes - 4 * MIB),
      ) + 1,
      "zero-byte": limits.maxConnections + SILENT_ATTACKERS_OVER_LIMIT,
      "grace-cycle": limits.maxConnections + SILENT_ATTACKERS_OVER_LIMIT,
    },
  };
}

class MixRun {
  readonly results = new Map<ClientKind, KindResult>();
  /** Byte counts the log must show: bytes → clients. */
  readonly loggedSizes = new Map<number, number>();
  readonly errorSamples: string[] = [];
  connected = 0;
  failures = 0;
  readonly #hostname: string;
  readonly #port: number;
  readonly #settings: KindSettings;
  readonly #limit: number;
  readonly #goodWithinMs: number | undefined;
  readonly #attackerAddress: string | undefined;
  readonly #started = new Map<ClientKind, number>();
  readonly #stop = new AbortController();
  #seq = 0;
  #everConnected = false;
  #finishing = false;

  constructor(
    hostname: string,
    port: number,
    settings: KindSettings,
    limit: number,
    goodWithinMs: number | undefined,
    attackerAddress: string | undefined,
  ) {
    this.#hostname = hostname;
    this.#port = port;
    this.#settings = settings;
    this.#limit = limit;
    this.#goodWithinMs = goodWithinMs;
    this.#attackerAddress = attackerAddress;
  }

  /** Starts no more clients; those in flight may finish. */
  finish(): void {
    this.#finishing = true;
  }

  /** Starts no more clients and cuts off those in flight. */
  stop(): void {
    this.#finishing = true;
    this.#stop.abort();
  }

  async worker(kind: ClientKind): Promise<void> {
    const size = this.#settings.size;
    const readBytes = kind === "echo"
      ? Math.min(CHUNK_BYTES, Math.max(64, size + 1))
      : CHUNK_BYTES;
    const buffer = new PatternBuffer(readBytes);
    for (;;) {
      const started = this.#started.get(kind) ?? 0;
      if (this.#finishing || started >= this.#limit) return;
      this.#started.set(kind, started + 1);
      const seq = this.#seq++;
      const outcome = await CLIENTS[kind]({
        hostname: this.#hostname,
        port: this.#port,
        phase: phaseOf(seq),
        stop: this.#stop.signal,
        buffer,
        attackerAddress: this.#attackerAddress,
      }, this.#settings);
      this.#record(kind, seq, outcome);
    }
  }

  #record(kind: ClientKind, seq: number, outcome: Outcome): void {
    const result = this.results.get(kind)!;
    switch (outcome.status) {
      case "connect failed":
        result.connectErrors++;
        this.failures++;
        this.#sample(`${kind} client ${seq + 1}: connect: ${outcome.message}`);
        // Nothing listening at all: say so once rather than retry for the
        // whole duration.
        if (!this.#everConnected) this.stop();
        return;
      case "uncertain":
        result.uncertain++;
        return;
    }
    this.#everConnected = true;
    this.connected++;
    result.connected++;
    switch (outcome.status) {
      case "ok":
        result.ok++;
        if (outcome.echoedInFull) result.echoedInFull++;
        if (outcome.durationMs !== undefined) {
          result.durationsMs.push(outcome.durationMs);
          if (
            GOOD_KINDS.includes(kind) && this.#goodWithinMs !== undefined &&
            outcome.durationMs > this.#goodWithinMs
          ) {
            result.late++;
            this.failures++;
            this.#sample(
              `${kind} client ${seq + 1}: served after ${
                Math.round(outcome.durationMs)
              } ms, over the bound of ${this.#goodWithinMs} ms`,
            );
          }
        }
        if (outcome.loggedBytes !== undefined) {
          const bytes = outcome.loggedBytes;
          this.loggedSizes.set(bytes, (this.loggedSizes.get(bytes) ?? 0) + 1);
        }
        return;
      case "unfinished":
        result.unfinished++;
        if (outcome.durationMs === undefined) return;
        if (!GOOD_KINDS.includes(kind)) {
          result.durationsMs.push(outcome.durationMs);
          result.outlasted++;
        } else if (
          this.#goodWithinMs !== undefined &&
          outcome.durationMs > this.#goodWithinMs
        ) {
          // Never served by the end of the run, and already over the bound.
          result.late++;
          this.failures++;
          this.#sample(
            `${kind} client ${seq + 1}: not served after ${
              Math.round(outcome.durationMs)
            } ms, over the bound of ${this.#goodWithinMs} ms`,
          );
        }
        return;
      case "wrong":
      case "broken":
        result[outcome.status]++;
        this.failures++;
        this.#sample(`${kind} client ${seq + 1}: ${outcome.message}`);
        return;
    }
  }

  #sample(message: string): void {
    if (this.errorSamples.length < MAX_ERROR_SAMPLES) {
      this.errorSamples.push(message);
    }
  }
}

// ---------------------------------------------------------------------------
// The clients

type Client = (attempt: Attempt, settings: KindSettings) => Promise<Outcome>;

const CLIENTS: Record<ClientKind, Client> = {
  "echo": (attempt, { size }) =>
    echoClient(attempt, size, (conn) => sendAll(conn, attempt.phase, size)),
  "echo-large": (attempt, { largeSize }) =>
    echoClient(
      attempt,
      largeSize,
      (conn) => sendAll(conn, attempt.phase, largeSize),
    ),
  "slowloris": (attempt, { slowlorisIntervalMs }) =>
    echoClient(attempt, SLOWLORIS_BYTES, async (conn) => {
      for (let sent = 0; sent < SLOWLORIS_BYTES; sent++) {
        if (sent > 0) await sleep(slowlorisIntervalMs, attempt.stop);
        await writeAll(conn, patternSlice(attempt.phase, sent, 1));
      }
    }),
  "idle": (attempt, { idleMs }) =>
    echoClient(attempt, 0, () => sleep(idleMs, attempt.stop)),
  "oversize": oversizeClient,
  "slot-hog": (attempt, { attackIntervalMs }) =>
    attacker(attempt, async (write, ended) => {
      for (let sent = 0; !ended.aborted; sent++) {
        await write(patternSlice(attempt.phase, sent, 1));
        await sleep(attackIntervalMs, ended);
      }
    }),
  "memory-hog": (attempt, { attackIntervalMs, hogBytes }) =>
    attacker(attempt, async (write, ended) => {
      for (let sent = 0; sent < hogBytes;) {
        const size = Math.min(CHUNK_BYTES, hogBytes - sent);
        await write(patternSlice(attempt.phase, sent, size));
        sent += size;
      }
      for (let sent = hogBytes; !ended.aborted; sent++) {
        await sleep(attackIntervalMs, ended);
        await write(patternSlice(attempt.phase, sent, 1));
      }
    }),
  "slow-reader": slowReader,
  "zero-byte": (attempt) => silentAttacker(attempt, Infinity),
  "grace-cycle": (attempt) => silentAttacker(attempt, GRACE_CYCLE_MS),
  "vanish": async (attempt) => {
    const conn = await connect(attempt);
    if (!("localAddr" in conn)) return conn;
    conn.close();
    return { status: "ok", loggedBytes: 0 };
  },
  "no-read": async (attempt) => {
    const conn = await connect(attempt);
    if (!("localAddr" in conn)) return conn;
    using guard = new CloseOnStop(conn, attempt.stop);
    try {
      await sendAll(conn, attempt.phase, NO_READ_BYTES);
    } catch (error) {
      if (attempt.stop.aborted) return { status: "unfinished" };
      return { status: "broken", message: `write: ${describe(error)}` };
    }
    guard.close();
    return { status: "ok", loggedBytes: NO_READ_BYTES };
  },
  "reset-on-connect": async (attempt) => {
    const socket = await nodeConnect(attempt);
    if (!(socket instanceof net.Socket)) return socket;
    await reset(socket);
    return { status: "ok", loggedBytes: 0 };
  },
  "reset-mid-send": async (attempt) => {
    const socket = await nodeConnect(attempt);
    if (!(socket instanceof net.Socket)) return socket;
    const onStop = () => socket.destroy();
    attempt.stop.addEventListener("abort", onStop);
    try {
      await new Promise<void>((resolve) => {
        socket.write(
          patternSlice(attempt.phase, 0, RESET_MID_SEND_BYTES),
          () => resolve(),
        );
        socket.once("close", () => resolve());
      });
    } finally {
      attempt.stop.removeEventListener("abort", onStop);
    }
    if (attempt.stop.aborted) return { status: "unfinished" };
    await reset(socket);
    // The server logs whatever part of the bytes it read before the reset.
    return { status: "ok" };
  },
};

/** A Deno connection, or how connecting ended if it did not connect. */
async function connect(attempt: Attempt): Promise<Deno.TcpConn | Outcome> {
  // Cut off while waiting for a slot (see _connect_slots.ts): never tried.
  if (!await connectSlots.acquire(attempt.stop)) return { status: "uncertain" };
  try {
    return await Deno.connect({
      hostname: attempt.hostname,
      port: attempt.port,
      signal: attempt.stop,
    });
  } catch (error) {
    // Cut off mid-connect: the kernel may have completed it or not.
    if (attempt.stop.aborted) return { status: "uncertain" };
    return { status: "connect failed", message: describe(error) };
  } finally {
    connectSlots.release();
  }
}

/**
 * A node:net socket (for its reset, or to bind `localAddress`), or how
 * connecting ended.
 */
async function nodeConnect(
  attempt: Attempt,
  localAddress?: string,
): Promise<net.Socket | Outcome> {
  const socket = net.connect({
    host: attempt.hostname,
    port: attempt.port,
    localAddress,
  });
  // Listened for from the start: a refused connect emits "close" at once.
  const closed = new Promise<void>((resolve) =>
    socket.once("close", () => resolve())
  );
  // Errors after the connect (the server's reset) are expected; without a
  // listener they would be thrown.
  let error: unknown;
  socket.on("error", (e) => error ??= e);
  const stopped = Promise.withResolvers<false>();
  const onStop = () => stopped.resolve(false);
  attempt.stop.addEventListener("abort", onStop);
  if (attempt.stop.aborted) onStop();
  let connected;
  try {
    connected = await Promise.race([
      new Promise<true>((resolve) =>
        socket.once("connect", () => resolve(true))
      ),
      closed.then(() => false as const),
      stopped.promise,
    ]);
  } finally {
    attempt.stop.removeEventListener("abort", onStop);
    socket.removeAllListeners("connect");
  }
  if (connected) return socket;
  socket.destroy();
  await closed;
  if (attempt.stop.aborted) return { status: "uncertain" };
  return { status: "connect failed", message: describe(error) };
}

/** Resets the connection (SO_LINGER 0) and waits for the socket to close. */
async function reset(socket: net.Socket): Promise<void> {
  if (socket.destroyed) return;
  const closed = new Promise((resolve) => socket.once("close", resolve));
  socket.resetAndDestroy();
  await closed;
}

/**
 * An attacker: runs `send` with a function that writes bytes until the
 * server ends the connection (EOF, a reset, a failed write) or the run
 * stops; ok with how long it lasted. From
 * {@linkcode Attempt.attackerAddress} if given.
 */
function attacker(
  attempt: Attempt,
  send: (
    write: (bytes: Uint8Array) => Promise<void>,
    ended: AbortSignal,
  ) => Promise<void>,
): Promise<Outcome> {
  return attempt.attackerAddress === undefined
    ? denoAttacker(attempt, send)
    : nodeAttacker(attempt, attempt.attackerAddress, send);
}

/**
 * The frame of an attack over a node:net socket: `ended` aborts once the
 * socket closes or the run stops; `finish()` closes the socket and judges
 * the attack: ok with how long it lasted, or unfinished if the run stopped.
 */
function nodeSession(attempt: Attempt, socket: net.Socket, start: number): {
  ended: AbortController;
  finish: (ok?: { loggedBytes?: number }) => Promise<Outcome>;
} {
  const closed = new Promise<void>((resolve) =>
    socket.once("close", () => resolve())
  );
  const ended = new AbortController();
  closed.then(() => ended.abort());
  const onStop = () => ended.abort();
  attempt.stop.addEventListener("abort", onStop);
  return {
    ended,
    async finish(ok = {}) {
      attempt.stop.removeEventListener("abort", onStop);
      const durationMs = performance.now() - start;
      socket.destroy();
      await closed;
      if (attempt.stop.aborted) return { status: "unfinished", durationMs };
      return { status: "ok", ...ok, durationMs };
    },
  };
}

/** {@linkcode attacker} over a node:net socket bound to `localAddress`. */
async function nodeAttacker(
  attempt: Attempt,
  localAddress: string,
  send: (
    write: (bytes: Uint8Array) => Promise<void>,
    ended: AbortSignal,
  ) => Promise<void>,
): Promise<Outcome> {
  const start = performance.now();
  const socket = await nodeConnect(attempt, localAddress);
  if (!(socket instanceof net.Socket)) return socket;
  const { ended, finish } = nodeSession(attempt, socket, start);
  socket.resume();
  const write = (bytes: Uint8Array) =>
    new Promise<void>((resolve, reject) => {
      if (socket.destroyed) return reject(new Error("closed"));
      socket.write(bytes, (error) => error ? reject(error) : resolve());
    });
  try {
    await send(write, ended.signal);
  } catch {
    // The server closed the connection under a write.
  }
  return await finish();
}

/** {@linkcode attacker} over a Deno connection. */
async function denoAttacker(
  attempt: Attempt,
  send: (
    write: (bytes: Uint8Array) => Promise<void>,
    ended: AbortSignal,
  ) => Promise<void>,
): Promise<Outcome> {
  const start = performance.now();
  const conn = await connect(attempt);
  if (!("localAddr" in conn)) return conn;
  using guard = new CloseOnStop(conn, attempt.stop);
  const ended = new AbortController();
  const onStop = () => ended.abort();
  attempt.stop.addEventListener("abort", onStop);
  const reading = (async () => {
    try {
      while (await conn.read(attempt.buffer.bytes) !== null);
    } catch {
      // A reset or the close at the run's end: ended either way.
    }
    ended.abort();
  })();
  try {
    await send((bytes) => writeAll(conn, bytes), ended.signal);
  } catch {
    // The server closed the connection under a write.
  } finally {
    attempt.stop.removeEventListener("abort", onStop);
  }
  ended.abort();
  const durationMs = performance.now() - start;
  if (attempt.stop.aborted) {
    guard.close();
    await reading;
    return { status: "unfinished", durationMs };
  }
  // Cut off: the read has ended, or ends now that the connection closes.
  guard.close();
  await reading;
  return { status: "ok", durationMs };
}

/**
 * A silent attacker from {@linkcode Attempt.attackerAddress}: connects,
 * sends nothing, and waits until the server ends the connection, or until
 * `leaveAfterMs` passed and then closes it itself; ok either way, with how
 * long it lasted.
 */
async function silentAttacker(
  attempt: Attempt,
  leaveAfterMs: number,
): Promise<Outcome> {
  const start = performance.now();
  const socket = await nodeConnect(attempt, attempt.attackerAddress);
  if (!(socket instanceof net.Socket)) return socket;
  const { ended, finish } = nodeSession(attempt, socket, start);
  // Whatever the server sends (nothing, for an empty echo) is dropped.
  socket.resume();
  await sleep(
    leaveAfterMs === Infinity ? 2_147_483_647 : leaveAfterMs,
    ended.signal,
  );
  return await finish({ loggedBytes: 0 });
}

/**
 * The slow reader: sends `readerBytes`, half-closes, then reads 1 KiB every
 * 10 s until the server ends the connection or the run stops.
 */
async function slowReader(
  attempt: Attempt,
  settings: KindSettings,
): Promise<Outcome> {
  if (attempt.attackerAddress !== undefined) {
    return await nodeSlowReader(attempt, attempt.attackerAddress, settings);
  }
  const { readerBytes } = settings;
  const start = performance.now();
  const conn = await connect(attempt);
  if (!("localAddr" in conn)) return conn;
  using _guard = new CloseOnStop(conn, attempt.stop);
  const slice = attempt.buffer.bytes.subarray(0, SLOW_READ_BYTES);
  try {
    await sendAll(conn, attempt.phase, readerBytes);
    await conn.closeWrite();
    while (!attempt.stop.aborted) {
      await sleep(SLOW_READ_INTERVAL_MS, attempt.stop);
      if (attempt.stop.aborted) break;
      if (await conn.read(slice) === null) break;
    }
  } catch {
    // Cut off: a reset, or the close at the run's end.
  }
  const durationMs = performance.now() - start;
  if (attempt.stop.aborted) return { status: "unfinished", durationMs };
  return { status: "ok", durationMs };
}

/** {@linkcode slowReader} over a node:net socket bound to `localAddress`. */
async function nodeSlowReader(
  attempt: Attempt,
  localAddress: string,
  { readerBytes }: KindSettings,
): Promise<Outcome> {
  const start = performance.now();
  const socket = await nodeConnect(attempt, localAddress);
  if (!(socket instanceof net.Socket)) return socket;
  const { ended, finish } = nodeSession(attempt, socket, start);
  socket.once("end", () => ended.abort());
  // Paused: the reply stays in the kernel but for what read() takes.
  socket.pause();
  try {
    for (let sent = 0; sent < readerBytes && !ended.signal.aborted;) {
      const size = Math.min(CHUNK_BYTES, readerBytes - sent);
      await new Promise<void>((resolve, reject) =>
        socket.write(
          patternSlice(attempt.phase, sent, size),
          (error) => error ? reject(error) : resolve(),
        )
      );
      sent += size;
    }
    socket.end();
    while (!ended.signal.aborted) {
      await sleep(SLOW_READ_INTERVAL_MS, ended.signal);
      socket.read(SLOW_READ_BYTES);
    }
  } catch {
    // Cut off: a reset, or the close at the run's end.
  }
  return await finish();
}

/**
 * Sends with `send` while reading and verifying the reply, then judges it
 * as an echo of `size` bytes.
 */
async function echoClient(
  attempt: Attempt,
  size: number,
  send: (conn: Deno.TcpConn) => Promise<void>,
): Promise<Outcome> {
  const start = performance.now();
  const conn = await connect(attempt);
  if (!("localAddr" in conn)) return conn;
  const exchanged = await exchange(conn, attempt, size, send);
  if (exchanged.mismatch !== undefined) {
    return { status: "wrong", message: exchanged.mismatch };
  }
  if (attempt.stop.aborted) {
    return { status: "unfinished", durationMs: performance.now() - start };
  }
  const { sendError, readError, requestSent, received } = exchanged;
  if (sendError !== undefined) {
    return { status: "broken", message: `write: ${sendError}` };
  }
  if (readError !== undefined) {
    return {
      status: "broken",
      message: `read after ${received} bytes: ${readError}`,
    };
  }
  if (!requestSent) {
    // Deno reports a reset as EOF on read, so a reply that ends while the
    // request is still being sent is counted as what it most likely is.
    return {
      status: "broken",
      message: "closed or reset by the server before the request was sent",
    };
  }
  if (received < size) {
    // Every byte that came was right: the server cut the reply short.
    return {
      status: "broken",
      message: `reply ended after ${received} of ${size} bytes`,
    };
  }
  return {
    status: "ok",
    loggedBytes: size,
    durationMs: performance.now() - start,
  };
}

/**
 * Sends more than the server takes: a cut-off (reset or short reply) is
 * what it should get, a full echo is fine too; a wrong byte is not.
 */
async function oversizeClient(
  attempt: Attempt,
  { oversize }: KindSettings,
): Promise<Outcome> {
  const conn = await connect(attempt);
  if (!("localAddr" in conn)) return conn;
  const exchanged = await exchange(
    conn,
    attempt,
    oversize,
    (conn) => sendAll(conn, attempt.phase, oversize),
  );
  if (exchanged.mismatch !== undefined) {
    return { status: "wrong", message: exchanged.mismatch };
  }
  if (attempt.stop.aborted) return { status: "unfinished" };
  const echoedInFull = exchanged.requestSent &&
    exchanged.received === oversize && exchanged.sendError === undefined &&
    exchanged.readError === undefined;
  return { status: "ok", echoedInFull };
}

interface Exchanged {
  received: number;
  requestSent: boolean;
  sendError?: string;
  readError?: string;
  mismatch?: string;
}

/**
 * Runs `send` then half-closes, while reading the reply and checking it
 * against the pattern; closes `conn` at the end. Reading while sending
 * matters: a server that streams its reply would otherwise deadlock.
 */
async function exchange(
  conn: Deno.TcpConn,
  attempt: Attempt,
  size: number,
  send: (conn: Deno.TcpConn) => Promise<void>,
): Promise<Exchanged> {
  using guard = new CloseOnStop(conn, attempt.stop);
  const { buffer, phase } = attempt;
  const result: Exchanged = { received: 0, requestSent: false };
  const reading = (async () => {
    try {
      for (;;) {
        const n = await conn.read(buffer.bytes);
        if (n === null) return;
        if (result.received + n > size) {
          result.mismatch = `reply longer than the ${size} bytes sent`;
          return;
        }
        const at = buffer.firstDifference(n, phase, result.received);
        if (at >= 0) {
          result.mismatch = `reply byte ${result.received + at} is ${
            hex(buffer.bytes[at])
          }, sent ${hex(PatternBuffer.expected(phase, result.received + at))}`;
          return;
        }
        result.received += n;
      }
    } catch (error) {
      result.readError = describe(error);
    }
  })().finally(() => {
    // A wrong reply or a broken read ends the exchange: closing stops a
    // send that may be blocked on a server that no longer reads.
    if (result.mismatch !== undefined || result.readError !== undefined) {
      guard.close();
    }
  });
  try {
    await send(conn);
    result.requestSent = true;
    await conn.closeWrite();
  } catch (error) {
    result.sendError = describe(error);
    guard.close();
  }
  await reading;
  return result;
}

/** Closes a connection once: when asked, or when the run cuts clients off. */
class CloseOnStop implements Disposable {
  #closed = false;
  readonly #onStop = () => this.close();

  constructor(readonly conn: Deno.TcpConn, readonly stop: AbortSignal) {
    stop.addEventListener("abort", this.#onStop);
    if (stop.aborted) this.close();
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.conn.close();
  }

  [Symbol.dispose](): void {
    this.stop.removeEventListener("abort", this.#onStop);
    this.close();
  }
}

async function sendAll(
  conn: Deno.TcpConn,
  phase: number,
  size: number,
): Promise<void> {
  for (let sent = 0; sent < size;) {
    sent += await conn.write(
      patternSlice(phase, sent, Math.min(CHUNK_BYTES, size - sent)),
    );
  }
}

/** Waits `ms`, or less if `signal` aborts first. */
function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal.addEventListener("abort", done);
    if (signal.aborted) done();
  });
}

function hex(byte: number): string {
  return `0x${byte.toString(16).padStart(2, "0")}`;
}

// ---------------------------------------------------------------------------
// Output

/**
 * Formats a {@linkcode MixResult} as the table the command line prints: one
 * row per kind of client, a total, and the log check.
 *
 * @example
 * ```ts ignore
 * console.log(formatMixResult(await runMix({ port: 4000, duration: 5 })));
 * ```
 */
export function formatMixResult(result: MixResult): string {
  const header = [
    "kind",
    "in flight",
    "connected",
    "ok",
    "wrong",
    "broken",
    "connect err",
    "unfinished",
  ];
  const rows = result.kinds.map((kind) =>
    [
      kind.kind,
      kind.concurrency,
      kind.connected,
      kind.ok,
      kind.wrong,
      kind.broken,
      kind.connectErrors,
      kind.unfinished,
    ].map(String)
  );
  rows.push([
    "total",
    "",
    `${result.connected}`,
    `${result.kinds.reduce((total, kind) => total + kind.ok, 0)}`,
    `${result.wrong}`,
    `${result.broken}`,
    `${result.connectErrors}`,
    `${result.kinds.reduce((total, kind) => total + kind.unfinished, 0)}`,
  ]);
  const widths = header.map((title, column) =>
    Math.max(title.length, ...rows.map((row) => row[column].length))
  );
  const format = (row: string[]) =>
    row.map((cell, column) =>
      column === 0 ? cell.padEnd(widths[0]) : cell.padStart(widths[column])
    ).join("  ");
  const lines = [format(header), ...rows.map(format)];
  lines.push(
    `elapsed      ${result.elapsedSeconds.toFixed(3)} s, ${
      (result.connected / result.elapsedSeconds).toFixed(1)
    } conn/s`,
  );
  if (result.uncertain > 0) {
    lines.push(
      `uncertain    ${result.uncertain} connects cut off at the end may have completed`,
    );
  }
  for (const kind of result.kinds) {
    if (kind.durationsMs.length === 0) continue;
    const sorted = kind.durationsMs.toSorted((a, b) => a - b);
    if (GOOD_KINDS.includes(kind.kind)) {
      lines.push(
        `latency      ${kind.kind}: p50 ${ms(percentile(sorted, 0.5))}, p99 ${
          ms(percentile(sorted, 0.99))
        }, max ${ms(sorted.at(-1)!)}${
          result.goodWithinMs === undefined
            ? ""
            : `; ${kind.late} over the bound of ${ms(result.goodWithinMs)}`
        }`,
      );
    } else if (ATTACK_KINDS.includes(kind.kind)) {
      lines.push(
        `attack       ${kind.kind}: ${kind.concurrency} in flight, ${kind.ok} cut off, lasted p50 ${
          ms(percentile(sorted, 0.5))
        }, max ${
          ms(sorted.at(-1)!)
        }; ${kind.outlasted} still connected at the end`,
      );
    }
  }
  const echoedInFull = result.kinds.find((kind) => kind.kind === "oversize")
    ?.echoedInFull;
  if (echoedInFull) {
    lines.push(
      `note         ${echoedInFull} oversize clients were echoed in full: is --oversize above the server's limit?`,
    );
  }
  return lines.join("\n");
}

/** The `q` quantile of ascending `sorted` (nearest rank). */
function percentile(sorted: readonly number[], q: number): number {
  return sorted[Math.min(sorted.length - 1, Math.ceil(q * sorted.length) - 1)];
}

function ms(value: number): string {
  return value >= 10_000
    ? `${(value / 1000).toFixed(1)} s`
    : `${Math.round(value)} ms`;
}
