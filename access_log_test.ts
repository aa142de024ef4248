import assert from "node:assert/strict";
import { closeSync, constants, openSync, readSync } from "node:fs";
import { AccessLog, type LogFile, RefusedLogPathError } from "./access_log.ts";
import {
  findExecutable,
  Lines,
  needing,
  runCommand,
  waitUntil,
  withTempDir,
} from "./test_util.ts";

/** `fn` run in a fresh temporary directory, removed afterwards. */
function withTempDirSync(
  fn: (dir: string) => void,
): (t: Deno.TestContext) => void {
  return () => {
    const dir = Deno.makeTempDirSync();
    try {
      fn(dir);
    } finally {
      Deno.removeSync(dir, { recursive: true });
    }
  };
}

Deno.test(
  "AccessLog.open() creates the directory, record() writes exact lines",
  withTempDirSync((dir) => {
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
  }),
);

Deno.test(
  "AccessLog.open() appends to an existing file, never truncates",
  withTempDirSync((dir) => {
    const path = `${dir}/access.log`;
    Deno.writeTextFileSync(path, "[client 1]: received 9 bytes\n");
    const log = AccessLog.open(path);
    log.record(1, 7);
    log.close();
    assert.equal(
      Deno.readTextFileSync(path),
      "[client 1]: received 9 bytes\n[client 1]: received 7 bytes\n",
    );
  }),
);

Deno.test(
  "AccessLog.reopen() after a rename writes new lines to a new file",
  withTempDir(async (dir) => {
    const path = `${dir}/access.log`;
    const log = AccessLog.open(path, { onDiagnostic() {} });
    log.record(1, 10);
    Deno.renameSync(path, `${path}.1`);
    log.record(2, 20); // still the old, renamed file
    await log.reopen();
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
  }),
);

Deno.test(
  "AccessLog.reopen() that fails keeps writing to the old file, retries on the next line",
  withTempDir(async (dir) => {
    const path = `${dir}/logs/access.log`;
    const diagnostics: string[] = [];
    const log = AccessLog.open(path, {
      onDiagnostic: (message) => diagnostics.push(message),
      retryIntervalMs: 3_600_000, // no timer: only lines retry
    });
    Deno.renameSync(`${dir}/logs`, `${dir}/old`);
    Deno.writeTextFileSync(`${dir}/logs`, "a file where the directory was");
    assert.equal(await log.reopen(), false);
    assert.equal(log.stats.reopenPending, true);
    assert.match(
      diagnostics[0],
      /^cannot open access log .*logs\/access.log: .*; still writing to the old file, trying again/,
    );
    // The path can be opened again: the next line starts a retry, off the
    // event loop (the line itself still goes to the old file).
    Deno.removeSync(`${dir}/logs`);
    log.record(1, 1);
    await waitUntil(() => !log.stats.reopenPending, "the line's retry");
    log.record(2, 2);
    assert.equal(log.close(), 0);
    assert.equal(
      Deno.readTextFileSync(`${dir}/old/access.log`),
      "[client 1]: received 1 bytes\n",
    );
    assert.equal(Deno.readTextFileSync(path), "[client 2]: received 2 bytes\n");
    assert.equal(diagnostics.length, 2, diagnostics.join("\n"));
    assert.match(diagnostics[1], /^reopened access log .* \(after failing\)$/);
  }),
);

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

Deno.test(
  "AccessLog.record() never splits a line with four writer processes on one file",
  withTempDir(async (dir) => {
    // Separate processes, on separate cores when there are, appending at the
    // same time: a line written in two write calls would be split by another
    // writer's line between them.
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
  }),
);

Deno.test(
  "AccessLog.open() fails on an unwritable path, naming it",
  withTempDirSync((dir) => {
    Deno.writeTextFileSync(`${dir}/file`, "");
    assert.throws(
      () => AccessLog.open(`${dir}/file/access.log`),
      new RegExp(`^Error: cannot open access log ${dir}/file/access.log: `),
    );
  }),
);

/** Runs a command that must succeed (mkfifo, mknod). */
async function run(command: string, ...args: string[]): Promise<void> {
  const { code, stderr } = await runCommand(command, args);
  assert.equal(code, 0, stderr);
}

/**
 * A FIFO's read end opened without blocking, as a log shipper would hold
 * it: with a reader, a writer's open(2) of the FIFO succeeds.
 */
function fifoReader(path: string): Disposable & { read(): number } {
  const fd = openSync(path, constants.O_RDONLY | constants.O_NONBLOCK);
  return {
    read: () => readSync(fd, new Uint8Array(4096)),
    [Symbol.dispose]: () => closeSync(fd),
  };
}

Deno.test(
  "AccessLog.open() refuses a symlink, a FIFO with or without a reader, a directory and a device at the path, writing nothing",
  withTempDir(async (dir) => {
    const target = `${dir}/target`;
    await Deno.writeTextFile(target, "");
    const cases: [string, (path: string) => Promise<void>, RegExp][] = [
      ["symlink", (path) => Deno.symlink(target, path), /it is a symlink\b/],
      [
        "dangling symlink",
        (path) => Deno.symlink(`${dir}/missing`, path),
        /it is a symlink\b/,
      ],
      [
        "symlink to a device",
        (path) => Deno.symlink("/dev/null", path),
        /it is a symlink\b/,
      ],
      ["FIFO", (path) => run("mkfifo", path), /it is a FIFO /],
      ["directory", (path) => Deno.mkdir(path), /it is a directory;/],
      ["device", (path) => run("mknod", path, "c", "1", "3"), /character/],
    ];
    for (const [kind, make, reason] of cases) {
      const path = `${dir}/${kind.replaceAll(" ", "-")}.log`;
      await make(path);
      assert.throws(
        () => AccessLog.open(path),
        (error) => {
          assert.ok(error instanceof RefusedLogPathError, kind);
          assert.match(
            error.message,
            new RegExp(`^refusing access log ${path}: `),
          );
          assert.match(error.message, reason, kind);
          return true;
        },
      );
    }
    // A FIFO with a reader opens (no ENXIO) and is refused by its type.
    await run("mkfifo", `${dir}/read.log`);
    using reader = fifoReader(`${dir}/read.log`);
    assert.throws(
      () => AccessLog.open(`${dir}/read.log`),
      /: it is a FIFO \(named pipe\);/,
    );
    assert.equal(reader.read(), 0); // EOF: no writer, nothing written
    assert.equal(await Deno.readTextFile(target), "");
    // Nothing was created through the dangling symlink either.
    await assert.rejects(Deno.stat(`${dir}/missing`), Deno.errors.NotFound);
  }),
);

Deno.test(
  "AccessLog.reopen() refuses a FIFO with a reader: writes nothing into it, keeps the lines in memory, writes them once a file is back",
  withTempDir(async (dir) => {
    const path = `${dir}/access.log`;
    const diagnostics: string[] = [];
    const log = AccessLog.open(path, {
      onDiagnostic: (message) => diagnostics.push(message),
      retryIntervalMs: 3_600_000, // no timer: the second reopen retries
    });
    log.record(1, 1);
    await Deno.rename(path, `${path}.1`);
    await run("mkfifo", path);
    using reader = fifoReader(path);
    assert.equal(await log.reopen(), false);
    assert.match(
      diagnostics[0],
      /^refusing access log .*: it is a FIFO \(named pipe\);.*; 0 lines wait in memory, trying again every 3600 s and on SIGHUP$/,
    );
    log.record(2, 2);
    log.record(3, 3);
    assert.equal(reader.read(), 0);
    assert.deepEqual(
      [log.stats.backlogLines, log.stats.reopenPending],
      [2, true],
    );
    await Deno.remove(path);
    assert.equal(await log.reopen(), true);
    log.record(4, 4);
    assert.equal(log.close(), 0);
    assert.equal(await Deno.readTextFile(`${path}.1`), lines(1, 1));
    assert.equal(await Deno.readTextFile(path), lines(2, 4));
  }),
);

const setpriv = findExecutable("setpriv");
const asRoot = (await runCommand("id", ["-u"])).stdout.trim() === "0";

Deno.test({
  name:
    `AccessLog.open() as an unprivileged user refuses another user's symlink and log, and opens its own${
      setpriv === undefined || !asRoot
        ? " (ignored: needs root and setpriv)"
        : ""
    }`,
  ignore: setpriv === undefined || !asRoot,
  fn: withTempDir(async (dir) => {
    // As nobody, with the task's permission alone: the mark (utimensat)
    // needs the entry's owner, so another user's symlink or log cannot be
    // checked and is refused.
    const logs = `${dir}/logs`;
    await Deno.mkdir(logs);
    await Deno.chmod(dir, 0o755);
    await Deno.chmod(logs, 0o777);
    await Deno.writeTextFile(`${logs}/root.log`, line(1, 1), { mode: 0o666 });
    await Deno.chmod(`${logs}/root.log`, 0o666);
    await Deno.symlink(`${logs}/root.log`, `${logs}/link.log`);
    const script = `${dir}/open.ts`;
    await Deno.writeTextFile(
      script,
      `import { AccessLog } from ${
        JSON.stringify(new URL("./access_log.ts", import.meta.url).href)
      };
for (const name of Deno.args) {
  try {
    AccessLog.open(${JSON.stringify(logs)} + "/" + name).close();
    console.log(name + ": opened");
  } catch (error) {
    console.log(name + ": " + error.message);
  }
}`,
    );
    await Deno.chmod(script, 0o644);
    const denoDir = `${dir}/deno`;
    await Deno.mkdir(denoDir, { mode: 0o777 });
    await Deno.chmod(denoDir, 0o777);
    const { code, stdout, stderr } = await runCommand(setpriv!, [
      "--reuid=65534",
      "--regid=65534",
      "--clear-groups",
      Deno.execPath(),
      "run",
      "--no-prompt",
      `--allow-write=${logs}`,
      script,
      "link.log",
      "root.log",
      "own.log", // created
      "own.log", // its own, existing: checked and opened
    ], { env: { DENO_DIR: denoDir, HOME: dir } });
    assert.equal(code, 0, stderr);
    const refused = (name: string) =>
      `${name}: refusing access log ${logs}/${name}: cannot check that it is not a symlink: it belongs to another user; `;
    const results = stdout.trimEnd().split("\n");
    assert.ok(results[0].startsWith(refused("link.log")), results[0]);
    assert.ok(results[1].startsWith(refused("root.log")), results[1]);
    assert.deepEqual(results.slice(2), ["own.log: opened", "own.log: opened"]);
    assert.equal(await Deno.readTextFile(`${logs}/root.log`), line(1, 1));
  }),
});

/**
 * A stub disk: files on it share `free` bytes; a write takes what fits (a
 * short write, as a real full disk gives) and throws ENOSPC when nothing
 * does, or throws `error` while it is set (EIO, EDQUOT).
 */
class StubDisk {
  free: number;
  error: Error | undefined;
  /** Each name's file; a file keeps its text when renamed. */
  files = new Map<string, { text: string }>();
  writes = 0;

  constructor(free: number) {
    this.free = free;
  }

  open(path: string): LogFile {
    const decoder = new TextDecoder();
    let file = this.files.get(path);
    if (file === undefined) this.files.set(path, file = { text: "" });
    return {
      writeSync: (bytes) => {
        this.writes++;
        if (this.error) throw this.error;
        if (this.free === 0) {
          throw new Error("No space left on device (os error 28)");
        }
        const n = Math.min(bytes.length, this.free);
        this.free -= n;
        file.text += decoder.decode(bytes.subarray(0, n));
        return n;
      },
      close() {},
    };
  }

  text(path: string): string | undefined {
    return this.files.get(path)?.text;
  }

  /** Renames a file, as logrotate does. */
  rename(from: string, to: string): void {
    this.files.set(to, this.files.get(from)!);
    this.files.delete(from);
  }
}

function line(id: number, bytes: number): string {
  return `[client ${id}]: received ${bytes} bytes\n`;
}

function lines(from: number, to: number): string {
  let text = "";
  for (let id = from; id <= to; id++) text += line(id, id);
  return text;
}

Deno.test("AccessLog.record() on a disk that fills mid-line finishes that line first once space returns", () => {
  // Room for two lines and 8 bytes of the third: "[client " then ENOSPC.
  const disk = new StubDisk(line(1, 1).length * 2 + 8);
  const diagnostics: string[] = [];
  const log = AccessLog.open("access.log", {
    openFile: (path) => disk.open(path),
    onDiagnostic: (message) => diagnostics.push(message),
    reportIntervalMs: 60_000,
  });
  for (let id = 1; id <= 20; id++) log.record(id, id);
  assert.equal(disk.text("access.log"), lines(1, 2) + "[client ");
  assert.deepEqual(log.stats, {
    linesWritten: 2,
    backlogLines: 18,
    backlogBytes: lines(3, 20).length - 8,
    droppedLines: 0,
    // The short write's retry, then one try per later line.
    writeErrors: 18,
    reopenPending: false,
  });
  // One line for all those failures in the report interval.
  assert.equal(diagnostics.length, 1, diagnostics.join("\n"));
  assert.match(
    diagnostics[0],
    /^access log access.log: write failed: No space left on device \(os error 28\); 1 line waits in memory, retried every 1 s$/,
  );
  disk.free = 1_000_000;
  log.record(21, 21);
  assert.equal(disk.text("access.log"), lines(1, 21));
  assert.equal(log.stats.backlogLines, 0);
  assert.equal(log.stats.linesWritten, 21);
  assert.equal(log.close(), 0);
  assert.match(
    diagnostics.at(-1)!,
    /^access log access.log: writing again after \d+\.\d s; the backlog is written$/,
  );
});

Deno.test("AccessLog keeps lines through EIO and EDQUOT and writes them on its timer, in order", async () => {
  const disk = new StubDisk(1_000_000);
  const diagnostics: string[] = [];
  const log = AccessLog.open("access.log", {
    openFile: (path) => disk.open(path),
    onDiagnostic: (message) => diagnostics.push(message),
    retryIntervalMs: 10,
  });
  log.record(1, 1);
  disk.error = new Error("Input/output error (os error 5)");
  log.record(2, 2);
  log.record(3, 3);
  disk.error = new Error("Disk quota exceeded (os error 122)");
  log.record(4, 4);
  assert.equal(log.stats.backlogLines, 3);
  assert.match(
    diagnostics[0],
    /Input\/output error \(os error 5\); 1 line waits in memory/,
  );
  disk.error = undefined;
  // No new line: the timer writes them.
  const writes = disk.writes;
  assert.equal(await log.flush({ timeoutMs: 10_000 }), 0);
  assert.equal(disk.writes, writes + 1, "the backlog went out in one write");
  assert.equal(disk.text("access.log"), lines(1, 4));
  assert.equal(log.close(), 0);
});

Deno.test("AccessLog drops and counts lines past maxBacklogBytes, never the one a fragment began", () => {
  const disk = new StubDisk(5);
  const diagnostics: string[] = [];
  const log = AccessLog.open("access.log", {
    openFile: (path) => disk.open(path),
    onDiagnostic: (message) => diagnostics.push(message),
    maxBacklogBytes: 100,
    reportIntervalMs: 60_000,
  });
  for (let id = 1; id <= 100; id++) log.record(id, id);
  // Line 1's remainder (24 bytes) and lines 2-3 fit; the rest are dropped.
  assert.equal(log.stats.backlogLines, 3);
  assert.equal(log.stats.droppedLines, 97);
  assert.equal(
    diagnostics.filter((line) => line.includes("dropped")).length,
    1,
    diagnostics.join("\n"),
  );
  disk.free = 1_000_000;
  log.record(101, 101);
  assert.equal(disk.text("access.log"), lines(1, 3) + line(101, 101));
  assert.equal(log.close(), 97);
  assert.match(
    diagnostics.at(-1)!,
    /^access log access.log: 97 lines never written \(0 still waiting at exit, 97 dropped past the backlog bound\)$/,
  );
});

Deno.test("AccessLog.reopen() writes the backlog to the new file; a fragment the old one refuses is written whole", async () => {
  const disk = new StubDisk(line(1, 1).length + 3);
  const diagnostics: string[] = [];
  const log = AccessLog.open("access.log", {
    openFile: (path) => disk.open(path),
    onDiagnostic: (message) => diagnostics.push(message),
  });
  log.record(1, 1);
  log.record(2, 2);
  log.record(3, 3);
  disk.rename("access.log", "access.log.1");
  disk.free = 1_000_000;
  // The old file would take the remainder now; finish it there instead.
  assert.equal(await log.reopen(), true);
  assert.equal(disk.text("access.log.1"), lines(1, 2));
  assert.equal(disk.text("access.log"), line(3, 3));
  assert.equal(log.close(), 0);

  // And when the old file takes no more, the whole line goes to the new.
  const full = new StubDisk(line(1, 1).length + 3);
  const files: LogFile[] = [];
  const log3 = AccessLog.open("access.log", {
    openFile: (path) => {
      const file = full.open(path);
      files.push(file);
      return file;
    },
    onDiagnostic: (message) => diagnostics.push(message),
  });
  log3.record(1, 1);
  log3.record(2, 2);
  full.rename("access.log", "access.log.1");
  const oldFile = files[0];
  oldFile.writeSync = () => {
    throw new Error("No space left on device (os error 28)");
  };
  full.free = 1_000_000;
  assert.equal(await log3.reopen(), true);
  assert.equal(full.text("access.log.1"), line(1, 1) + "[cl");
  assert.equal(full.text("access.log"), line(2, 2));
  assert.ok(
    diagnostics.some((line) =>
      /ends in 3 bytes of an unfinished line .*; the whole line goes to the new file$/
        .test(line)
    ),
  );
  assert.equal(log3.close(), 0);
});

Deno.test("AccessLog.reopen() that finishes a fragment at a backlog chunk's end goes on to the next chunk", async () => {
  // Backlog chunks are 64 KiB of whole lines: lines 1..n fill the first.
  let n = 1;
  while (lines(1, n + 1).length <= 64 * 1024) n++;
  const disk = new StubDisk(0);
  const log = AccessLog.open("access.log", {
    openFile: (path) => disk.open(path),
    onDiagnostic() {},
  });
  disk.error = new Error("Input/output error (os error 5)");
  for (let id = 1; id <= n + 1; id++) log.record(id, id);
  // The first chunk goes out but for its last 3 bytes: a fragment.
  disk.error = undefined;
  disk.free = lines(1, n).length - 3;
  assert.equal(await log.flush(), 2);
  disk.rename("access.log", "access.log.1");
  disk.free = 1_000_000;
  assert.equal(await log.reopen(), true);
  assert.equal(disk.text("access.log.1"), lines(1, n));
  assert.equal(disk.text("access.log"), line(n + 1, n + 1));
  assert.equal(log.stats.backlogLines, 0);
  assert.equal(log.close(), 0);
});

Deno.test("AccessLog retries a failed reopen on its timer after the backlog drains", async () => {
  const disk = new StubDisk(3);
  let failOpen = false;
  const reopened = Promise.withResolvers<void>();
  const log = AccessLog.open("access.log", {
    openFile: (path) => {
      if (failOpen) throw new Error("Too many open files (os error 24)");
      const file = disk.open(path);
      if (disk.files.has("access.log.1")) reopened.resolve();
      return file;
    },
    onDiagnostic() {},
    retryIntervalMs: 10,
  });
  log.record(1, 1); // "[cl", the rest waits
  disk.rename("access.log", "access.log.1");
  failOpen = true;
  assert.equal(await log.reopen(), false);
  disk.free = 1_000_000;
  log.record(2, 2); // the backlog drains to the old file
  assert.equal(log.stats.backlogLines, 0);
  failOpen = false;
  // No new line: the timer must open the path.
  let timer;
  try {
    await Promise.race([
      reopened.promise,
      new Promise((_, reject) => {
        timer = setTimeout(
          () => reject(new Error("the reopen was not retried in 10 s")),
          10_000,
        );
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
  assert.equal(log.stats.reopenPending, false);
  assert.equal(log.close(), 0);
  assert.equal(disk.text("access.log.1"), lines(1, 2));
  assert.equal(disk.text("access.log"), "");
});

Deno.test("AccessLog.flush() ends at once when its signal is aborted, resolving with the lines still waiting", async () => {
  const disk = new StubDisk(0);
  const log = AccessLog.open("access.log", {
    openFile: (path) => disk.open(path),
    onDiagnostic() {},
  });
  disk.error = new Error("No space left on device (os error 28)");
  log.record(1, 1);
  log.record(2, 2);
  const abort = new AbortController();
  // The disk stays full: without the abort this flush would wait an hour.
  const flushed = log.flush({ timeoutMs: 3_600_000, signal: abort.signal });
  abort.abort();
  assert.equal(await flushed, 2);
  assert.equal(
    await log.flush({ timeoutMs: 3_600_000, signal: abort.signal }),
    2,
  );
  assert.equal(disk.text("access.log"), "");
  assert.equal(log.close(), 2);
});

Deno.test("AccessLog.reopen() whose open does not return keeps writing to the old file, says so, and opens once more for a SIGHUP meanwhile", async () => {
  const disk = new StubDisk(1_000_000);
  const diagnostics: string[] = [];
  const opens: PromiseWithResolvers<LogFile>[] = [];
  const log = AccessLog.open("access.log", {
    openFile: (path) => disk.open(path),
    // An open that returns only when the test says (a stalled NFS server).
    reopenFile: () => {
      const open = Promise.withResolvers<LogFile>();
      opens.push(open);
      return open.promise;
    },
    onDiagnostic: (message) => diagnostics.push(message),
    retryIntervalMs: 10,
    reportIntervalMs: 50,
  });
  disk.rename("access.log", "access.log.1");
  const first = log.reopen();
  log.record(1, 1); // the open is in flight: the old file
  await waitUntil(
    () => diagnostics.some((message) => /has not returned after/.test(message)),
    "the stalled open's diagnostic",
  );
  assert.match(
    diagnostics[0],
    /^cannot open access log access\.log: the open has not returned after \d+\.\d s \(a stalled file system\?\); still writing to the old file$/,
  );
  const second = log.reopen(); // a rotation meanwhile: once more, after
  assert.equal(opens.length, 1, "one open in flight at a time");
  opens[0].resolve(disk.open("access.log"));
  await waitUntil(() => opens.length === 2, "the second open");
  log.record(2, 2); // the first open's file
  disk.rename("access.log", "access.log.2");
  opens[1].resolve(disk.open("access.log"));
  assert.deepEqual([await first, await second], [true, true]);
  log.record(3, 3);
  assert.equal(log.close(), 0);
  assert.equal(disk.text("access.log.1"), line(1, 1));
  assert.equal(disk.text("access.log.2"), line(2, 2));
  assert.equal(disk.text("access.log"), line(3, 3));
});

Deno.test(
  "AccessLog.open() and reopen() of one existing log by 6 processes at once all open it (their checks' marks collide and are checked again)",
  withTempDir(async (dir) => {
    // As instances sharing the log after a rotation's SIGHUP to them all,
    // or started together, under the compiled binary's permission alone:
    // 20 rounds, each a reopen and an open by every process at once.
    const path = `${dir}/access.log`;
    await Deno.writeTextFile(path, line(1, 1));
    const script = `${dir}/contend.ts`;
    await Deno.writeTextFile(
      script,
      `import { AccessLog } from ${
        JSON.stringify(new URL("./access_log.ts", import.meta.url).href)
      };
import { createInterface } from "node:readline";
const path = Deno.args[0];
const said = [];
const log = AccessLog.open(path, { onDiagnostic: (line) => said.push(line) });
console.log("ready");
for await (const _ of createInterface({ input: process.stdin })) {
  const failures = [];
  if (!(await log.reopen())) failures.push(said.at(-1));
  try {
    AccessLog.open(path, { onDiagnostic() {} }).close();
  } catch (error) {
    failures.push(error.message);
  }
  console.log(JSON.stringify(failures));
}
log.close();`,
    );
    const children = Array.from(
      { length: 6 },
      () =>
        new Deno.Command(Deno.execPath(), {
          args: ["run", "--no-prompt", `--allow-write=${dir}`, script, path],
          stdin: "piped",
          stdout: "piped",
          stderr: "inherit",
        }).spawn(),
    );
    const writers = children.map((child) => child.stdin.getWriter());
    const outputs = children.map((child) => new Lines(child.stdout));
    try {
      for (const output of outputs) await output.next(/^ready$/);
      for (let round = 0; round < 20; round++) {
        await Promise.all(writers.map((w) => w.write(new Uint8Array([10]))));
        for (const [i, output] of outputs.entries()) {
          const [failures] = await output.next(/^\[.*\]$/);
          assert.deepEqual(
            JSON.parse(failures),
            [],
            `round ${round}, process ${i}`,
          );
        }
      }
    } finally {
      for (const writer of writers) await writer.close();
      for (const [i, child] of children.entries()) {
        await outputs[i].done;
        assert.equal((await child.status).code, 0);
      }
    }
    assert.equal(await Deno.readTextFile(path), line(1, 1));
  }),
);

// Whether an ext4 image with 128-byte inodes (whole-second timestamps, as
// ext3, HFS+ and older small ext4 file systems keep them) can be made and
// loop-mounted here: needs root, mkfs.ext4 and a loop device.
const coarseTimesMissing = !asRoot
  ? "needs root"
  : findExecutable("mkfs.ext4") === undefined
  ? "needs mkfs.ext4"
  : await loopMountFails();

/** Why no ext4 image can be loop-mounted here, or undefined if one can. */
async function loopMountFails(): Promise<string | undefined> {
  const dir = await Deno.makeTempDir();
  try {
    const made = await runCommand("sh", [
      "-c",
      `truncate -s 16M ${dir}/probe.img && mkfs.ext4 -q -I 128 ` +
      `${dir}/probe.img 2>/dev/null && mkdir ${dir}/mnt && ` +
      `mount -o loop ${dir}/probe.img ${dir}/mnt && umount ${dir}/mnt`,
    ]);
    return made.code === 0
      ? undefined
      : `cannot loop-mount an ext4 image: ${made.stderr.trim()}`;
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test(
  needing(
    "AccessLog.open() and reopen() accept an existing log on a file system that keeps times in whole seconds, and leave its access time as it was",
    coarseTimesMissing === undefined,
    coarseTimesMissing ?? "",
  ),
  withTempDir(async (dir) => {
    const image = `${dir}/ext4.img`;
    const mnt = `${dir}/mnt`;
    await Deno.mkdir(mnt);
    const made = await runCommand("sh", [
      "-c",
      `truncate -s 16M ${image} && mkfs.ext4 -q -I 128 ${image}`,
    ]);
    assert.equal(made.code, 0, made.stderr);
    const mounted = await runCommand("mount", ["-o", "loop", image, mnt]);
    assert.equal(mounted.code, 0, mounted.stderr);
    try {
      const path = `${mnt}/access.log`;
      await Deno.writeTextFile(path, line(1, 1));
      const atime = new Date(Date.parse("2026-01-02T03:04:05Z"));
      await Deno.utime(path, atime, atime);
      const log = AccessLog.open(path, { onDiagnostic() {} });
      log.record(2, 2);
      assert.equal(await log.reopen(), true);
      log.record(3, 3);
      assert.equal(log.close(), 0);
      // Before reading it, which moves the access time on (relatime).
      assert.equal((await Deno.stat(path)).atime?.getTime(), atime.getTime());
      assert.equal(await Deno.readTextFile(path), lines(1, 3));
    } finally {
      const unmounted = await runCommand("umount", [mnt]);
      assert.equal(unmounted.code, 0, unmounted.stderr);
    }
  }),
);
