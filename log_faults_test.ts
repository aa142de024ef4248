/**
 * The access log under real faults, through the server process: a full
 * file system (a tiny tmpfs, which needs root), a file-size limit
 * (RLIMIT_FSIZE set with prlimit), a SIGHUP reopen that fails for lack
 * of file descriptors (`ulimit -n`) and then recovers, and a log path
 * turned into a symlink, a FIFO or a directory (at a SIGHUP and at
 * start-up), under the task's exact permissions.
 */

import assert from "node:assert/strict";
import {
  type CommandResult,
  connectMany,
  echo,
  findExecutable,
  readAll,
  runCommand,
  ServerProcess,
  type ServerProcessOptions,
  within,
  withTempDir,
} from "./test_util.ts";

/**
 * main.ts on port 0 logging to `${logDir}/access.log`, with `--metrics` on
 * an ephemeral port, and `args`.
 */
function spawnLogServer(
  logDir: string,
  args: string[],
  options: ServerProcessOptions = {},
): ServerProcess {
  return new ServerProcess(logDir, ["--metrics", "127.0.0.1:0", ...args], {
    timeoutMs: 120_000,
    ...options,
  });
}

/** The echo port and the metrics port, from the start-up lines. */
async function ports(
  server: ServerProcess,
): Promise<{ port: number; metricsPort: number }> {
  return { port: await server.port(), metricsPort: await server.metricsPort() };
}

/** The line the server writes for client `id` (who sent `size(id)` bytes). */
function line(id: number): string {
  return `[client ${id}]: received ${size(id)} bytes\n`;
}

function size(id: number): number {
  return id % 7 + 1;
}

/** Clients `from` to `to`, one after another, each echoed exactly. */
async function serveClients(port: number, from: number, to: number) {
  for (let id = from; id <= to; id++) {
    const payload = new Uint8Array(size(id)).fill(id % 256);
    assert.deepEqual(await echo(port, payload), payload, `client ${id}`);
  }
}

/**
 * The `echo_log_*` samples, once no client is in flight (a client can see
 * its reply's EOF just before the server logs it).
 */
async function metrics(port: number): Promise<Record<string, number>> {
  for (;;) {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port });
    let text;
    try {
      await conn.write(
        new TextEncoder().encode(
          "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        ),
      );
      text = new TextDecoder().decode(await readAll(conn));
    } finally {
      conn.close();
    }
    if (!/^echo_connections_active 0$/m.test(text)) continue;
    const samples: Record<string, number> = {};
    for (const [, name, value] of text.matchAll(/^(echo_log_\w+) (\S+)$/gm)) {
      samples[name] = Number(value);
    }
    return samples;
  }
}

/**
 * Checks that `text` is whole lines for clients `from`, `from + 1`, ... in
 * that order (each number once), and returns the last client's number.
 */
function assertLinesInOrder(text: string, from: number): number {
  let id = from;
  let offset = 0;
  while (offset < text.length) {
    const expected = line(id);
    assert.equal(
      text.slice(offset, offset + expected.length),
      expected,
      `at byte ${offset}`,
    );
    offset += expected.length;
    id++;
  }
  return id - 1;
}

/** Writes 4 KiB at a time to `path` until the file system is full. */
function fill(path: string): void {
  using file = Deno.openSync(path, { write: true, create: true });
  const block = new Uint8Array(4096);
  try {
    for (;;) file.writeSync(block);
  } catch (error) {
    assert.match(String(error), /No space left on device \(os error 28\)/);
  }
}

/** Mounts a 64 KiB tmpfs at `dir`. */
function mountTinyTmpfs(dir: string): Promise<CommandResult> {
  return runCommand("mount", ["-t", "tmpfs", "-o", "size=64k", "tmpfs", dir]);
}

// Why a tmpfs cannot be mounted here (needs root, and a container that
// allows it), or undefined if it can.
async function canMountTmpfs(): Promise<string | undefined> {
  const dir = await Deno.makeTempDir();
  try {
    const mounted = await mountTinyTmpfs(dir);
    if (mounted.code !== 0) return `mount failed: ${mounted.stderr.trim()}`;
    await runCommand("umount", [dir]);
    return undefined;
  } catch (error) {
    return `mount failed: ${error}`;
  } finally {
    await Deno.remove(dir);
  }
}

const noTmpfs = await canMountTmpfs();
const needsTmpfs = noTmpfs === undefined
  ? ""
  : ` (ignored: cannot mount a tmpfs: ${noTmpfs})`;

/** Runs `fn` with a 64 KiB tmpfs mounted at `${dir}/mnt`. */
function withTinyTmpfs(
  fn: (mnt: string) => Promise<void>,
): (t: Deno.TestContext) => Promise<void> {
  return withTempDir(async (dir) => {
    const mnt = `${dir}/mnt`;
    await Deno.mkdir(mnt);
    const mounted = await mountTinyTmpfs(mnt);
    assert.equal(mounted.code, 0, mounted.stderr);
    try {
      await fn(mnt);
    } finally {
      const unmounted = await runCommand("umount", [mnt]);
      assert.equal(unmounted.code, 0, unmounted.stderr);
    }
  });
}

Deno.test({
  name:
    `echo-server on a full tmpfs serves everyone, keeps every line, and writes them whole and in order once space returns${needsTmpfs}`,
  ignore: noTmpfs !== undefined,
  fn: withTinyTmpfs(async (mnt) => {
    await using server = spawnLogServer(mnt, []);
    const { port, metricsPort } = await ports(server);
    await serveClients(port, 1, 20);
    fill(`${mnt}/filler`);
    // The log's last page has room for a few more lines, then a short
    // write, then ENOSPC.
    await serveClients(port, 21, 1220);
    const full = await metrics(metricsPort);
    const text = await Deno.readTextFile(`${mnt}/access.log`);
    const whole = text.slice(0, text.lastIndexOf("\n") + 1);
    const last = assertLinesInOrder(whole, 1);
    // What follows the last whole line is the start of the next one.
    assert.ok(line(last + 1).startsWith(text.slice(whole.length)));
    assert.equal(full.echo_log_backlog_lines, 1220 - last);
    assert.ok(full.echo_log_backlog_lines > 1000, JSON.stringify(full));
    assert.ok(full.echo_log_write_errors_total >= 1200 - last);
    assert.equal(full.echo_log_dropped_lines_total, 0);
    await server.stderr.next(
      /^access log .*: write failed: No space left on device \(os error 28\); \d+ lines? waits? in memory/,
    );

    await Deno.remove(`${mnt}/filler`);
    await serveClients(port, 1221, 1240);
    const freed = await metrics(metricsPort);
    assert.equal(freed.echo_log_backlog_lines, 0);
    assert.equal(freed.echo_log_backlog_bytes, 0);
    assert.equal(freed.echo_log_dropped_lines_total, 0);
    assert.equal(
      freed.echo_log_write_errors_total,
      full.echo_log_write_errors_total,
    );
    await server.stderr.next(/^access log .*: writing again after /);
    assert.equal(await server.stop(), 0, server.stderr.lines.join("\n"));
    const log = await Deno.readTextFile(`${mnt}/access.log`);
    assert.equal(assertLinesInOrder(log, 1), 1240);
  }),
});

/**
 * Serves clients 1 to 5, fills the tmpfs at `mnt`, serves clients 6 to 400
 * on the full disk, and returns the metrics then.
 */
async function serveOntoFullDisk(
  server: ServerProcess,
  mnt: string,
): Promise<Record<string, number>> {
  const { port, metricsPort } = await ports(server);
  await serveClients(port, 1, 5);
  fill(`${mnt}/filler`);
  await serveClients(port, 6, 400);
  return await metrics(metricsPort);
}

Deno.test({
  name:
    `echo-server on a tmpfs that stays full drops past --log-backlog, keeps serving, and exits 1 counting what it never wrote${needsTmpfs}`,
  ignore: noTmpfs !== undefined,
  fn: withTinyTmpfs(async (mnt) => {
    await using server = spawnLogServer(mnt, [
      "--log-backlog",
      "4KiB",
      "--drain-timeout",
      "0.5",
    ]);
    const full = await serveOntoFullDisk(server, mnt);
    assert.ok(full.echo_log_dropped_lines_total > 0, JSON.stringify(full));
    assert.ok(full.echo_log_backlog_bytes <= 4096);
    await server.stderr.next(
      /^access log .*: lines dropped: the backlog is full/,
    );
    assert.equal(await server.stop(), 1);
    const [, lost, waiting, dropped] = await server.stderr.next(
      /^access log .*: (\d+) lines never written \((\d+) still waiting at exit, (\d+) dropped past the backlog bound\)$/,
    );
    assert.equal(Number(dropped), full.echo_log_dropped_lines_total);
    assert.equal(Number(lost), Number(waiting) + Number(dropped));
    // The unfinished line at the end was cut off: only whole lines remain.
    const log = await Deno.readTextFile(`${mnt}/access.log`);
    assert.ok(log.endsWith("\n"));
    assert.ok(
      server.stderr.lines.some((line) =>
        /cut off the \d+ bytes of an unfinished line at its end/.test(line)
      ),
      server.stderr.lines.join("\n"),
    );
    const written = assertLinesInOrder(log, 1);
    assert.equal(written + Number(lost), 400);
  }),
});

Deno.test({
  name:
    `echo-server cuts its exit's access-log flush short on a second SIGTERM, counting the lines still waiting${needsTmpfs}`,
  ignore: noTmpfs !== undefined,
  fn: withTinyTmpfs(async (mnt) => {
    // A drain time far past the test's bound: only the second signal can
    // end the flush of a disk that stays full in time.
    await using server = spawnLogServer(mnt, ["--drain-timeout", "600"]);
    const full = await serveOntoFullDisk(server, mnt);
    assert.ok(full.echo_log_backlog_lines > 100, JSON.stringify(full));
    const firstAt = performance.now();
    server.child.kill("SIGTERM");
    const [, announced] = await server.stderr.next(
      /^access log: writing (\d+) waiting lines for up to \d+\.\d s; a second SIGINT\/SIGTERM cuts this off$/,
    );
    assert.equal(Number(announced), full.echo_log_backlog_lines);
    // Not synchronisation: signals within 500 ms of the first count as one
    // (main.ts), so a deliberate second one comes later.
    await new Promise((resolve) =>
      setTimeout(resolve, Math.max(0, firstAt + 600 - performance.now()))
    );
    server.child.kill("SIGTERM");
    let timer: ReturnType<typeof setTimeout> | undefined;
    const status = await Promise.race([
      server.child.status,
      new Promise<undefined>((resolve) => {
        timer = setTimeout(() => resolve(undefined), 30_000);
      }),
    ]);
    clearTimeout(timer);
    assert.ok(status, "still flushing 30 s after the second SIGTERM");
    // Lines lost outrank the forced stop's 143 (README, Signals).
    assert.equal(status.code, 1, server.stderr.lines.join("\n"));
    await server.stderr.done;
    const [, cut] = await server.stderr.next(
      /^SIGTERM again: cutting off 0 connections now and the access log's (\d+) waiting lines$/,
    );
    const [, lost, waiting] = await server.stderr.next(
      /^access log .*: (\d+) lines never written \((\d+) still waiting at exit, 0 dropped past the backlog bound\)$/,
    );
    assert.equal(Number(cut), full.echo_log_backlog_lines);
    assert.equal(Number(lost), Number(waiting));
    const log = await Deno.readTextFile(`${mnt}/access.log`);
    assert.ok(log.endsWith("\n"));
    assert.equal(assertLinesInOrder(log, 1) + Number(lost), 400);
  }),
});

const prlimit = findExecutable("prlimit");

Deno.test({
  name:
    `echo-server under a real RLIMIT_FSIZE lives, backlogs the line cut short, and writes it whole once the limit is raised${
      prlimit === undefined ? " (ignored: prlimit not installed)" : ""
    }`,
  ignore: prlimit === undefined,
  fn: withTempDir(async (dir) => {
    await using server = spawnLogServer(dir, []);
    const { port, metricsPort } = await ports(server);
    await serveClients(port, 1, 3);
    // Room for one more line and 11 bytes of the next: the write past the
    // limit raises SIGXFSZ, which would end the process unless handled.
    // (From the lines' lengths: client 3's line may still be on its way.)
    const limit = linesText(1, 4).length + 11;
    const set = await runCommand(prlimit!, [
      `--pid=${server.child.pid}`,
      `--fsize=${limit}:unlimited`, // the soft limit; the hard one stays
    ]);
    assert.equal(set.code, 0, set.stderr);
    await serveClients(port, 4, 14);
    await server.stderr.next(/write failed: File too large \(os error 27\)/);
    const limited = await metrics(metricsPort);
    assert.equal(limited.echo_log_backlog_lines, 10);
    assert.ok(limited.echo_log_write_errors_total > 0);
    const text = await Deno.readTextFile(`${dir}/access.log`);
    assert.equal(text.length, limit);
    assert.equal(text, linesText(1, 4) + line(5).slice(0, 11));

    const raised = await runCommand(prlimit!, [
      `--pid=${server.child.pid}`,
      "--fsize=unlimited:unlimited",
    ]);
    assert.equal(raised.code, 0, raised.stderr);
    await serveClients(port, 15, 15);
    assert.equal((await metrics(metricsPort)).echo_log_backlog_lines, 0);
    assert.equal(await server.stop(), 0);
    const log = await Deno.readTextFile(`${dir}/access.log`);
    assert.equal(assertLinesInOrder(log, 1), 15);
  }),
});

function linesText(from: number, to: number): string {
  let text = "";
  for (let id = from; id <= to; id++) text += line(id);
  return text;
}

Deno.test(
  "echo-server under ulimit -n 64 retries a failed SIGHUP reopen until descriptors free up, losing no line",
  withTempDir(async (dir) => {
    await using server = spawnLogServer(dir, [], { maxOpenFiles: 64 });
    const { port, metricsPort } = await ports(server);
    await serveClients(port, 1, 2);
    // More clients than descriptors, held open: accept fails with EMFILE.
    const clients = 100;
    const conns = await connectMany(port, clients);
    try {
      await Promise.all(conns.map((conn) => conn.write(new Uint8Array(3))));
      await server.stderr.next(/^accept failed.*\(os error 24\)/);
      await Deno.rename(`${dir}/access.log`, `${dir}/access.log.1`);
      server.child.kill("SIGHUP");
      await server.stderr.next(
        /^cannot open access log .*access\.log: Too many open files \(os error 24\)[^;]*; still writing to the old file, trying again/,
      );
      // Release them: finished clients free descriptors, and the reopen,
      // tried on every line and every second, gets one.
      await Promise.all(conns.map(async (conn) => {
        await conn.closeWrite();
        assert.equal((await readAll(conn)).length, 3);
      }));
    } finally {
      for (const conn of conns) conn.close();
    }
    await server.stderr.next(/^reopened access log .* \(after failing\)$/);
    await serveClients(port, clients + 3, clients + 3);
    const after = await metrics(metricsPort);
    assert.equal(after.echo_log_reopen_pending, 0);
    assert.equal(after.echo_log_backlog_lines, 0);
    assert.equal(await server.stop(), 0, server.stderr.lines.join("\n"));

    const old = await Deno.readTextFile(`${dir}/access.log.1`);
    const current = await Deno.readTextFile(`${dir}/access.log`);
    assert.ok(current.endsWith(line(clients + 3)), current);
    const ids: number[] = [];
    for (const text of [old, current]) {
      for (const entry of text.trimEnd().split("\n")) {
        const match = /^\[client (\d+)\]: received (\d+) bytes$/.exec(entry);
        assert.ok(match, `malformed line: ${entry}`);
        ids.push(Number(match[1]));
      }
    }
    assert.deepEqual(
      ids.toSorted((a, b) => a - b),
      Array.from({ length: clients + 3 }, (_, i) => i + 1),
    );
  }),
);

/** Runs `mkfifo path`. */
async function mkfifo(path: string): Promise<void> {
  const made = await runCommand("mkfifo", [path]);
  assert.equal(made.code, 0, made.stderr);
}

/** Lines 1 and 2 logged, then the log renamed as logrotate does. */
async function rotateAfterTwo(
  server: ServerProcess,
  dir: string,
): Promise<{ port: number; metricsPort: number }> {
  const ports_ = await ports(server);
  await serveClients(ports_.port, 1, 2);
  await Deno.rename(`${dir}/access.log`, `${dir}/access.log.1`);
  return ports_;
}

/**
 * After a refused reopen: `access.log.1` holds clients 1 and 2 only, the
 * lines of clients 3 to `waiting + 2` wait in memory, and once `restore`
 * puts a regular file back (or frees the path) the retry timer writes
 * them, in order, to `access.log`, then client `waiting + 3` too.
 */
async function assertLinesWaitThenLand(
  server: ServerProcess,
  dir: string,
  { port, metricsPort }: { port: number; metricsPort: number },
  waiting: number,
  restore: () => Promise<void>,
): Promise<void> {
  const held = await metrics(metricsPort);
  assert.equal(held.echo_log_backlog_lines, waiting, JSON.stringify(held));
  assert.equal(held.echo_log_reopen_pending, 1);
  assert.equal(held.echo_log_dropped_lines_total, 0);
  assert.equal(await Deno.readTextFile(`${dir}/access.log.1`), linesText(1, 2));
  await restore();
  await server.stderr.next(/^reopened access log .* \(after failing\)$/);
  await serveClients(port, waiting + 3, waiting + 3);
  assert.equal(await server.stop(), 0, server.stderr.lines.join("\n"));
  assert.equal(
    await Deno.readTextFile(`${dir}/access.log`),
    linesText(3, waiting + 3),
  );
}

Deno.test(
  "echo-server on SIGHUP with a symlink at the log path writes nothing through it, says why, keeps the lines in memory and writes them once a file is back",
  withTempDir(async (dir) => {
    // The symlink's target lies outside the directory --allow-write names.
    const outside = await Deno.makeTempFile();
    try {
      await using server = spawnLogServer(dir, []);
      const served = await rotateAfterTwo(server, dir);
      await Deno.symlink(outside, `${dir}/access.log`);
      server.child.kill("SIGHUP");
      await server.stderr.next(
        /^refusing access log .*\/access\.log: it is a symlink .*; \d+ lines? waits? in memory, trying again every 1 s and on SIGHUP$/,
      );
      await serveClients(served.port, 3, 7);
      await assertLinesWaitThenLand(server, dir, served, 5, async () => {
        assert.equal(await Deno.readTextFile(outside), "");
        await Deno.remove(`${dir}/access.log`);
      });
      assert.equal(await Deno.readTextFile(outside), "");
    } finally {
      await Deno.remove(outside);
    }
  }),
);

Deno.test(
  "echo-server on SIGHUP with a FIFO at the log path keeps serving and keeps the lines in memory until a file is back",
  withTempDir(async (dir) => {
    await using server = spawnLogServer(dir, []);
    const served = await rotateAfterTwo(server, dir);
    const { port } = served;
    await mkfifo(`${dir}/access.log`);
    server.child.kill("SIGHUP");
    // A reopen that blocked in open(2) on the FIFO would stall the event
    // loop: no line on stderr, no client served until something read it.
    await within(
      server.stderr.next(
        /^refusing access log .*\/access\.log: it is a FIFO \(named pipe\) or a socket; /,
      ),
      30_000,
      "the refusal on stderr",
    );
    await within(serveClients(port, 3, 12), 30_000, "10 clients served");
    await assertLinesWaitThenLand(
      server,
      dir,
      served,
      10,
      () => Deno.remove(`${dir}/access.log`),
    );
  }),
);

Deno.test(
  "echo-server refuses to start on a symlink, a FIFO or a directory at the log path: one line, exit 1, nothing written",
  withTempDir(async (dir) => {
    const outside = await Deno.makeTempFile();
    try {
      const cases: [string, () => Promise<void>, RegExp][] = [
        [
          "symlink",
          () => Deno.symlink(outside, `${dir}/symlink/access.log`),
          /it is a symlink /,
        ],
        ["FIFO", () => mkfifo(`${dir}/FIFO/access.log`), /it is a FIFO /],
        [
          "directory",
          () => Deno.mkdir(`${dir}/directory/access.log`),
          /it is a directory;/,
        ],
      ];
      for (const [kind, make, reason] of cases) {
        await Deno.mkdir(`${dir}/${kind}`);
        await make();
        // A start-up that blocked on the FIFO, or served, is killed at 30 s.
        await using server = new ServerProcess(`${dir}/${kind}`, [], {
          timeoutMs: 30_000,
        });
        const { code, stderr } = await server.exit();
        assert.equal(code, 1, `${kind}: ${stderr}`);
        assert.match(
          stderr,
          new RegExp(
            `^echo-server: refusing access log ${dir}/${kind}/access\\.log: `,
          ),
          kind,
        );
        assert.match(stderr, reason, kind);
        assert.equal(stderr.split("\n").length, 2, `${kind}: one line`);
      }
      assert.equal(await Deno.readTextFile(outside), "");
    } finally {
      await Deno.remove(outside);
    }
  }),
);
