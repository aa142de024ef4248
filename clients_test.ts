/**
 * The command line clients the README names, run against a real server:
 * those that half-close at end of input get the exact echo and exit by
 * themselves; plain OpenBSD `nc` (no `-N`) waits to be cut off: at the end
 * of `--min-rate-grace` (20 s), or at the idle timeout with `--min-rate 0`.
 *
 * @module
 */

import assert from "node:assert/strict";
import { findExecutable, startServer } from "./test_util.ts";

/** Pipes `input` into `command` and returns its exit code and stdout. */
async function pipeThrough(
  command: string,
  args: string[],
  input: string,
): Promise<{ code: number; stdout: string }> {
  const child = new Deno.Command(command, {
    args,
    stdin: "piped",
    stdout: "piped",
    stderr: "null",
  }).spawn();
  const timer = setTimeout(() => child.kill("SIGKILL"), 30_000);
  try {
    const writer = child.stdin.getWriter();
    await writer.write(new TextEncoder().encode(input));
    await writer.close();
    const { code, stdout } = await child.output();
    return { code, stdout: new TextDecoder().decode(stdout) };
  } finally {
    clearTimeout(timer);
  }
}

const HALF_CLOSING: Array<[string, string, (port: number) => string[]]> = [
  ["socat -", "socat", (port) => ["-", `TCP:127.0.0.1:${port}`]],
  ["ncat", "ncat", (port) => ["127.0.0.1", `${port}`]],
  ["busybox nc", "busybox", (port) => ["nc", "127.0.0.1", `${port}`]],
  ["nc -N (OpenBSD)", "nc.openbsd", (port) => ["-N", "127.0.0.1", `${port}`]],
];

for (const [name, program, args] of HALF_CLOSING) {
  const path = findExecutable(program);
  Deno.test({
    name: `${name} gets the exact echo and exits by itself`,
    ignore: path === undefined,
    fn: async () => {
      await using s = startServer();
      const result = await pipeThrough(path!, args(s.port), "hello\n");
      assert.deepEqual(result, { code: 0, stdout: "hello\n" });
      await s.server.shutdown();
      assert.deepEqual(s.records, [[1, 6]]);
    },
  });
  if (path === undefined) {
    console.warn(`clients_test.ts: ${name} skipped, ${program} not installed`);
  }
}

const NC = findExecutable("nc.openbsd");
// The defaults' order, scaled down: --min-rate-grace (20 s) ends before
// --idle-timeout (30 s), so the min-rate rule is what cuts plain nc off.
const NC_CUT_OFF: Array<[string, Parameters<typeof startServer>[0], RegExp]> = [
  [
    "at the end of --min-rate-grace",
    { minRateGraceMs: 200, idleTimeoutMs: 3000 },
    /^client 1: cut off after 6 bytes: sent below the minimum rate of 500 B\/s/,
  ],
  [
    "at the idle timeout with --min-rate 0",
    { minRate: 0, idleTimeoutMs: 200 },
    /^client 1: cut off after 6 bytes: idle for more than 0\.2 s$/,
  ],
];
for (const [when, options, diagnostic] of NC_CUT_OFF) {
  Deno.test({
    name: `nc without -N (OpenBSD) never half-closes: empty reply ${when}`,
    ignore: NC === undefined,
    fn: async () => {
      await using s = startServer(options);
      const result = await pipeThrough(
        NC!,
        ["127.0.0.1", `${s.port}`],
        "hello\n",
      );
      assert.equal(result.stdout, "");
      await s.server.shutdown();
      assert.deepEqual(s.records, [[1, 6]]);
      assert.ok(
        s.diagnostics.some((line) => diagnostic.test(line)),
        s.diagnostics.join("\n"),
      );
    },
  });
}
