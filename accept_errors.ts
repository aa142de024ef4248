/**
 * Sorts the errors of `listener.accept()` into whose doing they were. A
 * module of its own because the sorting is pure (an error in, a kind out)
 * and the tables behind it change for reasons of their own (a new errno,
 * a new Deno error class), not with the accept loop that acts on them.
 *
 * @module
 */

import { describe } from "./_errors.ts";

/** Whose doing a failed accept was: see {@linkcode acceptErrorKind}. */
export type AcceptErrorKind = "exhaustion" | "client" | "unknown";

/**
 * How the accept loop treats an error from `listener.accept()`:
 *
 * - `"exhaustion"`: the server is out of file descriptors or memory
 *   (EMFILE, ENFILE, ENOBUFS, ENOMEM). The connection stays queued; accept
 *   again once a client finishes.
 * - `"client"`: the kernel accepted a connection that then failed, e.g. it
 *   reset while queued (ENOTCONN from Deno's getpeername,
 *   denoland/deno#8499), or a network error Linux passes on from the new
 *   socket (see accept(2)). A client that sent nothing; accept again at once.
 * - `"unknown"`: anything else. Counted as a client too, but worth a report.
 *
 * Sorted by the error's `code` (or the os error number in its message),
 * the way Go's net package and nginx sort them, not by its class.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const emfile = Object.assign(new Error("Too many open files (os error 24)"), {
 *   code: "EMFILE",
 * });
 * assert.equal(acceptErrorKind(emfile), "exhaustion");
 * assert.equal(
 *   acceptErrorKind(new Deno.errors.NotConnected("os error 107")),
 *   "client",
 * );
 * assert.equal(acceptErrorKind(new Error("something new")), "unknown");
 * ```
 */
export function acceptErrorKind(error: unknown): AcceptErrorKind {
  const code = errorCode(error);
  if (code !== undefined) {
    if (EXHAUSTION_CODES.has(code)) return "exhaustion";
    if (CLIENT_CODES.has(code)) return "client";
  }
  // Deno gives these classes only to these client codes; errors made
  // without a code (as in tests) are still sorted by them.
  if (
    error instanceof Deno.errors.NotConnected ||
    error instanceof Deno.errors.ConnectionReset ||
    error instanceof Deno.errors.ConnectionAborted
  ) return "client";
  return "unknown";
}

// Linux numbers, for an error that carries no code.
const OS_ERROR_CODES: Record<number, string> = {
  12: "ENOMEM",
  23: "ENFILE",
  24: "EMFILE",
  105: "ENOBUFS",
};
const EXHAUSTION_CODES = new Set(["EMFILE", "ENFILE", "ENOBUFS", "ENOMEM"]);
// ECONNABORTED, ECONNRESET and ENOTCONN: the client left while queued.
// EPERM: a firewall rule refused it. The rest: network errors Linux's
// accept(2) passes on from the new socket and says to retry.
const CLIENT_CODES = new Set([
  "ECONNABORTED",
  "ECONNRESET",
  "ENOTCONN",
  "EPERM",
  "ETIMEDOUT",
  "EPROTO",
  "ENOPROTOOPT",
  "ENETDOWN",
  "ENETUNREACH",
  "EHOSTDOWN",
  "EHOSTUNREACH",
  "ENONET",
  "EOPNOTSUPP",
]);

function errorCode(error: unknown): string | undefined {
  if (!(error instanceof Error)) return undefined;
  const { code } = error as Error & { code?: unknown };
  if (typeof code === "string") return code;
  const number = /\(os error (\d+)\)/.exec(error.message)?.[1];
  return number === undefined ? undefined : OS_ERROR_CODES[Number(number)];
}

/**
 * The stderr line about `failures` accepts that failed for want of file
 * descriptors or memory (`"exhaustion"`), the last with `error`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * assert.equal(
 *   exhaustionLine(3, new Error("Too many open files (os error 24)")),
 *   "accept failed 3 times: Error: Too many open files (os error 24); accepting again as soon as a client finishes",
 * );
 * ```
 */
export function exhaustionLine(failures: number, error: unknown): string {
  return `accept failed ${failures} ${failures === 1 ? "time" : "times"}: ${
    describe(error)
  }; accepting again as soon as a client finishes`;
}
