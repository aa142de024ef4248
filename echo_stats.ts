/**
 * The running totals behind `/metrics`: bytes, cut-offs by reason, accept
 * errors by kind, and a histogram of how long clients stayed. Kept apart
 * from the server so that what is counted (and the bucket bounds metrics.ts
 * exposes) reads in one place; the server only increments plain numbers in
 * place, which is why the counters are public fields and not methods.
 *
 * @module
 */

import type { AcceptErrorKind } from "./accept_errors.ts";
import type { AdmissionReason } from "./admission.ts";

/**
 * Why a client was cut off, as counted in {@linkcode EchoStats.cutoffs}:
 * over `maxClientBytes`, over `maxBufferedBytes` with nobody to evict, one
 * of admission.ts's rules (idle too long, sending below `minRate`, reading
 * its echo below `minReadRate`, evicted for a newcomer at
 * `maxConnections` or for memory at `maxBufferedBytes`), still connected
 * when the drain ran out, its connection failed under the server (almost
 * always a reset by the client), or turned away at `maxConnections` (its
 * source the biggest, none of its own past the grace); with the PROXY
 * protocol on, a connection from an address not trusted to send a header,
 * one that does not begin with a header, one with a malformed header, or
 * one whose header was not complete in time.
 */
export type CutoffReason =
  | "client_limit"
  | "buffer_limit"
  | AdmissionReason
  | "shutdown"
  | "reset"
  | "turned_away"
  | "proxy_untrusted"
  | "proxy_missing"
  | "proxy_malformed"
  | "proxy_timeout";

/**
 * A PROXY protocol header that was accepted, by version and command:
 * `proxy` carried the client's address, `local` (v2 LOCAL, v1 UNKNOWN) the
 * proxy's own connection, such as a health check.
 */
export type ProxyHeaderKind = "v1_proxy" | "v1_local" | "v2_proxy" | "v2_local";

/**
 * What a stderr line about a single client was about, as the summary of
 * lines held back counts it: a cut-off, an accept error nobody could sort,
 * or a client whose log line could not be written.
 */
export type ClientLineKind = CutoffReason | "accept_unknown" | "not_logged";

/**
 * Every {@linkcode ClientLineKind}, in the order a summary lists them.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * assert.equal(CLIENT_LINE_KINDS[0], "reset");
 * ```
 */
export const CLIENT_LINE_KINDS: readonly ClientLineKind[] = [
  "reset",
  "client_limit",
  "buffer_limit",
  "idle",
  "min_rate",
  "slow_reader",
  "slot_eviction",
  "memory_eviction",
  "turned_away",
  "proxy_untrusted",
  "proxy_missing",
  "proxy_malformed",
  "proxy_timeout",
  "shutdown",
  "accept_unknown",
  "not_logged",
];

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
 * numbers incremented in place. Read them through `EchoServer.stats`.
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
  /** PROXY protocol headers accepted, by version and command. */
  readonly proxyHeaders: Readonly<Record<ProxyHeaderKind, number>>;
}

/**
 * The counters behind {@linkcode EchoStats}, mutable for the server that
 * keeps them and read-only to everyone it hands them to.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const stats = new EchoCounters();
 * stats.receivedBytes += 5;
 * stats.recordDuration(0.0002);
 * assert.equal(stats.durationCounts[1], 1);
 * assert.equal(stats.durationSecondsSum, 0.0002);
 * ```
 */
export class EchoCounters implements EchoStats {
  /** Bytes read from clients. */
  receivedBytes = 0;
  /** Bytes written back to clients. */
  sentBytes = 0;
  /** Clients cut off, by reason. */
  cutoffs: Record<CutoffReason, number> = {
    client_limit: 0,
    buffer_limit: 0,
    idle: 0,
    min_rate: 0,
    slow_reader: 0,
    slot_eviction: 0,
    memory_eviction: 0,
    shutdown: 0,
    reset: 0,
    turned_away: 0,
    proxy_untrusted: 0,
    proxy_missing: 0,
    proxy_malformed: 0,
    proxy_timeout: 0,
  };
  /** Failed accepts, by whose doing. */
  acceptErrors: Record<AcceptErrorKind, number> = {
    exhaustion: 0,
    client: 0,
    unknown: 0,
  };
  /** Served clients by duration bucket (see {@linkcode EchoStats}). */
  durationCounts: number[] = new Array(DURATION_BUCKETS_SECONDS.length + 1)
    .fill(0);
  /** The sum of those durations, in seconds. */
  durationSecondsSum = 0;
  /** Times `onClientDone` threw. */
  reportErrors = 0;
  /** PROXY protocol headers accepted, by version and command. */
  proxyHeaders: Record<ProxyHeaderKind, number> = {
    v1_proxy: 0,
    v1_local: 0,
    v2_proxy: 0,
    v2_local: 0,
  };

  /** Counts one served client that was connected for `seconds`. */
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
