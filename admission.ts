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
 *   nothing for this long is cut off (`idle`).
 * - **Minimum send rate** (`minRate`, 500 B/s, after `minRateGraceMs`,
 *   20 s), after Apache's mod_reqtimeout (`header=20,MinRate=500`): until
 *   it half-closes, a client connected for `t` seconds must have sent at
 *   least `(t - 20) * 500` bytes; each 500 bytes buys a second. Trickling a
 *   byte now and then cannot hold a connection forever (`min_rate`).
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
 * - **Fair slots between sources** (`evictionGraceMs`, 2 s): a client's
 *   source is its IPv4 address, or the /64 prefix of its IPv6 address (one
 *   host is handed a whole /64, RFC 6177, so counting IPv6 addresses one
 *   by one would limit nothing; IPv4-mapped IPv6 addresses count as IPv4).
 *   At `maxConnections` the server keeps accepting and decides per
 *   newcomer (nginx `limit_conn` and HAProxy's `src_conn_cur` count per
 *   address and refuse; this server evicts instead). A newcomer from a
 *   source holding at least two fewer connections than the biggest source
 *   (with one fewer, the swap would only make it the bigger one, and the
 *   two would evict each other's clients turn about) is served at once, at
 *   the biggest source's expense, grace or not, but one past its grace
 *   first: its oldest client that has sent nothing, else the lowest recent
 *   rate (bytes moved either way in the last `rateWindowMs`, or on average
 *   since it was accepted or half-closed, whichever is higher) among its
 *   32 oldest, so that the choice costs the same at any number of clients;
 *   if all of them were accepted in the last 125 ms (their first bytes may
 *   not be read yet), the newcomer waits up to that long first. A newcomer
 *   from the biggest source (or one nearly as big) may only take the slot
 *   of one of its own past its grace, chosen the same way; if none is, it
 *   waits for one (at most 64 newcomers wait, each at most 1 s, first come
 *   first served) and is then turned away (`turned_away`: closed, logged
 *   with 0 bytes). One turned away at once would reconnect at once, and a
 *   loop of such attackers takes every slot the moment it frees, ahead of
 *   the honest clients of their source. With 64 waiting, the next
 *   newcomers are turned away at once, unless one source holds every slot:
 *   then they wait in the kernel's queue, where nobody of
 *   another source waits behind them. The grace protects progress, not
 *   newness: a client is past it `evictionGraceMs / 8` (250 ms) after its
 *   last byte while it still sends, or after it was accepted if it has
 *   sent nothing; a client sending or reading its echo keeps the whole
 *   2 s. Grace cycling (silent clients that leave within the grace and
 *   reconnect) therefore holds no slot against a newcomer of its own
 *   source for more than 250 ms, and the silent ones go first: while any
 *   client of the source is silent, one that moved bytes in the last
 *   250 ms is never chosen for a newcomer of its own source. Cost: a
 *   source that is the biggest at the limit loses connections to
 *   newcomers of smaller ones; many honest clients behind one address (a
 *   NAT, a proxy without the PROXY protocol) are one source and share its
 *   slots with any attacker among them; a person typing into `nc` at the
 *   limit may lose the connection to a newcomer of their own source 250 ms
 *   after connecting or after their last line, and to one from a smaller
 *   source if theirs is the biggest. Attackers on the same address as good
 *   clients are told from them only by progress (bench/README.md has the
 *   measured share).
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
 *   little is the asking client cut off (`buffer_limit`). Cost: under memory
 *   pressure, a client that holds much and moves little (a slow link with a
 *   large payload) goes first. One scan of every client (~1.3 ms at
 *   16,384) picks the 256 highest scores and serves 100 ms; each read
 *   scores those afresh together with every client admitted since, and
 *   only if they free too little scans all again. An attacker who keeps
 *   the budget full cannot make the server scan every client for every
 *   read (`deno run bench/victim_cost.ts 16384 20000`: ~40 µs a read at
 *   16,384 clients holding buffers, reads 1 ms apart; 5.6 ms when every
 *   read scanned and sorted all).
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
  /** Its source, from {@linkcode sourceKey}: whose slots it counts against. */
  readonly source: string;
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
   * closed, its end not yet logged) and is never picked to evict again.
   */
  cutOffReason: string | undefined;
}

/** Options for {@linkcode Admission.slotVictim}. */
export interface SlotVictimOptions {
  /**
   * How long the newcomer has waited for a slot, in milliseconds: once it
   * has waited 125 ms, a newcomer of a smaller source may take a client
   * accepted just now.
   *
   * @default {0}
   */
  waitedMs?: number;
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
// A victim of a source with no silent client is the lowest rate among this
// many of its oldest: a bounded cost per newcomer (bench/victim_cost.ts).
const VICTIM_SCAN = 32;
// How long a newcomer has for its first bytes to be read before a newcomer
// of a smaller source may take its slot, at most (a sixteenth of the
// grace otherwise).
const SETTLE_MS = 125;
// Entries of sources kept for reuse: a server with one client at a time
// would otherwise make and drop two Sets per connection.
const SPARE_ENTRIES = 64;
// How long one ranking of memory victims serves (see memoryVictims()).
const RANKING_MS = 100;
// Clients a ranking orders; the rest are ordered only when these free too
// little (see memoryVictims()).
const RANKED_VICTIMS = 256;
// The part of the grace a client that has sent nothing keeps: as long as
// one silent since its last byte. (Half the grace made a flood of silent
// clients from the good clients' own address turn its slots over 4 times
// slower: 0 of 150 good clients within 5 s at 64 slots, against 145.)
const SILENT_GRACE_SHARE = 1 / 8;

/**
 * The source a client's slots count against: an IPv4 address as it is, an
 * IPv6 address as its /64 prefix (`2001:db8:0:1::/64`), an IPv4-mapped
 * IPv6 address (`::ffff:192.0.2.1`) as the IPv4 address.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * assert.equal(sourceKey("192.0.2.7"), "192.0.2.7");
 * assert.equal(sourceKey("2001:db8:0:1:aa::5"), "2001:db8:0:1::/64");
 * assert.equal(sourceKey("2001:db8:0:1::6"), "2001:db8:0:1::/64");
 * assert.equal(sourceKey("::1"), "0:0:0:0::/64");
 * assert.equal(sourceKey("::ffff:192.0.2.7"), "192.0.2.7");
 * ```
 */
export function sourceKey(hostname: string): string {
  if (!hostname.includes(":")) return hostname;
  const address = hostname.replace(/^\[|\]$/g, "").replace(/%.*$/, "");
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(address);
  if (mapped !== null) return mapped[1];
  const [head, tail] = address.split("::");
  const front = head === "" ? [] : head.split(":");
  const back = tail === undefined || tail === "" ? [] : tail.split(":");
  // An embedded IPv4 tail ("64:ff9b::192.0.2.1") is counted as one group
  // of two: it is past the prefix either way.
  const groups = tail === undefined ? front : [
    ...front,
    ...new Array(Math.max(0, 8 - front.length - back.length)).fill("0"),
    ...back,
  ];
  return `${
    groups.slice(0, 4).map((group) => (parseInt(group, 16) || 0).toString(16))
      .join(":")
  }::/64`;
}

/** Options for {@linkcode newProgress}. */
export interface NewProgressOptions {
  /**
   * Its source, from {@linkcode sourceKey}.
   *
   * @default {""}
   */
  source?: string;
}

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
export function newProgress(
  now: number,
  options: NewProgressOptions = {},
): ClientProgress {
  return {
    acceptedAt: now,
    source: options.source ?? "",
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

/** One source's clients, oldest first. */
interface SourceClients<C> {
  key: string;
  /** Its clients not cut off, in the order they were admitted. */
  readonly clients: Set<C>;
  /**
   * Those that had sent nothing when admitted; ones that have sent since
   * are dropped lazily when met at the front.
   */
  readonly silent: Set<C>;
}

/** The clients of one scan for memory victims. */
interface MemoryRanking<C> {
  /** The client set it scanned. */
  clients: Iterable<C>;
  /** When. */
  at: number;
  /** The clients holding a buffer with the highest scores then. */
  top: C[];
  /** Whether `top` has every client that held a buffer. */
  complete: boolean;
}

/**
 * The admission policy with its limits, and the clients holding a slot by
 * source: see the module doc for the rules. `C` is the server's own client
 * type, handed back as it was given.
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
export class Admission<C extends ClientProgress = ClientProgress> {
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

  #sources = new Map<string, SourceClients<C>>();
  // Sources by how many clients they hold, to find the biggest at once;
  // a bucket, once made, is kept (no Set made and dropped per client).
  #sourcesBySize: Array<Set<SourceClients<C>>> = [];
  // Entries of sources that left, for the next new source to reuse.
  #spareEntries: SourceClients<C>[] = [];
  #biggest = 0;
  #memoryRanking: MemoryRanking<C> | undefined;
  // Clients admitted while the scan serves: candidates for memory too.
  #recent: C[] = [];
  #admitted = 0;

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
    if (client.eofAt !== undefined) return end;
    // Nothing sent yet: the grace protects progress, not newness.
    if (client.bytesReceived === 0) {
      return client.acceptedAt + this.evictionGraceMs * SILENT_GRACE_SHARE;
    }
    // Still sending: silence protects nobody for long.
    return Math.min(end, client.lastActivity + this.evictionGraceMs / 8);
  }

  /** Whether `client` is past its grace and may be evicted for a slot. */
  #evictable(client: ClientProgress, now: number): boolean {
    return now >= this.#graceEnds(client);
  }

  /** Clients holding a slot now: admitted and neither cut off nor gone. */
  get connections(): number {
    return this.#admitted;
  }

  /** How many slots the biggest source holds (0 with no clients). */
  get biggestSourceConnections(): number {
    return this.#biggest;
  }

  /**
   * How many slots `source` holds.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * const admission = new Admission();
   * admission.admit(newProgress(0, { source: "192.0.2.7" }));
   * assert.equal(admission.sourceConnections("192.0.2.7"), 1);
   * assert.equal(admission.sourceConnections("192.0.2.8"), 0);
   * ```
   */
  sourceConnections(source: string): number {
    return this.#sources.get(source)?.clients.size ?? 0;
  }

  /** Moves `entry` from the bucket of `from` clients to that of `to`. */
  #resize(entry: SourceClients<C>, from: number, to: number): void {
    const bySize = this.#sourcesBySize;
    bySize[from]?.delete(entry);
    if (to > 0) (bySize[to] ??= new Set()).add(entry);
    if (to > this.#biggest) this.#biggest = to;
    else if (from === this.#biggest && bySize[from].size === 0) {
      this.#biggest = to;
    }
  }

  /**
   * Counts `client` as holding a slot of its source, from its acceptance
   * until {@linkcode Admission.leave}. Constant time.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * const admission = new Admission();
   * const client = newProgress(0, { source: "192.0.2.7" });
   * admission.admit(client);
   * assert.equal(admission.connections, 1);
   * admission.leave(client);
   * admission.leave(client);
   * assert.equal(admission.connections, 0);
   * ```
   */
  admit(client: C): void {
    let entry = this.#sources.get(client.source);
    if (entry === undefined) {
      entry = this.#spareEntries.pop() ??
        { key: "", clients: new Set(), silent: new Set() };
      entry.key = client.source;
      this.#sources.set(client.source, entry);
    }
    if (entry.clients.has(client)) return;
    entry.clients.add(client);
    if (client.bytesReceived === 0) entry.silent.add(client);
    this.#admitted++;
    this.#resize(entry, entry.clients.size - 1, entry.clients.size);
    const ranking = this.#memoryRanking;
    if (ranking !== undefined && client.acceptedAt - ranking.at < RANKING_MS) {
      this.#recent.push(client);
    }
  }

  /**
   * Frees the slot `client` held: call it when it is cut off or gone;
   * more calls do nothing. Constant time.
   */
  leave(client: C): void {
    const entry = this.#sources.get(client.source);
    if (entry === undefined || !entry.clients.delete(client)) return;
    entry.silent.delete(client);
    this.#admitted--;
    this.#resize(entry, entry.clients.size + 1, entry.clients.size);
    if (entry.clients.size === 0) {
      this.#sources.delete(entry.key);
      entry.silent.clear();
      if (this.#spareEntries.length < SPARE_ENTRIES) {
        this.#spareEntries.push(entry);
      }
    }
  }

  /**
   * At `maxConnections`, the client to evict so a newcomer from `source`
   * is served (see the module doc): one of the biggest source's, grace or
   * not, if `source` holds at least two fewer; else one of `source`'s own past its
   * grace; undefined if there is none (turn the newcomer away) or eviction
   * is off. Within the source, in order: its oldest client that has sent
   * nothing, if past its grace; the lowest {@linkcode Admission.rate}
   * among its 32 oldest of those past the grace and silent for an eighth
   * of it (ties: the one idle longest); then, for a newcomer of its own,
   * the slowest past the grace while none of the source is silent; for
   * one from a smaller source, its oldest silent client, else its slowest.
   * The cost per newcomer does not grow with the number of clients.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * const admission = new Admission({ evictionGraceMs: 2000 });
   * const fast = newProgress(0, { source: "192.0.2.7" });
   * fast.bytesReceived = 1_000_000;
   * fast.lastActivity = 9990;
   * const trickler = newProgress(0, { source: "192.0.2.7" });
   * trickler.bytesReceived = 3;
   * const flooder = newProgress(9800, { source: "198.51.100.1" });
   * const flooder2 = newProgress(9850, { source: "198.51.100.1" });
   * const flooder3 = newProgress(9860, { source: "198.51.100.1" });
   * const flooder4 = newProgress(9870, { source: "198.51.100.1" });
   * for (const c of [fast, trickler, flooder, flooder2, flooder3, flooder4]) {
   *   admission.admit(c);
   * }
   * // A newcomer from a smaller source: the biggest source's oldest
   * // client, in its grace or not.
   * assert.equal(admission.slotVictim("192.0.2.7", 10_000), flooder);
   * assert.equal(admission.slotVictim("203.0.113.5", 10_000), flooder);
   * // A newcomer from the biggest source: one of its own past its grace.
   * assert.equal(admission.slotVictim("198.51.100.1", 10_000), undefined);
   * assert.equal(admission.slotVictim("198.51.100.1", 10_800), flooder);
   * ```
   */
  slotVictim(
    source: string,
    now: number,
    options: SlotVictimOptions = {},
  ): C | undefined {
    if (this.evictionGraceMs === 0 || this.#biggest === 0) return undefined;
    // Two fewer at least: one fewer would make the newcomer's source the
    // bigger of the two after the swap, and the next newcomer of the other
    // would swap back, each time evicting someone.
    if (this.sourceConnections(source) + 1 < this.#biggest) {
      const [biggest] = this.#sourcesBySize[this.#biggest];
      return this.#victimOf(biggest, now, false, options.waitedMs ?? 0);
    }
    const own = this.#sources.get(source);
    return own === undefined ? undefined : this.#victimOf(own, now, true, 0);
  }

  /**
   * The client of `entry` to evict; with `graceHolds`, only one past its
   * grace. In order: its oldest silent client past the grace; the slowest
   * of its oldest that is past the grace and moved no byte for an eighth of
   * it; the slowest of its oldest past the grace (with `graceHolds`, only
   * while none of the source is silent); without `graceHolds`, the slowest
   * of its oldest accepted 125 ms ago or more (a sixteenth of a shorter
   * grace), or, once the newcomer has waited that long, of its oldest.
   */
  #victimOf(
    entry: SourceClients<C>,
    now: number,
    graceHolds: boolean,
    waitedMs: number,
  ): C | undefined {
    const silent = this.#oldestSilent(entry);
    if (silent !== undefined && this.#evictable(silent, now)) return silent;
    const still = now - this.evictionGraceMs / 8;
    const idle = this.#slowest(
      entry,
      now,
      (client) => client.lastActivity <= still && this.#evictable(client, now),
    );
    if (idle !== undefined) return idle;
    // A client moving bytes is not traded for a newcomer of its own source
    // that has shown no more than the silent ones waiting.
    if (!graceHolds || silent === undefined) {
      const past = this.#slowest(
        entry,
        now,
        (client) => this.#evictable(client, now),
      );
      if (past !== undefined || graceHolds) return past;
    }
    if (graceHolds) return undefined;
    // Everyone is in the grace: the slowest of those whose first bytes had
    // time to be read (a burst of newcomers from elsewhere, accepted before
    // any read completes, would otherwise take honest clients that have
    // sent all they mean to); none yet: the newcomer waits.
    const settleMs = Math.min(this.evictionGraceMs / 16, SETTLE_MS);
    const settled = now - settleMs;
    const victim = this.#slowest(
      entry,
      now,
      (client) => client.acceptedAt <= settled,
    );
    // A newcomer that has waited as long takes the slowest of them all: a
    // source that keeps its slots that young cannot make it wait longer.
    if (victim !== undefined || waitedMs < settleMs) return victim;
    return this.#slowest(entry, now, () => true);
  }

  /** The oldest client of `entry` that has sent nothing yet. */
  #oldestSilent(entry: SourceClients<C>): C | undefined {
    for (const client of entry.silent) {
      if (client.bytesReceived === 0 && client.cutOffReason === undefined) {
        return client;
      }
      entry.silent.delete(client);
    }
    return undefined;
  }

  /**
   * The lowest {@linkcode Admission.rate} among the oldest `VICTIM_SCAN`
   * clients of `entry` that `eligible` accepts (ties: idle longest).
   */
  #slowest(
    entry: SourceClients<C>,
    now: number,
    eligible: (client: C) => boolean,
  ): C | undefined {
    let victim: C | undefined;
    let victimRate = Infinity;
    let scanned = 0;
    for (const client of entry.clients) {
      if (++scanned > VICTIM_SCAN) break;
      if (client.cutOffReason !== undefined || !eligible(client)) continue;
      const rate = this.rate(client, now);
      if (
        victim === undefined || rate < victimRate ||
        (rate === victimRate && client.lastActivity < victim.lastActivity)
      ) {
        victim = client;
        victimRate = rate;
      }
    }
    return victim;
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
    clients: Iterable<C>,
    asking: C,
    neededBytes: number,
    now: number,
  ): C[] | undefined {
    if (this.evictionGraceMs === 0) return undefined;
    // Scoring every client costs milliseconds at 16,384; an attacker who
    // keeps the budget full would have the server pay it for every read.
    // One scan of every client picks the RANKED_VICTIMS highest scores and
    // serves RANKING_MS; each read scores those afresh, with every client
    // admitted since the scan.
    let ranking = this.#memoryRanking;
    if (
      ranking === undefined || ranking.clients !== clients ||
      now - ranking.at >= RANKING_MS || now < ranking.at
    ) {
      ranking = this.#memoryRanking = this.#rank(clients, now);
      this.#recent.length = 0;
    }
    const victims = this.#takeVictims(
      [...ranking.top, ...this.#recent],
      asking,
      neededBytes,
      now,
    );
    if (victims !== undefined || ranking.complete) return victims;
    // The top ones free too little: every client.
    this.#memoryRanking = this.#rank(clients, now, true);
    this.#recent.length = 0;
    return this.#takeVictims(this.#memoryRanking.top, asking, neededBytes, now);
  }

  /**
   * The fewest of `candidates` that together free `neededBytes`, highest
   * score now first; undefined if they all free too little.
   */
  #takeVictims(
    candidates: C[],
    asking: C,
    neededBytes: number,
    now: number,
  ): C[] | undefined {
    const scored: Array<{ client: C; score: number }> = [];
    for (const client of candidates) {
      if (
        client === asking || client.bufferedBytes <= 0 ||
        client.cutOffReason !== undefined
      ) continue;
      scored.push({ client, score: this.#memoryScore(client, now) });
    }
    scored.sort((a, b) => b.score - a.score);
    const victims: C[] = [];
    let freed = 0;
    for (const { client } of scored) {
      victims.push(client);
      freed += client.bufferedBytes;
      if (freed >= neededBytes) return victims;
    }
    return undefined;
  }

  /** The byte-seconds `client`'s buffer costs at its recent rate. */
  #memoryScore(client: C, now: number): number {
    return client.bufferedBytes ** 2 / (this.rate(client, now) + 1);
  }

  /**
   * The clients holding a buffer with the {@linkcode RANKED_VICTIMS}
   * highest scores, or all of them with `all`.
   */
  #rank(clients: Iterable<C>, now: number, all = false): MemoryRanking<C> {
    const candidates: C[] = [];
    const scoreList: number[] = [];
    for (const client of clients) {
      if (client.bufferedBytes <= 0 || client.cutOffReason !== undefined) {
        continue;
      }
      candidates.push(client);
      scoreList.push(this.#memoryScore(client, now));
    }
    const complete = all || candidates.length <= RANKED_VICTIMS;
    if (complete) return { clients, at: now, top: candidates, complete };
    // The RANKED_VICTIMS-th highest score, by a native numeric sort.
    const scores = Float64Array.from(scoreList);
    const threshold = scores.slice().sort()[
      candidates.length - RANKED_VICTIMS
    ];
    const top = candidates.filter((_, i) => scores[i] >= threshold);
    return { clients, at: now, top, complete };
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
  /** The source of the newcomer a slot eviction is for. */
  newcomerSource?: string;
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
 * const client = newProgress(0, { source: "198.51.100.1" });
 * assert.equal(
 *   verdictText("idle", client, 31_000, options),
 *   "idle for more than 30 s",
 * );
 * client.bytesReceived = 1000;
 * admission.admit(client);
 * assert.equal(
 *   verdictText("slot_eviction", client, 2000, {
 *     ...options,
 *     newcomerSource: "192.0.2.7",
 *   }),
 *   "evicted for a newcomer from 192.0.2.7 at the limit of 64 connections: its source 198.51.100.1 holds 1 of them, the most (500 B/s)",
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
    case "slot_eviction": {
      const { newcomerSource = "", maxConnections } = options;
      const held = admission.sourceConnections(client.source);
      const rate = Math.round(admission.rate(client, now));
      return newcomerSource === client.source
        ? `evicted for a newcomer from its own source ${client.source} at the limit of ${maxConnections} connections: the source holds ${held} of them (${rate} B/s, ${
          client.bytesReceived === 0 ? "sent nothing" : "the slowest"
        })`
        : `evicted for a newcomer from ${newcomerSource} at the limit of ${maxConnections} connections: its source ${client.source} holds ${held} of them, the most (${rate} B/s)`;
    }
    case "memory_eviction":
      return `evicted: server buffer limit of ${options.maxBufferedBytes} bytes reached, it held ${client.bufferedBytes} bytes at ${
        Math.round(admission.rate(client, now))
      } B/s`;
    default:
      return `idle for more than ${admission.idleTimeoutMs / 1000} s`;
  }
}

/**
 * Why a newcomer from `source` is turned away at `maxConnections`, in words
 * for stderr.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const admission = new Admission();
 * const options = { admission, maxConnections: 64, maxBufferedBytes: 1024 };
 * assert.equal(
 *   turnedAwayText("192.0.2.7", options),
 *   "turned away at the limit of 64 connections: its source 192.0.2.7 holds 0 of them, and none past its grace",
 * );
 * ```
 */
export function turnedAwayText(
  source: string,
  options: VerdictTextOptions,
): string {
  return `turned away at the limit of ${options.maxConnections} connections: its source ${source} holds ${
    options.admission.sourceConnections(source)
  } of them, and none past its grace`;
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
