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

Deno.test("AccessLog.record() never splits a line with two writers on one file", () => {
  const dir = Deno.makeTempDirSync();
  try {
    const path = `${dir}/access.log`;
    const a = AccessLog.open(path);
    const b = AccessLog.open(path);
    for (let i = 1; i <= 1000; i++) {
      a.record(i, i * 1000);
      b.record(i, i);
    }
    a.close();
    b.close();
    const lines = Deno.readTextFileSync(path).split("\n");
    assert.equal(lines.pop(), "");
    assert.equal(lines.length, 2000);
    for (const line of lines) {
      assert.match(line, /^\[client \d+\]: received \d+ bytes$/);
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
