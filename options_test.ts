import assert from "node:assert/strict";
import {
  type Config,
  DEFAULTS,
  FLAGS,
  parseFlags,
  SWITCHES,
  USAGE,
} from "./options.ts";

/** What `--metrics` in `args` sets. */
function metricsOf(args: string[]): Config["metrics"] {
  const config = parseFlags(args);
  assert.ok(typeof config === "object");
  return config.metrics;
}

Deno.test("parseFlags() gives the defaults and reads sizes and seconds", () => {
  assert.deepEqual(parseFlags([]), {
    hostname: "127.0.0.1",
    port: 4000,
    logPath: "/var/log/echo-server/access.log",
    logBacklogBytes: 16 * 1024 * 1024,
    maxClientBytes: 64 * 1024 * 1024,
    maxBufferedBytes: 512 * 1024 * 1024,
    maxConnections: 16384,
    idleTimeoutMs: 30_000,
    minRate: 500,
    minRateGraceMs: 20_000,
    minReadRate: 16 * 1024,
    evictionGraceMs: 2000,
    drainTimeoutMs: 10_000,
    shutdownDelayMs: 0,
    instance: 1,
    instances: 1,
  });
  const config = parseFlags([
    "--host=0.0.0.0",
    "--port=0",
    "--max-client-bytes=2KiB",
    "--max-buffered",
    "3MiB",
    "--idle-timeout=0.25",
    "--drain-timeout=0",
    "--shutdown-delay=2.5",
    "--instance=3/4",
    "--log-backlog=8KiB",
    "--min-rate=0",
    "--min-rate-grace=5",
    "--min-read-rate=32KiB",
    "--eviction-grace=0",
  ]);
  assert.ok(typeof config === "object");
  assert.equal(config.hostname, "0.0.0.0");
  assert.equal(config.port, 0);
  assert.equal(config.maxClientBytes, 2048);
  assert.equal(config.maxBufferedBytes, 3 * 1024 * 1024);
  assert.equal(config.idleTimeoutMs, 250);
  assert.equal(config.drainTimeoutMs, 0);
  assert.equal(config.shutdownDelayMs, 2500);
  assert.equal(config.minRate, 0);
  assert.equal(config.minRateGraceMs, 5000);
  assert.equal(config.minReadRate, 32 * 1024);
  assert.equal(config.evictionGraceMs, 0);
  assert.equal(config.instance, 3);
  assert.equal(config.instances, 4);
  assert.equal(config.logBacklogBytes, 8192);
  // The smallest positive value each seconds flag takes: 1 ms, not 0.
  const smallest = parseFlags([
    "--idle-timeout=0.001",
    "--drain-timeout=0.001",
    "--shutdown-delay=0.001",
  ]);
  assert.ok(typeof smallest === "object");
  assert.equal(smallest.idleTimeoutMs, 1);
  assert.equal(smallest.drainTimeoutMs, 1);
  assert.equal(smallest.shutdownDelayMs, 1);
});

Deno.test("parseFlags() reads --metrics HOST:PORT, or :PORT on loopback, off by default", () => {
  assert.equal(metricsOf([]), undefined);
  assert.deepEqual(metricsOf(["--metrics", ":9400"]), {
    hostname: "127.0.0.1",
    port: 9400,
  });
  assert.deepEqual(
    metricsOf(["--metrics=0.0.0.0:0"]),
    { hostname: "0.0.0.0", port: 0 },
  );
  assert.deepEqual(
    metricsOf(["--metrics=[::1]:9400"]),
    { hostname: "::1", port: 9400 },
  );
});

Deno.test("parseFlags() returns help or version when asked, whatever else is given", () => {
  assert.equal(parseFlags(["-h"]), "help");
  assert.equal(parseFlags(["--port", "0", "--help"]), "help");
  assert.equal(parseFlags(["-V"]), "version");
  assert.equal(parseFlags(["--version", "--help"]), "help");
});

Deno.test("parseFlags() refuses an empty --host or --log in one line naming it", () => {
  for (const flag of ["--host", "--log"]) {
    assert.throws(() => parseFlags([flag, ""]), {
      name: "UsageError",
      message: `${flag} must not be empty`,
    });
  }
});

Deno.test("FLAGS: each field of DEFAULTS is one row's, and each row's default as shown reads back as its default", () => {
  const rowOf = new Map<string, string>();
  for (const row of FLAGS) {
    for (const key of Object.keys(row.read(undefined))) {
      assert.ok(!rowOf.has(key), `${key}: ${rowOf.get(key)} and ${row.flag}`);
      rowOf.set(key, row.flag);
    }
    if (row.shown !== "off") {
      assert.deepEqual(row.read(row.shown), row.read(undefined), row.flag);
    }
  }
  assert.deepEqual([...rowOf.keys()], Object.keys(DEFAULTS));
  assert.deepEqual(Object.keys(DEFAULTS), Object.keys(parseFlags([])));
});

Deno.test("USAGE gives each row its help without backticks and its own default, in lines of at most 79 columns", () => {
  // Each option's text, continuation lines joined, keyed by its label: a
  // default printed beside the wrong flag, or a word lost, fails here.
  const options: Array<[string, string]> = [];
  for (const line of USAGE.split("\n")) {
    assert.ok(line.length <= 79, line);
    const option = /^ {2}(-[^\s,]+(?:, -\S+)?(?: [A-Z][A-Z/:]*)?) +(\S.*)$/
      .exec(line);
    if (option) {
      options.push([option[1], option[2]]);
    } else if (options.length > 0 && /^ {10,}\S/.test(line)) {
      options[options.length - 1][1] += ` ${line.trim()}`;
    }
  }
  assert.deepEqual(options, [
    ...FLAGS.map((row) => [
      `${row.flag} ${row.arg}`,
      `${row.help.replaceAll("`", "")} (default ${row.shown})`,
    ]),
    ...SWITCHES.map((row) => [`-${row.short}, --${row.name}`, row.help]),
  ]);
  assert.match(
    USAGE,
    /^Signals: SIGHUP reopens the access log, or, once the terminal/m,
  );
});

/**
 * The cells of the first Markdown table after the line `heading`, header
 * row first, the separator row left out: cells, not lines, since deno fmt
 * pads the columns.
 */
function tableAfter(markdown: string, heading: string): string[][] {
  const lines = markdown.split("\n");
  const start = lines.indexOf(heading);
  assert.ok(start >= 0, `no line ${heading}`);
  const rows: string[][] = [];
  for (const line of lines.slice(start + 1)) {
    if (line.startsWith("|")) {
      rows.push(line.slice(1, -1).split("|").map((cell) => cell.trim()));
    } else if (rows.length > 0 || line.startsWith("#")) {
      break;
    }
  }
  return rows.filter((cells) => !cells.every((cell) => /^:?-+:?$/.test(cell)));
}

Deno.test("README.md's flags table shows each row of FLAGS and SWITCHES: the flag, its default, its help", async () => {
  const readme = await Deno.readTextFile(
    new URL("./README.md", import.meta.url),
  );
  assert.deepEqual(tableAfter(readme, "## Flags"), [
    ["flag", "default", "meaning"],
    ...FLAGS.map((row) => [
      `\`${row.flag} ${row.arg}\``,
      row.shown === "off" ? "off" : `\`${row.shown}\``,
      row.help,
    ]),
    ...SWITCHES.map((row) => [
      `\`-${row.short}\`, \`--${row.name}\``,
      "",
      row.help,
    ]),
  ]);
});

/** The value of a `@default {...}` tag: a string literal, or a product of numbers. */
function defaultValue(text: string): unknown {
  if (text.startsWith('"')) return JSON.parse(text);
  return text.split("*")
    .map((factor) => Number(factor.trim().replaceAll("_", "")))
    .reduce((product, factor) => product * factor);
}

Deno.test("the library's @default tags for fields a flag sets say DEFAULTS", async () => {
  const defaults = new Map<string, unknown>(Object.entries(DEFAULTS));
  // The access log's field has a name of its own on the command line.
  const fieldOf = new Map([["maxBacklogBytes", "logBacklogBytes"]]);
  const checked: string[] = [];
  for (
    const module of [
      "server.ts",
      "admission.ts",
      "buffer_pool.ts",
      "access_log.ts",
    ]
  ) {
    const source = await Deno.readTextFile(new URL(module, import.meta.url));
    const tags = source.matchAll(/@default \{([^}]*)\}\s*\*\/\s*(\w+)\?:/g);
    for (const [, value, name] of tags) {
      const field = fieldOf.get(name) ?? name;
      if (!defaults.has(field)) continue;
      assert.equal(
        defaultValue(value),
        defaults.get(field),
        `${module}: ${name}`,
      );
      checked.push(`${module}: ${name}`);
    }
  }
  assert.deepEqual(checked, [
    "server.ts: hostname",
    "server.ts: port",
    "server.ts: maxClientBytes",
    "server.ts: maxConnections",
    "server.ts: instance",
    "server.ts: instances",
    "server.ts: drainTimeoutMs",
    "admission.ts: idleTimeoutMs",
    "admission.ts: minRate",
    "admission.ts: minRateGraceMs",
    "admission.ts: minReadRate",
    "admission.ts: evictionGraceMs",
    "buffer_pool.ts: maxBufferedBytes",
    "access_log.ts: maxBacklogBytes",
  ]);
});
