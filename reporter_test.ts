import assert from "node:assert/strict";
import { RateLimitedReporter } from "./reporter.ts";
import { FakeClock } from "./test_util.ts";

function reporterWith(
  options: { linesPerPeriod: number; label?: string },
) {
  const clock = new FakeClock();
  const lines: string[] = [];
  const reporter = new RateLimitedReporter<"reset" | "idle">(
    (line) => lines.push(line),
    { ...options, periodMs: 1000, kinds: ["reset", "idle"], clock },
  );
  return { clock, lines, reporter };
}

Deno.test("RateLimitedReporter.report() writes linesPerPeriod lines, then one summary by kind at the period's end", () => {
  const { clock, lines, reporter } = reporterWith({
    linesPerPeriod: 2,
    label: "client diagnostic",
  });
  reporter.report("idle", "a");
  reporter.report("reset", "b");
  clock.advance(100);
  reporter.report("idle", "c");
  reporter.report("reset", "d");
  reporter.report("idle", "e");
  assert.deepEqual(lines, ["a", "b"]);
  clock.advance(899);
  assert.deepEqual(lines, ["a", "b"]);
  clock.advance(1);
  assert.deepEqual(lines, [
    "a",
    "b",
    "... and 3 more client diagnostics in the last second (reset 1, idle 2)",
  ]);
  assert.equal(clock.pending, 0);
});

Deno.test("RateLimitedReporter.report() counts the summary as the next period's first line", () => {
  const { clock, lines, reporter } = reporterWith({ linesPerPeriod: 1 });
  reporter.report("reset", "first");
  reporter.report("reset", "held");
  clock.advance(1000);
  assert.deepEqual(lines, [
    "first",
    "... and 1 more line in the last second (reset 1)",
  ]);
  // Within the period the summary opened: held, not written.
  clock.advance(500);
  reporter.report("reset", "too soon");
  assert.equal(lines.length, 2);
  clock.advance(500);
  assert.equal(lines[2], "... and 1 more line in the last second (reset 1)");
  // A quiet period later, a line goes out at once.
  clock.advance(1000);
  reporter.report("idle", "later");
  assert.equal(lines[3], "later");
});

Deno.test("RateLimitedReporter.close() writes what is held back and leaves no timer", () => {
  const { clock, lines, reporter } = reporterWith({ linesPerPeriod: 0 });
  reporter.report("idle", "x");
  assert.equal(clock.pending, 1);
  reporter.close();
  assert.equal(clock.pending, 0);
  assert.deepEqual(lines, ["... and 1 more line in the last second (idle 1)"]);
  reporter.close();
  assert.equal(lines.length, 1);
});

Deno.test("RateLimitedReporter uses summarize for its summary line", () => {
  const lines: string[] = [];
  const reporter = new RateLimitedReporter<"exhaustion">(
    (line) => lines.push(line),
    {
      linesPerPeriod: 1,
      summarize: (counts, total) =>
        `failed ${total} times (${JSON.stringify(counts)})`,
    },
  );
  reporter.report("exhaustion", "failed 1 time");
  reporter.report("exhaustion", "failed 1 time");
  reporter.report("exhaustion", "failed 1 time");
  reporter.flush();
  assert.deepEqual(lines, [
    "failed 1 time",
    'failed 2 times ([["exhaustion",2]])',
  ]);
  reporter.close();
});

Deno.test("RateLimitedReporter.reset() writes what is held back and lets the next line out at once", () => {
  const { lines, reporter } = reporterWith({ linesPerPeriod: 1 });
  reporter.report("reset", "first");
  reporter.report("reset", "held");
  reporter.reset();
  reporter.report("idle", "next");
  assert.deepEqual(lines, [
    "first",
    "... and 1 more line in the last second (reset 1)",
    "next",
  ]);
  reporter.close();
});

Deno.test("RateLimitedReporter passes the last line held back to summarize", () => {
  const lines: string[] = [];
  const reporter = new RateLimitedReporter<"write">(
    (line) => lines.push(line),
    {
      linesPerPeriod: 1,
      summarize: (_, total, last) => `${last} (${total} times)`,
    },
  );
  reporter.report("write", "ENOSPC");
  reporter.report("write", "EDQUOT");
  reporter.report("write", "EIO");
  reporter.close();
  assert.deepEqual(lines, ["ENOSPC", "EIO (2 times)"]);
});
