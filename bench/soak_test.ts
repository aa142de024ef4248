import assert from "node:assert/strict";
import { assertUsageError, runCommand } from "../test_util.ts";
import type { LogReport } from "./log_check.ts";
import { readRssKiB } from "./_proc.ts";
import {
  checkRss,
  neverAcceptedLines,
  parseSoakArgs,
  type RssSample,
  runSoak,
} from "./soak.ts";

const MIB = 1024 * 1024;

/** Samples four a second for `seconds`, of `mib(t)` MiB at time t. */
function samples(seconds: number, mib: (t: number) => number): RssSample[] {
  return Array.from({ length: seconds * 4 + 1 }, (_, i) => ({
    seconds: i / 4,
    bytes: Math.round(mib(i / 4) * MIB),
  }));
}

Deno.test("checkRss() passes a flat RSS and growth during the first quarter", () => {
  assert.ok(checkRss(samples(20, () => 60)).ok);
  // Warm-up: 40 -> 70 MiB over the first 5 s, flat after.
  const warm = checkRss(samples(20, (t) => 40 + 6 * Math.min(t, 5)));
  assert.ok(warm.ok);
  assert.equal(warm.secondQuarterMax, 70 * MIB);
  assert.equal(warm.lastQuarterMax, 70 * MIB);
  assert.equal(warm.limit, Math.round(77 * MIB + 8 * MIB));
});

Deno.test("checkRss() passes a sawtooth whose peaks stay level", () => {
  // A heap that grows 2 MiB a second and is collected every 3 s.
  assert.ok(checkRss(samples(20, (t) => 60 + 2 * (t % 3))).ok);
});

Deno.test("checkRss() fails an RSS that keeps growing", () => {
  // 2 MiB a second from 60 MiB: 80 MiB at the end of the second quarter,
  // 100 at the end, over 80 x 1.1 + 8.
  const leak = checkRss(samples(20, (t) => 60 + 2 * t));
  assert.equal(leak.secondQuarterMax, 80 * MIB);
  assert.equal(leak.lastQuarterMax, 100 * MIB);
  assert.equal(leak.ok, false);
  // A sawtooth whose peaks climb 2 MiB a second.
  assert.equal(
    checkRss(samples(20, (t) => 60 + 2 * (t % 3) + 2 * t)).ok,
    false,
  );
});

Deno.test("checkRss() fails with fewer than four samples", () => {
  assert.equal(checkRss(samples(0.5, () => 60)).ok, false);
  assert.equal(checkRss([]).ok, false);
});

Deno.test("parseSoakArgs() reads --duration", () => {
  assert.deepEqual(parseSoakArgs([]), { duration: 20 });
  assert.deepEqual(parseSoakArgs(["--duration", "600"]), { duration: 600 });
  assert.equal(parseSoakArgs(["-h"]), "help");
  for (
    const bad of [["--duration", "0"], ["--duration", "x"], ["--port", "1"]]
  ) {
    assert.throws(() => parseSoakArgs(bad), { name: "UsageError" }, `${bad}`);
  }
});

const SOAK = new URL("./soak.ts", import.meta.url).pathname;

Deno.test("deno task soak prints --help, and one line and the usage for a bad flag, exits 2", async () => {
  const run = (args: string[]) =>
    runCommand(Deno.execPath(), ["run", "--no-prompt", SOAK, ...args], {
      env: { NO_COLOR: "1" },
    });
  const help = await run(["--help"]);
  assert.equal(help.code, 0);
  assert.match(help.stdout, /^Usage: deno task soak \[--duration SECONDS\]$/m);
  assert.match(
    help.stdout,
    /--duration SECONDS +how long to run clients \(default 20\)/,
  );
  assertUsageError(
    await run(["--duration", "0"]),
    "soak: --duration must be a number of seconds",
    "Usage: deno task soak [--duration SECONDS]",
  );
});

Deno.test("runSoak() runs the server and the mix for 2 s and the checks pass", async () => {
  const result = await runSoak({ duration: 2 });
  const report = result.checks.map((c) =>
    `${c.name}: ${c.ok ? "ok" : "FAILED"} ${c.detail}`
  ).join("\n");
  assert.deepEqual(result.checks.map((c) => c.name), [
    "warm-up",
    "echoes",
    "accepted == logged",
    "RSS",
    "descriptors",
    "listening",
    "exit",
    "log total",
  ]);
  // Not the RSS: 2 s is within the server's warm-up, when its RSS still
  // grows (the buffer pool filling); the 20 s CI soak checks it.
  for (const check of result.checks) {
    if (check.name !== "RSS") assert.ok(check.ok, report);
  }
  assert.ok(result.mix.connected > 0);
  assert.equal(result.mix.log!.lines, result.mix.connected);
  assert.ok(result.rss.length >= 4, report);
  assert.ok(
    result.diagnostics.some(([shape]) => shape.startsWith("listening on ")),
  );
});

// A process that holds 16 MiB more each time it reads a 1 from stdin (a 0
// holds nothing), and answers each byte once done.
const GROWER = `
const held = [];
const byte = new Uint8Array(1);
while ((await Deno.stdin.read(byte)) !== null) {
  if (byte[0] === 1) held.push(new Uint8Array(16 * 1024 * 1024).fill(1));
  await Deno.stdout.write(byte);
}
`;

/**
 * The VmRSS of a real process, sampled at 8 steps (as seconds 0..7), where
 * it grows by 16 MiB before each of the steps `growAt` says.
 */
async function sampleGrower(growAt: (step: number) => boolean) {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["eval", GROWER],
    stdin: "piped",
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  const writer = child.stdin.getWriter();
  const reader = child.stdout.getReader({ mode: "byob" });
  try {
    const rss: RssSample[] = [];
    for (let step = 0; step < 8; step++) {
      await writer.write(new Uint8Array([growAt(step) ? 1 : 0]));
      const { done } = await reader.read(new Uint8Array(1));
      assert.ok(!done, "the process ended");
      rss.push({ seconds: step, bytes: await readRssKiB(child.pid) * 1024 });
    }
    return checkRss(rss);
  } finally {
    await writer.close();
    await reader.cancel();
    assert.equal((await child.status).code, 0);
  }
}

Deno.test("checkRss() on a real process's VmRSS: flat passes, growing 16 MiB a step in the second half fails", async () => {
  // What the soak's RSS check does, on a process whose growth the test
  // controls (the soak's own 2 s run in this suite is still warming up).
  const flat = await sampleGrower(() => false);
  assert.ok(flat.ok, JSON.stringify(flat));
  const growing = await sampleGrower((step) => step >= 4);
  assert.equal(growing.ok, false, JSON.stringify(growing));
  assert.ok(growing.lastQuarterMax - growing.secondQuarterMax >= 48 * MIB);
});

Deno.test("neverAcceptedLines() forgives missing lines only up to the kernel's embryonic resets, and nothing else wrong", () => {
  const report = (fields: Partial<LogReport>): LogReport => ({
    lines: 98,
    expected: 100,
    uncertain: 0,
    missing: 2,
    extra: 0,
    malformed: 0,
    duplicates: 0,
    missingSizes: [],
    samples: [],
    ok: false,
    ...fields,
  });
  assert.equal(neverAcceptedLines(report({}), 2), 2);
  assert.equal(neverAcceptedLines(report({}), 5), 2);
  // More missing than the kernel saw reset: the server lost some.
  assert.equal(neverAcceptedLines(report({}), 1), 0);
  assert.equal(neverAcceptedLines(report({}), 0), 0);
  // A verified client's line missing, or any other fault, is never forgiven.
  const missingSizes = [{ bytes: 4096, expected: 10, found: 9 }];
  assert.equal(neverAcceptedLines(report({ missingSizes }), 9), 0);
  assert.equal(neverAcceptedLines(report({ malformed: 1 }), 9), 0);
  assert.equal(neverAcceptedLines(report({ duplicates: 1 }), 9), 0);
  assert.equal(neverAcceptedLines(report({ extra: 1 }), 9), 0);
  assert.equal(
    neverAcceptedLines(report({ lines: 100, missing: 0, ok: true }), 9),
    0,
  );
});
