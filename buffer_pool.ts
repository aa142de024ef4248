/**
 * The server's buffer memory: how big each client's read chunks are, the
 * budget they are counted against (`maxBufferedBytes`), and a pool of spare
 * chunks in power-of-two sizes reused between clients.
 *
 * The budget and the pool are one module because they are one account:
 * spares count against the same limit as live buffers, and live buffers win
 * over spares. Kept out of server.ts so the client path reads as "allocate,
 * read, keep, free" and the arithmetic is tested on plain data.
 *
 * The server reads every client into fresh chunks. A new `Uint8Array` is
 * zero-filled, and a dropped one holds its memory until V8's next garbage
 * collection, which comes late for memory outside the JS heap: under bulk
 * load that doubled the server's peak RSS. Reusing freed chunks avoids both.
 *
 * @module
 */

/** Options for {@linkcode BufferPool}. */
export interface BufferPoolOptions {
  /**
   * Most bytes kept in spare buffers.
   *
   * @default {64 * 1024 * 1024}
   */
  maxSpareBytes?: number;
}

/**
 * Hands out buffers, reusing ones given back. Only power-of-two sizes are
 * kept; a reused buffer still holds old bytes, so callers must only use what
 * they fill.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const pool = new BufferPool({ maxSpareBytes: 1024 * 1024 });
 * const chunk = pool.take(4096);
 * pool.give(chunk);
 * assert.equal(pool.take(4096), chunk);
 * ```
 */
export class BufferPool {
  #maxSpareBytes: number;
  /** Spare buffers by size, and whether that size was reused since trim. */
  #spares = new Map<number, { buffers: Uint8Array[]; reused: boolean }>();
  #spareBytes = 0;

  /** Creates an empty pool. */
  constructor(options: BufferPoolOptions = {}) {
    this.#maxSpareBytes = options.maxSpareBytes ?? 64 * 1024 * 1024;
  }

  /** Bytes held in spare buffers now. */
  get spareBytes(): number {
    return this.#spareBytes;
  }

  /** A buffer of `size` bytes, reused if one is spare, else a new one. */
  take(size: number): Uint8Array {
    const spares = this.#spares.get(size);
    const spare = spares?.buffers.pop();
    if (spare === undefined) return new Uint8Array(size);
    spares!.reused = true;
    this.#spareBytes -= size;
    return spare;
  }

  /**
   * Gives back the buffer under `chunk` (which may be a view of part of it)
   * for reuse. Kept only if its size is a power of two and the pool has room.
   */
  give(chunk: Uint8Array): void {
    const size = chunk.buffer.byteLength;
    if ((size & (size - 1)) !== 0 || size < 64) return;
    if (this.#spareBytes + size > this.#maxSpareBytes) return;
    let spares = this.#spares.get(size);
    if (spares === undefined) {
      this.#spares.set(size, spares = { buffers: [], reused: false });
    }
    spares.buffers.push(
      chunk.byteOffset === 0 && chunk.length === size
        ? chunk
        : new Uint8Array(chunk.buffer),
    );
    this.#spareBytes += size;
  }

  /**
   * Lets go of the spares of each size that was not reused since the last
   * call, so memory from a burst of large clients is given back once they
   * stop coming. Call it periodically.
   */
  trim(): void {
    for (const [size, spares] of this.#spares) {
      if (spares.reused) {
        spares.reused = false;
      } else {
        this.#spareBytes -= size * spares.buffers.length;
        this.#spares.delete(size);
      }
    }
  }

  /** Lets go of every spare. */
  clear(): void {
    this.#spares.clear();
    this.#spareBytes = 0;
  }
}

/**
 * Size of a client's first read chunk: small, because every idle client
 * holds its first chunk (a 4 KiB one doubled an idle client's cost).
 */
export const FIRST_CHUNK_BYTES = 64;
const MAX_CHUNK_BYTES = 1024 * 1024;
const MIN_GROWN_CHUNK_BYTES = 16 * 1024;

/**
 * The next chunk: an eighth of what was received so far, as a power of two
 * (so the pool can reuse it), from 16 KiB to 1 MiB. The unused end of the
 * last chunk is then never more than 1/8 of the payload (or 16 KiB), even
 * before EOF, so a client never holds much more than 1.125x its bytes.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * assert.equal(nextChunkBytes(64), 16 * 1024);
 * assert.equal(nextChunkBytes(1024 * 1024), 128 * 1024);
 * assert.equal(nextChunkBytes(1024 ** 3), 1024 * 1024);
 * ```
 */
export function nextChunkBytes(bytesReceived: number): number {
  const eighth = bytesReceived / 8;
  let size = MIN_GROWN_CHUNK_BYTES;
  while (size * 2 <= eighth && size < MAX_CHUNK_BYTES) size *= 2;
  return size;
}

/**
 * What the budget needs of one client: the capacity it holds, the bytes it
 * sent, and the chunks kept to write back. The server's per-client object
 * is one.
 */
export interface BufferHolder {
  /** Buffer capacity this holder owns, counted against the budget. */
  bufferedBytes: number;
  /** Bytes received so far (decides how tight the last chunk is kept). */
  readonly bytesReceived: number;
  /** Filled chunks kept, in order. */
  chunks: Uint8Array[];
}

/** Options for {@linkcode BufferBudget}. */
export interface BufferBudgetOptions {
  /**
   * Buffer memory held for all holders together, spares included.
   *
   * @default {512 * 1024 * 1024}
   */
  maxBufferedBytes?: number;
}

/**
 * Allocates, trims, recycles and releases chunks against one limit on the
 * bytes held by all clients together, reusing freed chunks through a
 * {@linkcode BufferPool} whose spares also count against the limit.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const budget = new BufferBudget({ maxBufferedBytes: 100 });
 * const client = { bufferedBytes: 0, bytesReceived: 0, chunks: [] };
 * const chunk = budget.allocate(client, 64)!;
 * assert.equal(budget.bufferedBytes, 64);
 * assert.equal(budget.allocate(client, 64), undefined); // over the limit
 * budget.keepLast(client, chunk, 0); // nothing read into it
 * assert.equal(budget.bufferedBytes, 0);
 * ```
 */
export class BufferBudget {
  #maxBufferedBytes: number;
  #bufferedBytes = 0;
  // Freed chunks are reused; spares left unused for a sweep period go.
  #pool = new BufferPool();

  /** Creates an empty budget. */
  constructor(options: BufferBudgetOptions = {}) {
    this.#maxBufferedBytes = options.maxBufferedBytes ?? 512 * 1024 * 1024;
  }

  /** The limit, in bytes. */
  get maxBufferedBytes(): number {
    return this.#maxBufferedBytes;
  }

  /** Bytes held by holders now. */
  get bufferedBytes(): number {
    return this.#bufferedBytes;
  }

  /** Bytes held in spare chunks now. */
  get spareBytes(): number {
    return this.#pool.spareBytes;
  }

  /**
   * A chunk of `size` bytes for `holder`, or undefined if it would pass the
   * limit. A reused chunk holds an earlier client's bytes: only the part a
   * read fills may be used.
   */
  allocate(holder: BufferHolder, size: number): Uint8Array | undefined {
    if (this.#bufferedBytes + size > this.#maxBufferedBytes) return undefined;
    this.#bufferedBytes += size;
    holder.bufferedBytes += size;
    const chunk = this.#pool.take(size);
    // Spares count against the limit too; live buffers win over them.
    if (this.#bufferedBytes + this.#pool.spareBytes > this.#maxBufferedBytes) {
      this.#pool.clear();
    }
    return chunk;
  }

  /** At EOF: keeps the last chunk's filled part, or frees it if empty. */
  keepLast(holder: BufferHolder, chunk: Uint8Array, filled: number): void {
    if (filled > 0) {
      holder.chunks.push(this.#trim(holder, chunk, filled));
    } else {
      this.release(holder, chunk.length);
      this.#recycle(chunk);
    }
  }

  /** Frees a chunk that has been written back. */
  free(holder: BufferHolder, chunk: Uint8Array): void {
    this.release(holder, chunk.buffer.byteLength);
    this.#recycle(chunk);
  }

  /** Takes `bytes` off what `holder` holds (all of it when it is done). */
  release(holder: BufferHolder, bytes: number): void {
    this.#bufferedBytes -= bytes;
    holder.bufferedBytes -= bytes;
  }

  /**
   * Takes off all `holder` holds and drops its chunks without reusing them
   * (a read or write may still be pending on one): when it is done, or
   * evicted for memory.
   */
  releaseAll(holder: BufferHolder): void {
    this.release(holder, holder.bufferedBytes);
    holder.chunks = [];
  }

  /** Lets spares unused since the last call go; call it periodically. */
  trimSpares(): void {
    this.#pool.trim();
  }

  /**
   * Keeps a partly filled last chunk, or a tight copy if much is unused. The
   * copy takes in a lone first chunk too, so a payload of a few KiB still
   * goes back in one write, not two.
   */
  #trim(holder: BufferHolder, chunk: Uint8Array, filled: number): Uint8Array {
    const unused = chunk.length - filled;
    if (unused <= holder.bytesReceived / 16) return chunk.subarray(0, filled);
    this.release(holder, unused);
    const { chunks } = holder;
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
}
