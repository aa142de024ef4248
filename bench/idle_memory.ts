#!/usr/bin/env -S deno run --allow-run --allow-net=127.0.0.1 --allow-write
/**
 * Measures what an idle connection costs a server in memory: the growth of
 * the server process's resident set (VmRSS) per connection that is open but
 * has sent nothing. By default it measures the echo server (`main.ts`) and
 * the bare Deno loop in `bare_echo.ts` (the runtime's own floor) one after
 * the other, alternating, for a few rounds, and prints each round's KiB per
 * connection and the ratio to the bare loop.
 *
 * ```sh
 * ulimit -n 20000   # each side holds one descriptor per connection
 * deno run --allow-run --allow-net=127.0.0.1 --allow-write bench/idle_memory.ts --connections 15000 --rounds 3
 * ```
 *
 * For each server and round it: starts the server on a free loopback port,
 * waits until it accepts, echoes 100 small warm-up clients, samples VmRSS,
 * opens the idle connections (256 connects in flight at a time), waits until
 * the server holds them all (its open file descriptors, counted in
 * `/proc/PID/fd`, reach the count before plus the connections) and its RSS
 * stops growing, samples VmRSS again, then half-closes every connection and
 * checks each gets an empty reply, and stops the server with SIGTERM. Only
 * the server's RSS counts: the connections are held by this process.
 * Every wait is bounded; a server that dies or never gets there is an error.
 *
 * Deno reads another process's `/proc` files only with `--allow-all`, so
 * this script reads them with `cat` and `ls` (hence `--allow-run`, which
 * also starts the servers).
 *
 * @module
 */

import { parseCommand } from "./_cli.ts";
import { parseCommandLine, parseInteger, UsageError } from "../flags.ts";
import { countFds, openFileLimit, readRssKiB, readSlabKiB } from "./_proc.ts";

/** A server to measure: its command line, with `{port}` replaced by a free
 * loopback port, `{log}` by an access log path and `{logdir}` by that log's
 * directory. */
export interface ServerCommand {
  /** Name in the report. */
  name: string;
  /** Program and arguments. */
  command: string[];
}

/** Options for {@linkcode measureIdleMemory}. */
export interface IdleMemoryOptions {
  /** Idle connections held open per measurement. @default {15000} */
  connections?: number;
  /** Times each server is measured; servers alternate. @default {3} */
  rounds?: number;
  /** Servers to measure, in this order each round; the first is the one
   * ratios are taken against. @default {defaultServers()} */
  servers?: ServerCommand[];
  /** Called with each measurement as it is made. */
  onMeasurement?: (measurement: IdleMemoryMeasurement) => void;
}

/** One server measured once. */
export interface IdleMemoryMeasurement {
  /** The server's name. */
  name: string;
  /** Round number, from 1. */
  round: number;
  /** Idle connections opened. */
  connections: number;
  /** The server's VmRSS before the idle connections, in KiB. */
  rssBeforeKiB: number;
  /** The server's VmRSS holding all of them, in KiB. */
  rssAfterKiB: number;
  /** (after - before) / connections. */
  kibPerConnection: number;
  /** Growth of the kernel's slab memory (`Slab` in `/proc/meminfo`) per
   * connection over the same time: socket memory, which is in no process's
   * RSS. Both ends are on this machine, so it counts two sockets per
   * connection; it is machine-wide, so other work on the machine adds noise. */
  slabKiBPerConnection: number;
  /** Idle connections that got an empty reply (EOF) after half-closing. */
  emptyReplies: number;
}

// A file path (pathname alone would keep %20 for a space).
const BENCH_DIR = decodeURIComponent(new URL(".", import.meta.url).pathname);
const V8_FLAGS = "--v8-flags=--max-semi-space-size=1";
const CONNECTS_IN_FLIGHT = 256;
const WARM_UP_CLIENTS = 100;
const POLL_MS = 100;

/**
 * The servers measured by default: `bare` is `bare_echo.ts` reading into a
 * `readBytes` buffer, `echo` is this project's `main.ts` as `deno task start`
 * runs it (with `--idle-timeout 600`, so no idle client is cut off while
 * connections are still being opened). Both run with the V8 flags of
 * `deno task start`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * assert.deepEqual(defaultServers(64).map((s) => s.name), ["bare", "echo"]);
 * ```
 */
export function defaultServers(readBytes = 64): ServerCommand[] {
  const deno = Deno.execPath();
  return [{
    name: "bare",
    command: [
      deno,
      "run",
      V8_FLAGS,
      "--allow-net",
      `${BENCH_DIR}bare_echo.ts`,
      "--port",
      "{port}",
      "--read-bytes",
      String(readBytes),
    ],
  }, {
    name: "echo",
    command: [
      deno,
      "run",
      V8_FLAGS,
      "--allow-net",
      "--allow-write={logdir}",
      `${BENCH_DIR}../main.ts`,
      "--port",
      "{port}",
      "--log",
      "{log}",
      "--idle-timeout",
      "600",
    ],
  }];
}

/**
 * Measures every server `rounds` times, alternating, and returns the
 * measurements in the order they were made. Throws if a server fails to
 * start, dies, or does not accept every connection in time.
 *
 * @example
 * ```ts ignore
 * const results = await measureIdleMemory({ connections: 15000, rounds: 3 });
 * console.log(formatTable(results));
 * ```
 */
export async function measureIdleMemory(
  options: IdleMemoryOptions = {},
): Promise<IdleMemoryMeasurement[]> {
  const connections = options.connections ?? 15000;
  const rounds = options.rounds ?? 3;
  const servers = options.servers ?? defaultServers();
  const needed = connections + 64;
  const limit = await openFileLimit(Deno.pid);
  if (limit < needed) {
    throw new Error(
      `${connections} connections need an open file limit of at least ${needed}, ` +
        `it is ${limit}: raise it first, e.g. \`ulimit -n ${needed}\``,
    );
  }
  const logDir = await Deno.makeTempDir({ prefix: "idle_memory_" });
  const results: IdleMemoryMeasurement[] = [];
  try {
    for (let round = 1; round <= rounds; round++) {
      for (const server of servers) {
        const result = await measureOnce(
          server,
          round,
          connections,
          logDir,
        );
        results.push(result);
        options.onMeasurement?.(result);
      }
    }
  } finally {
    await Deno.remove(logDir, { recursive: true });
  }
  return results;
}

async function measureOnce(
  server: ServerCommand,
  round: number,
  connections: number,
  logDir: string,
): Promise<IdleMemoryMeasurement> {
  const port = freePort();
  const [program, ...args] = server.command.map((arg) =>
    arg.replaceAll("{port}", String(port)).replaceAll("{logdir}", logDir)
      .replaceAll("{log}", `${logDir}/${server.name}.${round}.log`)
  );
  const child = new Deno.Command(program, {
    args,
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  // Keep the end of the server's stderr for error messages; reading it also
  // keeps a chatty server from blocking on a full pipe.
  let stderrTail = "";
  const stderrDone = child.stderr.pipeThrough(new TextDecoderStream())
    .pipeTo(
      new WritableStream({
        write(text) {
          stderrTail = (stderrTail + text).slice(-2000);
        },
      }),
    );
  let exited = false;
  const status = child.status.finally(() => exited = true);
  const fail = (what: string) =>
    new Error(
      `${server.name}: ${what}${
        stderrTail ? `; its stderr ends:\n${stderrTail.trimEnd()}` : ""
      }`,
    );
  const idle: Deno.TcpConn[] = [];
  try {
    await waitFor(30_000, async () => {
      if (exited) throw fail("exited before it accepted connections");
      try {
        (await Deno.connect({ port })).close();
        return true;
      } catch (error) {
        if (error instanceof Deno.errors.ConnectionRefused) return false;
        throw error;
      }
    }, () => fail(`did not accept on port ${port} within 30 s`));
    await warmUp(port);
    const pid = child.pid;
    // Descriptors settle once the warm-up clients are closed on its side.
    let fdsBefore = await countFds(pid);
    await waitFor(10_000, async () => {
      const now = await countFds(pid);
      const settled = now === fdsBefore;
      fdsBefore = now;
      return settled;
    }, () => fail("its open file descriptors kept changing"));
    const rssBeforeKiB = await readRssKiB(pid);
    const slabBeforeKiB = await readSlabKiB();

    await openIdle(port, connections, idle);
    let fds = 0;
    const acceptMs = 60_000 + connections * 2;
    await waitFor(acceptMs, async () => {
      if (exited) throw fail("exited while holding idle connections");
      fds = await countFds(pid);
      return fds >= fdsBefore + connections;
    }, () =>
      fail(
        `accepted ${
          fds - fdsBefore
        } of ${connections} connections within ${acceptMs} ms`,
      ));
    // Each accepted connection then gets its read issued: wait until the
    // RSS stops growing (less than 0.01 KiB per connection in 200 ms). A
    // quiet period stands here: RSS is the quantity measured, and the
    // servers compared are any command line, with no event that says every
    // read is issued (the descriptors above say only that all are accepted).
    let rssAfterKiB = await readRssKiB(pid);
    await waitFor(20_000, async () => {
      await delay(2 * POLL_MS);
      const now = await readRssKiB(pid);
      const settled = now - rssAfterKiB < connections / 100;
      rssAfterKiB = Math.max(rssAfterKiB, now);
      return settled;
    }, () => fail("its RSS kept growing for 20 s"));

    const slabAfterKiB = await readSlabKiB();
    const emptyReplies = await closeIdle(idle);
    return {
      name: server.name,
      round,
      connections,
      rssBeforeKiB,
      rssAfterKiB,
      kibPerConnection: (rssAfterKiB - rssBeforeKiB) / connections,
      slabKiBPerConnection: (slabAfterKiB - slabBeforeKiB) / connections,
      emptyReplies,
    };
  } finally {
    for (const conn of idle.splice(0)) closeQuietly(conn);
    if (!exited) child.kill("SIGTERM");
    const timer = setTimeout(() => {
      if (!exited) child.kill("SIGKILL");
    }, 10_000);
    await status;
    clearTimeout(timer);
    await stderrDone;
  }
}

/**
 * A port that was free a moment ago. It stands: the servers measured are any
 * command line, which bind `{port}` themselves and print nothing to read a
 * port from; a port taken meanwhile makes the server exit or never hold the
 * connections, an error, never a wrong figure.
 */
function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const { port } = listener.addr;
  listener.close();
  return port;
}

/** Echoes a few small clients so the server's code paths are compiled and
 * its pools warm before the first sample. */
async function warmUp(port: number): Promise<void> {
  const payload = new TextEncoder().encode("hello");
  for (let i = 0; i < WARM_UP_CLIENTS; i += 10) {
    await Promise.all(Array.from({ length: 10 }, async () => {
      const conn = await Deno.connect({ port });
      try {
        await conn.write(payload);
        await conn.closeWrite();
        const reply = await readToEnd(conn);
        if (reply !== "hello") {
          throw new Error(`warm-up client got '${reply}' instead of 'hello'`);
        }
      } finally {
        conn.close();
      }
    }));
  }
}

async function readToEnd(conn: Deno.TcpConn): Promise<string> {
  const buffer = new Uint8Array(64);
  let text = "";
  const decoder = new TextDecoder();
  for (let n; (n = await conn.read(buffer)) !== null;) {
    text += decoder.decode(buffer.subarray(0, n), { stream: true });
  }
  return text;
}

/** Opens `count` connections into `into`, a bounded number at a time. */
async function openIdle(
  port: number,
  count: number,
  into: Deno.TcpConn[],
): Promise<void> {
  let started = 0;
  const worker = async () => {
    while (started < count) {
      started++;
      into.push(await Deno.connect({ port }));
    }
  };
  await Promise.all(
    Array.from({ length: Math.min(CONNECTS_IN_FLIGHT, count) }, worker),
  );
}

/** Half-closes every connection and counts those whose reply is empty;
 * the rest (data, a reset, or no EOF within 60 s) are cut. */
async function closeIdle(conns: Deno.TcpConn[]): Promise<number> {
  const timer = setTimeout(() => {
    for (const conn of conns) closeQuietly(conn);
  }, 60_000);
  const replies = await Promise.all(conns.map(async (conn) => {
    try {
      await conn.closeWrite();
      return await conn.read(new Uint8Array(1)) === null;
    } catch {
      return false;
    }
  }));
  clearTimeout(timer);
  return replies.filter((empty) => empty).length;
}

function closeQuietly(conn: Deno.TcpConn): void {
  try {
    conn.close();
  } catch (error) {
    if (!(error instanceof Deno.errors.BadResource)) throw error;
  }
}

/** Polls `check` until it returns true; throws `timeoutError()` after `ms`. */
async function waitFor(
  ms: number,
  check: () => Promise<boolean>,
  timeoutError: () => Error,
): Promise<void> {
  const deadline = performance.now() + ms;
  while (!await check()) {
    if (performance.now() > deadline) throw timeoutError();
    await delay(POLL_MS);
  }
}

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * A Markdown table with one row per round: each server's KiB per idle
 * connection, and each later server's ratio to the first one.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const row = { round: 1, connections: 10, emptyReplies: 10, slabKiBPerConnection: 7 };
 * const table = formatTable([
 *   { ...row, name: "bare", rssBeforeKiB: 100, rssAfterKiB: 140, kibPerConnection: 4 },
 *   { ...row, name: "echo", rssBeforeKiB: 100, rssAfterKiB: 150, kibPerConnection: 5 },
 * ]);
 * assert.match(table, /\| 1 +\| 4\.00 +\| 5\.00 +\| 1\.25x/);
 * ```
 */
export function formatTable(results: IdleMemoryMeasurement[]): string {
  const names = [...new Set(results.map((r) => r.name))];
  const rounds = [...new Set(results.map((r) => r.round))];
  const header = [
    "round",
    ...names.map((name) => `${name} KiB/conn`),
    ...names.slice(1).map((name) => `${name}/${names[0]}`),
  ];
  const rows = rounds.map((round) => {
    const kib = names.map((name) =>
      results.find((r) => r.round === round && r.name === name)
        ?.kibPerConnection
    );
    return [
      String(round),
      ...kib.map((k) => k === undefined ? "-" : k.toFixed(2)),
      ...kib.slice(1).map((k) =>
        k === undefined || kib[0] === undefined
          ? "-"
          : `${(k / kib[0]).toFixed(2)}x`
      ),
    ];
  });
  const widths = header.map((h, i) =>
    Math.max(h.length, ...rows.map((row) => row[i].length))
  );
  const line = (cells: string[]) =>
    `| ${cells.map((c, i) => c.padEnd(widths[i])).join(" | ")} |`;
  return [
    line(header),
    line(widths.map((w) => "-".repeat(w))),
    ...rows.map(line),
  ].join("\n");
}

/** The `--help` text. */
export const USAGE =
  `Usage: deno run --allow-run --allow-net=127.0.0.1 --allow-write bench/idle_memory.ts [options]

Measures each server's RSS growth per idle connection (open, nothing sent):
by default the echo server (main.ts) and the bare Deno loop (bare_echo.ts),
alternating. Needs an open file limit above the connections on both sides:
run \`ulimit -n 20000\` first (up to \`ulimit -Hn\`).

Options:
  --connections N     idle connections per measurement (default 15000)
  --rounds N          measurements of each server (default 3)
  --read-bytes N      the bare loop's read buffer (default 64)
  --server NAME=CMD   also measure CMD (split on spaces; {port}, {log} and
                      {logdir} are replaced); may be repeated
  -h, --help          show this help`;

/**
 * Parses command line arguments into options, or `"help"`. Throws
 * {@linkcode UsageError}.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const options = parseIdleMemoryArgs(["--connections", "100", "--rounds", "1"]);
 * assert.ok(options !== "help");
 * assert.equal(options.connections, 100);
 * ```
 */
export function parseIdleMemoryArgs(
  args: string[],
): IdleMemoryOptions | "help" {
  const { values } = parseCommandLine(args, {
    connections: { type: "string" },
    rounds: { type: "string" },
    "read-bytes": { type: "string" },
    server: { type: "string", multiple: true },
    help: { type: "boolean", short: "h" },
  });
  if (values.help) return "help";
  const readBytes = parseInteger("--read-bytes", values["read-bytes"], {
    default: 64,
    min: 1,
    max: 16 * 1024 * 1024,
  });
  const servers = defaultServers(readBytes);
  for (const spec of values.server ?? []) {
    const match = /^([\w.-]+)=(.+)$/.exec(spec);
    if (match === null) {
      throw new UsageError(`--server must be NAME=CMD, not '${spec}'`);
    }
    if (servers.some((s) => s.name === match[1])) {
      throw new UsageError(`--server name '${match[1]}' is already taken`);
    }
    servers.push({ name: match[1], command: match[2].trim().split(/\s+/) });
  }
  return {
    connections: parseInteger("--connections", values.connections, {
      default: 15000,
      min: 1,
      max: 1_000_000,
    }),
    rounds: parseInteger("--rounds", values.rounds, {
      default: 3,
      min: 1,
      max: 100,
    }),
    servers,
  };
}

/**
 * Runs the measurement from command line arguments and prints the table.
 * Returns 0, 1 if any idle connection did not get its empty reply or a
 * server failed, 2 on a usage error.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * assert.equal(await main(["--rounds", "0"]), 2);
 * ```
 */
export async function main(args: string[]): Promise<number> {
  const options = parseCommand(
    "idle_memory",
    USAGE,
    () => parseIdleMemoryArgs(args),
  );
  if (typeof options === "number") return options;
  let results;
  try {
    results = await measureIdleMemory({
      ...options,
      onMeasurement: (m) =>
        console.error(
          `round ${m.round} ${m.name}: RSS ${
            (m.rssBeforeKiB / 1024).toFixed(1)
          } -> ${(m.rssAfterKiB / 1024).toFixed(1)} MiB, ${
            m.kibPerConnection.toFixed(2)
          } KiB per idle connection (kernel slab ${
            m.slabKiBPerConnection.toFixed(2)
          } KiB, both ends), ` +
            `${m.emptyReplies}/${m.connections} empty replies`,
        ),
    });
  } catch (error) {
    console.error(
      `idle_memory: ${error instanceof Error ? error.message : error}`,
    );
    return 1;
  }
  console.log(
    `${options.connections} idle connections, ${Deno.build.os}, deno ${Deno.version.deno}, ${
      new Date().toISOString().slice(0, 16).replace("T", " ")
    } UTC`,
  );
  console.log(formatTable(results));
  return results.every((m) => m.emptyReplies === m.connections) ? 0 : 1;
}

if (import.meta.main) {
  Deno.exit(await main(Deno.args));
}
