/**
 * Test support shared by the `*_test.ts` files: socket I/O against the echo
 * server, a recording server on an ephemeral port, running a command, and a
 * temporary directory per test.
 *
 * @module
 */

import assert from "node:assert/strict";
import net from "node:net";
import { readAll, writeAll } from "./_bytes.ts";
import type { ReporterClock } from "./reporter.ts";
import { type EchoServer, serveEcho, type ServeOptions } from "./server.ts";

const MAIN = new URL("./main.ts", import.meta.url).pathname;

// Tests import these from here with the rest of their helpers.
export { readAll, writeAll } from "./_bytes.ts";

/**
 * Connects to 127.0.0.1:`port`, sends `payload`, half-closes, then reads
 * the reply to EOF and returns it. A payload given as pieces is written a
 * piece at a time, each once the one before is written: a generator paces
 * a slow sender by awaiting between its pieces.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * await using s = startServer();
 * const hello = new TextEncoder().encode("hello");
 * assert.deepEqual(await echo(s.port, hello), hello);
 * async function* slowly() {
 *   for (const byte of hello) {
 *     yield new Uint8Array([byte]);
 *     await new Promise((resolve) => setTimeout(resolve, 1));
 *   }
 * }
 * assert.deepEqual(await echo(s.port, slowly()), hello);
 * ```
 */
export async function echo(
  port: number,
  payload: Uint8Array | AsyncIterable<Uint8Array>,
): Promise<Uint8Array> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  try {
    if (payload instanceof Uint8Array) {
      await writeAll(conn, payload);
    } else {
      for await (const piece of payload) await writeAll(conn, piece);
    }
    await conn.closeWrite();
    return await readAll(conn);
  } finally {
    conn.close();
  }
}

/**
 * {@linkcode echo} over IPv6 loopback (`::1`).
 *
 * @example
 * ```ts ignore
 * const hello = new TextEncoder().encode("hello");
 * await echo6(4000, hello);
 * ```
 */
export async function echo6(
  port: number,
  payload: Uint8Array,
): Promise<Uint8Array> {
  const conn = await Deno.connect({ hostname: "::1", port });
  try {
    await writeAll(conn, payload);
    await conn.closeWrite();
    return await readAll(conn);
  } finally {
    conn.close();
  }
}

/** An echo server on an ephemeral port that records what it reports. */
export interface TestServer extends AsyncDisposable {
  /** The server; disposing shuts it down with no drain time. */
  server: EchoServer;
  /** The port it listens on, on 127.0.0.1. */
  port: number;
  /** [clientId, bytesReceived] in the order the server reported them. */
  records: Array<[number, number]>;
  /** The server's diagnostics, in order. */
  diagnostics: string[];
}

/**
 * Starts an echo server on an ephemeral port that records every client and
 * diagnostic; `options` are passed on to `serveEcho`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * await using s = startServer({ maxClientBytes: 1000 });
 * await echo(s.port, new Uint8Array(5));
 * await s.server.shutdown();
 * assert.deepEqual(s.records, [[1, 5]]);
 * ```
 */
export function startServer(options: ServeOptions = {}): TestServer {
  const records: Array<[number, number]> = [];
  const diagnostics: string[] = [];
  const server = serveEcho(
    (clientId, bytesReceived) => records.push([clientId, bytesReceived]),
    {
      port: 0,
      onDiagnostic: (message) => diagnostics.push(message),
      ...options,
    },
  );
  return {
    server,
    port: server.addr.port,
    records,
    diagnostics,
    [Symbol.asyncDispose]: () => server.shutdown({ drainTimeoutMs: 0 }),
  };
}

/** What {@linkcode runCommand} returns: the exit code and decoded output. */
export interface CommandResult {
  /** Exit code. */
  code: number;
  /** Everything written to stdout. */
  stdout: string;
  /** Everything written to stderr. */
  stderr: string;
}

/** Options for {@linkcode runCommand}. */
export interface RunCommandOptions
  extends Pick<Deno.CommandOptions, "cwd" | "env"> {
  /**
   * Kill the command (SIGKILL) and throw if it runs longer than this, so a
   * test fails instead of hanging.
   *
   * @default {120_000}
   */
  timeoutMs?: number;
}

/**
 * Runs `command` with `args` and no stdin to completion; throws if it is
 * still running after `options.timeoutMs`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const { code, stdout } = await runCommand(Deno.execPath(), ["--version"]);
 * assert.equal(code, 0);
 * assert.match(stdout, /^deno \d/);
 * ```
 */
export async function runCommand(
  command: string,
  args: string[],
  options: RunCommandOptions = {},
): Promise<CommandResult> {
  const { timeoutMs = 120_000, ...commandOptions } = options;
  const child = new Deno.Command(command, {
    ...commandOptions,
    args,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    child.kill("SIGKILL");
  }, timeoutMs);
  let output: Deno.CommandOutput;
  try {
    output = await child.output();
  } finally {
    clearTimeout(timer);
  }
  if (timedOut) {
    throw new Error(
      `${command} ${args.join(" ")} ran longer than ${timeoutMs} ms; killed`,
    );
  }
  const decoder = new TextDecoder();
  return {
    code: output.code,
    stdout: decoder.decode(output.stdout),
    stderr: decoder.decode(output.stderr),
  };
}

/**
 * Kills `child` (SIGKILL) if it still runs after `timeoutMs`, so a test
 * fails instead of hanging; disposing the result cancels that.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const child = new Deno.Command("true").spawn();
 * using _timeout = killAfter(child, 60_000);
 * assert.equal((await child.status).code, 0);
 * ```
 */
export function killAfter(
  child: Deno.ChildProcess,
  timeoutMs: number,
): Disposable {
  const timer = setTimeout(() => {
    try {
      child.kill("SIGKILL");
    } catch {
      // It exited meanwhile.
    }
  }, timeoutMs);
  return { [Symbol.dispose]: () => clearTimeout(timer) };
}

/**
 * Asserts that a command line program rejected its flags: exit status 2,
 * nothing on stdout, and on stderr a first line starting with `message`.
 * Then, given `usage`, a blank line and the usage, whose first line is
 * `usage` (send and the bench tools); without it, one line that points to
 * `--help` and nothing more (echo-server: `Try 'NAME --help' for more
 * information.`, NAME being what the first line names before its colon).
 *
 * @example
 * ```ts
 * const send = await runCommand(Deno.execPath(), ["run", "send.ts", "-x"]);
 * assertUsageError(send, "send: Unknown option '-x'", "Usage: send [options] [MESSAGE]");
 * const main = await runCommand(Deno.execPath(), ["run", "main.ts", "-x"]);
 * assertUsageError(main, "echo-server: Unknown option '-x'");
 * ```
 */
export function assertUsageError(
  result: CommandResult,
  message: string,
  usage?: string,
): void {
  assert.equal(result.code, 2, result.stderr);
  assert.equal(result.stdout, "");
  const [first, ...rest] = result.stderr.split("\n");
  assert.ok(first.startsWith(message), first);
  if (usage !== undefined) {
    assert.deepEqual(rest.slice(0, 2), ["", usage], result.stderr);
  } else {
    const name = first.slice(0, first.indexOf(":"));
    assert.deepEqual(rest, [
      `Try '${name} --help' for more information.`,
      "",
    ], result.stderr);
  }
}

/**
 * Wraps a test function so that it runs in a fresh temporary directory,
 * removed with everything in it when the test ends.
 *
 * @example
 * ```ts ignore
 * Deno.test("writes a file", withTempDir(async (dir) => {
 *   await Deno.writeTextFile(`${dir}/file`, "");
 * }));
 * ```
 */
export function withTempDir(
  fn: (dir: string, t: Deno.TestContext) => Promise<void>,
  options?: Deno.MakeTempOptions,
): (t: Deno.TestContext) => Promise<void> {
  return async (t) => {
    const dir = await Deno.makeTempDir(options);
    try {
      await fn(dir, t);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  };
}

/**
 * The path of an executable called `name` on `PATH` or in `/usr/sbin` or
 * `/sbin` (Debian puts logrotate and haproxy there, and a non-root `PATH`
 * may lack them), or undefined if there is none.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * assert.match(findExecutable("sh") ?? "", /^\/.*\/sh$/);
 * assert.equal(findExecutable("no-such-program"), undefined);
 * ```
 */
export function findExecutable(name: string): string | undefined {
  let path = "";
  try {
    path = Deno.env.get("PATH") ?? "";
  } catch {
    // no --allow-env: try the usual places only
  }
  for (const dir of [...path.split(":"), "/usr/sbin", "/sbin"]) {
    if (!dir) continue;
    try {
      if (Deno.statSync(`${dir}/${name}`).isFile) return `${dir}/${name}`;
    } catch {
      // not there (or not allowed to look)
    }
  }
  return undefined;
}

/**
 * Reads a child's output to the end, line by line, and lets a test await
 * the next line that matches a pattern.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const child = new Deno.Command(Deno.execPath(), {
 *   args: ["eval", "console.error('listening on 127.0.0.1:4000, log x')"],
 *   stderr: "piped",
 * }).spawn();
 * const stderr = new Lines(child.stderr);
 * const [, port] = await stderr.next(/^listening on .+:(\d+), /);
 * assert.equal(port, "4000");
 * await child.status;
 * await stderr.done;
 * ```
 */
export class Lines {
  /** Every line read so far, without its newline. */
  readonly lines: string[] = [];
  /** Resolves once the stream has ended. */
  readonly done: Promise<void>;
  #cursor = 0;
  #closed = false;
  // Whether the last line had no newline: `rest()` gives back the text as is.
  #unterminated = false;
  #changed = Promise.withResolvers<void>();

  /** Starts reading `stream`. */
  constructor(stream: ReadableStream<Uint8Array>) {
    this.done = this.#pump(stream);
  }

  async #pump(stream: ReadableStream<Uint8Array>): Promise<void> {
    let partial = "";
    try {
      for await (const text of stream.pipeThrough(new TextDecoderStream())) {
        const parts = (partial + text).split("\n");
        partial = parts.pop()!;
        this.lines.push(...parts);
        this.#notify();
      }
    } finally {
      if (partial) this.lines.push(partial);
      this.#unterminated = partial !== "";
      this.#closed = true;
      this.#notify();
    }
  }

  #notify(): void {
    this.#changed.resolve();
    this.#changed = Promise.withResolvers();
  }

  /**
   * The next line (after the last one matched) that matches `pattern`.
   * Rejects if the stream ends without one.
   */
  async next(pattern: RegExp): Promise<RegExpExecArray> {
    for (;;) {
      while (this.#cursor < this.lines.length) {
        const match = pattern.exec(this.lines[this.#cursor++]);
        if (match) return match;
      }
      if (this.#closed) {
        throw new Error(
          `stream ended with no line matching ${pattern}:\n${
            this.lines.join("\n")
          }`,
        );
      }
      await this.#changed.promise;
    }
  }

  /**
   * The text after the last line {@linkcode Lines.next} matched, newlines
   * included, once the stream has ended.
   */
  async rest(): Promise<string> {
    await this.done;
    const rest = this.lines.slice(this.#cursor);
    return rest.map((line, i) =>
      this.#unterminated && i === rest.length - 1 ? line : `${line}\n`
    ).join("");
  }
}

/** Options for {@linkcode spawnChild}. */
export interface SpawnChildOptions
  extends Pick<Deno.CommandOptions, "cwd" | "stdout" | "stderr"> {
  /**
   * Environment added to the test's (`NO_COLOR=1` is always set).
   *
   * @default {{}}
   */
  env?: Record<string, string>;
}

/**
 * Spawns `command` with `args` as tests run their child processes: stdin
 * closed, `NO_COLOR=1` so that its output is plain text, stdout and stderr
 * piped unless `options` say otherwise. The caller kills it (e.g. with
 * {@linkcode killAfter}) and awaits its status.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const child = spawnChild("sh", ["-c", 'echo "$NO_COLOR" >&2'], {
 *   stdout: "null",
 * });
 * const stderr = new Lines(child.stderr);
 * assert.equal((await child.status).code, 0);
 * assert.deepEqual(await stderr.rest(), "1\n");
 * ```
 */
export function spawnChild(
  command: string,
  args: string[],
  options: SpawnChildOptions = {},
): Deno.ChildProcess {
  const { env, ...stdio } = options;
  return new Deno.Command(command, {
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    ...stdio,
    args,
    env: { NO_COLOR: "1", ...env },
  }).spawn();
}

/** Options for a {@linkcode ServerProcess}. */
export interface ServerProcessOptions {
  /**
   * Deno permission flags for the server.
   *
   * @default {["--allow-net", `--allow-write=${logDir}`]}
   */
  permissions?: string[];
  /**
   * Runs the server under `ulimit -n` of this many descriptors (soft and
   * hard: Deno raises its soft limit to the hard one).
   *
   * @default {undefined}
   */
  maxOpenFiles?: number;
  /**
   * A bash command run first, in the process that then becomes the server
   * (e.g. `prlimit --pid $$ --fsize=4096`). The server's command line is
   * `"$@"` there: `exec 2>"$FIFO"` sends its stderr to a FIFO the test
   * reads at its own pace, `exec python3 wrapper.py "$@"` runs it under a
   * wrapper (which then is {@linkcode ServerProcess.child}).
   *
   * @default {undefined}
   */
  shell?: string;
  /**
   * Environment added to the test's (`NO_COLOR=1` is always set).
   *
   * @default {{}}
   */
  env?: Record<string, string>;
  /**
   * Kill the server (SIGKILL) if it still runs after this long, so that a
   * test fails instead of hanging.
   *
   * @default {60_000}
   */
  timeoutMs?: number;
}

/**
 * main.ts running as a subprocess on port 0, logging to `logDir/access.log`,
 * with `args` after those flags: stdin and stdout closed, stderr read line
 * by line (its first line names the port). Killed if it still runs after
 * its timeout; disposing it kills it and waits for it.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const dir = await Deno.makeTempDir();
 * try {
 *   await using server = new ServerProcess(dir, ["--metrics", ":0"]);
 *   const port = await server.port();
 *   assert.ok(await server.metricsPort() > 0);
 *   assert.deepEqual(await echo(port, new Uint8Array(1)), new Uint8Array(1));
 *   assert.equal(await server.stop(), 0);
 * } finally {
 *   await Deno.remove(dir, { recursive: true });
 * }
 * ```
 */
export class ServerProcess implements AsyncDisposable {
  /** The server process (or the wrapper a `shell` option execs). */
  readonly child: Deno.ChildProcess;
  /** Its stderr, every line so far in `stderr.lines`. */
  readonly stderr: Lines;
  readonly #timeout: Disposable;
  #exited = false;

  /** Starts main.ts with these arguments; see {@linkcode ServerProcess}. */
  constructor(
    logDir: string,
    args: string[] = [],
    options: ServerProcessOptions = {},
  ) {
    const {
      permissions = ["--allow-net", `--allow-write=${logDir}`],
      maxOpenFiles,
      shell,
      env,
      timeoutMs = 60_000,
    } = options;
    const command = [
      Deno.execPath(),
      "run",
      ...permissions,
      MAIN,
      "--port",
      "0",
      "--log",
      `${logDir}/access.log`,
      ...args,
    ];
    const setup = [
      maxOpenFiles === undefined
        ? undefined
        : `ulimit -Sn ${maxOpenFiles} -Hn ${maxOpenFiles}`,
      shell,
    ].filter((part) => part !== undefined);
    if (setup.length > 0) {
      command.unshift(
        "bash",
        "-c",
        `${setup.join(" && ")} && exec "$@"`,
        "bash",
      );
    }
    this.child = spawnChild(command[0], command.slice(1), {
      env,
      stdout: "null",
    });
    this.child.status.then(() => this.#exited = true);
    this.#timeout = killAfter(this.child, timeoutMs);
    this.stderr = new Lines(this.child.stderr);
  }

  /** Whether the process has exited (as its `status` has settled). */
  get exited(): boolean {
    return this.#exited;
  }

  /** Reads stderr up to the next line matching `pattern`, and returns it. */
  async waitFor(pattern: RegExp): Promise<string> {
    return (await this.stderr.next(pattern))[0];
  }

  /** The echo port, from the start-up line. */
  async port(): Promise<number> {
    return Number((await this.stderr.next(/^listening on .+:(\d+), /))[1]);
  }

  /** The `--metrics` port, from its start-up line. */
  async metricsPort(): Promise<number> {
    const [, port] = await this.stderr.next(/^metrics on .+:(\d+)\/metrics/);
    return Number(port);
  }

  /**
   * Waits for the server to exit; returns its exit code and its stderr
   * after the last line {@linkcode ServerProcess.waitFor} matched.
   */
  async exit(): Promise<{ code: number; stderr: string }> {
    const { code } = await this.child.status;
    const stderr = await this.stderr.rest();
    this.#timeout[Symbol.dispose]();
    return { code, stderr };
  }

  /**
   * Sends SIGTERM unless the server has exited; resolves with the exit code
   * once stderr has ended.
   */
  async stop(): Promise<number> {
    this.#kill("SIGTERM");
    return (await this.exit()).code;
  }

  /** Kills the server (SIGKILL) unless it has exited, and waits for it. */
  async [Symbol.asyncDispose](): Promise<void> {
    this.#kill("SIGKILL");
    await this.exit();
  }

  #kill(signal: Deno.Signal): void {
    try {
      this.child.kill(signal);
    } catch (error) {
      // It has exited, and `status` may not have settled yet.
      if (!(error instanceof TypeError)) throw error;
    }
  }
}

/**
 * Deterministic pseudo-random bytes (xorshift32), different for each seed.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * assert.deepEqual(pattern(8, 3), pattern(8, 3));
 * assert.ok(!sameBytes(pattern(8, 3), pattern(8, 4)));
 * ```
 */
export function pattern(size: number, seed = 1): Uint8Array {
  const bytes = new Uint8Array(size);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < size; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    bytes[i] = x;
  }
  return bytes;
}

/**
 * Whether two byte arrays hold the same bytes.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * assert.ok(sameBytes(new Uint8Array([1, 2]), new Uint8Array([1, 2])));
 * ```
 */
export function sameBytes(actual: Uint8Array, expected: Uint8Array): boolean {
  if (actual.length !== expected.length) return false;
  for (let i = 0; i < actual.length; i++) {
    if (actual[i] !== expected[i]) return false;
  }
  return true;
}

/**
 * Connects to 127.0.0.1:`port` with node:net (Deno's own sockets cannot
 * send a reset), waits for the handshake, sends `text` if any, then resets
 * the connection and waits until it is closed.
 *
 * @example
 * ```ts
 * await using s = startServer();
 * await sendAndReset(s.port, "abc");
 * ```
 */
export async function sendAndReset(port: number, text = ""): Promise<void> {
  const socket = net.connect(port, "127.0.0.1");
  await new Promise((resolve, reject) => {
    socket.once("connect", resolve);
    socket.once("error", reject);
  });
  if (text !== "") await new Promise((resolve) => socket.write(text, resolve));
  const closed = new Promise((resolve) => socket.once("close", resolve));
  socket.resetAndDestroy();
  await closed;
}

/**
 * Opens `count` connections to 127.0.0.1:`port` at once and returns them
 * all, open; the caller closes them.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * await using s = startServer();
 * const conns = await connectMany(s.port, 3);
 * assert.equal(conns.length, 3);
 * for (const conn of conns) conn.close();
 * ```
 */
export function connectMany(
  port: number,
  count: number,
): Promise<Deno.TcpConn[]> {
  return Promise.all(
    Array.from(
      { length: count },
      () => Deno.connect({ hostname: "127.0.0.1", port }),
    ),
  );
}

/**
 * A port on 127.0.0.1 that nothing listens on, for a test that wants its
 * connect refused: one the kernel picked for a listener just closed.
 *
 * It stands as "free a moment ago" on purpose: a refused connect needs a
 * port with no listener, and Deno cannot hold a TCP port bound without
 * listening on it. The kernel picks listen(0) ports at random among some
 * 28,000, so another process taking this one in the microseconds before the
 * connect is unlikely, and would show as a test failing, never passing.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const port = closedPort();
 * await assert.rejects(
 *   Deno.connect({ hostname: "127.0.0.1", port }),
 *   Deno.errors.ConnectionRefused,
 * );
 * ```
 */
export function closedPort(): number {
  using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  return listener.addr.port;
}

/**
 * A TCP server on 127.0.0.1 and an ephemeral port that hands each
 * connection, with its 1-based number, to `handle` and closes it afterwards
 * if `handle` has not. What `handle` throws is ignored, and so are failed
 * accepts: it stands for the deliberately wrong servers that the bench
 * tools must cope with.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const server = new HandlerServer(async (conn) => {
 *   await writeAll(conn, new TextEncoder().encode("no"));
 * });
 * assert.deepEqual(await echo(server.port, new Uint8Array(1)), new TextEncoder().encode("no"));
 * await server.close();
 * ```
 */
export class HandlerServer {
  /** The port it listens on. */
  readonly port: number;
  readonly #listener: Deno.TcpListener;
  readonly #handlers = new Set<Promise<void>>();
  readonly #acceptLoop: Promise<void>;
  #clients = 0;

  /** Listens at once; `handle` serves each connection. */
  constructor(
    readonly handle: (conn: Deno.TcpConn, client: number) => Promise<void>,
  ) {
    this.#listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    this.port = this.#listener.addr.port;
    this.#acceptLoop = this.#accept();
  }

  async #accept(): Promise<void> {
    for (;;) {
      let conn: Deno.TcpConn;
      try {
        conn = await this.#listener.accept();
      } catch (error) {
        if (error instanceof Deno.errors.BadResource) return; // closed
        continue; // a client lost: this server is wrong on purpose
      }
      const handler = this.#serve(conn, ++this.#clients).finally(() =>
        this.#handlers.delete(handler)
      );
      this.#handlers.add(handler);
    }
  }

  async #serve(conn: Deno.TcpConn, client: number): Promise<void> {
    try {
      await this.handle(conn, client);
    } catch {
      // The client may have given up on a wrong reply; that is fine here.
    } finally {
      try {
        conn.close();
      } catch {
        // Already closed by `handle`.
      }
    }
  }

  /** Closes the listener: later connects are refused. */
  stopListening(): void {
    try {
      this.#listener.close();
    } catch (error) {
      if (!(error instanceof Deno.errors.BadResource)) throw error;
    }
  }

  /** Stops listening and waits for every connection's `handle`. */
  async close(): Promise<void> {
    this.stopListening();
    await this.#acceptLoop;
    while (this.#handlers.size > 0) await Promise.all(this.#handlers);
  }
}

/**
 * The name and `ignore` of a test that needs a tool the machine may lack:
 * `name` as is when `available`, else ignored and named with
 * ` (skipped: ${missing})` after it, so the run says what to install.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * assert.deepEqual(needing("nc works", false, "nc not installed"), {
 *   name: "nc works (skipped: nc not installed)",
 *   ignore: true,
 * });
 * ```
 */
export function needing(
  name: string,
  available: boolean,
  missing: string,
): { name: string; ignore: boolean } {
  return available
    ? { name, ignore: false }
    : { name: `${name} (skipped: ${missing})`, ignore: true };
}

/**
 * Resolves once `condition()` holds, checking it every few milliseconds.
 * Gives up after `timeoutMs`, so a test fails instead of hanging.
 *
 * @example Usage
 * ```ts
 * import { waitUntil } from "./test_util.ts";
 *
 * let done = false;
 * setTimeout(() => done = true, 0);
 * await waitUntil(() => done, "the timer");
 * ```
 */
export async function waitUntil(
  condition: () => boolean,
  what: string,
  timeoutMs = 60_000,
): Promise<void> {
  const giveUp = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > giveUp) throw new Error(`gave up waiting: ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

/**
 * Resolves with `promise`, or rejects naming `what` if it takes longer than
 * `ms`: a test of something that must end fails instead of hanging.
 *
 * @example Usage
 * ```ts
 * import assert from "node:assert/strict";
 * import { within } from "./test_util.ts";
 *
 * assert.equal(await within(Promise.resolve(1), 1_000, "one"), 1);
 * ```
 */
export async function within<T>(
  promise: Promise<T>,
  ms: number,
  what: string,
): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`not within ${ms} ms: ${what}`)),
      ms,
    );
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** The largest socket buffer TCP autotunes to, from `/proc/sys/net/ipv4/`. */
async function tcpBufferMax(name: "tcp_rmem" | "tcp_wmem"): Promise<number> {
  // Read by cat: Deno asks --allow-all for /proc/sys, which the test task
  // does not grant (--allow-run it does).
  const { stdout } = await new Deno.Command("cat", {
    args: [`/proc/sys/net/ipv4/${name}`],
    stderr: "inherit",
  }).output();
  const text = new TextDecoder().decode(stdout);
  const max = Number(text.trim().split(/\s+/)[2]);
  if (!Number.isSafeInteger(max) || max <= 0) {
    throw new Error(`Cannot read the maximum from ${name}: ${text}`);
  }
  return max;
}

/**
 * A byte count that loopback cannot hold between a writer and a reader that
 * does not read, on this machine: more than the sender's send buffer and the
 * receiver's receive buffer at their largest (the maxima of `tcp_wmem` and
 * `tcp_rmem`, read from the kernel, not assumed), plus 8 MiB, in whole MiB.
 * A test whose write must stall, or still be under way when the peer
 * closes, sends this many.
 *
 * @example Usage
 * ```ts
 * import assert from "node:assert/strict";
 * import { stallingBytes } from "./test_util.ts";
 *
 * const bytes = await stallingBytes();
 * assert.ok(bytes > 8 * 1024 * 1024 && bytes % (1024 * 1024) === 0);
 * ```
 */
export async function stallingBytes(): Promise<number> {
  const MIB = 1024 * 1024;
  const held = (await tcpBufferMax("tcp_wmem")) +
    (await tcpBufferMax("tcp_rmem"));
  return Math.ceil(held / MIB + 8) * MIB;
}

/**
 * A clock that moves only when told to, firing the timers that come due:
 * for the modules whose clock is injectable (reporter.ts, drain.ts).
 *
 * @example Usage
 * ```ts
 * import assert from "node:assert/strict";
 * import { FakeClock } from "./test_util.ts";
 *
 * const clock = new FakeClock();
 * let fired = false;
 * clock.setTimeout(() => fired = true, 100);
 * clock.advance(99);
 * assert.equal(fired, false);
 * clock.advance(1);
 * assert.ok(fired && clock.pending === 0);
 * ```
 */
export class FakeClock implements ReporterClock {
  /** Milliseconds, as {@linkcode FakeClock.now} gives them. */
  time = 0;
  #timers = new Map<number, { at: number; callback: () => void }>();
  #nextId = 1;

  /** The time {@linkcode FakeClock.advance} moved it to. */
  now(): number {
    return this.time;
  }
  /** Calls `callback` once the clock is advanced `ms` past now. */
  setTimeout(callback: () => void, ms: number): unknown {
    const id = this.#nextId++;
    this.#timers.set(id, { at: this.time + ms, callback });
    return id;
  }
  /** Cancels a timer. */
  clearTimeout(handle: unknown): void {
    this.#timers.delete(handle as number);
  }
  /** Timers not yet fired nor cancelled. */
  get pending(): number {
    return this.#timers.size;
  }
  /** Moves the clock `ms` forward and fires the timers due by then. */
  advance(ms: number): void {
    this.time += ms;
    for (const [id, timer] of [...this.#timers]) {
      if (timer.at <= this.time) {
        this.#timers.delete(id);
        timer.callback();
      }
    }
  }
}

/** Options for {@linkcode SilentFlood}. */
export interface SilentFloodOptions {
  /**
   * Server address.
   *
   * @default {"127.0.0.1"}
   */
  hostname?: string;
  /**
   * Local addresses the clients connect from, one after the other (e.g.
   * `127.0.0.2` to play another source than `Deno.connect`'s 127.0.0.1).
   *
   * @default {["127.0.0.2"]}
   */
  localAddresses?: readonly string[];
  /**
   * A client that the server has not ended by then closes the connection
   * itself and reconnects (grace cycling); by default it waits.
   *
   * @default {Infinity}
   */
  leaveAfterMs?: number;
}

/**
 * An attack of `count` silent clients on `port`: each connects, sends
 * nothing, and connects again as soon as its connection ends (the server's
 * doing, or its own after `leaveAfterMs`). Disposing of it ends every
 * connection and waits until they are closed.
 *
 * @example Usage
 * ```ts
 * import assert from "node:assert/strict";
 * import { SilentFlood, startServer, waitUntil } from "./test_util.ts";
 *
 * await using s = startServer();
 * {
 *   await using flood = new SilentFlood(s.port, 2);
 *   await waitUntil(() => s.server.connections === 2, "2 silent clients");
 *   assert.equal(flood.connected, 2);
 * }
 * await s.server.shutdown();
 * ```
 */
export class SilentFlood implements AsyncDisposable {
  /** Connections made so far. */
  connected = 0;
  #stopped = false;
  #sockets = new Set<net.Socket>();
  #loops: Promise<void>[];

  /** Starts `count` silent clients on `port`. */
  constructor(
    readonly port: number,
    count: number,
    readonly options: SilentFloodOptions = {},
  ) {
    this.#loops = Array.from({ length: count }, (_, i) => this.#loop(i));
  }

  async #loop(index: number): Promise<void> {
    const {
      hostname = "127.0.0.1",
      localAddresses = ["127.0.0.2"],
      leaveAfterMs = Infinity,
    } = this.options;
    const localAddress = localAddresses[index % localAddresses.length];
    while (!this.#stopped) {
      const socket = net.connect({
        host: hostname,
        port: this.port,
        localAddress,
      });
      this.#sockets.add(socket);
      socket.on("error", () => {});
      socket.resume();
      socket.once("connect", () => this.connected++);
      const timer = leaveAfterMs === Infinity
        ? undefined
        : setTimeout(() => socket.destroy(), leaveAfterMs);
      await new Promise((resolve) => socket.once("close", resolve));
      clearTimeout(timer);
      this.#sockets.delete(socket);
    }
  }

  /** Ends every connection and waits until they are closed. */
  async [Symbol.asyncDispose](): Promise<void> {
    this.#stopped = true;
    for (const socket of this.#sockets) socket.destroy();
    await Promise.all(this.#loops);
  }
}
