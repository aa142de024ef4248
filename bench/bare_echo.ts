#!/usr/bin/env -S deno run --allow-net
/**
 * The floor for a Deno echo server: an accept loop that reads each client
 * with `conn.read` into one small buffer until EOF, then writes the bytes
 * back and closes. No log, no limits, no idle timeout. `idle_memory.ts`
 * measures the memory an idle connection costs here (the Deno runtime's own
 * cost of a pending read) beside the echo server's.
 *
 * ```sh
 * deno run --allow-net bench/bare_echo.ts --port 4000 --read-bytes 64
 * ```
 *
 * It prints `listening on HOST:PORT` on stderr once it accepts, and runs
 * until it is killed.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { parseInteger, UsageError } from "../flags.ts";

/** Options for {@linkcode serveBareEcho}. */
export interface BareEchoOptions {
  /** Address to listen on. @default {"127.0.0.1"} */
  hostname?: string;
  /** TCP port; 0 picks a free one. @default {4000} */
  port?: number;
  /** Size of each connection's read buffer. @default {64} */
  readBytes?: number;
}

/**
 * Starts the bare echo loop and returns its listener; closing the listener
 * stops accepting (connections in flight still finish).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const listener = serveBareEcho({ port: 0, readBytes: 64 });
 * const conn = await Deno.connect({ port: listener.addr.port });
 * await conn.write(new TextEncoder().encode("hello"));
 * await conn.closeWrite();
 * const reply = new Uint8Array(16);
 * assert.equal(await conn.read(reply), 5);
 * assert.equal(await conn.read(reply), null);
 * conn.close();
 * listener.close();
 * ```
 */
export function serveBareEcho(options: BareEchoOptions = {}): Deno.TcpListener {
  const listener = Deno.listen({
    hostname: options.hostname ?? "127.0.0.1",
    port: options.port ?? 4000,
  });
  acceptLoop(listener, options.readBytes ?? 64);
  return listener;
}

async function acceptLoop(listener: Deno.TcpListener, readBytes: number) {
  while (true) {
    let conn;
    try {
      conn = await listener.accept();
    } catch (error) {
      if (error instanceof Deno.errors.BadResource) return; // closed
      continue; // a client that reset while queued, or out of fds
    }
    echo(conn, readBytes);
  }
}

async function echo(conn: Deno.TcpConn, readBytes: number): Promise<void> {
  try {
    const buffer = new Uint8Array(readBytes);
    const chunks: Uint8Array[] = [];
    for (let n; (n = await conn.read(buffer)) !== null;) {
      chunks.push(buffer.slice(0, n));
    }
    for (const chunk of chunks) {
      for (let written = 0; written < chunk.length;) {
        written += await conn.write(chunk.subarray(written));
      }
    }
  } catch {
    // A reset client: nothing to report in a floor measurement.
  } finally {
    // With all input read, close() sends the FIN that closeWrite() would.
    conn.close();
  }
}

/** The `--help` text. */
export const USAGE = `Usage: deno run --allow-net bench/bare_echo.ts [options]

A bare Deno echo loop (conn.read into a small buffer to EOF, write back,
close; no log, no limits), the floor idle_memory.ts measures against.

Options:
  --host HOST         address to listen on (default 127.0.0.1)
  --port PORT         TCP port; 0 picks a free one (default 4000)
  --read-bytes N      read buffer per connection (default 64)
  -h, --help          show this help`;

/**
 * Runs the loop from command line arguments. Resolves with 2 on a usage
 * error, 0 after `--help`; otherwise it serves until the process is killed.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * assert.equal(await main(["--read-bytes", "0"]), 2);
 * ```
 */
export async function main(args: string[]): Promise<number> {
  let options: BareEchoOptions;
  try {
    const { values } = parseArgs({
      args,
      options: {
        host: { type: "string" },
        port: { type: "string" },
        "read-bytes": { type: "string" },
        help: { type: "boolean", short: "h" },
      },
    });
    if (values.help) {
      console.log(USAGE);
      return 0;
    }
    options = {
      hostname: values.host ?? "127.0.0.1",
      port: parseInteger("--port", values.port, { default: 4000, max: 65535 }),
      readBytes: parseInteger("--read-bytes", values["read-bytes"], {
        default: 64,
        min: 1,
        max: 16 * 1024 * 1024,
      }),
    };
  } catch (error) {
    if (!(error instanceof UsageError || error instanceof TypeError)) {
      throw error;
    }
    console.error(`bare_echo: ${error.message}\n\n${USAGE}`);
    return 2;
  }
  const listener = serveBareEcho(options);
  const { hostname, port } = listener.addr;
  console.error(`listening on ${hostname}:${port}`);
  await new Promise(() => {}); // serve until killed
  return 0;
}

if (import.meta.main) {
  Deno.exit(await main(Deno.args));
}
