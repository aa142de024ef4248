import assert from "node:assert/strict";
import { BufferPool } from "./buffer_pool.ts";

Deno.test("BufferPool.take() hands out a buffer given back, for its size", () => {
  const pool = new BufferPool();
  const chunk = pool.take(4096);
  assert.equal(chunk.length, 4096);
  pool.give(chunk.subarray(0, 10)); // a view: the whole buffer is kept
  assert.equal(pool.spareBytes, 4096);
  assert.notEqual(pool.take(8192).buffer, chunk.buffer);
  const again = pool.take(4096);
  assert.equal(again.buffer, chunk.buffer);
  assert.equal(again.length, 4096);
  assert.equal(pool.spareBytes, 0);
  assert.notEqual(pool.take(4096).buffer, chunk.buffer);
});

Deno.test("BufferPool.give() keeps only power-of-two sizes, within maxSpareBytes", () => {
  const pool = new BufferPool({ maxSpareBytes: 8192 });
  pool.give(new Uint8Array(5000));
  assert.equal(pool.spareBytes, 0);
  pool.give(new Uint8Array(4096));
  pool.give(new Uint8Array(4096));
  pool.give(new Uint8Array(4096));
  assert.equal(pool.spareBytes, 8192);
});

Deno.test("BufferPool.trim() lets spares go only after a period without reuse", () => {
  const pool = new BufferPool();
  pool.give(new Uint8Array(1024));
  pool.give(new Uint8Array(1024));
  pool.take(1024);
  pool.trim(); // one was reused since the start: keep the other
  assert.equal(pool.spareBytes, 1024);
  pool.trim(); // none reused since the last trim
  assert.equal(pool.spareBytes, 0);
});

Deno.test("BufferPool.trim() keeps only the sizes reused since the last trim", () => {
  const pool = new BufferPool();
  pool.give(new Uint8Array(4096));
  pool.give(new Uint8Array(4096));
  pool.give(new Uint8Array(1 << 20));
  pool.trim(); // nothing reused yet: all go
  assert.equal(pool.spareBytes, 0);
  pool.give(new Uint8Array(4096));
  pool.give(new Uint8Array(4096));
  pool.give(new Uint8Array(1 << 20));
  pool.take(4096);
  pool.trim(); // 4 KiB was reused, 1 MiB was not
  assert.equal(pool.spareBytes, 4096);
});

Deno.test("BufferPool.clear() lets every spare go", () => {
  const pool = new BufferPool();
  pool.give(new Uint8Array(4096));
  pool.give(new Uint8Array(1 << 20));
  pool.clear();
  assert.equal(pool.spareBytes, 0);
  assert.equal(pool.take(4096).length, 4096);
});
