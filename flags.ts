/**
 * Parsers for command line flag values: whole numbers, byte sizes with an
 * optional KiB, MiB or GiB suffix, and seconds. Each takes the flag's name
 * and its text (`undefined` when the flag was not given) and throws a
 * {@linkcode UsageError} with a one-line message naming the flag.
 *
 * @module
 */

import { parseArgs, type ParseArgsConfig } from "node:util";
import { errorMessage } from "./_errors.ts";

/** A command line mistake; its message is one line meant for the user. */
export class UsageError extends Error {
  /** Always `"UsageError"`. */
  override name = "UsageError";
}

/** Options for {@linkcode parseInteger}. */
export interface IntegerOptions {
  /** Returned when the flag was not given; without one, it is required. */
  default?: number;
  /**
   * Smallest value accepted.
   *
   * @default {0}
   */
  min?: number;
  /**
   * Largest value accepted.
   *
   * @default {Number.MAX_SAFE_INTEGER}
   */
  max?: number;
}

/**
 * Parses a whole number from `min` to `max` written in decimal digits.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * assert.equal(parseInteger("--port", "8080", { default: 4000, max: 65535 }), 8080);
 * assert.equal(parseInteger("--port", undefined, { default: 4000, max: 65535 }), 4000);
 * assert.throws(() => parseInteger("--port", "80a"), UsageError);
 * ```
 */
export function parseInteger(
  flag: string,
  text: string | undefined,
  options: IntegerOptions = {},
): number {
  const { min = 0, max = Number.MAX_SAFE_INTEGER } = options;
  if (text === undefined) return defaultOf(flag, options.default);
  const value = /^\d+$/.test(text) ? Number(text) : NaN;
  if (!(value >= min && value <= max)) {
    throw new UsageError(
      `${flag} must be a whole number from ${min} to ${max}, not '${text}'`,
    );
  }
  return value;
}

/** Options for {@linkcode parseSize}. */
export interface SizeOptions {
  /** Returned when the flag was not given; without one, it is required. */
  default?: number;
  /**
   * Fewest bytes accepted.
   *
   * @default {0}
   */
  min?: number;
}

const SIZE_UNITS: Record<string, number> = {
  "": 1,
  kib: 1024,
  mib: 1024 ** 2,
  gib: 1024 ** 3,
};

/**
 * Parses a number of bytes, optionally followed by `KiB`, `MiB` or `GiB`
 * (in any case), of at least `min` and at most `Number.MAX_SAFE_INTEGER`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * assert.equal(parseSize("--max-buffered", "64MiB", { min: 65536 }), 67108864);
 * ```
 */
export function parseSize(
  flag: string,
  text: string | undefined,
  options: SizeOptions = {},
): number {
  const { min = 0 } = options;
  if (text === undefined) return defaultOf(flag, options.default);
  const match = /^(\d+)\s*(kib|mib|gib)?$/i.exec(text);
  const value = match
    ? Number(match[1]) * SIZE_UNITS[(match[2] ?? "").toLowerCase()]
    : NaN;
  if (!(value >= min && Number.isSafeInteger(value))) {
    const what = min > 0
      ? `a size of at least ${min} bytes`
      : "a number of bytes";
    throw new UsageError(
      `${flag} must be ${what} such as 65536 or 64MiB, not '${text}'`,
    );
  }
  return value;
}

// One millisecond: what the servers' timers take.
const MIN_SECONDS = 0.001;

/** Options for {@linkcode parseSeconds}. */
export interface SecondsOptions {
  /** Returned when the flag was not given; without one, it is required. */
  default?: number;
  /**
   * Whether exactly 0 is accepted (a positive value below 0.001 never is).
   *
   * @default {false}
   */
  allowZero?: boolean;
}

/**
 * Parses a number of seconds, with an optional decimal fraction, from 0.001
 * (the servers take whole milliseconds; a smaller value would round to 0,
 * and an idle timeout of 0 cuts off every client) up to 86400 (one day).
 * Returns seconds.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * assert.equal(parseSeconds("--idle-timeout", "0.25"), 0.25);
 * assert.equal(parseSeconds("--drain-timeout", "0", { allowZero: true }), 0);
 * assert.throws(() => parseSeconds("--idle-timeout", "0.0004"), UsageError);
 * ```
 */
export function parseSeconds(
  flag: string,
  text: string | undefined,
  options: SecondsOptions = {},
): number {
  const { allowZero = false } = options;
  if (text === undefined) return defaultOf(flag, options.default);
  const seconds = /^\d+(\.\d+)?$/.test(text) ? Number(text) : NaN;
  if (
    !((allowZero && seconds === 0) ||
      (seconds >= MIN_SECONDS && seconds <= 86_400))
  ) {
    throw new UsageError(
      `${flag} must be ${
        allowZero ? "0 or " : ""
      }a number of seconds from ${MIN_SECONDS} to 86400, not '${text}'`,
    );
  }
  return seconds;
}

/** What {@linkcode parseInstance} returns: instance `instance` of `instances`. */
export interface Instance {
  /** This instance's number, from 1 to `instances`. */
  instance: number;
  /** How many instances there are. */
  instances: number;
}

/** Options for {@linkcode parseInstance}. */
export interface InstanceOptions {
  /**
   * Largest N accepted (server.ts's `MAX_INSTANCES`: ids grow by N per
   * client and must stay exact).
   *
   * @default {1024}
   */
  max?: number;
}

/**
 * Parses `I/N`, instance I of N, with 1 <= I <= N <= `max`. Without the
 * flag it is instance 1 of 1.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * assert.deepEqual(parseInstance("--instance", "2/4"), { instance: 2, instances: 4 });
 * assert.deepEqual(parseInstance("--instance", undefined), { instance: 1, instances: 1 });
 * assert.throws(() => parseInstance("--instance", "1/1025"), UsageError);
 * ```
 */
export function parseInstance(
  flag: string,
  text: string | undefined,
  options: InstanceOptions = {},
): Instance {
  const { max = 1024 } = options;
  if (text === undefined) return { instance: 1, instances: 1 };
  const match = /^(\d+)\/(\d+)$/.exec(text);
  const instance = Number(match?.[1]);
  const instances = Number(match?.[2]);
  if (!(instance >= 1 && instance <= instances && instances <= max)) {
    throw new UsageError(
      `${flag} must be I/N, instance I of N with 1 <= I <= N <= ${max}, such as 2/4, not '${text}'`,
    );
  }
  return { instance, instances };
}

function defaultOf(flag: string, value: number | undefined): number {
  if (value === undefined) throw new UsageError(`${flag} is required`);
  return value;
}

/** A host and port from {@linkcode parseHostPort}. */
export interface HostPort {
  /** Host name or address, without brackets. */
  hostname: string;
  /** TCP port. */
  port: number;
}

/**
 * Parses `HOST:PORT`, `[IPV6]:PORT` or `:PORT`; a missing host is
 * `defaultHostname`. The port is a whole number from 0 to 65535.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * assert.deepEqual(parseHostPort("--metrics", ":9400", "127.0.0.1"), {
 *   hostname: "127.0.0.1",
 *   port: 9400,
 * });
 * assert.deepEqual(parseHostPort("--metrics", "[::1]:0", "127.0.0.1"), {
 *   hostname: "::1",
 *   port: 0,
 * });
 * ```
 */
export function parseHostPort(
  flag: string,
  text: string,
  defaultHostname: string,
): HostPort {
  const match = /^(?:\[([^\]]+)\]|([^:[\]]*)):(\d+)$/.exec(text);
  const port = match ? Number(match[3]) : NaN;
  if (!match || !(port <= 65535)) {
    throw new UsageError(
      `${flag} must be HOST:PORT or :PORT with a port from 0 to 65535, not '${text}'`,
    );
  }
  return { hostname: match[1] ?? (match[2] || defaultHostname), port };
}

/** What {@linkcode parseCommandLine} accepts: node:util's option table. */
export type CommandLineOptions = NonNullable<ParseArgsConfig["options"]>;

/**
 * Parses `args` strictly against `options` with `node:util`'s `parseArgs`,
 * and throws its complaint (unknown flag, missing value) as a
 * {@linkcode UsageError} in one line. Positional arguments are refused
 * unless `allowPositionals` is set.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const { values } = parseCommandLine(["--port", "80"], {
 *   port: { type: "string" },
 * });
 * assert.equal(values.port, "80");
 * assert.throws(() => parseCommandLine(["--nope"], {}), UsageError);
 * ```
 */
export function parseCommandLine<
  T extends CommandLineOptions,
  P extends boolean = false,
>(
  args: string[],
  options: T,
  config: { allowPositionals?: P } = {},
): ReturnType<
  typeof parseArgs<
    { args: string[]; options: T; strict: true; allowPositionals: P }
  >
> {
  try {
    return parseArgs({
      args,
      options,
      strict: true,
      allowPositionals: (config.allowPositionals ?? false) as P,
    });
  } catch (error) {
    // node:util's messages can span lines; ours are one line.
    throw new UsageError(errorMessage(error).replaceAll(/\s*\n\s*/g, " "));
  }
}
