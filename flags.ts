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
  const expected = `a whole number from ${min} to ${max}`;
  return parseFlag(flag, text, options.default, expected, (text) => {
    const value = /^\d+$/.test(text) ? Number(text) : NaN;
    return value >= min && value <= max ? value : undefined;
  });
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
  const expected = `${
    min > 0
      ? `a size of at least ${min} byte${min === 1 ? "" : "s"}`
      : "a number of bytes"
  } such as 65536 or 64MiB`;
  return parseFlag(flag, text, options.default, expected, (text) => {
    const match = /^(\d+)\s*(kib|mib|gib)?$/i.exec(text);
    const value = match
      ? Number(match[1]) * SIZE_UNITS[(match[2] ?? "").toLowerCase()]
      : NaN;
    return value >= min && Number.isSafeInteger(value) ? value : undefined;
  });
}

/**
 * `bytes` as {@linkcode parseSize} reads it back, in the largest unit that
 * divides it: for defaults in help texts.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * assert.equal(formatSize(512 * 1024 * 1024), "512MiB");
 * assert.equal(formatSize(16 * 1024), "16KiB");
 * assert.equal(formatSize(500), "500");
 * ```
 */
export function formatSize(bytes: number): string {
  for (const [suffix, unit] of SIZE_SUFFIXES) {
    if (bytes > 0 && bytes % unit === 0) return `${bytes / unit}${suffix}`;
  }
  return `${bytes}`;
}

const SIZE_SUFFIXES = [["GiB", 1024 ** 3], ["MiB", 1024 ** 2], [
  "KiB",
  1024,
]] as const;

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
  const expected = `${
    allowZero ? "0 or " : ""
  }a number of seconds from ${MIN_SECONDS} to 86400`;
  return parseFlag(flag, text, options.default, expected, (text) => {
    const seconds = /^\d+(\.\d+)?$/.test(text) ? Number(text) : NaN;
    return (allowZero && seconds === 0) ||
        (seconds >= MIN_SECONDS && seconds <= 86_400)
      ? seconds
      : undefined;
  });
}

/** Options for {@linkcode parseMilliseconds}. */
export interface MillisecondsOptions extends Omit<SecondsOptions, "default"> {
  /**
   * Returned, in milliseconds, when the flag was not given; without one, it
   * is required.
   */
  default?: number;
}

/**
 * Parses seconds as {@linkcode parseSeconds} does, and returns them as whole
 * milliseconds: flags are in seconds, the servers' timers take milliseconds.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * assert.equal(parseMilliseconds("--idle-timeout", "0.25"), 250);
 * assert.equal(parseMilliseconds("--idle-timeout", undefined, { default: 5000 }), 5000);
 * assert.throws(() => parseMilliseconds("--idle-timeout", "0"), UsageError);
 * ```
 */
export function parseMilliseconds(
  flag: string,
  text: string | undefined,
  options: MillisecondsOptions = {},
): number {
  const { default: fallback, ...secondsOptions } = options;
  if (text === undefined && fallback !== undefined) return fallback;
  return Math.round(parseSeconds(flag, text, secondsOptions) * 1000);
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
   * Largest N accepted: the server's bound (options.ts's `MAX_INSTANCES`,
   * ids grow by N per client and must stay exact), so the caller names it
   * rather than this module keeping a copy.
   */
  max: number;
}

/**
 * Parses `I/N`, instance I of N, with 1 <= I <= N <= `max`. Without the
 * flag it is instance 1 of 1.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * assert.deepEqual(parseInstance("--instance", "2/4", { max: 1024 }), { instance: 2, instances: 4 });
 * assert.deepEqual(parseInstance("--instance", undefined, { max: 1024 }), { instance: 1, instances: 1 });
 * assert.throws(() => parseInstance("--instance", "1/1025", { max: 1024 }), UsageError);
 * ```
 */
export function parseInstance(
  flag: string,
  text: string | undefined,
  options: InstanceOptions,
): Instance {
  const expected =
    `I/N, instance I of N with 1 <= I <= N <= ${options.max}, such as 2/4`;
  const alone = { instance: 1, instances: 1 }; // without the flag
  return parseFlag(flag, text, alone, expected, (text) => {
    const match = /^(\d+)\/(\d+)$/.exec(text);
    const instance = Number(match?.[1]);
    const instances = Number(match?.[2]);
    return instance >= 1 && instance <= instances && instances <= options.max
      ? { instance, instances }
      : undefined;
  });
}

/**
 * What every parser here does around its own reading of the text: the
 * fallback when the flag was not given (required if there is none), else
 * `read(text)`, and where that is undefined, the one-line complaint that
 * `flag` must be `expected`.
 */
function parseFlag<T>(
  flag: string,
  text: string | undefined,
  fallback: T | undefined,
  expected: string,
  read: (text: string) => T | undefined,
): T {
  if (text === undefined) {
    if (fallback === undefined) throw new UsageError(`${flag} is required`);
    return fallback;
  }
  const value = read(text);
  if (value === undefined) {
    throw new UsageError(`${flag} must be ${expected}, not '${text}'`);
  }
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
  const expected = "HOST:PORT or :PORT with a port from 0 to 65535";
  return parseFlag(flag, text, undefined, expected, (text) => {
    const match = /^(?:\[([^\]]+)\]|([^:[\]]*)):(\d+)$/.exec(text);
    const port = match ? Number(match[3]) : NaN;
    return match && port <= 65535
      ? { hostname: match[1] ?? (match[2] || defaultHostname), port }
      : undefined;
  });
}

/**
 * `HOST:PORT`, with an IPv6 address in brackets: the inverse of
 * {@linkcode parseHostPort}, for messages naming an address.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * assert.equal(formatHostPort("127.0.0.1", 4000), "127.0.0.1:4000");
 * assert.equal(formatHostPort("::1", 4000), "[::1]:4000");
 * ```
 */
export function formatHostPort(hostname: string, port: number): string {
  return hostname.includes(":")
    ? `[${hostname}]:${port}`
    : `${hostname}:${port}`;
}

/** What {@linkcode parseCommandLine} accepts: node:util's option table. */
export type CommandLineOptions = NonNullable<ParseArgsConfig["options"]>;

/** The option table {@linkcode stringFlags} returns. */
export type StringFlags<N extends string> = { [K in N]: { type: "string" } };

/**
 * The part of a {@linkcode parseCommandLine} table for flags that each take
 * a value (`--name VALUE` or `--name=VALUE`), one for each of `names`: most
 * flags do, and their values go to the parsers here.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const { values } = parseCommandLine(["--host", "::1", "--port=80"], {
 *   ...stringFlags(["host", "port"]),
 *   help: { type: "boolean" },
 * });
 * assert.deepEqual({ ...values }, { host: "::1", port: "80" });
 * ```
 */
export function stringFlags<const N extends string>(
  names: readonly N[],
): StringFlags<N> {
  return Object.fromEntries(
    names.map((name) => [name, { type: "string" }]),
  ) as StringFlags<N>;
}

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
      args: joinNegativeValues(args, options),
      options,
      strict: true,
      allowPositionals: (config.allowPositionals ?? false) as P,
    });
  } catch (error) {
    // node:util's messages can span lines; ours are one line.
    throw new UsageError(errorMessage(error).replaceAll(/\s*\n\s*/g, " "));
  }
}

/**
 * `--port -1` as `--port=-1`: node:util reads a value that starts with a
 * dash as a missing one ("argument is ambiguous"), while the flag's own
 * parser says what range it takes.
 */
function joinNegativeValues(
  args: string[],
  options: CommandLineOptions,
): string[] {
  const joined: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const arg = args[i];
    const next = args[i + 1];
    if (
      arg.startsWith("--") && !arg.includes("=") && next !== undefined &&
      /^-\d/.test(next) && options[arg.slice(2)]?.type === "string"
    ) {
      joined.push(`${arg}=${next}`);
      i++;
    } else {
      joined.push(arg);
    }
  }
  return joined;
}
