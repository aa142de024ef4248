// The admission policy (admission.ts) as the server applies it, over real
// sockets: eviction at maxConnections and maxBufferedBytes, the minimum
// send rate, the minimum read rate on the write side. Limits and windows
// are scaled down through the options so each test takes a few seconds.
import assert from "node:assert/strict";
import {
  echo,
  pattern,
  readAll,
  sameBytes,
  stallingBytes,
  startServer,
  type TestServer,
  waitUntil,
  within,
  writeAll,
} from "./test_util.ts";

const HOST = "127.0.0.1";
const MIB = 1024 * 1024;

/** A new client's `payload` comes back whole within 10 s. */
async function assertEchoedWithin10s(
  port: number,
  payload: Uint8Array,
  what: string,
): Promise<void> {
  const reply = await within(echo(port, payload), 10_000, what);
  assert.ok(sameBytes(reply, payload), `got ${reply.length} bytes`);
}

/** Reads until the server ends the connection, by EOF or a reset. */
async function readUntilClosed(conn: Deno.TcpConn): Promise<void> {
  const buffer = new Uint8Array(64 * 1024);
  try {
    while (await conn.read(buffer) !== null);
  } catch (error) {
    if (!(error instanceof Deno.errors.ConnectionReset)) throw error;
  }
}

/** Clients that each sent `bytes` bytes and then hold their connection. */
async function holders(
  s: TestServer,
  count: number,
  bytes: number,
): Promise<Deno.TcpConn[]> {
  const conns: Deno.TcpConn[] = [];
  for (let i = 0; i < count; i++) {
    const conn = await Deno.connect({ hostname: HOST, port: s.port });
    conns.push(conn);
    await writeAll(conn, pattern(bytes, 100 + i));
  }
  return conns;
}

Deno.test("serveEcho() at maxConnections evicts a client that sent a byte and serves a newcomer at once", async () => {
  await using s = startServer({ maxConnections: 4, evictionGraceMs: 200 });
  const held = await holders(s, 4, 1);
  try {
    await waitUntil(() => s.server.connections === 4, "4 clients held");
    // Today's server leaves this client in the kernel's queue until a slot
    // frees, which the held clients never do (they sent a byte each).
    const payload = pattern(5, 1);
    await assertEchoedWithin10s(s.port, payload, "the good client echoed");
    await waitUntil(() => s.records.length === 2, "both ends reported");
    // One held client lost its slot; the other three keep theirs.
    assert.equal(s.server.connections, 3);
  } finally {
    for (const conn of held) conn.close();
  }
  await s.server.shutdown({ drainTimeoutMs: 0 });
  assert.equal(s.server.stats.cutoffs.slot_eviction, 1);
  assert.match(
    s.diagnostics[0],
    /^client [1-4]: cut off after 1 bytes: evicted for a newcomer at the limit of 4 connections/,
  );
  // Every client has its one record; the evicted one with its 1 byte.
  assert.equal(s.records.length, 5);
  assert.deepEqual(s.records.filter(([id]) => id === 5), [[5, 5]]);
});

Deno.test("serveEcho() at maxConnections waits while every slot is in its grace", async () => {
  await using s = startServer({ maxConnections: 1, evictionGraceMs: 60_000 });
  const [held] = await holders(s, 1, 1);
  try {
    await waitUntil(() => s.server.connections === 1, "1 client held");
    const second = echo(s.port, pattern(3, 2));
    await held.closeWrite();
    assert.equal((await readAll(held)).length, 1);
    assert.ok(sameBytes(await second, pattern(3, 2)));
  } finally {
    held.close();
  }
  await s.server.shutdown();
  assert.equal(s.server.stats.cutoffs.slot_eviction, 0);
  assert.deepEqual(s.records, [[1, 1], [2, 3]]);
});

Deno.test("serveEcho() at maxConnections never serves a newcomer past the limit when the evictable client moved since", async () => {
  // After its first byte, a client still sending leaves its grace after
  // evictionGraceMs / 8 = 1 s of silence and re-enters it when it sends
  // again; one that sent nothing keeps the whole 8 s.
  await using s = startServer({ maxConnections: 2, evictionGraceMs: 8000 });
  const [held] = await holders(s, 1, 1);
  const silent = await Deno.connect({ hostname: HOST, port: s.port });
  try {
    await waitUntil(() => s.server.stats.receivedBytes === 1, "1 byte read");
    await waitUntil(() => s.server.connections === 2, "2 clients held");
    // The rule's own clock: once the first has been silent for 1 s the
    // server accepts again, to evict it for whoever comes next.
    const silentSince = performance.now();
    await waitUntil(
      () => performance.now() - silentSince > 1500,
      "1.5 s of silence",
    );
    await writeAll(held, new Uint8Array([1]));
    await waitUntil(() => s.server.stats.receivedBytes === 2, "its byte read");
    // Both are in their grace now: the newcomer waits until the first is
    // not, then takes its slot; it is not served beside them.
    const payload = pattern(5, 8);
    await assertEchoedWithin10s(s.port, payload, "the newcomer echoed");
    assert.equal(s.server.stats.cutoffs.slot_eviction, 1);
    assert.match(s.diagnostics[0], /^client 1: cut off after 2 bytes: evicted/);
  } finally {
    held.close();
    silent.close();
  }
  await s.server.shutdown({ drainTimeoutMs: 0 });
  assert.deepEqual(s.records.toSorted(([a], [b]) => a - b), [
    [1, 2],
    [2, 0],
    [3, 5],
  ]);
});

Deno.test("serveEcho() at maxBufferedBytes evicts the clients holding the most for the least progress and serves 1 MiB", async () => {
  await using s = startServer({
    maxBufferedBytes: 4 * MIB,
    // The hogs must be past their grace when the newcomer asks; the
    // newcomer itself is never a candidate.
    evictionGraceMs: 1,
  });
  // Two hogs hold ~3.4 MiB of the 4 MiB and then send nothing.
  const held = await holders(s, 2, 1.5 * MIB);
  try {
    await waitUntil(
      () => s.server.stats.receivedBytes === 3 * MIB,
      "the hogs' bytes read",
    );
    // Today the newcomer is the one cut off ("server buffer limit reached").
    const payload = pattern(MIB, 7);
    await assertEchoedWithin10s(s.port, payload, "the 1 MiB client echoed");
    await waitUntil(
      () => s.records.length >= 2,
      "a hog and the newcomer reported",
    );
  } finally {
    for (const conn of held) conn.close();
  }
  await s.server.shutdown({ drainTimeoutMs: 0 });
  assert.ok(s.server.stats.cutoffs.memory_eviction >= 1);
  assert.equal(s.server.stats.cutoffs.buffer_limit, 0);
  assert.ok(
    s.diagnostics.some((line) =>
      /evicted: server buffer limit of 4194304 bytes reached/.test(line)
    ),
    s.diagnostics.join("\n"),
  );
});

Deno.test("serveEcho() cuts off a client sending below minRate once minRateGraceMs is over", async () => {
  // The idle timeout alone never fires: the client is not idle for 30 s.
  await using s = startServer({ minRate: 1000, minRateGraceMs: 300 });
  const conn = await Deno.connect({ hostname: HOST, port: s.port });
  try {
    await writeAll(conn, new Uint8Array([1]));
    await within(readUntilClosed(conn), 10_000, "the trickler cut off");
  } finally {
    conn.close();
  }
  await s.server.shutdown();
  assert.deepEqual(s.records, [[1, 1]]);
  assert.equal(s.server.stats.cutoffs.min_rate, 1);
  assert.match(
    s.diagnostics.join("\n"),
    /client 1: cut off after 1 bytes: sent below the minimum rate of 1000 B\/s/,
  );
});

Deno.test("serveEcho() serves a client sending at exactly minRate", async () => {
  const rate = 4000; // bytes per second
  await using s = startServer({ minRate: rate, minRateGraceMs: 300 });
  const payload = pattern(6000, 3);
  // Paced by the clock, not by counting timer turns: whatever the
  // machine's delays, it has sent rate * elapsed bytes at each step.
  async function* atRate() {
    const start = performance.now();
    for (let sent = 0; sent < payload.length;) {
      const due = Math.min(
        payload.length,
        Math.floor(rate * (performance.now() - start) / 1000),
      );
      if (due > sent) {
        yield payload.subarray(sent, due);
        sent = due;
      }
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }
  assert.ok(sameBytes(await echo(s.port, atRate()), payload));
  await s.server.shutdown();
  assert.deepEqual(s.records, [[1, 6000]]);
  assert.deepEqual(s.diagnostics, []);
});

Deno.test("serveEcho() serves a reader at minReadRate whose writes complete further apart than idleTimeoutMs", async () => {
  // Scaled from 16 KiB/s and 30 s: the kernel takes ~4 MiB at once, then
  // wakes the writer only after ~1.3 MiB drained, 0.65 s at 2 MiB/s, so the
  // idle clock alone (300 ms) cuts this reader off.
  const rate = 2 * MIB;
  await using s = startServer({ idleTimeoutMs: 300, minReadRate: rate });
  const payload = pattern(6 * MIB, 4);
  const conn = await Deno.connect({ hostname: HOST, port: s.port });
  try {
    await writeAll(conn, payload);
    await conn.closeWrite();
    // Paced by the clock: it has read at most rate * elapsed bytes.
    const reply = new Uint8Array(payload.length);
    const start = performance.now();
    let received = 0;
    while (received < reply.length) {
      const due = Math.min(
        reply.length,
        Math.floor(rate * (performance.now() - start) / 1000),
      );
      if (due <= received) {
        await new Promise((resolve) => setTimeout(resolve, 20));
        continue;
      }
      const n = await conn.read(reply.subarray(received, due));
      if (n === null) break;
      received += n;
    }
    assert.equal(received, payload.length);
    assert.equal(await conn.read(new Uint8Array(1)), null);
    assert.ok(sameBytes(reply, payload));
  } finally {
    conn.close();
  }
  await s.server.shutdown();
  assert.deepEqual(s.records, [[1, 6 * MIB]]);
  assert.deepEqual(s.diagnostics, []);
});

Deno.test("serveEcho() still lets go a client that stops reading its echo", async () => {
  await using s = startServer({ idleTimeoutMs: 300, minReadRate: 2 * MIB });
  const conn = await Deno.connect({ hostname: HOST, port: s.port });
  try {
    await writeAll(conn, pattern(8 * MIB, 5));
    await conn.closeWrite();
    // The client reads nothing; the server must give up within
    // idleTimeoutMs plus what the kernels took at 2 MiB/s.
    await waitUntil(() => s.records.length === 1, "the reader let go", 20_000);
  } finally {
    conn.close();
  }
  await s.server.shutdown();
  assert.deepEqual(s.records, [[1, 8 * MIB]]);
  assert.equal(s.server.stats.cutoffs.slow_reader, 1);
  assert.match(
    s.diagnostics.join("\n"),
    /client 1: cut off after 8388608 bytes: read its echo below the minimum rate of 2097152 B\/s/,
  );
});

Deno.test("serveEcho() lets go a reader that read fast and then stalled within idleTimeoutMs + 4 MiB / minReadRate of its last write", async () => {
  // Scaled from 30 s and 16 KiB/s: 300 ms + 4 MiB / 2 MiB/s = 2.3 s after
  // the last write the kernel took. Credited with all the kernels took
  // since the half-close (32 MiB read at once, plus their buffers), it was
  // held over 16 s, past the wait below.
  const rate = 2 * MIB;
  const readFast = 32 * MIB;
  const size = readFast + await stallingBytes();
  await using s = startServer({
    idleTimeoutMs: 300,
    minReadRate: rate,
    maxClientBytes: size,
    maxBufferedBytes: 2 * size,
  });
  const payload = pattern(size, 6);
  const conn = await Deno.connect({ hostname: HOST, port: s.port });
  try {
    await writeAll(conn, payload);
    await conn.closeWrite();
    const buffer = new Uint8Array(MIB);
    let received = 0;
    while (received < readFast) {
      const n = await conn.read(buffer);
      assert.notEqual(n, null, "the echo ended early");
      received += n!;
    }
    // Then it reads nothing more.
    await waitUntil(() => s.records.length === 1, "the reader let go", 10_000);
  } finally {
    conn.close();
  }
  await s.server.shutdown();
  assert.deepEqual(s.records, [[1, size]]);
  assert.equal(s.server.stats.cutoffs.slow_reader, 1);
  assert.match(
    s.diagnostics.join("\n"),
    /client 1: cut off after \d+ bytes: read its echo below the minimum rate of 2097152 B\/s \(no write taken for [\d.]+ s after a burst of \d+ bytes\)/,
  );
});
