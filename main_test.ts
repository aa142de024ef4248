import assert from "node:assert/strict";
import denoJson from "./deno.json" with { type: "json" };
import { SAME_SIGNAL_WINDOW_MS } from "./main.ts";
import { USAGE } from "./options.ts";
import {
  assertUsageError,
  type CommandResult,
  connectMany,
  echo,
  findExecutable,
  readAll,
  runCommand,
  sendAndReset,
  ServerProcess,
  withTempDir,
} from "./test_util.ts";

const MAIN = new URL("./main.ts", import.meta.url).pathname;

/** Runs main.ts to completion with the given permissions and flags. */
function run(permissions: string[], args: string[]): Promise<CommandResult> {
  return runCommand(Deno.execPath(), ["run", ...permissions, MAIN, ...args]);
}

/** Waits until a second signal is a second request, not the same one. */
function outlastSameSignalWindow(): Promise<void> {
  return new Promise((resolve) =>
    setTimeout(resolve, SAME_SIGNAL_WINDOW_MS + 50)
  );
}

/**
 * Sends `signal` again once it is a second request, and checks that the
 * server cuts off `cutOff` connections (any number if undefined) at once
 * and exits with `signal`'s status after `clients` clients. Returns the
 * stderr it wrote from then on.
 */
async function assertSecondSignalCutsOff(
  server: ServerProcess,
  signal: "SIGTERM" | "SIGINT",
  clients: number,
  cutOff?: number,
): Promise<string> {
  await outlastSameSignalWindow();
  server.child.kill(signal);
  const { code, stderr } = await server.exit();
  assert.equal(code, signal === "SIGTERM" ? 143 : 130, stderr);
  assert.match(
    stderr,
    new RegExp(
      `^${signal} again: cutting off ${cutOff ?? "\\d+"} connections? now\n`,
    ),
  );
  assert.match(stderr, new RegExp(`\nstopped after ${clients} clients\n$`));
  return stderr;
}

/**
 * A server with `--metrics` and a `--shutdown-delay` that outlasts the
 * test, so everything the test does after the signal lands inside it
 * however slow the machine; a second signal ends it.
 */
function startWithLongDelay(dir: string): ServerProcess {
  return new ServerProcess(
    dir,
    ["--shutdown-delay", "3600", "--metrics", ":0"],
    { timeoutMs: 30_000 },
  );
}

/** Whether `path` exists. */
async function exists(path: string): Promise<boolean> {
  try {
    await Deno.lstat(path);
    return true;
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return false;
    throw error;
  }
}

/** Echoes `text` through the server at `port`; returns the reply as text. */
async function echoText(port: number, text: string): Promise<string> {
  const reply = await echo(port, new TextEncoder().encode(text));
  return new TextDecoder().decode(reply);
}

/**
 * After shutdown starts a new client is refused, or reset if it reached the
 * closing listener's queue; it is never served.
 */
async function assertNotServed(port: number): Promise<void> {
  let reply;
  try {
    reply = await echoText(port, "late");
  } catch (error) {
    if (
      error instanceof Deno.errors.ConnectionRefused ||
      error instanceof Deno.errors.ConnectionReset
    ) return;
    throw error;
  }
  assert.equal(reply, "", "a client was served after shutdown began");
}

/**
 * Connects a client to `port` and runs `start` on it; returns it open, or
 * closes it if `start` throws. The caller's `using` closes it.
 */
async function connectAnd(
  port: number,
  start: (conn: Deno.TcpConn) => Promise<void>,
): Promise<Deno.TcpConn> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  try {
    await start(conn);
  } catch (error) {
    conn.close();
    throw error;
  }
  return conn;
}

/**
 * A client whose message is begun ("in ") and which the server has
 * accepted, as a later client's full round trip proves.
 */
function startInFlight(port: number): Promise<Deno.TcpConn> {
  return connectAnd(port, async (conn) => {
    await conn.write(new TextEncoder().encode("in "));
    assert.equal(await echoText(port, "x"), "x");
  });
}

/**
 * A client that has sent 6 bytes, which the server has read (7 bytes with a
 * later client's round trip), so that the client's line must say 6.
 */
function holdSixBytes(
  port: number,
  metricsPort: number,
): Promise<Deno.TcpConn> {
  return connectAnd(port, async (conn) => {
    await conn.write(new Uint8Array(6));
    assert.equal(await echoText(port, "x"), "x");
    await waitForReceivedBytes(metricsPort, 7);
  });
}

/** The access log in `dir` holds exactly `expected`. */
async function assertAccessLog(dir: string, expected: string): Promise<void> {
  assert.equal(await Deno.readTextFile(`${dir}/access.log`), expected);
}

/** Ends the message ("flight") and checks all of it comes back. */
async function finishInFlight(conn: Deno.Conn): Promise<void> {
  await conn.write(new TextEncoder().encode("flight"));
  await conn.closeWrite();
  assert.equal(new TextDecoder().decode(await readAll(conn)), "in flight");
}

/**
 * Finishes the client `startInFlight()` began and checks the drain's end:
 * its echo, exit 0 after 2 clients (its probe and it), both lines logged.
 */
async function assertDrainsInFlight(
  server: ServerProcess,
  dir: string,
  conn: Deno.Conn,
): Promise<void> {
  await finishInFlight(conn);
  const { code, stderr } = await server.exit();
  assert.equal(code, 0, stderr);
  assert.equal(stderr, "stopped after 2 clients\n");
  await assertAccessLog(
    dir,
    "[client 2]: received 1 bytes\n[client 1]: received 9 bytes\n",
  );
}

Deno.test("echo-server --help and -h print the usage", async () => {
  const help = await run([], ["--help"]);
  assert.equal(help.code, 0);
  assert.equal(help.stdout, `${USAGE}\n`);
  assert.deepEqual(await run([], ["-h"]), help);
});

Deno.test("echo-server --version and -V print the version from deno.json", async () => {
  const version = await run([], ["--version"]);
  assert.equal(version.code, 0);
  assert.equal(version.stdout, `echo-server ${denoJson.version}\n`);
  assert.deepEqual(await run([], ["-V"]), version);
});

const BAD_FLAGS: Array<[string[], string]> = [
  [["--bogus"], "echo-server: Unknown option '--bogus'"],
  [["extra"], "echo-server: Unexpected argument 'extra'"],
  [["--port", "70000"], "echo-server: --port must be a whole number"],
  [["--port", "4x"], "echo-server: --port must be a whole number"],
  [["--port"], "echo-server: Option '--port <value>' argument missing"],
  [["--max-client-bytes", "12XB"], "echo-server: --max-client-bytes must"],
  [["--max-connections", "0"], "echo-server: --max-connections must"],
  [
    ["--max-buffered", "1KiB"],
    "echo-server: --max-buffered must be a size of at least 65536 bytes",
  ],
  [["--idle-timeout", "0"], "echo-server: --idle-timeout must"],
  [
    ["--idle-timeout", "0.0004"],
    "echo-server: --idle-timeout must be a number of seconds from 0.001 to 86400, not '0.0004'",
  ],
  [
    ["--drain-timeout", "0.0004"],
    "echo-server: --drain-timeout must be 0 or a number of seconds from 0.001 to 86400, not '0.0004'",
  ],
  [
    ["--shutdown-delay", "0.0001"],
    "echo-server: --shutdown-delay must be 0 or a number of seconds from 0.001 to 86400, not '0.0001'",
  ],
  [
    ["--drain-timeout", "-1"],
    "echo-server: --drain-timeout must be 0 or a number of seconds from 0.001 to 86400, not '-1'",
  ],
  [
    ["--port", "-1"],
    "echo-server: --port must be a whole number from 0 to 65535, not '-1'",
  ],
  [["--shutdown-delay", "soon"], "echo-server: --shutdown-delay must"],
  [["--log", ""], "echo-server: --log must not be empty"],
  [
    ["--log-backlog", "1KiB"],
    "echo-server: --log-backlog must be a size of at least 4096 bytes",
  ],
  [["--instance", "0/4"], "echo-server: --instance must be I/N"],
  [["--instance", "5/4"], "echo-server: --instance must be I/N"],
  [["--instance", "x"], "echo-server: --instance must be I/N"],
  [["--instance", "1/1025"], "echo-server: --instance must be I/N"],
  [
    ["--proxy-protocol", "localhost"],
    `echo-server: --proxy-protocol: "localhost" is not an IP address or CIDR range`,
  ],
  [
    ["--proxy-protocol", "10.0.0.1/8"],
    'echo-server: --proxy-protocol: "10.0.0.1/8" has bits set past /8 (did you mean 10.0.0.0/8?)',
  ],
];
for (const [args, message] of BAD_FLAGS) {
  Deno.test(`echo-server ${args.map((arg) => arg || "''").join(" ")} prints one line and a pointer to --help, exits 2`, async () => {
    assertUsageError(await run([], args), message);
  });
}

Deno.test(
  "echo-server on a port in use prints one line, exits 1",
  withTempDir(async (dir) => {
    using taken = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const port = taken.addr.port;
    const { code, stderr } = await run(
      ["--allow-net", `--allow-write=${dir}`],
      ["--port", `${port}`, "--log", `${dir}/access.log`],
    );
    assert.equal(code, 1);
    assert.equal(
      stderr,
      `echo-server: cannot listen on 127.0.0.1:${port}: address already in use (is another server running? pick another --port)\n`,
    );
  }),
);

Deno.test(
  "echo-server on an address not on this machine prints one line, exits 1",
  withTempDir(async (dir) => {
    const { code, stderr } = await run(
      ["--allow-net", `--allow-write=${dir}`],
      ["--host", "192.0.2.1", "--port", "0", "--log", `${dir}/access.log`],
    );
    assert.equal(code, 1);
    assert.match(
      stderr,
      /^echo-server: cannot listen on 192\.0\.2\.1:0: address not available on this machine \(check --host\)\n$/,
    );
  }),
);

Deno.test(
  "echo-server with an unwritable log prints one line naming it, exits 1",
  withTempDir(async (dir) => {
    await Deno.writeTextFile(`${dir}/file`, "");
    const { code, stderr } = await run(
      ["--allow-net", `--allow-write=${dir}`],
      ["--port", "0", "--log", `${dir}/file/access.log`],
    );
    assert.equal(code, 1);
    assert.match(
      stderr,
      new RegExp(
        `^echo-server: cannot open access log ${dir}/file/access.log: [^\\n]+\\n$`,
      ),
    );
  }),
);

Deno.test(
  "echo-server names the fixes when it may not write the default log",
  withTempDir(async (dir) => {
    // Write permission only for a temporary directory: the real default log
    // is never touched, whoever runs the tests.
    const { code, stderr } = await run(
      ["--allow-net", `--allow-write=${dir}`],
      ["--port", "0"],
    );
    assert.equal(code, 1);
    assert.equal(
      stderr,
      "echo-server: cannot open access log /var/log/echo-server/access.log: " +
        "Deno's --allow-write does not grant it (the tasks and the compiled " +
        "binary may write only in /var/log/echo-server: log there, or run " +
        "main.ts with --allow-write naming the log's directory)\n",
    );
  }),
);

Deno.test(
  "echo-server without --allow-net prints one line, exits 1",
  withTempDir(async (dir) => {
    const { code, stderr } = await run(
      [`--allow-write=${dir}`],
      ["--port", "0", "--log", `${dir}/access.log`],
    );
    assert.equal(code, 1);
    assert.equal(
      stderr,
      "echo-server: cannot listen on 127.0.0.1:0: permission to use the network was not granted (run with --allow-net)\n",
    );
  }),
);

Deno.test(
  "echo-server --instance 2/3 logs its clients as 2, 5, 8",
  withTempDir(async (dir) => {
    await using server = new ServerProcess(dir, ["--instance", "2/3"]);
    const port = await server.port();
    for (const text of ["a", "bb", "ccc"]) {
      assert.equal(await echoText(port, text), text);
    }
    server.child.kill("SIGTERM");
    assert.equal((await server.exit()).code, 0);
    await assertAccessLog(
      dir,
      "[client 2]: received 1 bytes\n[client 5]: received 2 bytes\n" +
        "[client 8]: received 3 bytes\n",
    );
  }),
);

Deno.test(
  "echo-server --proxy-protocol names its senders at start, echoes what follows a header and refuses a client without one",
  withTempDir(async (dir) => {
    await using server = new ServerProcess(dir, [
      "--proxy-protocol",
      "127.0.0.1, ::1",
    ]);
    const line = await server.waitFor(/^listening on .*/);
    assert.match(
      line,
      /, access log \S+, PROXY protocol from 127\.0\.0\.1,::1$/,
    );
    const port = Number(/:(\d+), /.exec(line)![1]);
    assert.equal(
      await echoText(port, "PROXY TCP4 192.0.2.1 127.0.0.1 5000 4000\r\nhi"),
      "hi",
    );
    // Cut off: an empty reply, or a reset if "hello" was not all read.
    assert.equal(
      await echoText(port, "hello").catch((error) => {
        if (error instanceof Deno.errors.ConnectionReset) return "";
        throw error;
      }),
      "",
    );
    await server.waitFor(
      /^client 2 \(connection from 127\.0\.0\.1\): cut off after \d+ bytes: /,
    );
    server.child.kill("SIGTERM");
    assert.equal((await server.exit()).code, 0);
    await assertAccessLog(
      dir,
      "[client 1]: received 2 bytes\n[client 2]: received 0 bytes\n",
    );
  }),
);

Deno.test(
  "echo-server reopens the log on SIGHUP after a rename, losing no line",
  withTempDir(async (dir) => {
    await using server = new ServerProcess(dir, []);
    const port = await server.port();
    assert.equal(await echoText(port, "one"), "one");
    await Deno.rename(`${dir}/access.log`, `${dir}/access.log.1`);
    assert.equal(await echoText(port, "two"), "two");
    server.child.kill("SIGHUP");
    await server.waitFor(/^reopened access log /);
    assert.equal(await echoText(port, "three"), "three");
    server.child.kill("SIGTERM");
    assert.equal((await server.exit()).code, 0);
    assert.equal(
      await Deno.readTextFile(`${dir}/access.log.1`),
      "[client 1]: received 3 bytes\n[client 2]: received 3 bytes\n",
    );
    await assertAccessLog(dir, "[client 3]: received 5 bytes\n");
  }),
);

for (const signal of ["SIGTERM", "SIGINT"] as const) {
  Deno.test(
    `echo-server on ${signal} drains a client in flight, refuses new ones, exits 0`,
    withTempDir(async (dir) => {
      await using server = new ServerProcess(dir, ["--drain-timeout", "3600"]);
      const port = await server.port();
      using conn = await startInFlight(port);
      server.child.kill(signal);
      await server.waitFor(new RegExp(`^${signal}: stopping; 1 connection `));
      await assertNotServed(port);
      await assertDrainsInFlight(server, dir, conn);
    }),
  );
}

Deno.test(
  "echo-server on a second SIGTERM cuts off at once, its log complete",
  withTempDir(async (dir) => {
    await using server = new ServerProcess(dir, [
      "--drain-timeout",
      "3600",
      "--metrics",
      ":0",
    ]);
    const port = await server.port();
    const metricsPort = await server.metricsPort();
    using _client = await holdSixBytes(port, metricsPort);
    server.child.kill("SIGTERM");
    await server.waitFor(/^SIGTERM: stopping; 1 connection /);
    const stderr = await assertSecondSignalCutsOff(server, "SIGTERM", 2, 1);
    assert.match(stderr, /client 1: cut off after 6 bytes/);
    await assertAccessLog(
      dir,
      "[client 2]: received 1 bytes\n[client 1]: received 6 bytes\n",
    );
  }),
);

Deno.test(
  "echo-server takes a second SIGINT right after the first as the same request and drains, exits 0",
  withTempDir(async (dir) => {
    await using server = new ServerProcess(dir, ["--drain-timeout", "3600"]);
    const port = await server.port();
    using conn = await startInFlight(port);
    // What a terminal's Ctrl-C under `deno task` delivers: two at once.
    server.child.kill("SIGINT");
    server.child.kill("SIGINT");
    await server.waitFor(/^SIGINT: stopping; 1 connection /);
    await finishInFlight(conn);
    const { code, stderr } = await server.exit();
    assert.equal(code, 0, stderr);
    assert.equal(stderr, "stopped after 2 clients\n");
  }),
);

for (const bad of ["9400", "host:", "host:port", ":70000", "::1:9400"]) {
  Deno.test(`echo-server --metrics ${bad} prints one line and a pointer to --help, exits 2`, async () => {
    assertUsageError(
      await run([], ["--metrics", bad]),
      `echo-server: --metrics must be HOST:PORT or :PORT with a port from 0 to 65535, not '${bad}'`,
    );
  });
}

Deno.test(
  "echo-server --metrics on a port in use prints one line, exits 1",
  withTempDir(async (dir) => {
    using taken = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const port = taken.addr.port;
    const { code, stderr } = await run(
      ["--allow-net", `--allow-write=${dir}`],
      ["--port", "0", "--log", `${dir}/access.log`, "--metrics", `:${port}`],
    );
    assert.equal(code, 1);
    assert.match(
      stderr,
      new RegExp(
        `\\necho-server: --metrics: cannot listen on 127\\.0\\.0\\.1:${port}: address already in use \\(is another server running\\? pick another --metrics\\)\\n`,
      ),
    );
  }),
);

Deno.test(
  "echo-server --metrics on an address not on this machine names --metrics, exits 1",
  withTempDir(async (dir) => {
    const { code, stderr } = await run(
      ["--allow-net", `--allow-write=${dir}`],
      [
        "--port",
        "0",
        "--log",
        `${dir}/access.log`,
        "--metrics",
        "192.0.2.1:0",
      ],
    );
    assert.equal(code, 1);
    assert.match(
      stderr,
      /\necho-server: --metrics: cannot listen on 192\.0\.2\.1:0: address not available on this machine \(check --metrics\)\n/,
    );
  }),
);

for (const host of ["nosuch.invalid", "999.1.1.1"]) {
  Deno.test(
    `echo-server --host ${host} says no such host in one line, exits 1`,
    withTempDir(async (dir) => {
      const { code, stderr } = await run(
        ["--allow-net", `--allow-write=${dir}`],
        ["--host", host, "--port", "0", "--log", `${dir}/access.log`],
      );
      assert.equal(code, 1);
      assert.equal(
        stderr,
        `echo-server: cannot listen on ${host}:0: no such host (check --host; an address such as 127.0.0.1 or ::1 needs no lookup)\n`,
      );
    }),
  );
}

/** `GET path` over HTTP/1.1 with `Connection: close`: status and body. */
async function httpGet(
  port: number,
  path: string,
): Promise<{ status: number; body: string }> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  try {
    await conn.write(
      new TextEncoder().encode(
        `GET ${path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n`,
      ),
    );
    const text = new TextDecoder().decode(await readAll(conn));
    return {
      status: Number(text.split(" ", 2)[1]),
      body: text.slice(text.indexOf("\r\n\r\n") + 4),
    };
  } finally {
    conn.close();
  }
}

/** The value of the unlabelled sample `name` in an exposition. */
function sampleValue(exposition: string, name: string): number {
  const match = new RegExp(`^${name} (\\S+)$`, "m").exec(exposition);
  assert.ok(match, `no ${name} in ${exposition}`);
  return Number(match[1]);
}

for (const signal of ["SIGTERM", "SIGINT"] as const) {
  Deno.test(
    `echo-server --metrics answers /healthz 503 on ${signal} while a client finishes`,
    withTempDir(async (dir) => {
      await using server = new ServerProcess(dir, [
        "--drain-timeout",
        "3600",
        "--metrics",
        ":0",
      ]);
      const port = await server.port();
      const metricsPort = await server.metricsPort();
      assert.deepEqual(await httpGet(metricsPort, "/healthz"), {
        status: 200,
        body: "ok\n",
      });
      using conn = await startInFlight(port);
      // Accepted = lines written + clients being served: a client's line
      // is written in the same step that stops counting it as active.
      const exposition = (await httpGet(metricsPort, "/metrics")).body;
      const lines = (await Deno.readTextFile(`${dir}/access.log`))
        .split("\n").length - 1;
      assert.equal(sampleValue(exposition, "echo_connections_active"), 1);
      assert.equal(lines, 1);
      assert.equal(
        sampleValue(exposition, "echo_connections_accepted_total"),
        lines + 1,
      );
      server.child.kill(signal);
      // /healthz flips before this line is printed.
      await server.waitFor(new RegExp(`^${signal}: stopping; 1 connection `));
      assert.deepEqual(await httpGet(metricsPort, "/healthz"), {
        status: 503,
        body: "draining\n",
      });
      await assertNotServed(port);
      await finishInFlight(conn);
      const { code } = await server.exit();
      assert.equal(code, 0);
      // The health checks and scrapes were never clients.
      await assertAccessLog(
        dir,
        "[client 2]: received 1 bytes\n[client 1]: received 9 bytes\n",
      );
    }),
  );
}

/**
 * main.ts with `args` and its stderr on a new FIFO at `fifo`, for a test
 * that decides when stderr is read (open the FIFO to read it).
 */
async function startOnFifo(
  dir: string,
  fifo: string,
  args: string[],
): Promise<ServerProcess> {
  assert.equal((await runCommand("mkfifo", [fifo])).code, 0);
  return new ServerProcess(dir, args, {
    env: { STDERR: fifo },
    shell: 'exec 2>"$STDERR"',
  });
}

Deno.test(
  "echo-server on SIGHUP after SIGTERM, while its last line waits for a stalled stderr, reopens the log and exits 0 with that line",
  withTempDir(async (dir) => {
    // stderr is a FIFO read here with plain reads (no read-ahead), so the
    // test decides when the pipe is full and when it drains.
    const fifo = `${dir}/stderr`;
    await using server = await startOnFifo(dir, fifo, [
      "--drain-timeout",
      "3600",
    ]);
    const { child } = server;
    using stderr = await Deno.open(fifo, { read: true });
    let text = "";
    const buffer = new Uint8Array(4096);
    /** Reads stderr until `pattern` matches what was read, or to its end. */
    const readUntil = async (pattern?: RegExp) => {
      while (pattern === undefined || !pattern.test(text)) {
        const n = await stderr.read(buffer);
        if (n === null) {
          if (pattern === undefined) return;
          throw new Error(`stderr ended: ${text}`);
        }
        text += new TextDecoder().decode(buffer.subarray(0, n));
      }
    };
    const readToEnd = () => readUntil();
    try {
      await readUntil(/^listening on .*\n/m);
      const port = Number(/^listening on .*:(\d+), /m.exec(text)![1]);
      using conn = await startInFlight(port);
      child.kill("SIGTERM");
      await readUntil(/^SIGTERM: stopping; 1 connection .*\n/m);
      // Fill the pipe (16 pages: 64 KiB on x86-64) as a stalled log
      // shipper would, in writes of one page, each of whole lines and so
      // never split by a line of the server's.
      {
        using filler = await Deno.open(fifo, { write: true });
        const page = new TextEncoder().encode(
          `${"#".repeat(63)}\n`.repeat(64),
        );
        for (let i = 0; i < 16; i++) {
          assert.equal(await filler.write(page), page.length);
        }
      }
      await finishInFlight(conn);
      // Drained once the client has its line; the server then waits for
      // stderr to take its last line (up to 5 s). Rotate the log now, as
      // logrotate's postrotate during a restart would.
      const log = `${dir}/access.log`;
      const complete =
        "[client 2]: received 1 bytes\n[client 1]: received 9 bytes\n";
      const giveUp = Date.now() + 10_000;
      while ((await Deno.readTextFile(log)) !== complete) {
        assert.ok(Date.now() < giveUp, await Deno.readTextFile(log));
        await new Promise((resolve) => setTimeout(resolve, 0)); // a timer turn
      }
      await Deno.rename(log, `${log}.1`);
      child.kill("SIGHUP");
      // Either the server reopens the log (a new file at the path) or the
      // signal kills it; only then is stderr read again.
      let exited = false;
      child.status.then(() => exited = true);
      while (!exited && !(await exists(log))) {
        await new Promise((resolve) => setTimeout(resolve, 0)); // a timer turn
      }
      await readToEnd();
      const lines = text.split("\n").filter((line) => !/^#+$/.test(line));
      assert.equal((await child.status).code, 0, lines.join("\n"));
      assert.deepEqual(lines.slice(2), [
        "stopped after 2 clients",
        `reopened access log ${log}`,
        "",
      ]);
      assert.equal(await Deno.readTextFile(`${log}.1`), complete);
      assert.equal(await Deno.readTextFile(log), "");
    } finally {
      try {
        child.kill("SIGKILL");
      } catch {
        // It exited.
      }
      await child.status;
    }
  }),
);

Deno.test(
  "echo-server under ulimit -n 64 serves and logs every client once, reports at most once a second",
  withTempDir(async (dir) => {
    await using server = new ServerProcess(dir, [], { maxOpenFiles: 64 });
    const port = await server.port();
    const started = performance.now();
    // More clients than the server has descriptors, all held open at once:
    // the server accepts until accept fails with EMFILE, the rest wait in
    // the kernel's queue.
    const clients = 100;
    const conns = await connectMany(port, clients);
    try {
      const payloads = conns.map((_, i) =>
        new TextEncoder().encode("x".repeat(i + 1))
      );
      await Promise.all(conns.map((conn, i) => conn.write(payloads[i])));
      // Held until the server has retried for over a second, so that the
      // back-off has something to report twice.
      await server.waitFor(/^accept failed.*\(os error 24\)/);
      await server.waitFor(/^accept failed.*\(os error 24\)/);
      // Release them: each finished client frees a descriptor for the next.
      const replies = await Promise.all(conns.map(async (conn) => {
        await conn.closeWrite();
        return new TextDecoder().decode(await readAll(conn));
      }));
      replies.forEach((reply, i) => assert.equal(reply.length, i + 1));
    } finally {
      for (const conn of conns) conn.close();
    }
    // The server is still up.
    assert.equal(await echoText(port, "after"), "after");
    server.child.kill("SIGTERM");
    await server.waitFor(/^SIGTERM: stopping/);
    const seconds = (performance.now() - started) / 1000;
    const { code, stderr } = await server.exit();
    assert.equal(code, 0, stderr);

    const log = await Deno.readTextFile(`${dir}/access.log`);
    const lines = log.trimEnd().split("\n");
    assert.equal(lines.length, clients + 1);
    const ids = new Set<number>();
    const sizes: number[] = [];
    for (const line of lines) {
      const match = /^\[client (\d+)\]: received (\d+) bytes$/.exec(line);
      assert.ok(match, `malformed line: ${line}`);
      ids.add(Number(match[1]));
      sizes.push(Number(match[2]));
    }
    assert.equal(ids.size, clients + 1, "a client number was logged twice");
    assert.deepEqual(
      sizes.toSorted((a, b) => a - b),
      [...Array.from({ length: clients }, (_, i) => i + 1), 5].toSorted((
        a,
        b,
      ) => a - b),
    );

    // Before the signal: one back-off line per second at most, each saying
    // how many failures it covers; at shutdown, one more for the rest.
    const stopping = server.stderr.lines.findIndex((line) =>
      line.startsWith("SIGTERM: stopping")
    );
    const isBackOff = (line: string) =>
      /^accept failed \d+ times?: Error: Too many open files \(os error 24\); /
        .test(line);
    // Deno's own warnings are not the server's (with NODE_EXTRA_CA_CERTS
    // set, Deno loads it lazily, which fails when out of fds).
    const serverLines = (lines: string[]) =>
      lines.filter((line) =>
        line !== "" && !line.startsWith("Warning: ") &&
        !line.startsWith("stopped after ")
      );
    // All of stderr: the lines waited for and the rest (`stderr`) alike.
    const before = serverLines(server.stderr.lines.slice(1, stopping));
    const after = serverLines(server.stderr.lines.slice(stopping + 1));
    assert.ok(before.length >= 1);
    // Stands: one-sided (a slow machine only loosens it, so load cannot
    // fail it), and a rate can only be bounded by elapsed time.
    assert.ok(
      before.length <= Math.floor(seconds) + 1,
      `${before.length} back-off lines in ${seconds} s:\n${before.join("\n")}`,
    );
    assert.ok(after.length <= 1, after.join("\n"));
    for (const line of [...before, ...after]) {
      assert.ok(isBackOff(line), `unexpected stderr line: ${line}`);
    }
  }),
);

Deno.test(
  "echo-server --metrics under ulimit -n 64 answers /metrics again after running out",
  withTempDir(async (dir) => {
    await using server = new ServerProcess(dir, ["--metrics", ":0"], {
      maxOpenFiles: 64,
    });
    const port = await server.port();
    const metricsPort = await server.metricsPort();
    assert.equal((await httpGet(metricsPort, "/metrics")).status, 200);
    // More clients than the server has descriptors, all held open: the
    // server accepts until accept fails with EMFILE.
    const clients = 100;
    const conns = await connectMany(port, clients);
    let queued: ReturnType<typeof httpGet> | undefined;
    try {
      await server.waitFor(/^accept failed.*\(os error 24\)/);
      // Now the metrics server's accept fails too: it keeps listening and
      // accepts again after a back-off; this request waits in the queue.
      queued = httpGet(metricsPort, "/metrics");
      await server.waitFor(
        /^metrics server: accept failed: .*\(os error 24\); accepting again in \d+ ms$/,
      );
    } finally {
      for (const conn of conns) conn.close();
    }
    // Descriptors are free again: the queued request is answered.
    const exposition = await queued;
    await server.waitFor(/^metrics server: accepting again$/);
    assert.equal(exposition.status, 200);
    const exhaustion = /^echo_accept_errors_total\{kind="exhaustion"\} (\d+)$/m
      .exec(exposition.body);
    assert.ok(exhaustion && Number(exhaustion[1]) > 0, exposition.body);
    // The process lived through it and stops as usual.
    server.child.kill("SIGTERM");
    const { code, stderr } = await server.exit();
    assert.equal(code, 0, stderr);
    const log = await Deno.readTextFile(`${dir}/access.log`);
    assert.equal(log.split("\n").length - 1, clients);
  }),
);

Deno.test(
  "echo-server --metrics exits 0 on SIGTERM while a metrics request body never ends",
  withTempDir(async (dir) => {
    await using server = new ServerProcess(dir, ["--metrics", ":0"], {
      timeoutMs: 30_000,
    });
    const port = await server.port();
    const metricsPort = await server.metricsPort();
    // Promises 100000 bytes of body, sends 3, and stays connected.
    const held = await Deno.connect({
      hostname: "127.0.0.1",
      port: metricsPort,
    });
    try {
      await held.write(
        new TextEncoder().encode(
          "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nabc",
        ),
      );
      // Answered (405) before the body ends: the request reached the server.
      const head = new Uint8Array(1024);
      const n = await held.read(head);
      assert.match(
        new TextDecoder().decode(head.subarray(0, n ?? 0)),
        /^HTTP\/1.1 405 /,
      );
      assert.equal(await echoText(port, "x"), "x");
      server.child.kill("SIGTERM");
      // Killed after the timeout (not 0) if shutdown waits for that body.
      const { code, stderr } = await server.exit();
      assert.equal(code, 0, stderr);
      assert.match(stderr, /\nstopped after 1 client\n$/);
    } finally {
      held.close();
    }
    await assertAccessLog(dir, "[client 1]: received 1 bytes\n");
  }),
);

Deno.test(
  "echo-server --shutdown-delay answers /healthz 503 on SIGTERM while still serving and logging new clients and those in flight",
  withTempDir(async (dir) => {
    await using server = startWithLongDelay(dir);
    const port = await server.port();
    const metricsPort = await server.metricsPort();
    {
      using conn = await startInFlight(port);
      server.child.kill("SIGTERM");
      await server.waitFor(
        /^SIGTERM: stopping in 3600 s; accepting until then, \/healthz answers 503$/,
      );
      assert.deepEqual(await httpGet(metricsPort, "/healthz"), {
        status: 503,
        body: "draining\n",
      });
      // A load balancer that has not yet seen the 503 still gets served.
      assert.equal(
        await echoText(port, "during the delay"),
        "during the delay",
      );
      await finishInFlight(conn);
    }
    await assertSecondSignalCutsOff(server, "SIGTERM", 3);
    // Every client, the one in the delay included, has its line.
    assert.deepEqual(
      (await Deno.readTextFile(`${dir}/access.log`)).split("\n").toSorted(),
      [
        "",
        "[client 1]: received 9 bytes",
        "[client 2]: received 1 bytes",
        "[client 3]: received 16 bytes",
      ],
    );
  }),
);

Deno.test(
  "echo-server --shutdown-delay stops accepting when the delay ends, drains the client in flight and exits 0",
  withTempDir(async (dir) => {
    // Nothing has to happen inside the 0.2 s delay: the client in flight
    // stays through it and finishes only once the drain has begun.
    await using server = new ServerProcess(dir, [
      "--shutdown-delay",
      "0.2",
      "--drain-timeout",
      "3600",
      "--metrics",
      ":0",
    ]);
    const port = await server.port();
    const metricsPort = await server.metricsPort();
    using conn = await startInFlight(port);
    server.child.kill("SIGTERM");
    await server.waitFor(
      /^SIGTERM: stopping in 0.2 s; accepting until then, \/healthz answers 503$/,
    );
    await server.waitFor(
      /^SIGTERM: stopping; \d+ connections? gets? up to 3600 s to finish$/,
    );
    await assertNotServed(port);
    assert.deepEqual(await httpGet(metricsPort, "/healthz"), {
      status: 503,
      body: "draining\n",
    });
    await assertDrainsInFlight(server, dir, conn);
  }),
);

Deno.test(
  "echo-server --shutdown-delay on a second SIGINT in the delay cuts off at once, exits 130, its log complete",
  withTempDir(async (dir) => {
    await using server = startWithLongDelay(dir);
    const port = await server.port();
    const metricsPort = await server.metricsPort();
    using conn = await holdSixBytes(port, metricsPort);
    server.child.kill("SIGINT");
    await server.waitFor(
      /^SIGINT: stopping in 3600 s; accepting until then, \/healthz answers 503$/,
    );
    await assertSecondSignalCutsOff(server, "SIGINT", 2, 1);
    await readUntilEnd(conn);
    await assertAccessLog(
      dir,
      "[client 2]: received 1 bytes\n[client 1]: received 6 bytes\n",
    );
  }),
);

/** Reads `conn` to its end, a reset counting as the end. */
async function readUntilEnd(conn: Deno.Conn): Promise<void> {
  try {
    await readAll(conn);
  } catch (error) {
    if (!(error instanceof Deno.errors.ConnectionReset)) throw error;
  }
}

Deno.test(
  "echo-server with a stderr nobody reads serves on through 2,000 client resets, then counts the lines it held back",
  withTempDir(async (dir) => {
    // A stderr pipe the test stops reading after the start-up lines, like a
    // stalled log shipper: a pipe holds 64 KiB, about 1,100 lines of one
    // per reset, and a blocking write to a full one stops the event loop.
    const fifo = `${dir}/stderr`;
    // If the server hangs, killing it makes the clients below fail.
    await using server = await startOnFifo(dir, fifo, ["--metrics", ":0"]);
    const { child } = server;
    const reader = (await Deno.open(fifo, { read: true })).readable.getReader();
    const decoder = new TextDecoder();
    let text = "";
    try {
      while (!/^metrics on .*\n/m.test(text)) {
        const { value, done } = await reader.read();
        if (done) throw new Error(`server exited: ${text}`);
        text += decoder.decode(value, { stream: true });
      }
      const port = Number(/^listening on .*:(\d+), /m.exec(text)![1]);
      const metricsPort = Number(
        /^metrics on .*:(\d+)\/metrics/m.exec(text)![1],
      );

      const resets = 2000;
      for (let sent = 0; sent < resets; sent += 50) {
        await Promise.all(
          Array.from({ length: 50 }, () => sendAndReset(port, "x")),
        );
      }
      assert.equal(await echoText(port, "still here"), "still here");
      const exposition = (await httpGet(metricsPort, "/metrics")).body;
      assert.equal(
        sampleValue(exposition, "echo_connections_accepted_total"),
        resets + 1,
      );
      // Each reset client was either reset while queued or while served.
      const reset = sampleValue(
        exposition,
        'echo_cutoffs_total{reason="reset"}',
      );
      const queued = sampleValue(
        exposition,
        'echo_accept_errors_total{kind="client"}',
      );
      assert.equal(reset + queued, resets, exposition);
      child.kill("SIGTERM");
      assert.equal((await child.status).code, 0);

      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        text += decoder.decode(value, { stream: true });
      }
      const lines = text.trimEnd().split("\n");
      let named = 0;
      let counted = 0;
      for (const line of lines.slice(2)) {
        if (/^client \d+: (failed before it was accepted: )?\w+: /.test(line)) {
          named++;
          continue;
        }
        const summary =
          /^\.\.\. and (\d+) more client diagnostics? in the last second \(reset (\d+)\)$/
            .exec(line);
        if (summary) {
          assert.equal(summary[1], summary[2]);
          counted += Number(summary[1]);
          continue;
        }
        assert.match(line, /^(SIGTERM: stopping|stopped after 2001 clients$)/);
      }
      assert.ok(named < resets / 2, `${named} lines about single clients`);
      assert.equal(named + counted, resets, lines.join("\n"));
      const log = await Deno.readTextFile(`${dir}/access.log`);
      assert.equal(log.split("\n").length - 1, resets + 1);
    } finally {
      await reader.cancel();
    }
  }),
);

// Holds the server's stderr in a pipe of one page (4 KiB, F_SETPIPE_SZ) that
// it reads only for the start-up lines, passed on to its own stderr after
// the server's pid, and says "full" there once one of the server's threads
// is blocked writing to the pipe (wchan pipe_write). At 10 lines
// a second about single clients, a 64 KiB pipe would take minutes to fill;
// one page takes a few seconds. A count of queued bytes is no sign: a
// batch of lines up to PIPE_BUF is written whole or not at all, so the
// pipe can stall a batch's length short of full (seen under load in CI).
const STALLED_STDERR = `
import fcntl, os, struct, subprocess, sys, termios, time
r, w = os.pipe()
fcntl.fcntl(w, 1031, 4096)  # F_SETPIPE_SZ
child = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=w)
os.close(w)
seen = b""
while not (b"metrics on" in seen and seen.endswith(b"\\n")):
    byte = os.read(r, 1)
    if not byte:
        break
    seen += byte
sys.stderr.write("pid %d\\n" % child.pid + seen.decode())
sys.stderr.flush()
def blocked_in_pipe_write(pid):
    for task in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/wchan" % (pid, task)) as f:
                if "pipe_write" in f.read():
                    return True
        except OSError:
            pass
    return False
said = False
while child.poll() is None:
    queued = struct.unpack("i", fcntl.ioctl(r, termios.FIONREAD, b"\\0" * 4))[0]
    if not said and queued > 0 and blocked_in_pipe_write(child.pid):
        print("full", file=sys.stderr, flush=True)
        said = True
    time.sleep(0.05)
sys.exit(child.returncode)
`;

Deno.test({
  name:
    "echo-server serves on while its stderr pipe is full and nobody reads it",
  ignore: findExecutable("python3") === undefined,
  fn: withTempDir(async (dir) => {
    // Python runs the server and passes its start-up lines on to stderr.
    await using python = new ServerProcess(dir, ["--metrics", ":0"], {
      env: { PYTHON: findExecutable("python3")!, SCRIPT: STALLED_STDERR },
      shell: 'exec "$PYTHON" -c "$SCRIPT" "$@"',
    });
    const { child, stderr: lines } = python;
    let pid: number | undefined;
    let stalledKill: ReturnType<typeof setTimeout> | undefined;
    try {
      pid = Number((await lines.next(/^pid (\d+)$/))[1]);
      const port = Number((await lines.next(/^listening on .*:(\d+), /))[1]);
      const metricsPort = Number(
        (await lines.next(/^metrics on .*:(\d+)\//))[1],
      );
      // One line per reset until the pipe is full: about 70 lines.
      const full = lines.next(/^full$/);
      let resets = 0;
      let isFull = false;
      full.then(() => isFull = true, () => {});
      // Bounded: were stderr never to stall, the test fails here rather
      // than reset clients for ever.
      const giveUp = Date.now() + 45_000;
      while (!isFull) {
        if (Date.now() > giveUp) {
          throw new Error(`stderr never stalled after ${resets} resets`);
        }
        await Promise.all(
          Array.from({ length: 20 }, () => sendAndReset(port, "x")),
        );
        resets += 20;
      }
      await full;
      // A blocking stderr write would stop the event loop here: the echo
      // would never come, so the server is killed after 30 s to fail it.
      stalledKill = setTimeout(() => Deno.kill(pid!, "SIGKILL"), 30_000);
      assert.equal(await echoText(port, "still here"), "still here");
      const exposition = (await httpGet(metricsPort, "/metrics")).body;
      assert.equal(
        sampleValue(exposition, "echo_connections_accepted_total"),
        resets + 1,
      );
      Deno.kill(pid, "SIGTERM");
      // The server gives up flushing the stalled pipe and exits.
      assert.equal((await child.status).code, 0);
      const log = await Deno.readTextFile(`${dir}/access.log`);
      assert.equal(log.split("\n").length - 1, resets + 1);
    } finally {
      clearTimeout(stalledKill);
      // The server is python's child: killing python alone would leave it.
      if (pid !== undefined) {
        try {
          Deno.kill(pid, "SIGKILL");
        } catch {
          // It exited.
        }
      }
    }
  }),
});

/**
 * Waits until the server at `metricsPort` has read at least `bytes` bytes
 * (echo_received_bytes_total), checking every few milliseconds for at most
 * 30 s.
 */
async function waitForReceivedBytes(
  metricsPort: number,
  bytes: number,
): Promise<void> {
  const giveUp = Date.now() + 30_000;
  for (;;) {
    const { body } = await httpGet(metricsPort, "/metrics");
    const received = sampleValue(body, "echo_received_bytes_total");
    if (received >= bytes) return;
    if (Date.now() > giveUp) {
      throw new Error(`gave up waiting: ${received} of ${bytes} bytes read`);
    }
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}
