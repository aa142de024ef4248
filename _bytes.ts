/**
 * Byte plumbing shared by the client tools, the stderr writer and the
 * tests: write all of a buffer, read a connection to EOF, join chunks.
 * Internal (leading underscore): not part of the package's surface.
 *
 * @module
 */

/**
 * Writes all of `bytes` to `conn`, however many writes that takes.
 *
 * @example
 * ```ts ignore
 * using conn = await Deno.connect({ port: 4000 });
 * await writeAll(conn, new Uint8Array(1024 * 1024));
 * ```
 */
export async function writeAll(
  conn: Deno.Conn,
  bytes: Uint8Array,
): Promise<void> {
  for (let written = 0; written < bytes.length;) {
    written += await conn.write(bytes.subarray(written));
  }
}

/**
 * Reads `conn` to EOF (`read()` until null, which leaves it open) and
 * returns every byte read.
 *
 * @example
 * ```ts ignore
 * using conn = await Deno.connect({ port: 4000 });
 * await conn.closeWrite();
 * const reply = await readAll(conn);
 * ```
 */
export async function readAll(conn: Deno.Conn): Promise<Uint8Array> {
  const chunks: Uint8Array[] = [];
  const buffer = new Uint8Array(64 * 1024);
  for (let n; (n = await conn.read(buffer)) !== null;) {
    chunks.push(buffer.slice(0, n));
  }
  return concat(chunks);
}

/**
 * The chunks joined into one array (the chunk itself if there is one).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const joined = concat([new Uint8Array([1, 2]), new Uint8Array([3])]);
 * assert.deepEqual([...joined], [1, 2, 3]);
 * ```
 */
export function concat(chunks: Uint8Array[]): Uint8Array {
  if (chunks.length === 1) return chunks[0];
  let length = 0;
  for (const chunk of chunks) length += chunk.length;
  const all = new Uint8Array(length);
  let offset = 0;
  for (const chunk of chunks) {
    all.set(chunk, offset);
    offset += chunk.length;
  }
  return all;
}
