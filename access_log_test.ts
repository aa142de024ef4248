import assert from "node:assert/strict";
import { AccessLog } from "./access_log.ts";

Deno.test("AccessLog.open() creates the directory, record() writes exact lines", () => {
  const dir = Deno.makeTempDirSync();
  try {
    const path = `${dir}/nested/dir/access.log`;
    const log = AccessLog.open(path);
    log.record(1, 5);
    log.record(2, 1);
    log.record(3, 0);
    log.close();
    assert.equal(
      Deno.readTextFileSync(path),
      "[client 1]: received 5 bytes\n" +
        "[client 2]: received 1 bytes\n" +
        "[client 3]: received 0 bytes\n",
    );
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("AccessLog.open() appends to an existing file, never truncates", () => {
  const dir = Deno.makeTempDirSync();
  try {
    const path = `${dir}/access.log`;
    Deno.writeTextFileSync(path, "[client 1]: received 9 bytes\n");
    const log = AccessLog.open(path);
    log.record(1, 7);
    log.close();
    assert.equal(
      Deno.readTextFileSync(path),
      "[client 1]: received 9 bytes\n[client 1]: received 7 bytes\n",
    );
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("AccessLog.reopen() after a rename writes new lines to a new file", () => {
  const dir = Deno.makeTempDirSync();
  try {
    const path = `${dir}/access.log`;
    const log = AccessLog.open(path);
    log.record(1, 10);
    Deno.renameSync(path, `${path}.1`);
    log.record(2, 20); // still the old, renamed file
    log.reopen();
    log.record(3, 30);
    log.close();
    assert.equal(
      Deno.readTextFileSync(`${path}.1`),
      "[client 1]: received 10 bytes\n[client 2]: received 20 bytes\n",
    );
    assert.equal(
      Deno.readTextFileSync(path),
      "[client 3]: received 30 bytes\n",
    );
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("AccessLog.reopen() that fails keeps writing to the old file", () => {
  const dir = Deno.makeTempDirSync();
  try {
    const path = `${dir}/logs/access.log`;
    const log = AccessLog.open(path);
    Deno.renameSync(`${dir}/logs`, `${dir}/old`);
    Deno.writeTextFileSync(`${dir}/logs`, "a file where the directory was");
    assert.throws(() => log.reopen(), /cannot open access log .*logs\/access/);
    log.record(1, 1);
    log.close();
    assert.equal(
      Deno.readTextFileSync(`${dir}/old/access.log`),
      "[client 1]: received 1 bytes\n",
    );
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

// A writer process: opens the log, waits for the test to close its stdin
// (so that all writers start at once), then records its lines.
const WRITER = `
import { AccessLog } from ${
  JSON.stringify(new URL("./access_log.ts", import.meta.url).href)
};
const [path, writer, count] = Deno.args.map((a, i) => i === 0 ? a : Number(a));
const log = AccessLog.open(path);
await Deno.stdin.readable.pipeTo(new WritableStream());
for (let i = 1; i <= count; i++) log.record(writer * 1_000_000 + i, i);
log.close();
`;

Deno.test("AccessLog.record() never splits a line with four writer processes on one file", async () => {
  // Separate processes, on separate cores when there are, appending at the
  // same time: a line written in two write calls would be split by another
  // writer's line between them.
  const dir = Deno.makeTempDirSync();
  try {
    const path = `${dir}/access.log`;
    const writers = 4;
    const count = 20_000;
    const children = Array.from(
      { length: writers },
      (_, w) =>
        new Deno.Command(Deno.execPath(), {
          args: [
            "eval",
            "--ext=ts",
            WRITER,
            path,
            String(w + 1),
            String(count),
          ],
          stdin: "piped",
          stdout: "null",
          stderr: "inherit",
        }).spawn(),
    );
    try {
      for (const child of children) await child.stdin.close();
      for (const child of children) {
        assert.equal((await child.status).code, 0);
      }
    } finally {
      for (const child of children) {
        try {
          child.kill("SIGKILL");
        } catch {
          // It exited.
        }
        await child.status;
      }
    }
    const lines = Deno.readTextFileSync(path).split("\n");
    assert.equal(lines.pop(), "");
    assert.equal(lines.length, writers * count);
    // Every line whole, and each writer's lines all there, in order.
    const next = Array.from({ length: writers }, () => 1);
    for (const line of lines) {
      const match = /^\[client (\d+)\]: received (\d+) bytes$/.exec(line);
      assert.ok(match, `split line: ${JSON.stringify(line)}`);
      const writer = Math.floor(Number(match[1]) / 1_000_000);
      const i = Number(match[1]) % 1_000_000;
      assert.equal(i, next[writer - 1]++, line);
      assert.equal(Number(match[2]), i, line);
    }
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("AccessLog.open() fails on an unwritable path, naming it", () => {
  const dir = Deno.makeTempDirSync();
  try {
    Deno.writeTextFileSync(`${dir}/file`, "");
    assert.throws(
      () => AccessLog.open(`${dir}/file/access.log`),
      new RegExp(`^Error: cannot open access log ${dir}/file/access.log: `),
    );
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});
