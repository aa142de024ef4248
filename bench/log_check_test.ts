import assert from "node:assert/strict";
import { formatLogReport, LogTail, parseLogLine } from "./log_check.ts";
import { withTempDir } from "../test_util.ts";

/**
 * A test body that runs `fn` with a LogTail opened on a fresh
 * `dir`/access.log holding `initial`.
 */
function withLogTail(
  initial: string,
  fn: (path: string, tail: LogTail) => Promise<void>,
): (t: Deno.TestContext) => Promise<void> {
  return withTempDir(async (dir) => {
    const path = `${dir}/access.log`;
    await Deno.writeTextFile(path, initial);
    using tail = await LogTail.open(path);
    await fn(path, tail);
  });
}

Deno.test("parseLogLine() reads exactly the access log's line shape", () => {
  assert.deepEqual(parseLogLine("[client 1]: received 0 bytes"), [1, 0]);
  assert.deepEqual(
    parseLogLine("[client 123456]: received 67108865 bytes"),
    [123456, 67108865],
  );
  for (
    const bad of [
      "",
      "[client 0]: received 5 bytes",
      "[client 01]: received 5 bytes",
      "[client 1]: received 05 bytes",
      "[client 1]: received 5 byte",
      "[client 1]: received -5 bytes",
      "[client 1] received 5 bytes",
      " [client 1]: received 5 bytes",
      "[client 1]: received 5 bytes ",
      "[client 1]: received 5 bytes\r",
      "[client 99999999999999999999]: received 5 bytes",
    ]
  ) {
    assert.equal(parseLogLine(bad), undefined, JSON.stringify(bad));
  }
});

Deno.test(
  "LogTail.poll() reads only the lines appended after open()",
  withLogTail("[client 1]: received 5 bytes\n", async (path, tail) => {
    assert.equal(await tail.poll(), 0);
    await Deno.writeTextFile(path, "[client 2]: received 5 bytes\n[cli", {
      append: true,
    });
    assert.equal(await tail.poll(), 1);
    await Deno.writeTextFile(path, "ent 3]: received 0 bytes\n", {
      append: true,
    });
    assert.equal(await tail.poll(), 2);
    const report = tail.check({
      connections: 2,
      requiredSizes: new Map([[5, 1], [0, 1]]),
    });
    assert.deepEqual(report, {
      lines: 2,
      expected: 2,
      uncertain: 0,
      missing: 0,
      extra: 0,
      malformed: 0,
      duplicates: 0,
      missingSizes: [],
      samples: [],
      ok: true,
    });
  }),
);

Deno.test(
  "LogTail.check() finds missing, extra, malformed, duplicate and unterminated lines",
  withLogTail("", async (path, tail) => {
    await Deno.writeTextFile(
      path,
      [
        "[client 1]: received 5 bytes",
        "[client 2]: received 5 bytes",
        "[client 1]: received 0 bytes",
        "[client 3]: received 5 bytes[client 4]: received 5 bytes",
        "[client 5]: rec",
      ].join("\n"),
    );
    await tail.poll();
    const short = tail.check({
      connections: 7,
      requiredSizes: new Map([[5, 3], [0, 1], [4096, 1]]),
    });
    assert.equal(short.lines, 5);
    assert.equal(short.missing, 2);
    assert.equal(short.extra, 0);
    assert.equal(short.malformed, 2);
    assert.equal(short.duplicates, 1);
    assert.deepEqual(short.missingSizes, [
      { bytes: 5, expected: 3, found: 2 },
      { bytes: 4096, expected: 1, found: 0 },
    ]);
    assert.deepEqual(short.samples, [
      'duplicate client number: "[client 1]: received 0 bytes"',
      'malformed line: "[client 3]: received 5 bytes[client 4]: received 5 bytes"',
      'unterminated line: "[client 5]: rec"',
    ]);
    assert.equal(short.ok, false);
    const text = formatLogReport(short);
    for (
      const figure of [
        "5 lines added, 7 expected: FAILED",
        "2 connections without a line",
        "2 malformed lines",
        "1 duplicate client numbers",
        "5 bytes: 2 lines, at least 3 expected",
        "4096 bytes: 0 lines, at least 1 expected",
      ]
    ) {
      assert.ok(text.includes(figure), `${figure} missing from:\n${text}`);
    }
    const long = tail.check({ connections: 2, uncertain: 1 });
    assert.equal(long.missing, 0);
    assert.equal(long.extra, 2);
    assert.match(formatLogReport(long), /2 to 3 expected.*\n.*2 lines more/);
  }),
);

Deno.test(
  "LogTail.check() accepts a line per uncertain connect or none",
  withLogTail("", async (path, tail) => {
    await Deno.writeTextFile(path, "[client 1]: received 0 bytes\n");
    await tail.poll();
    assert.ok(tail.check({ connections: 1, uncertain: 1 }).ok);
    assert.ok(tail.check({ connections: 0, uncertain: 1 }).ok);
    assert.ok(!tail.check({ connections: 0 }).ok);
  }),
);

Deno.test(
  "LogTail.waitFor() returns once the lines are there, or when they stop coming",
  withLogTail("", async (path, tail) => {
    const lines = Array.from(
      { length: 1000 },
      (_, i) => `[client ${i + 1}]: received 5 bytes\n`,
    );
    const writer = (async () => {
      using file = await Deno.open(path, { append: true });
      for (const line of lines) {
        await file.write(new TextEncoder().encode(line));
      }
    })();
    assert.equal(await tail.waitFor(1000, { settleMs: 0 }), 1000);
    await writer;
    // Never reached: it gives up once nothing changes for quietMs. The quiet
    // period stands: it is what LogTail promises a caller that cannot know
    // how many lines a (possibly lossy) server will write; here the writer
    // has finished, so no line can arrive late and the count is exact.
    assert.equal(await tail.waitFor(2000, { quietMs: 50 }), 1000);
    assert.ok(tail.check({ connections: 1000 }).ok);
  }),
);

Deno.test(
  "LogTail.waitFor() given finished waits for it, not for a quiet period, and fails if it never comes",
  withLogTail("", async (path, tail) => {
    const writer = (async () => {
      using file = await Deno.open(path, { append: true });
      for (let i = 1; i <= 1000; i++) {
        await file.write(
          new TextEncoder().encode(`[client ${i}]: received 5 bytes\n`),
        );
      }
    })();
    // More lines than come, and no quiet period to stop at: only the end
    // of the writer ends the wait, and every line is read by then.
    assert.equal(
      await tail.waitFor(2000, { finished: writer, quietMs: 0, settleMs: 0 }),
      1000,
    );
    await assert.rejects(
      tail.waitFor(1, { finished: new Promise(() => {}), timeoutMs: 50 }),
      /^Error: The server did not finish its log within 50 ms/,
    );
  }),
);

Deno.test("LogTail.open() rejects a log that does not exist", async () => {
  await assert.rejects(
    LogTail.open("/nonexistent/echo-server/access.log"),
    Deno.errors.NotFound,
  );
});
