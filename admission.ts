/**
 * The admission policy: which clients the echo server cuts off for going
 * too slowly, and which it evicts when a limit is reached so that a newcomer
 * is served at once. Pure: it reads and updates plain per-client numbers
 * ({@linkcode ClientProgress}) and never touches a socket or a timer; the
 * server calls it from its periodic sweep, from its accept loop at
 * `maxConnections` and from its allocator at `maxBufferedBytes`.
 *
 * The rules, each with its default and its cost to honest clients:
 *
 * - **Idle** (`idleTimeoutMs`, 30 s): while reading, a client that sends
 *   nothing for this long is cut off (`idle`), as before.
 * - **Minimum send rate** (`minRate`, 500 B/s, after `minRateGraceMs`,
 *   20 s), after Apache's mod_reqtimeout (`header=20,MinRate=500`): until
 *   it half-closes, a client connected for `t` seconds must have sent at
 *   least `(t - 20) * 500` bytes; each 500 bytes buys a second. Trickling a
 *   byte now and then no longer holds a connection forever (`min_rate`).
 *   Served: anything at 500 B/s or faster (64 MiB over a 1 Mbit/s link
 *   takes 537 s and is allowed 134,237 s), and a person who types a line
 *   into `nc -N` and ends it within 20 s. A person slower than that is cut
 *   off at 20 s plus a second per 500 bytes they sent.
 * - **Minimum read rate** (`minReadRate`, 16 KiB/s): once a client has
 *   half-closed, the server cannot see what the peer has read, only which
 *   writes the kernel took, and Linux wakes a writer only after about a
 *   third of a send buffer of up to 4 MiB has drained (85 s at 16 KiB/s),
 *   so the idle clock alone would cut off readers below ~45 KB/s. The
 *   silence allowed after each burst of writes (those the kernel took at one
 *   wakeup, with no second of silence between them) is `idleTimeoutMs +
 *   burst / minReadRate`, the burst credited up to 4 MiB (Linux's largest
 *   send buffer by default): a client silent longer is cut off
 *   (`slow_reader`). What the kernel takes at a wakeup is what drained since
 *   the last one, so a reader at 16 KiB/s or faster drains the next burst
 *   within the time the last one buys: it is never cut off, for any size (at 16 KiB/s a third of a 4 MiB buffer is 85 s of the 115 s
 *   allowed). A reader that stops is let go within 30 s + 4 MiB / 16 KiB/s
 *   = 286 s of the last write the kernel took, however much it read
 *   before; after small bursts (a small send buffer, a slow start) sooner.
 *   Cost: a reader that pauses longer than that, even one whose average
 *   stays above 16 KiB/s, loses its connection (deploy/README.md has the
 *   measured cases).
 * - **Slot eviction** (`evictionGraceMs`, 2 s): at `maxConnections` the
 *   server accepts the newcomer and evicts the client with the lowest
 *   recent rate (bytes moved either way in the last `rateWindowMs`, or on
 *   average since it was accepted or half-closed, whichever is higher)
 *   among those past their grace; if none is, the newcomer waits in the
 *   kernel's queue until the first grace ends. The newcomer itself is never
 *   the one evicted. A client is in its grace for 2 s after it is accepted
 *   while it keeps moving bytes; one that is still sending, has sent
 *   something and has been silent since for an eighth of the grace (250 ms)
 *   is past it. One that has sent nothing yet keeps the whole grace: its
 *   bytes may only be waiting for the server to read them. Without that,
 *   attackers that reconnect as soon as they are evicted hold every slot in
 *   its grace: in `bench --mix` at 256 slots, good clients were still served,
 *   but all clients together got 116 connections a second (slots / grace)
 *   instead of thousands. Cost: with every slot taken, the slowest client
 *   past its grace loses its connection to each newcomer, whoever it is; a
 *   person typing into `nc` may lose it 250 ms after their last line.
 * - **Memory eviction** (on unless the grace is 0): when a read buffer
 *   would pass `maxBufferedBytes`, the server evicts the other clients
 *   holding the most buffer for the least progress, largest
 *   `bufferedBytes² / (rate + 1)` first (the byte-seconds their buffer
 *   will cost at their recent rate), until the read fits; like Redis's
 *   `maxmemory-clients`, which frees the largest clients first, but a large
 *   client moving fast is kept, and thousands of idle clients holding 64 B
 *   each are not evicted to free one MiB. There is no grace here: hogs that reconnect
 *   and fill the memory within a grace would otherwise always be in it
 *   (bench/mix.ts showed good clients cut off that way), and a newcomer
 *   moving fast scores low anyway. Only if all the others together hold too
 *   little is the asking client cut off, as before. Cost: under memory
 *   pressure, a client that holds much and moves little (a slow link with a
 *   large payload) goes first.
 *
 * @module
 */

import { DEFAULTS } from "./options.ts";

/** Why the policy cuts a client off; counted in `echo_cutoffs_total`. */
export type AdmissionReason =
  | "idle"
  | "min_rate"
  | "slow_reader"
  | "slot_eviction"
  | "memory_eviction";

/**
 * What the policy knows of one client: plain numbers the server updates as
 * bytes move. Times are `performance.now()` milliseconds. The `window*`,
 * `burstStart` and `lastBurst` fields belong to the policy
 * ({@linkcode Admission.check} keeps them).
 */
export interface ClientProgress {
  /** When it was accepted. */
  readonly acceptedAt: number;
  /** Bytes read from it. */
  bytesReceived: number;
  /** Bytes of its echo the kernel took (completed writes). */
  bytesSent: number;
  /** Buffer memory it holds. */
  bufferedBytes: number;
  /** When a read or write last completed. */
  lastActivity: number;
  /** When it half-closed (the echo began), or undefined while it sends. */
  eofAt: number | undefined;
  /**
   * `bytesSent` when the current burst of writes began: the writes the
   * kernel took at one wakeup, with no silence between them. Kept by
   * {@linkcode Admission.check}.
   */
  burstStart: number;
  /** Bytes the kernel took in the last burst that a silence ended. */
  lastBurst: number;
  /** When the current rate window began. */
  windowStart: number;
  /** Bytes moved (received plus sent) when the window began. */
  windowMoved: number;
  /** Bytes per second over the last whole window, or -1 before one ended. */
  windowRate: number;
  /**
   * Why it was cut off, once it was: it is on its way out (its connection
   * closed, its end not yet reported) and is never picked to evict again.
   */
  cutOffReason: string | undefined;
}

/** Options for {@linkcode Admission}. */
export interface AdmissionOptions {
  /**
   * A client that makes no progress reading or writing for this long is
   * cut off, in milliseconds; while its echo is written, only if it also
   * reads below {@linkcode AdmissionOptions.minReadRate} (see the module
   * doc).
   *
   * @default {30_000}
   */
  idleTimeoutMs?: number;
  /**
   * Bytes per second a client must average, after
   * {@linkcode AdmissionOptions.minRateGraceMs}, until it half-closes; 0
   * turns the rule off.
   *
   * @default {500}
   */
  minRate?: number;
  /**
   * How long a client may send below `minRate` before the rule applies,
   * in milliseconds.
   *
   * @default {20_000}
   */
  minRateGraceMs?: number;
  /**
   * Bytes per second of its echo a client must read while the echo is
   * written: after each burst of writes it may be silent for
   * `idleTimeoutMs` plus the burst (at most 4 MiB) at this rate; 0 leaves
   * only the idle rule on the write side.
   *
   * @default {16_384}
   */
  minReadRate?: number;
  /**
   * How long a newcomer that keeps moving bytes cannot be evicted for a
   * slot, in milliseconds (see the module doc); 0 turns eviction off, for
   * memory too (at `maxConnections` newcomers wait in the kernel's queue,
   * at `maxBufferedBytes` the asking client is cut off).
   *
   * @default {2000}
   */
  evictionGraceMs?: number;
  /**
   * The window over which a client's recent rate is measured, in
   * milliseconds.
   *
   * @default {5000}
   */
  rateWindowMs?: number;
}

const DEFAULT_RATE_WINDOW_MS = 5000;
// A silence this long between completed writes ends a burst: the writes of
// one wakeup complete within an event loop turn or two.
const BURST_GAP_MS = 1000;
/**
 * The most of a burst a reader is credited with: Linux's largest send
 * buffer by default (`net.ipv4.tcp_wmem`). One wakeup takes at most the
 * free room of the send buffer; a burst bigger than that is the peer
 * reading while the kernel took it, and the next write completes once a
 * third of the send buffer has drained (plus a receive window's step).
 */
export const MAX_CREDITED_BURST_BYTES = 4 * 1024 * 1024;

/**
 * Fresh {@linkcode ClientProgress} for a client accepted at `now`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const client = newProgress(1000);
 * assert.equal(client.acceptedAt, 1000);
 * assert.equal(client.eofAt, undefined);
 * ```
 */
export function newProgress(now: number): ClientProgress {
  return {
    acceptedAt: now,
    bytesReceived: 0,
    bytesSent: 0,
    bufferedBytes: 0,
    lastActivity: now,
    eofAt: undefined,
    burstStart: 0,
    lastBurst: 0,
    windowStart: now,
    windowMoved: 0,
    windowRate: -1,
    cutOffReason: undefined,
  };
}

/**
 * The admission policy with its limits: see the module doc for the rules.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const admission = new Admission({ minRate: 500, minRateGraceMs: 20_000 });
 * const trickler = newProgress(0);
 * trickler.bytesReceived = 10;
 * trickler.lastActivity = 20_000;
 * assert.equal(admission.check(trickler, 20_000), undefined);
 * assert.equal(admission.check(trickler, 20_100), "min_rate");
 * ```
 */
export class Admission {
  /** Milliseconds without progress before a client is idle. */
  readonly idleTimeoutMs: number;
  /** Bytes per second a sender must average after the grace; 0 is off. */
  readonly minRate: number;
  /** Milliseconds before the send-rate rule applies. */
  readonly minRateGraceMs: number;
  /** Bytes per second a reader must average once idle; 0 is off. */
  readonly minReadRate: number;
  /** Milliseconds a newcomer cannot be evicted; 0 turns eviction off. */
  readonly evictionGraceMs: number;
  /** Milliseconds over which recent rates are measured. */
  readonly rateWindowMs: number;

  /** Takes the limits; see {@linkcode AdmissionOptions} for the defaults. */
  constructor(options: AdmissionOptions = {}) {
    this.idleTimeoutMs = options.idleTimeoutMs ?? DEFAULTS.idleTimeoutMs;
    this.minRate = options.minRate ?? DEFAULTS.minRate;
    this.minRateGraceMs = options.minRateGraceMs ?? DEFAULTS.minRateGraceMs;
    this.minReadRate = options.minReadRate ?? DEFAULTS.minReadRate;
    this.evictionGraceMs = options.evictionGraceMs ?? DEFAULTS.evictionGraceMs;
    this.rateWindowMs = options.rateWindowMs ?? DEFAULT_RATE_WINDOW_MS;
  }

  /**
   * For the periodic sweep: updates `client`'s rate window and its last
   * burst, and says why it must be cut off now, if it must.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * const admission = new Admission({ idleTimeoutMs: 30_000 });
   * const reader = newProgress(0);
   * reader.eofAt = 0;
   * reader.bytesSent = 4 * 1024 * 1024; // the kernels took 4 MiB at once
   * // Idle for 60 s, but 4 MiB at 16 KiB/s takes 256 s.
   * assert.equal(admission.check(reader, 60_000), undefined);
   * assert.equal(admission.check(reader, 287_000), "slow_reader");
   * ```
   */
  check(client: ClientProgress, now: number): AdmissionReason | undefined {
    const elapsed = now - client.windowStart;
    if (elapsed >= this.rateWindowMs) {
      const moved = client.bytesReceived + client.bytesSent;
      client.windowRate = (moved - client.windowMoved) * 1000 / elapsed;
      client.windowMoved = moved;
      client.windowStart = now;
    }
    const idle = now - client.lastActivity > this.idleTimeoutMs;
    if (client.eofAt === undefined) {
      if (idle) return "idle";
      if (
        this.minRate > 0 &&
        now - client.acceptedAt >
          this.minRateGraceMs + client.bytesReceived * 1000 / this.minRate
      ) return "min_rate";
      return undefined;
    }
    const silence = now - client.lastActivity;
    if (
      client.bytesSent > client.burstStart &&
      (idle || silence >= BURST_GAP_MS)
    ) {
      client.lastBurst = client.bytesSent - client.burstStart;
      client.burstStart = client.bytesSent;
    }
    if (!idle) return undefined;
    if (this.minReadRate === 0) return "idle";
    return silence > this.readerSilenceMs(client) ? "slow_reader" : undefined;
  }

  /**
   * How long a client whose echo is being written may go without a
   * completed write: `idleTimeoutMs` plus its last burst (at most
   * {@linkcode MAX_CREDITED_BURST_BYTES}) at `minReadRate`. A reader at
   * `minReadRate` drains a burst in that time, and its next write completes.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * const admission = new Admission({ idleTimeoutMs: 30_000 });
   * const reader = newProgress(0);
   * reader.lastBurst = 1024 * 1024; // 1 MiB at 16 KiB/s takes 64 s
   * assert.equal(admission.readerSilenceMs(reader), 94_000);
   * reader.lastBurst = 64 * 1024 * 1024; // credited with 4 MiB
   * assert.equal(admission.readerSilenceMs(reader), 286_000);
   * ```
   */
  readerSilenceMs(client: ClientProgress): number {
    const credited = Math.min(client.lastBurst, MAX_CREDITED_BURST_BYTES);
    return this.idleTimeoutMs + credited * 1000 / this.minReadRate;
  }

  /**
   * A client's recent progress in bytes per second, either way: over the
   * last whole rate window, or on average since it was accepted (before a
   * window ended) or since it half-closed, whichever is higher. The
   * average since the half-close stands in for what the peer read, which
   * the kernel's buffering hides from the server.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * const admission = new Admission();
   * const client = newProgress(0);
   * client.bytesReceived = 1000;
   * assert.equal(admission.rate(client, 2000), 500);
   * ```
   */
  rate(client: ClientProgress, now: number): number {
    let rate = client.windowRate >= 0
      ? client.windowRate
      : (client.bytesReceived + client.bytesSent) * 1000 /
        Math.max(1, now - client.acceptedAt);
    if (client.eofAt !== undefined) {
      rate = Math.max(
        rate,
        client.bytesSent * 1000 / Math.max(1, now - client.eofAt),
      );
    }
    return rate;
  }

  /** When `client` leaves its grace (see the module doc). */
  #graceEnds(client: ClientProgress): number {
    const end = client.acceptedAt + this.evictionGraceMs;
    // Nothing read yet may be the server's own delay, not the client's:
    // under load a newcomer's bytes can wait in the kernel longer than an
    // eighth of the grace, and bench --mix saw good clients evicted so.
    if (client.eofAt !== undefined || client.bytesReceived === 0) return end;
    return Math.min(end, client.lastActivity + this.evictionGraceMs / 8);
  }

  /** Whether `client` is past its grace and may be evicted for a slot. */
  #evictable(client: ClientProgress, now: number): boolean {
    return this.evictionGraceMs > 0 && client.cutOffReason === undefined &&
      now >= this.#graceEnds(client);
  }

  /**
   * The client to evict so a newcomer gets a connection slot: the lowest
   * {@linkcode Admission.rate} among those past their grace (ties: the one
   * idle longest), or undefined if none is. A client is in its grace for
   * `evictionGraceMs` after it is accepted, or until it has been silent for
   * an eighth of that while still sending, after its first byte.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * const admission = new Admission({ evictionGraceMs: 2000 });
   * const fast = newProgress(0);
   * fast.bytesReceived = 1_000_000;
   * const trickler = newProgress(0);
   * trickler.bytesReceived = 3;
   * const newcomer = newProgress(9900);
   * assert.equal(admission.slotVictim([fast, trickler, newcomer], 10_000), trickler);
   * assert.equal(admission.slotVictim([newcomer], 10_000), undefined);
   * ```
   */
  slotVictim(
    clients: Iterable<ClientProgress>,
    now: number,
  ): ClientProgress | undefined {
    let victim: ClientProgress | undefined;
    let victimRate = Infinity;
    for (const client of clients) {
      if (!this.#evictable(client, now)) continue;
      const rate = this.rate(client, now);
      if (
        rate < victimRate ||
        (rate === victimRate && victim !== undefined &&
          client.lastActivity < victim.lastActivity)
      ) {
        victim = client;
        victimRate = rate;
      }
    }
    return victim;
  }

  /**
   * Milliseconds until some client leaves its grace and can be evicted for
   * a slot: 0 if one already can, `Infinity` if eviction is off or there
   * are no clients. A client that moves bytes meanwhile may stay in its
   * grace longer: ask again then.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * const admission = new Admission({ evictionGraceMs: 2000 });
   * // Nothing read yet: the whole grace.
   * assert.equal(admission.msUntilEvictable([newProgress(900)], 1000), 1900);
   * // A first byte, then silence: an eighth of the grace after it.
   * const trickler = newProgress(900);
   * trickler.bytesReceived = 1;
   * assert.equal(admission.msUntilEvictable([trickler], 1000), 150);
   * assert.equal(new Admission({ evictionGraceMs: 0 }).msUntilEvictable([newProgress(0)], 9000), Infinity);
   * ```
   */
  msUntilEvictable(clients: Iterable<ClientProgress>, now: number): number {
    if (this.evictionGraceMs === 0) return Infinity;
    let wait = Infinity;
    for (const client of clients) {
      if (client.cutOffReason !== undefined) continue;
      wait = Math.min(wait, Math.max(0, this.#graceEnds(client) - now));
      if (wait === 0) break;
    }
    return wait;
  }

  /**
   * The clients to evict so that `neededBytes` more buffer fits: any but
   * `asking`, largest `bufferedBytes ** 2 / (rate + 1)` first, as few as free
   * enough. Undefined if all of them together would not free enough (then
   * nobody should be evicted), or eviction is off.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * const admission = new Admission({ evictionGraceMs: 2000 });
   * const hog = newProgress(0);
   * hog.bufferedBytes = 60_000_000;
   * hog.windowRate = 0.2; // a byte every 5 s
   * const fast = newProgress(0);
   * fast.bufferedBytes = 60_000_000;
   * fast.windowRate = 50_000_000;
   * const asking = newProgress(10_000);
   * const clients = [fast, hog, asking];
   * assert.deepEqual(admission.memoryVictims(clients, asking, 1_000_000, 10_000), [hog]);
   * assert.equal(admission.memoryVictims(clients, asking, 200_000_000, 10_000), undefined);
   * ```
   */
  memoryVictims(
    clients: Iterable<ClientProgress>,
    asking: ClientProgress,
    neededBytes: number,
    now: number,
  ): ClientProgress[] | undefined {
    if (this.evictionGraceMs === 0) return undefined;
    const candidates: Array<{ client: ClientProgress; score: number }> = [];
    let available = 0;
    for (const client of clients) {
      if (
        client === asking || client.bufferedBytes <= 0 ||
        client.cutOffReason !== undefined
      ) continue;
      available += client.bufferedBytes;
      candidates.push({
        client,
        score: client.bufferedBytes ** 2 / (this.rate(client, now) + 1),
      });
    }
    if (available < neededBytes) return undefined;
    candidates.sort((a, b) => b.score - a.score);
    const victims: ClientProgress[] = [];
    let freed = 0;
    for (const { client } of candidates) {
      if (freed >= neededBytes) break;
      victims.push(client);
      freed += client.bufferedBytes;
    }
    return victims;
  }
}

/** What {@linkcode verdictText} words a verdict with besides the policy. */
export interface VerdictTextOptions {
  /** The policy that gave the verdict, for its limits. */
  admission: Admission;
  /** The server's `maxConnections`, named by a slot eviction. */
  maxConnections: number;
  /** The server's `maxBufferedBytes`, named by a memory eviction. */
  maxBufferedBytes: number;
}

/**
 * Why `client` is cut off for `verdict`, in words for stderr: the rule, its
 * limit, and the client's own figure. A memory eviction names what the
 * client holds, so word it before its buffers are let go.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const admission = new Admission({ idleTimeoutMs: 30_000 });
 * const options = { admission, maxConnections: 64, maxBufferedBytes: 1024 };
 * const client = newProgress(0);
 * assert.equal(
 *   verdictText("idle", client, 31_000, options),
 *   "idle for more than 30 s",
 * );
 * client.bytesReceived = 1000;
 * assert.equal(
 *   verdictText("slot_eviction", client, 2000, options),
 *   "evicted for a newcomer at the limit of 64 connections (500 B/s, the slowest)",
 * );
 * ```
 */
export function verdictText(
  verdict: AdmissionReason,
  client: ClientProgress,
  now: number,
  options: VerdictTextOptions,
): string {
  const { admission } = options;
  switch (verdict) {
    case "min_rate":
      return `sent below the minimum rate of ${admission.minRate} B/s for ${
        seconds(now - client.acceptedAt)
      } s without half-closing`;
    case "slow_reader":
      return `read its echo below the minimum rate of ${admission.minReadRate} B/s (no write taken for ${
        seconds(now - client.lastActivity)
      } s after a burst of ${client.lastBurst} bytes)`;
    case "slot_eviction":
      return `evicted for a newcomer at the limit of ${options.maxConnections} connections (${
        Math.round(admission.rate(client, now))
      } B/s, the slowest)`;
    case "memory_eviction":
      return `evicted: server buffer limit of ${options.maxBufferedBytes} bytes reached, it held ${client.bufferedBytes} bytes at ${
        Math.round(admission.rate(client, now))
      } B/s`;
    default:
      return `idle for more than ${admission.idleTimeoutMs / 1000} s`;
  }
}

/**
 * How often the server's sweep runs {@linkcode Admission.check}: often
 * enough that no rule cuts off much later than it allows (half its
 * shortest timeout), at most once a second and at least every 10 ms.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * assert.equal(sweepIntervalMs(new Admission()), 1000);
 * assert.equal(sweepIntervalMs(new Admission({ idleTimeoutMs: 300 })), 150);
 * ```
 */
export function sweepIntervalMs(admission: Admission): number {
  const { idleTimeoutMs, minRate, minRateGraceMs } = admission;
  return Math.max(
    10,
    Math.min(
      1000,
      idleTimeoutMs / 2,
      minRate > 0 ? minRateGraceMs / 2 : Infinity,
    ),
  );
}

function seconds(ms: number): string {
  return (ms / 1000).toFixed(1);
}
