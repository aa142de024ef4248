/**
 * The command line frame the bench tools share: parse the flags, print the
 * usage for `--help` (exit 0) or with the mistake for bad flags (exit 2).
 * Each tool's `main(args)` returns its exit status rather than exiting, so
 * tests can call it.
 *
 * @module
 */

import { UsageError } from "../flags.ts";

/**
 * Runs `parse`; returns its options, or the exit status once it has printed
 * what was asked: the usage on stdout for `"help"` (0), or
 * `NAME: message` and the usage on stderr for a {@linkcode UsageError} (2).
 * Any other error is rethrown.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const usage = "usage: tool [--help]";
 * assert.equal(parseCommand("tool", usage, () => "help"), 0);
 * assert.deepEqual(parseCommand("tool", usage, () => ({ port: 1 })), {
 *   port: 1,
 * });
 * ```
 */
export function parseCommand<T extends object>(
  name: string,
  usage: string,
  parse: () => T | "help",
): T | number {
  let options;
  try {
    options = parse();
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    console.error(`${name}: ${error.message}\n\n${usage}`);
    return 2;
  }
  if (options === "help") {
    console.log(usage);
    return 0;
  }
  return options;
}
