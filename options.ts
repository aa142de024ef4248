/**
 * The command line's options: one table row per flag ({@linkcode FLAGS}),
 * with the {@linkcode Config} field it sets, its parser, its default and its
 * help text. {@linkcode parseFlags}, {@linkcode USAGE} (`--help`) and
 * {@linkcode DEFAULTS}, the defaults the library modules use, are made from
 * it; options_test.ts checks the README's flags table and the library's
 * `@default` tags against it. A new flag is a new row.
 *
 * @module
 */

import { AddressRanges } from "./address_ranges.ts";
import {
  formatSize,
  type HostPort,
  type Instance,
  parseCommandLine,
  parseHostPort,
  parseInstance,
  parseInteger,
  parseMilliseconds,
  parseSize,
  stringFlags,
  UsageError,
} from "./flags.ts";

const KIB = 1024;
const MIB = 1024 * KIB;
const LOOPBACK = "127.0.0.1";

/**
 * Most instances `--instance I/N` (and `serveEcho()`'s `instances`) allows:
 * client ids grow by N per client, and must stay below 2^53 to stay exact
 * and distinct. With 1024, one instance numbers 2^53 / 1024 = 8.8e12
 * clients; at 100,000 a second (ten times the ~10,000 measured in
 * bench/README.md) that is 2.8 years without a restart, at the measured rate
 * 28 years.
 */
export const MAX_INSTANCES = 1024;

/**
 * A row of {@linkcode FLAGS}: a flag that takes a value, and how its text
 * becomes `Fields`, its part of {@linkcode Config}.
 */
export interface Flag<Fields extends object = object> {
  /** The flag as typed: `--max-buffered`. */
  readonly flag: `--${string}`;
  /** What `--help` and the README call its value: `SIZE`. */
  readonly arg: string;
  /** Its default as `--help` and the README show it: `512MiB`, or `off`. */
  readonly shown: string;
  /**
   * What it does, as the README's flags table says it (Markdown); `--help`
   * says it without the backticks.
   */
  readonly help: string;
  /**
   * Its fields of {@linkcode Config} from the flag's text, or their
   * defaults when the flag was not given (`undefined`). Throws
   * {@linkcode UsageError}.
   */
  read(text: string | undefined): Fields;
}

/** What every row of {@linkcode FLAGS} says of its flag. */
interface Described {
  flag: `--${string}`;
  arg: string;
  help: string;
}

/**
 * The row builder for one parser: a row sets one {@linkcode Config} field,
 * `key`, to what `parse` reads with the row as its options (`default`, and
 * bounds such as `min`), and shows its default with `show`.
 */
function kind<T, O>(
  show: (value: T) => string,
  parse: (flag: string, text: string | undefined, options: O) => T,
) {
  return <const K extends string>(
    row: Described & O & { key: K; default: T },
  ): Flag<Record<K, T>> => ({
    flag: row.flag,
    arg: row.arg,
    help: row.help,
    shown: show(row.default),
    read: (text) => field(row.key, parse(row.flag, text, row)),
  });
}

/** `{ [key]: value }`, typed: a computed key alone types as any string. */
function field<K extends string, T>(key: K, value: T): Record<K, T> {
  return { [key]: value } as Record<K, T>;
}

const integer = kind(String, parseInteger);
const size = kind(formatSize, parseSize);
// Seconds on the command line, milliseconds in Config.
const milliseconds = kind((ms: number) => `${ms / 1000}`, parseMilliseconds);
const nonEmpty = kind(
  (text: string) => text,
  (flag, text, options: { default: string }) => {
    if (text === "") throw new UsageError(`${flag} must not be empty`);
    return text ?? options.default;
  },
);

/** {@linkcode parseInstance}: one flag, two fields. */
function instance(row: Described & { max: number }): Flag<Instance> {
  const alone = parseInstance(row.flag, undefined, row);
  return {
    ...row,
    shown: `${alone.instance}/${alone.instances}`,
    read: (text) => parseInstance(row.flag, text, row),
  };
}

/**
 * The row builder for an option that is off by default: without the flag
 * its {@linkcode Config} field is absent; with it, `parse` reads the text
 * with the row as its options.
 */
function off<T, O>(parse: (flag: string, text: string, options: O) => T) {
  return <const K extends string>(
    row: Described & O & { key: K },
  ): Flag<Partial<Record<K, T>>> => ({
    flag: row.flag,
    arg: row.arg,
    help: row.help,
    shown: "off",
    read: (text) =>
      text === undefined ? {} : field(row.key, parse(row.flag, text, row)),
  });
}

const hostPort = off(
  (flag, text, options: { defaultHostname: string }): HostPort =>
    parseHostPort(flag, text, options.defaultHostname),
);
const addressRanges = off((flag, text): AddressRanges => {
  try {
    return AddressRanges.parse(text);
  } catch (error) {
    if (!(error instanceof RangeError)) throw error;
    throw new UsageError(`${flag}: ${error.message}`);
  }
});

/**
 * Every flag that takes a value, in `--help`'s order: the flag, its value's
 * name, the {@linkcode Config} field it sets (`key`), its default and its
 * help text (Markdown, as the README shows it). The builder names the
 * parser: `size()` reads with `parseSize()`, `milliseconds()` with
 * `parseMilliseconds()` (seconds on the command line, milliseconds in
 * `Config`), `nonEmpty()` takes any text but the empty one, and so on.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const port = FLAGS.find(({ flag }) => flag === "--port")!;
 * assert.deepEqual(port.read("8080"), { port: 8080 });
 * ```
 */
export const FLAGS = [
  nonEmpty({
    flag: "--host",
    arg: "HOST",
    key: "hostname",
    default: LOOPBACK,
    help: "address to listen on",
  }),
  integer({
    flag: "--port",
    arg: "PORT",
    key: "port",
    default: 4000,
    max: 65535,
    help: "TCP port; `0` picks a free one",
  }),
  nonEmpty({
    flag: "--log",
    arg: "PATH",
    key: "logPath",
    default: "/var/log/echo-server/access.log",
    help: "access log",
  }),
  size({
    flag: "--log-backlog",
    arg: "SIZE",
    key: "logBacklogBytes",
    default: 16 * MIB,
    // Room for a line's remainder after a short write, and then some.
    min: 4096,
    help:
      "log lines kept in memory while the disk takes no writes; past it they are dropped",
  }),
  size({
    flag: "--max-client-bytes",
    arg: "SIZE",
    key: "maxClientBytes",
    default: 64 * MIB,
    min: 1,
    help: "bytes one client may send",
  }),
  size({
    flag: "--max-buffered",
    arg: "SIZE",
    key: "maxBufferedBytes",
    default: 512 * MIB,
    // Below this every client would be cut off at its first read.
    min: 64 * KIB,
    help: "buffer memory for all clients together",
  }),
  integer({
    flag: "--max-connections",
    arg: "N",
    key: "maxConnections",
    default: 16384,
    min: 1,
    max: 1_000_000,
    help:
      "clients served at once; at the limit a newcomer evicts a client of the biggest source (IPv4 address or IPv6 /64)",
  }),
  milliseconds({
    flag: "--idle-timeout",
    arg: "SECONDS",
    key: "idleTimeoutMs",
    default: 30_000,
    help: "cut off a client idle this long",
  }),
  size({
    flag: "--min-rate",
    arg: "SIZE",
    key: "minRate",
    default: 500,
    help:
      "bytes a second a client must send on average until it half-closes, after `--min-rate-grace`; `0` is off",
  }),
  milliseconds({
    flag: "--min-rate-grace",
    arg: "SECONDS",
    key: "minRateGraceMs",
    default: 20_000,
    help: "time a client may send below `--min-rate`",
  }),
  size({
    flag: "--min-read-rate",
    arg: "SIZE",
    key: "minReadRate",
    default: 16 * KIB,
    help:
      "bytes a second a client must read its echo at, after each write, once idle; `0` is off",
  }),
  milliseconds({
    flag: "--eviction-grace",
    arg: "SECONDS",
    key: "evictionGraceMs",
    default: 2000,
    allowZero: true,
    help:
      "clients connected this long may be evicted for a newcomer at `--max-connections`; `0` turns eviction off, for `--max-buffered` too",
  }),
  milliseconds({
    flag: "--drain-timeout",
    arg: "SECONDS",
    key: "drainTimeoutMs",
    default: 10_000,
    allowZero: true,
    help: "on SIGINT/SIGTERM, time clients get to finish",
  }),
  milliseconds({
    flag: "--shutdown-delay",
    arg: "SECONDS",
    key: "shutdownDelayMs",
    default: 0,
    allowZero: true,
    help:
      "on SIGINT/SIGTERM, keep accepting this long with `/healthz` answering 503 before the drain",
  }),
  instance({
    flag: "--instance",
    arg: "I/N",
    max: MAX_INSTANCES,
    help:
      `instance I of N (N at most ${MAX_INSTANCES}) sharing one access log: numbers its clients I, I+N, I+2N, ...`,
  }),
  hostPort({
    flag: "--metrics",
    arg: "HOST:PORT",
    key: "metrics",
    defaultHostname: LOOPBACK,
    help:
      `serve Prometheus \`/metrics\` and \`/healthz\` over HTTP; \`:PORT\` alone binds \`${LOOPBACK}\``,
  }),
  addressRanges({
    flag: "--proxy-protocol",
    arg: "FROM",
    key: "proxyProtocol",
    help:
      "each connection begins with a PROXY header (v1 or v2) from a proxy in FROM (addresses, CIDR ranges: `127.0.0.1,10.0.0.0/8`)",
  }),
] as const;

/**
 * The flags that ask for something instead of setting an option: `--name`
 * or `-short`, with help as in {@linkcode FLAGS}. {@linkcode parseFlags}
 * returns the name of the one given.
 */
export const SWITCHES = [
  { name: "help", short: "h", help: "show this help" },
  { name: "version", short: "V", help: "show the version" },
] as const;

/**
 * The fields of every member of `U` together, as one object type:
 * `{ a: string } | { b: number }` to `{ a: string; b: number }`.
 */
export type AllOf<U> = (U extends unknown ? (u: U) => void : never) extends
  (u: infer I) => void ? { [K in keyof I]: I[K] } : never;

/**
 * Everything the command line can set: the fields the rows of
 * {@linkcode FLAGS} read, each described by its row's help text.
 */
export type Config = AllOf<ReturnType<(typeof FLAGS)[number]["read"]>>;

/**
 * Each option's value when its flag is not given: the command line's
 * defaults, and the library's (`serveEcho()`, `Admission`, `BufferBudget`,
 * `AccessLog.open()` take theirs from here).
 */
export const DEFAULTS: Readonly<Config> = Object.freeze(
  readFlags(() => undefined),
);

// The longest line --help prints.
const USAGE_WIDTH = 79;

/** The `--help` text. */
export const USAGE: string = `Usage: echo-server [options]

A TCP echo server: each client's bytes are read until it half-closes, then
sent back, and one line per client is appended to the access log.

Options:
${
  usageLines([
    ...FLAGS.map((flag) => ({
      label: `${flag.flag} ${flag.arg}`,
      words: [...plain(flag.help).split(" "), `(default ${flag.shown})`],
    })),
    ...SWITCHES.map((option) => ({
      label: `-${option.short}, --${option.name}`,
      words: plain(option.help).split(" "),
    })),
  ])
}

SIZE is a number of bytes, optionally with a suffix KiB, MiB or GiB.
SECONDS may have a fraction, down to 0.001 (one millisecond).
Signals: SIGHUP reopens the access log, or, once the terminal the server
started in has closed, stops it as SIGINT does; SIGINT or SIGTERM stops
accepting (after --shutdown-delay) and drains; a second SIGINT or SIGTERM cuts
everyone off at once. Signals within 500 ms of the first count as one: one
Ctrl-C under deno task arrives twice.`;

/**
 * Parses command line flags into a {@linkcode Config}, or returns `"help"`
 * or `"version"` when those were asked for. Throws {@linkcode UsageError}.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const config = parseFlags(["--port", "0", "--log", "/tmp/access.log"]);
 * assert.ok(typeof config === "object");
 * assert.equal(config.port, 0);
 * assert.equal(config.logPath, "/tmp/access.log");
 * assert.equal(parseFlags(["--help"]), "help");
 * ```
 */
export function parseFlags(
  args: string[],
): Config | (typeof SWITCHES)[number]["name"] {
  const { values } = parseCommandLine(args, {
    ...stringFlags(FLAGS.map(({ flag }) => flag.slice(2))),
    ...Object.fromEntries(
      SWITCHES.map(({ name, short }) => [name, { type: "boolean", short }]),
    ),
  });
  for (const { name } of SWITCHES) if (values[name] === true) return name;
  return readFlags(({ flag }) => {
    const text = values[flag.slice(2)];
    return typeof text === "string" ? text : undefined;
  });
}

/** Every row's fields, from the text `textOf` gives for its flag. */
function readFlags(textOf: (flag: Flag) => string | undefined): Config {
  const config: Partial<Config> = {};
  for (const flag of FLAGS) Object.assign(config, flag.read(textOf(flag)));
  // Each field of Config is some row's (options_test.ts), so all are set.
  return config as Config;
}

/** Help text as `--help` prints it: Markdown's backticks dropped. */
function plain(help: string): string {
  return help.replaceAll("`", "");
}

/**
 * `--help`'s option lines: each label, then its words wrapped at
 * {@linkcode USAGE_WIDTH} in a column that starts past the longest label.
 */
function usageLines(options: { label: string; words: string[] }[]): string {
  const column = 2 + Math.max(...options.map(({ label }) => label.length)) + 1;
  return options.flatMap(({ label, words }) => {
    const lines = [`  ${label}`.padEnd(column) + words[0]];
    for (const word of words.slice(1)) {
      const last = lines.length - 1;
      if (lines[last].length + 1 + word.length <= USAGE_WIDTH) {
        lines[last] += ` ${word}`;
      } else {
        lines.push(" ".repeat(column) + word);
      }
    }
    return lines;
  }).join("\n");
}
