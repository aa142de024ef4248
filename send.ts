#!/usr/bin/env -S deno run --no-prompt --allow-net=127.0.0.1,localhost,[::1]
/**
 * `send`: the smallest correct client of the echo protocol. It connects,
 * sends its message, half-closes, reads the reply to EOF, and closes.
 *
 * ```sh
 * deno task send hello                       # prints hello
 * printf 'two\nlines\n' | deno task send     # sends standard input
 * deno task send --port 5000 hello
 * ```
 *
 * The reply goes to stdout byte for byte, so `deno task send < a > b`
 * copies `a`; `sent N bytes, received M bytes` goes to stderr. The exit
 * status is 0 when the reply is exactly what was sent, 1 when it differs or
 * the connection fails, 2 for a bad command line.
 *
 * The send task may connect only to this machine (`--allow-net` for
 * 127.0.0.1, localhost and ::1). For a server elsewhere, grant that one:
 * `deno run --allow-net=HOST:PORT send.ts --host HOST --port PORT hello`.
 *
 * @module
 */

import { readAll, writeAll } from "./_bytes.ts";
import { errorMessage } from "./_errors.ts";
import {
  formatHostPort,
  parseCommandLine,
  parseInteger,
  UsageError,
} from "./flags.ts";

/** The `--help` text, also printed after a command line mistake. */
export const USAGE = `Usage: send [options] [MESSAGE]

Sends MESSAGE, or standard input without one, to an echo server, half-closes,
and prints the reply on stdout and the byte counts on stderr. Exits 1 if the
reply differs from what was sent or the connection fails.

Options:
  --host HOST  server address (default 127.0.0.1)
  --port PORT  server port (default 4000)
  -h, --help   show this help`;

/**
 * Sends `message` on `conn`, half-closes, and returns everything the peer
 * sends back up to EOF. Leaves `conn` open; the caller closes it.
 *
 * @example
 * ```ts ignore
 * using conn = await Deno.connect({ hostname: "127.0.0.1", port: 4000 });
 * const reply = await exchange(conn, new TextEncoder().encode("hello"));
 * ```
 */
export async function exchange(
  conn: Deno.Conn,
  message: Uint8Array,
): Promise<Uint8Array> {
  await writeAll(conn, message);
  // The server reads to EOF before it replies: without this it would wait.
  await conn.closeWrite();
  return await readAll(conn);
}

/** Where two byte strings first differ, or -1 if they are equal. */
function firstDifference(a: Uint8Array, b: Uint8Array): number {
  const length = Math.min(a.length, b.length);
  for (let i = 0; i < length; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : length;
}

function describeConnectError(
  error: unknown,
  hostname: string,
  port: number,
): string {
  const address = formatHostPort(hostname, port);
  if (error instanceof Deno.errors.ConnectionRefused) {
    return `cannot connect to ${address}: connection refused (is the server running? check --host and --port)`;
  }
  if (error instanceof Deno.errors.NotCapable) {
    return `cannot connect to ${address}: not allowed (the send task reaches only this machine; run deno run --allow-net=${address} send.ts --host ${hostname} --port ${port})`;
  }
  return `cannot connect to ${address}: ${errorMessage(error)}`;
}

/** Reads all of standard input. */
async function readStdin(): Promise<Uint8Array> {
  return await new Response(Deno.stdin.readable).bytes();
}

/**
 * Runs the client with the given command line and returns the exit status:
 * 0 when the reply matches, 1 when it differs or the connection fails, 2
 * for a command line mistake.
 *
 * @example
 * ```ts ignore
 * Deno.exit(await main(["--port", "4000", "hello"]));
 * ```
 */
export async function main(args: string[]): Promise<number> {
  let hostname, port, message;
  try {
    const { values, positionals } = parseCommandLine(args, {
      host: { type: "string" },
      port: { type: "string" },
      help: { type: "boolean", short: "h" },
    }, { allowPositionals: true });
    if (values.help) {
      console.log(USAGE);
      return 0;
    }
    if (positionals.length > 1) {
      throw new UsageError(
        `one MESSAGE at most (quote it if it has spaces), not ${positionals.length}`,
      );
    }
    if (values.host === "") throw new UsageError("--host must not be empty");
    hostname = values.host ?? "127.0.0.1";
    port = parseInteger("--port", values.port, {
      default: 4000,
      min: 1,
      max: 65535,
    });
    message = positionals[0];
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    console.error(`send: ${error.message}\n\n${USAGE}`);
    return 2;
  }

  if (message === undefined && Deno.stdin.isTerminal()) {
    console.error("send: reading standard input up to end of file (Ctrl-D)");
  }
  const sent = message === undefined
    ? await readStdin()
    : new TextEncoder().encode(message);

  let conn;
  try {
    conn = await Deno.connect({ hostname, port });
  } catch (error) {
    console.error(`send: ${describeConnectError(error, hostname, port)}`);
    return 1;
  }
  let reply;
  try {
    reply = await exchange(conn, sent);
  } catch (error) {
    const address = formatHostPort(hostname, port);
    console.error(
      `send: lost the connection to ${address}: ${errorMessage(error)}`,
    );
    return 1;
  } finally {
    conn.close();
  }

  for (let written = 0; written < reply.length;) {
    written += await Deno.stdout.write(reply.subarray(written));
  }
  if (Deno.stdout.isTerminal() && reply.at(-1) !== 0x0a) {
    // End the reply's line on screen; stdout itself stays byte for byte.
    console.error();
  }
  console.error(`sent ${sent.length} bytes, received ${reply.length} bytes`);
  const differs = firstDifference(sent, reply);
  if (differs >= 0) {
    console.error(
      `send: the reply differs from what was sent, from byte ${differs} on`,
    );
    return 1;
  }
  return 0;
}

if (import.meta.main) {
  Deno.exit(await main(Deno.args));
}
