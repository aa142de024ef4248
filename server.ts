/**
 * The echo server: accepts TCP clients, reads each one's bytes to EOF, sends
 * them back, half-closes, and logs every client it accepted exactly once.
 *
 * This module is the accept loop and one client's path (accept, its PROXY
 * header if the protocol is on, read to EOF, write back, log), in that
 * order from the top, so a reader can follow a client from `accept()` to
 * its log line here; the option and result types are at the end. Who is
 * cut off or evicted is `admission.ts`'s to decide and to word, asked at
 * the three places marked `ADMISSION:` (a slot for a newcomer, the
 * allocator at `maxBufferedBytes`, the periodic sweep); none adds a timer
 * per client or an await per read. The header's parsing is
 * `proxy_protocol.ts`'s, buffers and their budget `buffer_pool.ts`'s,
 * counters `echo_stats.ts`'s, the drain's deadline `drain.ts`'s.
 *
 * @module
 */

import { describe } from "./_errors.ts";
import { acceptErrorKind, exhaustionLine } from "./accept_errors.ts";
import type { AddressRanges } from "./address_ranges.ts";
import {
  Admission,
  type AdmissionOptions,
  type AdmissionReason,
  type ClientProgress,
  sourceKey,
  sweepIntervalMs,
  turnedAwayText,
  verdictText,
  type VerdictTextOptions,
} from "./admission.ts";
import {
  BufferBudget,
  type BufferBudgetOptions,
  type BufferHolder,
  FIRST_CHUNK_BYTES,
  nextChunkBytes,
} from "./buffer_pool.ts";
import { Drain } from "./drain.ts";
import {
  CLIENT_LINE_KINDS,
  type ClientLineKind,
  type CutoffReason,
  EchoCounters,
  type EchoStats,
} from "./echo_stats.ts";
import { DEFAULTS, MAX_INSTANCES } from "./options.ts";
import {
  parseProxyHeader,
  PROXY_HEADER_MAX_BYTES,
  type ProxyHeaderParse,
} from "./proxy_protocol.ts";
import { RateLimitedReporter } from "./reporter.ts";

export type { AcceptErrorKind } from "./accept_errors.ts";
export { acceptErrorKind } from "./accept_errors.ts";
export {
  type CutoffReason,
  DURATION_BUCKETS_SECONDS,
  type EchoStats,
} from "./echo_stats.ts";

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

class Server implements EchoServer {
  readonly addr: Deno.NetAddr;
  #listener: Deno.TcpListener;
  #onClientDone: ClientDone;
  #maxClientBytes: number;
  #maxConnections: number;
  #admission: Admission<Client>;
  #verdictOptions: VerdictTextOptions;
  // With the PROXY protocol on: who may send a header, and how long it may
  // take.
  #proxyFrom: AddressRanges | undefined;
  #proxyHeaderTimeoutMs: number;
  // Connections reading their PROXY header, oldest first.
  #awaitingHeader = new Set<AwaitingHeader>();
  // Those and the ones just cut off whose line is not yet logged: the drain
  // waits for them.
  #headerReaders = 0;

  #clients = new Set<Client>();
  // Newcomers waiting for a slot at maxConnections, first come first.
  #held: Newcomer[] = [];
  #heldCheck: ReturnType<typeof setInterval> | undefined;
  #stats = new EchoCounters();
  #budget: BufferBudget;
  #clientsAccepted = 0;
  #firstClientId: number;
  #clientIdStep: number;
  #stopping = false;
  #wakeAcceptLoop: (() => void) | undefined;
  #acceptsSinceYield = 0;
  // Out of fds: the last such error, for the line that sums up a second's.
  #exhaustionError: unknown;
  #exhaustionLines: RateLimitedReporter<"exhaustion">;
  #clientLines: RateLimitedReporter<ClientLineKind>;
  #acceptLoopDone = false;
  #idleSweep: ReturnType<typeof setInterval>;
  #headerCheck: ReturnType<typeof setInterval> | undefined;
  #drain = new Drain(() => {
    for (const client of this.#clients) this.#cutOffAtShutdown(client);
    for (const waiting of this.#awaitingHeader) {
      this.#endAwaiting(
        waiting,
        "shutdown",
        "still reading its PROXY header at shutdown",
      );
    }
  });

  async #accept(): Promise<void> {
    while (!this.#stopping) {
      // With eviction off, newcomers wait at the limit in the kernel's
      // queue until a client finishes.
      if (
        this.#admission.evictionGraceMs === 0 &&
        this.#clients.size >= this.#maxConnections
      ) {
        await this.#pauseAccepting(Infinity);
        continue;
      }
      // As many newcomers wait as may, and one source holds every slot:
      // the rest wait in the kernel's queue (see MAX_HELD).
      if (
        this.#held.length >= MAX_HELD &&
        this.#admission.biggestSourceConnections >= this.#admission.connections
      ) {
        await this.#pauseAccepting(HELD_CHECK_MS);
        continue;
      }
      // As many wait for their PROXY header as may: the rest wait in the
      // kernel's queue (see MAX_AWAITING_HEADER) until one is slow enough
      // to be cut off for the next newcomer, once that is accepted.
      if (
        this.#awaitingHeader.size >= MAX_AWAITING_HEADER &&
        this.#slowestHeader() === undefined
      ) {
        await this.#pauseAccepting(HELD_CHECK_MS);
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
          this.#exhaustionError = error;
          this.#exhaustionLines.report(
            "exhaustion",
            exhaustionLine(1, error),
          );
          await this.#pauseAccepting();
          continue;
        }
        // The kernel accepted a connection that then failed (e.g. reset
        // while queued, denoland/deno#8499): a client that sent nothing.
        const clientId = this.#nextClientId();
        if (kind === "client") {
          this.#clientLines.report(
            "reset",
            `client ${clientId}: failed before it was accepted: ${
              describe(error)
            }`,
          );
        } else {
          this.#clientLines.report(
            "accept_unknown",
            `client ${clientId}: UNEXPECTED accept error (please report it), counted as a client: ${
              describe(error)
            }`,
          );
        }
        this.#logClient(clientId, 0);
        // An error we cannot sort may come back at once, every time: without
        // a pause the loop would spin, numbering and logging a client each
        // pass.
        if (kind === "unknown") await this.#pauseAccepting();
        // A flood of clients that reset while queued fails accept() at once
        // as often as a full queue succeeds: it counts toward the turn too.
        else if (++this.#acceptsSinceYield >= ACCEPTS_PER_YIELD) {
          await this.#timerTurn();
        }
        continue;
      }
      const clientId = this.#nextClientId();
      if (this.#proxyFrom === undefined) {
        this.#place(conn, clientId, sourceKey(conn.remoteAddr.hostname));
      } else {
        this.#readProxyHeader(conn, clientId, this.#proxyFrom);
      }
      if (++this.#acceptsSinceYield >= ACCEPTS_PER_YIELD) {
        await this.#timerTurn();
      }
    }
  }

  /**
   * ADMISSION: who gets a slot. At the limit every newcomer is decided at
   * once, so that nobody waits in the kernel's queue behind an attacker's
   * connections: served in place of a client evicted for it (admission.ts:
   * one of the biggest source's, or of its own past its grace), or turned
   * away. `early` is what came after a PROXY header in its read.
   */
  #place(
    conn: Deno.TcpConn,
    clientId: number,
    source: string,
    early?: Uint8Array,
  ): void {
    if (this.#held.length > 0) this.#serveHeld();
    if (
      this.#admission.connections < this.#maxConnections ||
      // Stopping (a PROXY header completed after the stop): nobody is
      // evicted for a newcomer.
      (!this.#stopping && this.#evictForSlot(source))
    ) {
      this.#admit(conn, clientId, source, early);
    } else {
      const newcomer = {
        conn,
        clientId,
        source,
        early,
        since: performance.now(),
      };
      if (
        !this.#stopping &&
        (this.#held.length < MAX_HELD || this.#makeRoomFor(source))
      ) {
        this.#hold(newcomer);
      } else {
        this.#turnAway(newcomer);
      }
    }
  }

  /**
   * With the PROXY protocol on: refuses a connection from outside `from`,
   * else reads its header and places it by the header's source address;
   * cuts it off if the header is missing, malformed or late. Its own
   * buffer, so that nothing is taken from the budget before the client is.
   */
  async #readProxyHeader(
    conn: Deno.TcpConn,
    clientId: number,
    from: AddressRanges,
  ): Promise<void> {
    const peer = conn.remoteAddr.hostname;
    if (!from.contains(peer)) {
      conn.close();
      this.#refuse(
        clientId,
        peer,
        "proxy_untrusted",
        "a PROXY header is accepted only from --proxy-protocol's addresses",
        0,
      );
      return;
    }
    // The set only shrank while accept() waited: if still full, its oldest
    // is the slow one the accept loop found. A refused newcomer needs no
    // room.
    if (this.#awaitingHeader.size >= MAX_AWAITING_HEADER) {
      this.#cutOffSlowestHeader();
    }
    const waiting: AwaitingHeader = {
      conn,
      since: performance.now(),
      end: undefined,
    };
    this.#awaitingHeader.add(waiting);
    this.#headerReaders++;
    const buffer = new Uint8Array(PROXY_HEADER_MAX_BYTES);
    let filled = 0;
    let parse: ProxyHeaderParse = { status: "incomplete" };
    let failure: unknown;
    try {
      while (parse.status === "incomplete") {
        const n = await conn.read(buffer.subarray(filled));
        if (n === null) break;
        filled += n;
        parse = parseProxyHeader(buffer.subarray(0, filled));
      }
    } catch (error) {
      failure = error;
    } finally {
      this.#awaitingHeader.delete(waiting);
      this.#wakeAcceptLoop?.();
    }
    if (waiting.end !== undefined) {
      this.#refuse(clientId, peer, ...waiting.end, filled);
    } else if (failure !== undefined) {
      conn.close();
      this.#refuse(clientId, peer, "reset", describe(failure), filled);
    } else if (parse.status === "complete") {
      const { header } = parse;
      const kind = header.source === undefined ? "local" : "proxy";
      this.#stats.proxyHeaders[`v${header.version}_${kind}`]++;
      this.#place(
        conn,
        clientId,
        sourceKey(header.source?.hostname ?? peer),
        filled > header.length
          ? buffer.slice(header.length, filled)
          : undefined,
      );
    } else {
      conn.close();
      this.#refuse(clientId, peer, ...headerRefusal(parse, filled), filled);
    }
    this.#headerReaders--;
    if (this.#stopping) this.#resolveIfAllServed();
  }

  /**
   * Closes a connection still reading its PROXY header; its reader then
   * refuses it for `kind`.
   */
  #endAwaiting(
    waiting: AwaitingHeader,
    kind: CutoffReason,
    reason: string,
  ): void {
    if (waiting.end !== undefined) return;
    waiting.end = [kind, reason];
    this.#awaitingHeader.delete(waiting);
    waiting.conn.close();
  }

  /**
   * Cuts off the connections that have read their PROXY header for
   * proxyHeaderTimeoutMs; one check for all instead of a timer each.
   */
  #checkHeaderDeadlines(): void {
    const now = performance.now();
    // Oldest first: the rest are younger.
    for (const waiting of this.#awaitingHeader) {
      if (now - waiting.since < this.#proxyHeaderTimeoutMs) return;
      this.#endAwaiting(
        waiting,
        "proxy_timeout",
        `no complete PROXY header within ${this.#proxyHeaderTimeoutMs} ms`,
      );
    }
  }

  /**
   * The connection that has read its PROXY header longest, if that is at
   * least SLOW_HEADER_MS.
   */
  #slowestHeader(): AwaitingHeader | undefined {
    const [oldest] = this.#awaitingHeader;
    return oldest !== undefined &&
        performance.now() - oldest.since >= SLOW_HEADER_MS
      ? oldest
      : undefined;
  }

  /**
   * With MAX_AWAITING_HEADER connections reading their PROXY header and a
   * newcomer accepted: cuts off the one that has waited longest if that is
   * at least SLOW_HEADER_MS.
   */
  #cutOffSlowestHeader(): void {
    const oldest = this.#slowestHeader();
    if (oldest === undefined) return;
    const waitedMs = performance.now() - oldest.since;
    this.#endAwaiting(
      oldest,
      "proxy_timeout",
      `no complete PROXY header after ${
        Math.round(waitedMs)
      } ms, with ${MAX_AWAITING_HEADER} connections waiting for theirs`,
    );
  }

  /**
   * Counts, reports and logs a connection that was never a client: cut off
   * before or while it sent its PROXY header, logged with 0 bytes (none of
   * what it sent was a client's). Its connection is closed.
   */
  #refuse(
    clientId: number,
    peer: string,
    kind: CutoffReason,
    reason: string,
    bytesRead: number,
  ): void {
    this.#stats.cutoffs[kind]++;
    this.#clientLines.report(
      kind,
      `client ${clientId} (connection from ${peer}): cut off after ${bytesRead} bytes: ${reason}`,
    );
    this.#stats.recordDuration(0);
    this.#logClient(clientId, 0);
  }

  constructor(onClientDone: ClientDone, options: ServeOptions) {
    this.#onClientDone = onClientDone;
    const diagnostic = options.onDiagnostic ?? console.error;
    this.#maxClientBytes = options.maxClientBytes ?? DEFAULTS.maxClientBytes;
    this.#budget = new BufferBudget({
      maxBufferedBytes: options.maxBufferedBytes,
    });
    this.#maxConnections = options.maxConnections ?? DEFAULTS.maxConnections;
    this.#proxyFrom = options.proxyProtocol;
    this.#proxyHeaderTimeoutMs = options.proxyHeaderTimeoutMs ??
      PROXY_HEADER_TIMEOUT_MS;
    this.#admission = new Admission<Client>({
      idleTimeoutMs: options.idleTimeoutMs,
      minRate: options.minRate,
      minRateGraceMs: options.minRateGraceMs,
      minReadRate: options.minReadRate,
      evictionGraceMs: options.evictionGraceMs,
    });
    this.#verdictOptions = {
      admission: this.#admission,
      maxConnections: this.#maxConnections,
      maxBufferedBytes: this.#budget.maxBufferedBytes,
    };
    const {
      instance = DEFAULTS.instance,
      instances = DEFAULTS.instances,
    } = options;
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
    this.#exhaustionLines = new RateLimitedReporter(diagnostic, {
      linesPerPeriod: 1,
      kinds: ["exhaustion"],
      summarize: (_, failures) =>
        exhaustionLine(failures, this.#exhaustionError),
    });
    this.#clientLines = new RateLimitedReporter(diagnostic, {
      linesPerPeriod: CLIENT_LINES_PER_SECOND,
      kinds: CLIENT_LINE_KINDS,
      label: "client diagnostic",
    });
    this.#listener = Deno.listen({
      hostname: options.hostname ?? DEFAULTS.hostname,
      port: options.port ?? DEFAULTS.port,
    });
    this.addr = this.#listener.addr;
    // One check of the PROXY header deadlines and one sweep for all
    // clients, instead of a timer per connection, read or write.
    if (this.#proxyFrom !== undefined) {
      this.#headerCheck = setInterval(
        () => this.#checkHeaderDeadlines(),
        Math.min(HEADER_CHECK_MS, this.#proxyHeaderTimeoutMs),
      );
    }
    this.#idleSweep = setInterval(
      () => this.#sweep(),
      sweepIntervalMs(this.#admission),
    );
    this.#accept().finally(() => {
      this.#acceptLoopDone = true;
      this.#resolveIfAllServed();
    });
  }

  /** Serves an accepted newcomer now that it has a slot. */
  #admit(
    conn: Deno.TcpConn,
    clientId: number,
    source: string,
    early?: Uint8Array,
  ): void {
    const client = new Client(conn, clientId, source);
    this.#serve(client, early);
    // Accepted just as the drain ran out: logged, but not waited for.
    if (this.#drain.expired) this.#cutOffAtShutdown(client);
  }

  /**
   * With MAX_HELD newcomers waiting, turns away the first of them from a
   * source holding at least two more connections than `source`, so that a
   * newcomer of a smaller source is not turned away for a flood of the
   * biggest; false if there is none.
   */
  #makeRoomFor(source: string): boolean {
    const held = this.#admission.sourceConnections(source);
    const i = this.#held.findIndex((newcomer) =>
      this.#admission.sourceConnections(newcomer.source) >= held + 2
    );
    if (i < 0) return false;
    this.#turnAway(this.#held.splice(i, 1)[0]);
    return true;
  }

  /** Keeps a newcomer waiting for a slot (see MAX_HELD). */
  #hold(newcomer: Newcomer): void {
    this.#held.push(newcomer);
    this.#heldCheck ??= setInterval(() => this.#serveHeld(), HELD_CHECK_MS);
  }

  /**
   * Serves the waiting newcomers, first come first, while a slot is free
   * or one can be evicted for them; turns away those that waited too long.
   */
  #serveHeld(): void {
    const now = performance.now();
    // With eviction off they wait for a slot to free, as in the kernel's
    // queue: only those accepted to read a PROXY header before the limit
    // filled (at most MAX_AWAITING_HEADER) are ever held so.
    const holdMs = this.#admission.evictionGraceMs === 0
      ? Infinity
      : Math.min(HOLD_MS, this.#admission.evictionGraceMs);
    // Each in turn: one that cannot be served does not hold up another,
    // of another source, that can.
    const held = this.#held;
    this.#held = [];
    for (const newcomer of held) {
      if (this.#stopping) {
        this.#turnAway(newcomer);
      } else if (
        this.#admission.connections < this.#maxConnections ||
        this.#evictForSlot(newcomer.source, now - newcomer.since)
      ) {
        this.#admit(
          newcomer.conn,
          newcomer.clientId,
          newcomer.source,
          newcomer.early,
        );
      } else if (now - newcomer.since >= holdMs) {
        this.#turnAway(newcomer);
      } else {
        this.#held.push(newcomer);
      }
    }
    if (this.#held.length === 0) {
      clearInterval(this.#heldCheck);
      this.#heldCheck = undefined;
    }
  }

  /** Closes a newcomer no slot could be found for: logged with 0 bytes. */
  #turnAway({ conn, clientId, source }: Newcomer): void {
    this.#stats.cutoffs.turned_away++;
    this.#clientLines.report(
      "turned_away",
      `client ${clientId}: ${turnedAwayText(source, this.#verdictOptions)}`,
    );
    conn.close();
    this.#stats.recordDuration(0);
    this.#logClient(clientId, 0);
  }

  /** Lets timers and socket polling run; see ACCEPTS_PER_YIELD. */
  async #timerTurn(): Promise<void> {
    this.#acceptsSinceYield = 0;
    await new Promise((resolve) => setTimeout(resolve, 0));
  }

  /** Waits until a client finishes, shutdown starts, or `ms` passed. */
  async #pauseAccepting(ms = ACCEPT_RETRY_MS): Promise<void> {
    await new Promise<void>((resolve) => {
      const timer = ms === Infinity ? undefined : setTimeout(resolve, ms);
      this.#wakeAcceptLoop = () => {
        clearTimeout(timer);
        resolve();
      };
    });
    this.#wakeAcceptLoop = undefined;
  }

  async #serve(client: Client, early?: Uint8Array): Promise<void> {
    this.#clients.add(client);
    this.#admission.admit(client);
    const { conn } = client;
    const budget = this.#budget;
    try {
      // Read to EOF here, not in an async helper awaited from here: every
      // idle client waits in this loop, and a second suspended async
      // function per client cost 0.4 KiB each (bench/idle_memory.ts).
      let chunk = early === undefined || this.#takeEarly(client, early)
        ? this.#allocate(client, FIRST_CHUNK_BYTES)
        : undefined;
      let filled = 0;
      while (chunk !== undefined) {
        const n = await conn.read(
          filled === 0 ? chunk : chunk.subarray(filled),
        );
        if (n === null) {
          client.eofAt = performance.now();
          if (!client.evicted) budget.keepLast(client, chunk, filled);
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
        this.#clientLines.report(
          "reset",
          `client ${client.clientId}: ${describe(error)}`,
        );
      }
    } finally {
      budget.releaseAll(client);
      if (client.cutOffReason === undefined) conn.close();
      this.#clients.delete(client);
      this.#admission.leave(client);
      if (this.#held.length > 0) this.#serveHeld();
      this.#stats.recordDuration(
        (performance.now() - client.acceptedAt) / 1000,
      );
      this.#logClient(client.clientId, client.bytesReceived);
      this.#wakeAcceptLoop?.();
      if (this.#stopping) this.#resolveIfAllServed();
    }
  }

  /**
   * Keeps the client's bytes that came in one read with its PROXY header
   * as its first chunk; false if that cut it off.
   */
  #takeEarly(client: Client, early: Uint8Array): boolean {
    const chunk = this.#allocate(client, early.length);
    if (chunk === undefined) return false;
    chunk.set(early.subarray(0, chunk.length));
    client.chunks.push(chunk);
    return this.#count(client, early.length);
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
        client.bytesSent += n;
        client.lastActivity = performance.now();
      }
      // Evicted while this write completed: its buffers are already gone.
      if (client.evicted) return;
      // Free each chunk once it is sent rather than holding all to the end.
      chunks[i] = EMPTY;
      this.#budget.free(client, chunk);
    }
  }

  /** A new read chunk, or undefined (client cut off) if over a limit. */
  #allocate(client: Client, size: number): Uint8Array | undefined {
    // Cut off (or evicted) while a read completed: it gets no more.
    if (client.cutOffReason !== undefined) return undefined;
    // Never buffer more than one byte past the per-client limit.
    size = Math.min(size, this.#maxClientBytes + 1 - client.bytesReceived);
    let chunk = this.#budget.allocate(client, size);
    // ADMISSION: who loses memory. Others holding the most for the least
    // progress are evicted for this read; only if they hold too little is
    // the asking client the one cut off.
    if (chunk === undefined && this.#evictForMemory(client, size)) {
      chunk = this.#budget.allocate(client, size);
    }
    if (chunk === undefined) {
      this.#cutOff(
        client,
        "buffer_limit",
        `server buffer limit of ${this.#budget.maxBufferedBytes} bytes reached`,
      );
    }
    return chunk;
  }

  #cutOff(client: Client, kind: CutoffReason, reason: string): void {
    if (client.cutOffReason !== undefined) return;
    client.cutOffReason = reason;
    // Its slot is free now: its connection closes below.
    this.#admission.leave(client);
    this.#stats.cutoffs[kind]++;
    this.#clientLines.report(
      kind,
      `client ${client.clientId}: cut off after ${client.bytesReceived} bytes: ${reason}`,
    );
    // Closing with unread input makes the kernel send a reset, and rejects
    // any read or write still pending on the connection.
    client.conn.close();
  }

  /** Cuts `client` off for an admission verdict, worded by admission.ts. */
  #cutOffFor(client: Client, verdict: AdmissionReason, now: number): void {
    this.#cutOff(
      client,
      verdict,
      verdictText(verdict, client, now, this.#verdictOptions),
    );
  }

  #cutOffAtShutdown(client: Client): void {
    this.#cutOff(client, "shutdown", "still connected at shutdown");
  }

  /**
   * The periodic sweep: cuts off clients idle or below a minimum rate, lets
   * unused spares go.
   */
  #sweep(): void {
    this.#budget.trimSpares();
    // ADMISSION: who is cut off for making too little progress: idle,
    // sending below minRate, reading below minReadRate (admission.ts).
    // Monotonic: a wall-clock jump must not cut everyone off.
    const now = performance.now();
    for (const client of this.#clients) {
      const verdict = this.#admission.check(client, now);
      if (verdict !== undefined) {
        this.#cutOffFor(client, verdict, now);
      }
    }
  }

  /**
   * At maxConnections with a newcomer from `source` accepted: evicts a
   * client for it; false if admission.ts finds none to evict.
   */
  #evictForSlot(source: string, waitedMs = 0): boolean {
    const now = performance.now();
    const victim = this.#admission.slotVictim(source, now, { waitedMs });
    if (victim === undefined) return false;
    this.#cutOff(
      victim,
      "slot_eviction",
      verdictText("slot_eviction", victim, now, {
        ...this.#verdictOptions,
        newcomerSource: source,
      }),
    );
    return true;
  }

  /**
   * Evicts the other clients holding the most buffer for the least
   * progress until `size` more bytes fit; false (nobody evicted) if they
   * hold too little. Their buffers are let go at once, so the read that
   * asked fits now.
   */
  #evictForMemory(asking: Client, size: number): boolean {
    const needed = this.#budget.bufferedBytes + size -
      this.#budget.maxBufferedBytes;
    const now = performance.now();
    const victims = this.#admission.memoryVictims(
      this.#clients,
      asking,
      needed,
      now,
    );
    if (victims === undefined) return false;
    for (const victim of victims) {
      this.#cutOffFor(victim, "memory_eviction", now);
      // Its pending read or write is rejected by the close; nothing of its
      // chunks is used again.
      this.#budget.releaseAll(victim);
      victim.evicted = true;
    }
    return true;
  }

  #logClient(clientId: number, bytesReceived: number): void {
    try {
      this.#onClientDone(clientId, bytesReceived);
    } catch (error) {
      this.#stats.reportErrors++;
      this.#clientLines.report(
        "not_logged",
        `client ${clientId}: could not be logged: ${describe(error)}`,
      );
    }
  }

  /** Numbers the next accepted client: instance, instance + instances, ... */
  #nextClientId(): number {
    return this.#firstClientId + this.#clientIdStep * this.#clientsAccepted++;
  }

  get connections(): number {
    return this.#clients.size;
  }

  get clientsAccepted(): number {
    return this.#clientsAccepted;
  }

  get bufferedBytes(): number {
    return this.#budget.bufferedBytes;
  }

  get limits(): ServerLimits {
    return {
      maxConnections: this.#maxConnections,
      maxBufferedBytes: this.#budget.maxBufferedBytes,
      maxClientBytes: this.#maxClientBytes,
    };
  }

  get spareBufferBytes(): number {
    return this.#budget.spareBytes;
  }

  get stats(): EchoStats {
    return this.#stats;
  }

  shutdown(options: ShutdownOptions = {}): Promise<void> {
    if (!this.#stopping) {
      this.#stopping = true;
      this.#listener.close();
      // Never served: they are turned away, each with its line.
      this.#serveHeld();
      this.#wakeAcceptLoop?.();
      this.#resolveIfAllServed();
    }
    this.#drain.endWithin(options.drainTimeoutMs ?? DEFAULTS.drainTimeoutMs);
    return this.#drain.done.then(() => {
      clearInterval(this.#idleSweep);
      clearInterval(this.#headerCheck);
      this.#exhaustionLines.close();
      this.#clientLines.close();
    });
  }

  /** Once stopping, ends the drain when the accept loop has ended (so no
   * client can still be added) and every client has been logged. */
  #resolveIfAllServed(): void {
    if (
      this.#stopping && this.#acceptLoopDone && this.#clients.size === 0 &&
      this.#headerReaders === 0
    ) this.#drain.finish();
  }
}

// Reads go straight into chunks: FIRST_CHUNK_BYTES first (every idle
// client holds its first chunk), then growing with the payload up to 1 MiB
// (large reads for bulk); see nextChunkBytes in buffer_pool.ts.
// Out of fds or memory, accepting again waits for a client to finish, or
// this long if none does (the fds may be held by something else).
const ACCEPT_RETRY_MS = 100;
// While connections keep queuing, every accept succeeds at once and Deno
// may not poll the sockets for readiness (no epoll_wait for 22 s under
// strace): reads of new clients stayed pending with their bytes in the
// kernel until the idle timeout. A timer turn every this many accepts
// prevented it in every run; every 256 did not (bench/README.md). Accepts
// that fail because a client reset while queued count too: they also
// complete at once, and would hold off timers (idle sweep, drain) as long.
const ACCEPTS_PER_YIELD = 64;
// At maxConnections, newcomers of the biggest source with nobody of their
// own to evict wait, served first come first served as one can be, rather
// than be turned away at once: one turned away reconnects at once, and
// such a loop of attackers wins every slot the moment it frees, ahead of
// the honest clients of that source (bench --mix's slot-hogs beside good
// clients, all from one address, did: 364 good clients broken in a 2 s
// soak). At most this many wait (one fd each), each at most HOLD_MS.
// Beyond that, while one source holds every slot, the kernel's queue holds
// the rest (nobody of another source is there to wait behind it); else
// they are turned away at once.
const MAX_HELD = 64;
// How long a newcomer may wait for a slot (at most the eviction grace), and
// how often the waiting ones are looked at.
const HOLD_MS = 1000;
const HELD_CHECK_MS = 20;
// With the PROXY protocol on, a proxy sends its header as it connects: at
// most this many connections may be reading theirs at once (one fd and
// PROXY_HEADER_MAX_BYTES each), beyond which a newcomer cuts off the one
// that has waited longest, once that is SLOW_HEADER_MS; a newer one may be
// waiting only for the event loop to poll its socket.
const MAX_AWAITING_HEADER = 64;
const SLOW_HEADER_MS = 250;
const PROXY_HEADER_TIMEOUT_MS = 5000;
const HEADER_CHECK_MS = 100;
// Lines about single clients (resets, cut-offs, unknown accept errors, log
// write failures), at most 10 a second; the rest are counted by kind into
// one line at the second's end. Resets are cheap for a client to cause, and
// a line each would let clients flood stderr; stats has every count.
// Out of fds, at most one line a second, the same way.
const CLIENT_LINES_PER_SECOND = 10;

/** Called once for every accepted client, however its connection ended. */
export type ClientDone = (clientId: number, bytesReceived: number) => void;

/**
 * Options for {@linkcode serveEcho}; the admission rules' and the buffer
 * budget's are theirs (admission.ts, buffer_pool.ts).
 */
export interface ServeOptions extends
  Pick<
    AdmissionOptions,
    | "idleTimeoutMs"
    | "minRate"
    | "minRateGraceMs"
    | "minReadRate"
    | "evictionGraceMs"
  >,
  Pick<BufferBudgetOptions, "maxBufferedBytes"> {
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
   * Connections served at once. At the limit every newcomer is accepted
   * and decided at once (admission.ts): a client of the biggest source is
   * evicted for a newcomer of a smaller one; a newcomer of the biggest
   * source takes the slot of one of its own past its grace
   * ({@linkcode ServeOptions.evictionGraceMs}), or waits up to 1 s for one
   * and is turned away. With eviction off the kernel's queue holds the
   * rest.
   *
   * @default {16384}
   */
  maxConnections?: number;
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
   * Turns the PROXY protocol on: every connection must begin with a PROXY
   * header (v1 or v2), accepted only from these addresses; the header's
   * source address is the client's (admission's source, stderr lines). A
   * connection from elsewhere, without a header, with a malformed one or
   * one not complete within
   * {@linkcode ServeOptions.proxyHeaderTimeoutMs} is cut off, logged with
   * 0 bytes (stderr names the bytes it read).
   *
   * @default {undefined: off}
   */
  proxyProtocol?: AddressRanges;
  /**
   * With {@linkcode ServeOptions.proxyProtocol}: how long a connection may
   * take to send its PROXY header, in milliseconds.
   *
   * @default {5000}
   */
  proxyHeaderTimeoutMs?: number;
  /**
   * Receives one-line diagnostics (cut-offs, resets). Those about single
   * clients come at most 10 a second; the rest are counted into one line
   * at the end of the second.
   *
   * @default {console.error}
   */
  onDiagnostic?: (message: string) => void;
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
  /** The limits it runs with, to show how close it is to each. */
  readonly limits: ServerLimits;
  /** Running totals: bytes, cut-offs, accept errors, durations. */
  readonly stats: EchoStats;
  /**
   * Stops accepting, lets clients in flight finish within the drain timeout,
   * cuts off the rest, and resolves once every client has been logged.
   */
  shutdown(options?: ShutdownOptions): Promise<void>;
}

/** The limits of an {@linkcode EchoServer}, defaults applied. */
export interface ServerLimits {
  /** {@linkcode ServeOptions.maxConnections}. */
  readonly maxConnections: number;
  /** {@linkcode ServeOptions.maxBufferedBytes}. */
  readonly maxBufferedBytes: number;
  /** {@linkcode ServeOptions.maxClientBytes}. */
  readonly maxClientBytes: number;
}

/** A newcomer accepted at maxConnections, before it is served. */
interface Newcomer {
  readonly conn: Deno.TcpConn;
  readonly clientId: number;
  readonly source: string;
  /** Its bytes that came in one read with its PROXY header. */
  readonly early: Uint8Array | undefined;
  /** When it was accepted. */
  readonly since: number;
}

/**
 * Per-connection state, one object so the sweep can see every client; the
 * progress fields are what admission.ts judges.
 */
class Client implements BufferHolder, ClientProgress {
  bytesReceived = 0;
  bytesSent = 0;
  /** Buffer capacity this client holds, counted against maxBufferedBytes. */
  bufferedBytes = 0;
  lastActivity: number;
  eofAt: number | undefined = undefined;
  burstStart = 0;
  lastBurst = 0;
  windowStart: number;
  windowMoved = 0;
  windowRate = -1;
  cutOffReason: string | undefined = undefined;
  /** Evicted for memory: its buffers were let go then, none since. */
  evicted = false;
  chunks: Uint8Array[] = [];
  readonly acceptedAt: number;

  constructor(
    readonly conn: Deno.TcpConn,
    readonly clientId: number,
    /** Its source (admission.ts `sourceKey`): whose slots it counts against. */
    readonly source: string,
  ) {
    this.acceptedAt = this.lastActivity = this.windowStart = performance.now();
  }
}

/**
 * Why a connection that stopped before a complete PROXY header is cut off:
 * the parser's verdict, or its end after `bytesRead` bytes.
 */
function headerRefusal(
  parse: Exclude<ProxyHeaderParse, { status: "complete" }>,
  bytesRead: number,
): [CutoffReason, string] {
  if (parse.status === "invalid") {
    return [
      parse.reason === "missing" ? "proxy_missing" : "proxy_malformed",
      parse.message,
    ];
  }
  return bytesRead === 0
    ? ["proxy_missing", "closed before sending a PROXY header"]
    : ["proxy_malformed", "closed in the middle of its PROXY header"];
}

/** A connection reading its PROXY header. */
interface AwaitingHeader {
  readonly conn: Deno.TcpConn;
  /** When it was accepted. */
  readonly since: number;
  /** Why it was closed while it read, once it was. */
  end: [CutoffReason, string] | undefined;
}

const EMPTY = new Uint8Array(0);
