/**
 * The payload pattern the load clients send and verify: a pseudo-random
 * byte sequence, repeating with a prime period so it never lines up with a
 * server's chunks. Each connection starts at its own offset ({@linkcode phaseOf}),
 * so a reply that carries another client's bytes is caught too.
 *
 * @module
 */

/** Length of one period of the pattern: a prime. */
export const PATTERN_PERIOD = 65521;
/** Longest slice {@linkcode patternSlice} hands out, and most bytes verified at once. */
export const CHUNK_BYTES = 256 * 1024;
/** The pattern, plus one more chunk of it so any chunk-long window is contiguous. */
const PATTERN = makePattern(PATTERN_PERIOD, CHUNK_BYTES);

function makePattern(period: number, extra: number): Uint8Array {
  const pattern = new Uint8Array(period + extra);
  let x = 0x9e3779b9; // xorshift32
  for (let i = 0; i < period; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    pattern[i] = x >>> 24;
  }
  for (let i = period; i < pattern.length; i += period) {
    pattern.copyWithin(i, 0, Math.min(period, pattern.length - i));
  }
  return pattern;
}

/**
 * Where in the pattern connection `seq`'s payload starts.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * assert.notEqual(phaseOf(0), phaseOf(1));
 * assert.ok(phaseOf(7) < PATTERN_PERIOD);
 * ```
 */
export function phaseOf(seq: number): number {
  return (Math.imul(seq + 1, 0x9e3779b1) >>> 0) % PATTERN_PERIOD;
}

/**
 * Bytes `offset` to `offset + length` of the payload that starts at pattern
 * offset `phase`; `length` is at most {@linkcode CHUNK_BYTES}. The result is
 * a view of shared memory: do not change it.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const whole = patternSlice(3, 0, 10);
 * assert.deepEqual(patternSlice(3, 4, 6), whole.subarray(4));
 * ```
 */
export function patternSlice(
  phase: number,
  offset: number,
  length: number,
): Uint8Array {
  if (length > CHUNK_BYTES) {
    throw new RangeError(`at most ${CHUNK_BYTES} bytes at once, not ${length}`);
  }
  const from = (phase + offset) % PATTERN_PERIOD;
  return PATTERN.subarray(from, from + length);
}

/**
 * The pattern as 32-bit words, four times: `WORDS[s]` starts at pattern byte
 * `s`, so any pattern offset can be compared a word at a time.
 */
const WORDS = [0, 1, 2, 3].map((shift) => {
  const bytes = new Uint8Array(Math.ceil(PATTERN.length / 4) * 4);
  bytes.set(PATTERN.subarray(shift));
  return new Int32Array(bytes.buffer);
});

/**
 * A read buffer that checks what was read against the pattern a word at a
 * time.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const buffer = new PatternBuffer(64);
 * buffer.bytes.set(patternSlice(5, 100, 10));
 * assert.equal(buffer.firstDifference(10, 5, 100), -1);
 * buffer.bytes[3] ^= 1;
 * assert.equal(buffer.firstDifference(10, 5, 100), 3);
 * ```
 */
export class PatternBuffer {
  /** The memory to read into. */
  readonly bytes: Uint8Array;
  readonly #words: Int32Array;

  /** A buffer of `size` bytes, at most {@linkcode CHUNK_BYTES}. */
  constructor(size: number) {
    if (size > CHUNK_BYTES) {
      throw new RangeError(`at most ${CHUNK_BYTES} bytes, not ${size}`);
    }
    this.bytes = new Uint8Array(size);
    this.#words = new Int32Array(this.bytes.buffer, 0, size >>> 2);
  }

  /**
   * Index of the first of the buffer's first `n` bytes that differs from
   * the payload of `phase` at `offset`, or -1 if they all match.
   */
  firstDifference(n: number, phase: number, offset: number): number {
    const from = (phase + offset) % PATTERN_PERIOD;
    const want = WORDS[from & 3];
    const base = from >>> 2;
    const count = n >>> 2;
    const words = this.#words;
    let w = 0;
    while (w < count && words[w] === want[base + w]) w++;
    const got = this.bytes;
    for (let i = w * 4; i < n; i++) {
      if (got[i] !== PATTERN[from + i]) return i;
    }
    return -1;
  }

  /** What the payload of `phase` has at `offset`: for messages. */
  static expected(phase: number, offset: number): number {
    return PATTERN[(phase + offset) % PATTERN_PERIOD];
  }
}
