import assert from "node:assert/strict";
import {
  formatSize,
  parseCommandLine,
  parseHostPort,
  parseInstance,
  parseInteger,
  parseMilliseconds,
  parseSeconds,
  parseSize,
  stringFlags,
  UsageError,
} from "./flags.ts";

const MIB = 1024 * 1024;
// options.ts's MAX_INSTANCES, the bound --instance passes.
const MAX_1024 = { max: 1024 };

/** Asserts that `fn` throws a UsageError with exactly `message`. */
function assertThrowsUsage(fn: () => unknown, message: string): void {
  assert.throws(fn, (error) => {
    assert.ok(error instanceof UsageError);
    assert.equal(error.name, "UsageError");
    assert.equal(error.message, message);
    return true;
  });
}

Deno.test("parseInteger() reads digits within the bounds, or gives the default", () => {
  assert.equal(parseInteger("--n", "0"), 0);
  assert.equal(parseInteger("--n", "007"), 7);
  assert.equal(parseInteger("--n", "65535", { max: 65535 }), 65535);
  assert.equal(parseInteger("--n", "1", { min: 1, max: 1 }), 1);
  assert.equal(parseInteger("--n", undefined, { default: 4000 }), 4000);
  assert.equal(
    parseInteger("--n", `${Number.MAX_SAFE_INTEGER}`),
    Number.MAX_SAFE_INTEGER,
  );
});

Deno.test("parseInteger() rejects a value out of bounds or not digits", () => {
  assertThrowsUsage(
    () => parseInteger("--port", "70000", { max: 65535 }),
    "--port must be a whole number from 0 to 65535, not '70000'",
  );
  assertThrowsUsage(
    () => parseInteger("--connections", "0", { min: 1 }),
    "--connections must be a whole number from 1 to 9007199254740991, not '0'",
  );
  for (const bad of ["", "4x", "-1", "+1", "1.5", "1e3", " 1", "0x10"]) {
    assertThrowsUsage(
      () => parseInteger("--n", bad, { max: 10 }),
      `--n must be a whole number from 0 to 10, not '${bad}'`,
    );
  }
  assertThrowsUsage(() => parseInteger("--n", undefined), "--n is required");
});

Deno.test("parseSize() reads bytes, KiB, MiB and GiB in any case", () => {
  assert.equal(parseSize("--s", "0"), 0);
  assert.equal(parseSize("--s", "65536"), 65536);
  assert.equal(parseSize("--s", "2KiB"), 2048);
  assert.equal(parseSize("--s", "64kib"), 64 * 1024);
  assert.equal(parseSize("--s", "3MiB"), 3 * MIB);
  assert.equal(parseSize("--s", "16 MIB"), 16 * MIB);
  assert.equal(parseSize("--s", "2GiB"), 2048 * MIB);
  assert.equal(parseSize("--s", undefined, { default: 5 }), 5);
  assert.equal(parseSize("--s", "64KiB", { min: 65536 }), 65536);
});

Deno.test("parseSize() rejects a size below the minimum, too large, or not a size", () => {
  assertThrowsUsage(
    () => parseSize("--max-buffered", "1KiB", { min: 65536 }),
    "--max-buffered must be a size of at least 65536 bytes such as 65536 or 64MiB, not '1KiB'",
  );
  assertThrowsUsage(
    () => parseSize("--max-client-bytes", "0", { min: 1 }),
    "--max-client-bytes must be a size of at least 1 byte such as 65536 or 64MiB, not '0'",
  );
  for (
    const bad of ["", "12XB", "5MB", "-1", "1.5MiB", "KiB", "8388608GiB"]
  ) {
    assertThrowsUsage(
      () => parseSize("--size", bad),
      `--size must be a number of bytes such as 65536 or 64MiB, not '${bad}'`,
    );
  }
  assertThrowsUsage(() => parseSize("--size", undefined), "--size is required");
});

Deno.test("parseSeconds() reads whole or fractional seconds up to a day", () => {
  assert.equal(parseSeconds("--t", "0.25"), 0.25);
  assert.equal(parseSeconds("--t", "30"), 30);
  assert.equal(parseSeconds("--t", "86400"), 86400);
  assert.equal(parseSeconds("--t", "0", { allowZero: true }), 0);
  assert.equal(parseSeconds("--t", "0.0", { allowZero: true }), 0);
  assert.equal(parseSeconds("--t", "0.000", { allowZero: true }), 0);
  assert.equal(parseSeconds("--t", "0.001"), 0.001);
  assert.equal(parseSeconds("--t", "0.0010"), 0.001);
  assert.equal(parseSeconds("--t", "0.001", { allowZero: true }), 0.001);
  assert.equal(parseSeconds("--t", undefined, { default: 10 }), 10);
});

Deno.test("parseSeconds() rejects zero unless allowed, under 1 ms, over a day, or not a number", () => {
  assertThrowsUsage(
    () => parseSeconds("--idle-timeout", "0"),
    "--idle-timeout must be a number of seconds from 0.001 to 86400, not '0'",
  );
  assertThrowsUsage(
    () => parseSeconds("--drain-timeout", "86400.5", { allowZero: true }),
    "--drain-timeout must be 0 or a number of seconds from 0.001 to 86400, not '86400.5'",
  );
  // Positive, but 0 ms once rounded to the milliseconds the server takes.
  for (const small of ["0.0004", "0.0009", "0.0000001"]) {
    assertThrowsUsage(
      () => parseSeconds("--idle-timeout", small),
      `--idle-timeout must be a number of seconds from 0.001 to 86400, not '${small}'`,
    );
    assertThrowsUsage(
      () => parseSeconds("--drain-timeout", small, { allowZero: true }),
      `--drain-timeout must be 0 or a number of seconds from 0.001 to 86400, not '${small}'`,
    );
  }
  for (const bad of ["", "-1", ".5", "1.", "1e3", "10s", "Infinity"]) {
    assertThrowsUsage(
      () => parseSeconds("--t", bad),
      `--t must be a number of seconds from 0.001 to 86400, not '${bad}'`,
    );
  }
  assertThrowsUsage(() => parseSeconds("--t", undefined), "--t is required");
});

Deno.test("parseInstance() reads I/N with 1 <= I <= N, or gives 1/1 without the flag", () => {
  assert.deepEqual(parseInstance("--instance", "2/4", MAX_1024), {
    instance: 2,
    instances: 4,
  });
  assert.deepEqual(parseInstance("--instance", "1/1", MAX_1024), {
    instance: 1,
    instances: 1,
  });
  assert.deepEqual(parseInstance("--instance", "4/4", MAX_1024), {
    instance: 4,
    instances: 4,
  });
  assert.deepEqual(parseInstance("--instance", undefined, MAX_1024), {
    instance: 1,
    instances: 1,
  });
  assert.deepEqual(parseInstance("--instance", "1024/1024", MAX_1024), {
    instance: 1024,
    instances: 1024,
  });
  assert.deepEqual(parseInstance("--instance", "3/8", { max: 8 }), {
    instance: 3,
    instances: 8,
  });
});

Deno.test("parseInstance() rejects 0, over N, N over max, or not I/N", () => {
  for (
    const bad of [
      "0/4",
      "5/4",
      "x",
      "",
      "2",
      "2/",
      "/4",
      "1/0",
      "-1/4",
      "1.5/4",
      "1/4/4",
      "1/1025",
      "1/9007199254740993",
      "9007199254740993/9007199254740993",
    ]
  ) {
    assertThrowsUsage(
      () => parseInstance("--instance", bad, MAX_1024),
      `--instance must be I/N, instance I of N with 1 <= I <= N <= 1024, such as 2/4, not '${bad}'`,
    );
  }
  assertThrowsUsage(
    () => parseInstance("--instance", "1/9", { max: 8 }),
    "--instance must be I/N, instance I of N with 1 <= I <= N <= 8, such as 2/4, not '1/9'",
  );
});

Deno.test("parseHostPort() reads HOST:PORT, [IPV6]:PORT, or :PORT on the default host", () => {
  assert.deepEqual(parseHostPort("--metrics", "0.0.0.0:9400", "127.0.0.1"), {
    hostname: "0.0.0.0",
    port: 9400,
  });
  assert.deepEqual(parseHostPort("--metrics", "localhost:0", "127.0.0.1"), {
    hostname: "localhost",
    port: 0,
  });
  assert.deepEqual(parseHostPort("--metrics", "[::1]:65535", "127.0.0.1"), {
    hostname: "::1",
    port: 65535,
  });
  assert.deepEqual(parseHostPort("--metrics", ":9400", "127.0.0.1"), {
    hostname: "127.0.0.1",
    port: 9400,
  });
});

Deno.test("parseHostPort() rejects no port, a port over 65535, or a bare IPv6 address", () => {
  for (
    const text of ["", "9400", "host:", "host:x", ":65536", "::1:9400", "[::1]"]
  ) {
    assertThrowsUsage(
      () => parseHostPort("--metrics", text, "127.0.0.1"),
      `--metrics must be HOST:PORT or :PORT with a port from 0 to 65535, not '${text}'`,
    );
  }
});

Deno.test("stringFlags() makes each name a flag that takes a value", () => {
  assert.deepEqual(stringFlags(["host", "max-buffered"]), {
    host: { type: "string" },
    "max-buffered": { type: "string" },
  });
  assertThrowsUsage(
    () => parseCommandLine(["--host"], stringFlags(["host"])),
    "Option '--host <value>' argument missing",
  );
});

Deno.test("parseMilliseconds() reads seconds as whole milliseconds, or gives the default", () => {
  assert.equal(parseMilliseconds("--t", "0.001"), 1);
  assert.equal(parseMilliseconds("--t", "1.5"), 1500);
  assert.equal(parseMilliseconds("--t", "86400"), 86_400_000);
  assert.equal(parseMilliseconds("--t", "0", { allowZero: true }), 0);
  assert.equal(
    parseMilliseconds("--t", undefined, { default: 30_000 }),
    30_000,
  );
  assertThrowsUsage(
    () => parseMilliseconds("--t", "0"),
    "--t must be a number of seconds from 0.001 to 86400, not '0'",
  );
  assertThrowsUsage(
    () => parseMilliseconds("--t", undefined),
    "--t is required",
  );
});

Deno.test("formatSize() writes what parseSize() reads back, in the largest unit that divides it", () => {
  for (
    const [bytes, text] of [
      [0, "0"],
      [500, "500"],
      [1536, "1536"],
      [16 * 1024, "16KiB"],
      [64 * MIB, "64MiB"],
      [1024 * MIB, "1GiB"],
      [3 * 1024 * MIB + MIB, "3073MiB"],
    ] as const
  ) {
    assert.equal(formatSize(bytes), text);
    assert.equal(parseSize("--s", text), bytes);
  }
});
