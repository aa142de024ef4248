/**
 * Tests of `deno task compile` and the binary it builds.
 *
 * `deno compile` needs denort, Deno's runtime binary for the target: from
 * `DENORT_BIN=/path/to/denort` (an unpacked binary), else from Deno's cache,
 * `$DENO_DIR/dl/release/v<version>/denort-<target>.zip` (DENO_DIR defaults
 * to ~/.cache/deno on Linux; `deno info` shows it), else it downloads it.
 * Offline without either, the tests of the compiled binary are reported as
 * ignored, with the reason in their name.
 *
 * The compiled binary may only write under /var/log/echo-server, so a live
 * test cannot use a temporary log with it, and must not write the real log.
 * So the binary is compiled twice into a temporary dir, with the compile
 * task's words from deno.json: once exactly as the task does (checked:
 * --help, --version, and refusing a log outside /var/log/echo-server), and
 * once with the temporary dir added to --allow-write, only for the test that
 * serves a client and is stopped with SIGTERM.
 *
 * The same checks also run on `deno run` with the compile task's
 * permissions, which needs no denort, so they are exercised everywhere.
 */

import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import denoJson from "./deno.json" with { type: "json" };
import { DEFAULT_LOG_PATH } from "./main.ts";
import { echo, runCommand, withTempDir } from "./test_util.ts";

const REPO = fileURLToPath(new URL(".", import.meta.url));
const LOG_DIR = DEFAULT_LOG_PATH.slice(0, DEFAULT_LOG_PATH.lastIndexOf("/"));
const decoder = new TextDecoder();

const words = (task: string) => task.trim().split(/\s+/);
const compileTask = words(denoJson.tasks.compile);
const startTask = words(denoJson.tasks.start);

/** A task's permission flags (--allow-*, --deny-*, -A). */
function permissions(task: string[]): string[] {
  return task.filter((word) => /^(--allow-|--deny-|-A$)/.test(word)).sort();
}

Deno.test("compile and start tasks grant exactly --allow-net and --allow-write to the log dir", () => {
  const granted = ["--allow-net", `--allow-write=${LOG_DIR}`];
  assert.equal(LOG_DIR, "/var/log/echo-server");
  assert.deepEqual(compileTask.slice(0, 2), ["deno", "compile"]);
  assert.deepEqual(permissions(compileTask), granted);
  assert.deepEqual(startTask.slice(0, 2), ["deno", "run"]);
  assert.deepEqual(permissions(startTask), granted);
  for (const task of [compileTask, startTask]) {
    assert.ok(!task.some((w) => /^(-A|--allow-all)$/.test(w)), "never -A");
    assert.equal(task.at(-1), "main.ts");
  }
  // ./echo-server, which git ignores.
  assert.equal(compileTask[compileTask.indexOf("--output") + 1], "echo-server");
  const ignored = Deno.readTextFileSync(`${REPO}/.gitignore`).split("\n");
  assert.ok(ignored.some((line) => /^\/?echo-server$/.test(line.trim())));
});

/**
 * `deno compile`'s arguments from the compile task, writing to `output`;
 * with `extraWriteDir`, that dir is added to --allow-write.
 */
function compileArgs(output: string, extraWriteDir?: string): string[] {
  return compileTask.slice(1).map((word, i, args) => {
    if (args[i - 1] === "--output") return output;
    if (extraWriteDir && word.startsWith("--allow-write=")) {
      return `${word},${extraWriteDir}`;
    }
    return word;
  });
}

/** Where a denort comes from, or why there is none. */
function findDenort(): { found: boolean; reason: string } {
  try {
    const bin = Deno.env.get("DENORT_BIN");
    if (bin) {
      return isFile(bin)
        ? { found: true, reason: `DENORT_BIN=${bin}` }
        : { found: false, reason: `DENORT_BIN=${bin} does not exist` };
    }
    const info = new Deno.Command(Deno.execPath(), {
      args: ["info", "--json"],
      stdin: "null",
      stderr: "null",
    }).outputSync();
    const { denoDir } = JSON.parse(decoder.decode(info.stdout));
    const cached =
      `${denoDir}/dl/release/v${Deno.version.deno}/denort-${Deno.build.target}.zip`;
    return isFile(cached) ? { found: true, reason: `cached ${cached}` } : {
      found: false,
      reason:
        `no denort: set DENORT_BIN=/path/to/denort, or put denort-${Deno.build.target}.zip of Deno ${Deno.version.deno} at ${cached}`,
    };
  } catch (error) {
    return { found: false, reason: `cannot look for denort: ${error}` };
  }
}

function isFile(path: string): boolean {
  try {
    return Deno.statSync(path).isFile;
  } catch {
    return false;
  }
}

/** How to start the server: the compiled binary, or a `deno run` stand-in. */
interface Server {
  /** Runs with the compile task's permissions. */
  exact: [string, ...string[]];
  /** The same, and allowed to write in the test's temporary dir too. */
  withTempLog: [string, ...string[]];
}

/** --help and --version print what `deno run main.ts` prints. */
async function checkHelpAndVersion(server: Server): Promise<void> {
  const [command, ...prefix] = server.exact;
  for (const flag of ["--help", "--version"]) {
    const expected = await runCommand(
      Deno.execPath(),
      ["run", "main.ts", flag],
      { cwd: REPO },
    );
    assert.equal(expected.code, 0);
    const actual = await runCommand(command, [...prefix, flag], { cwd: REPO });
    assert.deepEqual(actual, expected, flag);
  }
}

/** A log outside /var/log/echo-server: one clear line, non-zero exit. */
async function checkLogOutsideLogDir(server: Server, dir: string) {
  const [command, ...prefix] = server.exact;
  const logPath = `${dir}/outside/access.log`;
  const result = await runCommand(
    command,
    [...prefix, "--port", "0", "--log", logPath],
    { cwd: REPO },
  );
  assert.notEqual(result.code, 0);
  assert.equal(result.stdout, "");
  const message = result.stderr.trimEnd();
  assert.ok(!message.includes("\n"), `one line: ${result.stderr}`);
  assert.ok(message.includes(logPath), `names the path: ${message}`);
  assert.ok(message.includes("--allow-write"), `says how: ${message}`);
  assert.ok(!isFile(logPath), "and writes nothing");
}

/** Serves one client, logs it, and exits 0 on SIGTERM. */
async function checkServesAndStops(server: Server, dir: string) {
  const [command, ...prefix] = server.withTempLog;
  const logPath = `${dir}/live/access.log`;
  const child = new Deno.Command(command, {
    args: [...prefix, "--port", "0", "--log", logPath],
    cwd: dir,
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  const lines = child.stderr.pipeThrough(new TextDecoderStream())
    .getReader();
  let stderr = "";
  let exited = false;
  try {
    // Read stderr up to the "listening on" line; the rest is read below.
    let listening;
    while (
      !(listening = /^listening on .+:(\d+), access log (.+)$/m.exec(stderr))
    ) {
      const { value, done } = await lines.read();
      assert.ok(!done, `exited before listening:\n${stderr}`);
      stderr += value;
    }
    assert.equal(listening[2], logPath);
    const payload = new TextEncoder().encode("hello, compiled echo-server\n");
    assert.deepEqual(await echo(Number(listening[1]), payload), payload);
    child.kill("SIGTERM");
    const status = await child.status;
    exited = true;
    for (let r; !(r = await lines.read()).done;) stderr += r.value;
    assert.equal(status.code, 0, stderr);
    assert.match(stderr, /^stopped after 1 clients$/m);
    assert.equal(
      await Deno.readTextFile(logPath),
      `[client 1]: received ${payload.length} bytes\n`,
    );
  } finally {
    if (!exited) {
      child.kill("SIGKILL");
      await child.status;
    }
    await lines.cancel();
  }
}

/** Runs the three checks above on `server`, each as a step of `t`. */
async function checkServer(
  t: Deno.TestContext,
  server: Server,
  dir: string,
): Promise<void> {
  await t.step("--help and --version", () => checkHelpAndVersion(server));
  await t.step(
    "log outside the log dir",
    () => checkLogOutsideLogDir(server, dir),
  );
  await t.step(
    "serves and stops on SIGTERM",
    () => checkServesAndStops(server, dir),
  );
}

Deno.test(
  "deno compile with a missing DENORT_BIN fails and names the path",
  withTempDir(async (dir) => {
    const denort = `${dir}/no-such-denort`;
    const output = await runCommand(
      Deno.execPath(),
      compileArgs(`${dir}/echo-server`),
      { cwd: REPO, env: { DENORT_BIN: denort, NO_COLOR: "1" } },
    );
    assert.notEqual(output.code, 0);
    assert.ok(
      output.stderr.includes(`Could not find denort at '${denort}'`),
      output.stderr,
    );
    assert.ok(!isFile(`${dir}/echo-server`));
  }, { prefix: "echo-server-compile-" }),
);

Deno.test(
  "the compile task's permissions, under deno run: help, version, log dir, serve, stop",
  withTempDir(async (dir, t) => {
    const run = [Deno.execPath(), "run", "--no-prompt"] as const;
    const server: Server = {
      exact: [...run, ...permissions(compileTask), "main.ts"],
      withTempLog: [
        ...run,
        ...permissions(compileArgs("", dir)),
        `${REPO}/main.ts`,
      ],
    };
    await checkServer(t, server, dir);
  }, { prefix: "echo-server-compile-" }),
);

const denort = findDenort();

Deno.test({
  name: denort.found
    ? `compiled ./echo-server (denort: ${denort.reason}): help, version, log dir, serve, stop`
    : `compiled ./echo-server (skipped: ${denort.reason})`,
  ignore: !denort.found,
  fn: withTempDir(async (dir, t) => {
    const exact = `${dir}/echo-server`;
    const withTempLog = `${dir}/echo-server-test-log`;
    await t.step(
      "deno task compile's command builds the binaries",
      async () => {
        const results = await Promise.all([
          runCommand(Deno.execPath(), compileArgs(exact), { cwd: REPO }),
          runCommand(Deno.execPath(), compileArgs(withTempLog, dir), {
            cwd: REPO,
          }),
        ]);
        for (const result of results) {
          assert.equal(result.code, 0, result.stderr);
        }
      },
    );
    const server: Server = { exact: [exact], withTempLog: [withTempLog] };
    await checkServer(t, server, dir);
  }, { prefix: "echo-server-compile-" }),
});
