/**
 * A pool of spare byte buffers in power-of-two sizes.
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
