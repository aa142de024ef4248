import assert from "node:assert/strict";
import {
  defaultServers,
  formatTable,
  type IdleMemoryMeasurement,
  measureIdleMemory,
  parseIdleMemoryArgs,
} from "./idle_memory.ts";
import { serveBareEcho } from "./bare_echo.ts";
import { echo } from "../test_util.ts";

Deno.test("measureIdleMemory() measures the bare loop and the echo server; every idle connection gets an empty reply", async () => {
  const seen: string[] = [];
  const results = await measureIdleMemory({
    connections: 40,
    rounds: 1,
    onMeasurement: (m) => seen.push(m.name),
  });
  assert.deepEqual(seen, ["bare", "echo"]);
  assert.deepEqual(results.map((m) => [m.name, m.round]), [
    ["bare", 1],
    ["echo", 1],
  ]);
  for (const m of results) {
    assert.equal(m.connections, 40);
    assert.equal(m.emptyReplies, 40);
    assert.ok(m.rssBeforeKiB > 0 && m.rssAfterKiB > 0);
    // Arithmetic only: the figure itself is checked against a known cost in
    // the test after this one.
    assert.equal(m.kibPerConnection, (m.rssAfterKiB - m.rssBeforeKiB) / 40);
  }
});

// A deliberately costly server: 256 KiB, touched, held per connection
// until it echoes at EOF.
const HOG = `
const listener = Deno.listen({ hostname: "127.0.0.1", port: Number(Deno.args[0]) });
const held = new Set();
for await (const conn of listener) {
  (async () => {
    const hog = new Uint8Array(256 * 1024).fill(1);
    held.add(hog);
    const chunks = [];
    const buf = new Uint8Array(65536);
    for (let n; (n = await conn.read(buf)) !== null;) chunks.push(buf.slice(0, n));
    for (const c of chunks) for (let o = 0; o < c.length;) o += await conn.write(c.subarray(o));
    held.delete(hog);
    conn.close();
  })().catch(() => {});
}
`;

Deno.test("measureIdleMemory() finds the 256 KiB a connection a deliberately costly server holds", async () => {
  // The figure checked against a cost known beforehand, not re-derived from
  // the fields it is computed from.
  const [m] = await measureIdleMemory({
    connections: 40,
    rounds: 1,
    servers: [{
      name: "hog",
      command: [Deno.execPath(), "eval", HOG, "{port}"],
    }],
  });
  assert.equal(m.emptyReplies, 40);
  assert.ok(
    m.kibPerConnection >= 256 * 0.9 && m.kibPerConnection <= 256 * 2,
    `${m.kibPerConnection} KiB a connection`,
  );
});

Deno.test("measureIdleMemory() reports a server that exits before it accepts", async () => {
  await assert.rejects(
    measureIdleMemory({
      connections: 1,
      rounds: 1,
      servers: [{
        name: "broken",
        command: [Deno.execPath(), "eval", "console.error('no listener')"],
      }],
    }),
    /^Error: broken: exited before it accepted connections; its stderr ends:\nno listener$/,
  );
});

Deno.test("measureIdleMemory() refuses more connections than the open file limit allows", async () => {
  await assert.rejects(
    measureIdleMemory({ connections: 1_000_000_000, servers: [] }),
    /1000000000 connections need an open file limit of at least 1000000064, it is \d+: raise it first, e\.g\. `ulimit -n 1000000064`/,
  );
});

Deno.test("parseIdleMemoryArgs() adds --server commands after the defaults", () => {
  const options = parseIdleMemoryArgs([
    "--connections",
    "100",
    "--read-bytes",
    "4096",
    "--server",
    "old=deno run /tmp/old/main.ts --port {port} --log {log}",
  ]);
  assert.ok(options !== "help");
  assert.equal(options.connections, 100);
  assert.equal(options.rounds, 3);
  assert.deepEqual(options.servers?.map((s) => s.name), [
    "bare",
    "echo",
    "old",
  ]);
  assert.deepEqual(options.servers?.[0].command.slice(-2), [
    "--read-bytes",
    "4096",
  ]);
  assert.deepEqual(options.servers?.[2].command, [
    "deno",
    "run",
    "/tmp/old/main.ts",
    "--port",
    "{port}",
    "--log",
    "{log}",
  ]);
});

Deno.test("parseIdleMemoryArgs() rejects bad flags with one line", () => {
  for (
    const [args, message] of [
      [["--rounds", "0"], /^--rounds must be a whole number from 1 to 100/],
      [["--server", "nameless"], /^--server must be NAME=CMD, not 'nameless'$/],
      [["--server", "echo=cat"], /^--server name 'echo' is already taken$/],
      [["--bogus"], /^Unknown option '--bogus'/],
    ] as const
  ) {
    assert.throws(() => parseIdleMemoryArgs([...args]), (error: Error) => {
      assert.equal(error.name, "UsageError");
      assert.match(error.message, message);
      assert.ok(!error.message.includes("\n"));
      return true;
    });
  }
});

Deno.test("formatTable() gives each round's KiB per connection and the ratio to the first server", () => {
  const m = (
    name: string,
    round: number,
    kibPerConnection: number,
  ): IdleMemoryMeasurement => ({
    name,
    round,
    connections: 10,
    rssBeforeKiB: 0,
    rssAfterKiB: kibPerConnection * 10,
    kibPerConnection,
    slabKiBPerConnection: 7,
    emptyReplies: 10,
  });
  assert.equal(
    formatTable([m("bare", 1, 4.4), m("echo", 1, 4.62), m("bare", 2, 4.5)]),
    [
      "| round | bare KiB/conn | echo KiB/conn | echo/bare |",
      "| ----- | ------------- | ------------- | --------- |",
      "| 1     | 4.40          | 4.62          | 1.05x     |",
      "| 2     | 4.50          | -             | -         |",
    ].join("\n"),
  );
});

Deno.test("defaultServers() runs main.ts with the start task's V8 flags and the bare loop with its read size", () => {
  const [bare, echoServer] = defaultServers(128);
  assert.ok(bare.command.includes("--v8-flags=--max-semi-space-size=1"));
  assert.ok(echoServer.command.includes("--v8-flags=--max-semi-space-size=1"));
  assert.ok(bare.command.some((arg) => arg.endsWith("/bench/bare_echo.ts")));
  assert.deepEqual(bare.command.slice(-2), ["--read-bytes", "128"]);
  assert.ok(echoServer.command.some((arg) => arg.endsWith("/main.ts")));
});

Deno.test("serveBareEcho() echoes a payload many times its read buffer", async () => {
  const listener = serveBareEcho({ port: 0, readBytes: 64 });
  try {
    const payload = Uint8Array.from({ length: 10_000 }, (_, i) => i * 7);
    assert.deepEqual(await echo(listener.addr.port, payload), payload);
  } finally {
    listener.close();
  }
});
