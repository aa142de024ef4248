/**
 * Tests of the start and compile tasks and of the binary `deno task compile`
 * builds.
 *
 * Checked in every run, offline: both tasks run main.ts with the same flags
 * (`--no-prompt`, the V8 flags, exactly `--allow-net
 * --allow-write=/var/log/echo-server`); in a terminal a missing permission is
 * one line and exit 1, never a prompt; and the payload `deno compile` embeds:
 * the test compiles with `DENORT_BIN` set to the Deno running the tests
 * (the result runs as the Deno CLI, but its payload is the real one) and
 * reads the binary's permissions, V8 flags, entry point and modules.
 *
 * Running the compiled binary needs a real denort, Deno's runtime binary for
 * the target: from `DENORT_BIN=/path/to/denort` (an unpacked binary), else
 * from Deno's cache, `$DENO_DIR/dl/release/v<version>/denort-<target>.zip`
 * (DENO_DIR defaults to ~/.cache/deno on Linux; `deno info` shows it). Without
 * one, that test is reported as ignored, with the reason in its name.
 *
 * The compiled binary may only write under /var/log/echo-server, so a live
 * test cannot use a temporary log with it, and must not write the real log.
 * So the binary is compiled twice into a temporary dir, with the compile
 * task's words from deno.json: once exactly as the task does (checked:
 * --help, --version, and refusing a log outside /var/log/echo-server), and
 * once with the temporary dir added to --allow-write, only for the test that
 * serves a client and is stopped with SIGTERM.
 *
 * The same checks also run on `deno run` with the compile task's flags,
 * which needs no denort, so they are exercised everywhere.
 */

import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import denoJson from "./deno.json" with { type: "json" };
import { DEFAULTS } from "./options.ts";
import { readCompiledPayload } from "./_compiled_payload.ts";
import {
  echo,
  killAfter,
  runCommand,
  spawnChild,
  withTempDir,
} from "./test_util.ts";

const REPO = fileURLToPath(new URL(".", import.meta.url));
const LOG_DIR = DEFAULTS.logPath.slice(0, DEFAULTS.logPath.lastIndexOf("/"));
const GRANTED = ["--allow-net", `--allow-write=${LOG_DIR}`];
const decoder = new TextDecoder();

const words = (task: string) => task.trim().split(/\s+/);
const compileTask = words(denoJson.tasks.compile);
const startTask = words(denoJson.tasks.start);

/** A task's permission flags (--allow-*, --deny-*, -A). */
function permissions(task: string[]): string[] {
  return task.filter((word) => /^(--allow-|--deny-|-A$)/.test(word)).sort();
}

/** The flags a task runs main.ts with: all but the subcommand and --output. */
function runFlags(task: string[]): string[] {
  return task.slice(2, -1).filter((word, i, flags) =>
    word !== "--output" && flags[i - 1] !== "--output"
  );
}

/** The V8 flags a task passes with --v8-flags. */
function v8Flags(task: string[]): string[] {
  return task.filter((word) => word.startsWith("--v8-flags="))
    .flatMap((word) => word.slice("--v8-flags=".length).split(","));
}

Deno.test("deno task start and compile run main.ts with the same flags, never -A or a prompt", () => {
  assert.equal(LOG_DIR, "/var/log/echo-server");
  assert.deepEqual(compileTask.slice(0, 2), ["deno", "compile"]);
  assert.deepEqual(startTask.slice(0, 2), ["deno", "run"]);
  assert.deepEqual(runFlags(compileTask), runFlags(startTask));
  assert.deepEqual(permissions(startTask), GRANTED);
  assert.ok(
    startTask.includes("--no-prompt"),
    "a prompt would stop the server",
  );
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
      if (!isFile(bin)) {
        return { found: false, reason: `DENORT_BIN=${bin} does not exist` };
      }
      // A binary built on the Deno CLI runs as the CLI; only its payload is
      // real, and the payload test checks that.
      return Deno.realPathSync(bin) === Deno.realPathSync(Deno.execPath())
        ? { found: false, reason: `DENORT_BIN=${bin} is the Deno CLI` }
        : { found: true, reason: `DENORT_BIN=${bin}` };
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

/**
 * V8 flags Deno 2.9.6 puts ahead of the user's (`construct_v8_flags` with
 * `get_default_v8_flags()`, cli/args/mod.rs); the first stands for argv[0].
 */
const DENO_V8_FLAGS = [
  "UNUSED_BUT_NECESSARY_ARG0",
  "--stack-size=1024",
  "--inspector-live-edit",
  "--external-memory-max-reasonable-size=0",
];

/**
 * Hosts Deno 2.9.6 allows imports from when no --allow-import is given
 * (`implicit_allow_import`, cli/args/mod.rs). An empty list would mean any.
 */
const DENO_DEFAULT_IMPORT_HOSTS = [
  "jsr.io:443",
  "deno.land:443",
  "esm.sh:443",
  "raw.esm.sh:443",
  "cdn.jsdelivr.net:443",
  "raw.githubusercontent.com:443",
  "gist.githubusercontent.com:443",
];

/** One module of `deno info --json`. */
interface InfoModule {
  specifier: string;
  kind: string;
  local?: string;
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && a.every((byte, i) => byte === b[i]);
}

Deno.test(
  "deno task compile embeds its permissions, the V8 flags and every module of main.ts",
  withTempDir(async (dir, t) => {
    // Built on the Deno CLI instead of denort, which needs no download: the
    // binary runs as the CLI, but its payload is what denort would run.
    const output = `${dir}/echo-server`;
    const compiled = await runCommand(Deno.execPath(), compileArgs(output), {
      cwd: REPO,
      env: { DENORT_BIN: Deno.execPath(), NO_COLOR: "1" },
    });
    assert.equal(compiled.code, 0, compiled.stderr);
    const payload = await readCompiledPayload(output);
    const { metadata } = payload;

    await t.step(
      "grants --allow-net and --allow-write to the log dir, nothing else, no prompt",
      () => {
        const { allow_import, ...granted } = metadata.permissions;
        const nothing = Object.fromEntries(
          Object.keys(granted).map((name) => [name, null]),
        );
        assert.deepEqual(granted, {
          ...nothing,
          allow_net: [], // every host
          allow_write: [LOG_DIR],
          prompt: false,
        });
        assert.ok(
          allow_import?.length,
          `imports from anywhere: ${allow_import}`,
        );
        for (const host of allow_import) {
          assert.ok(
            DENO_DEFAULT_IMPORT_HOSTS.includes(host),
            `imports: ${host}`,
          );
        }
      },
    );

    await t.step(
      "bakes in the start task's V8 flags, no arguments or env",
      () => {
        assert.ok(v8Flags(startTask).length > 0);
        assert.deepEqual(metadata.v8_flags, [
          ...DENO_V8_FLAGS,
          ...v8Flags(startTask),
        ]);
        assert.deepEqual(metadata.argv, []);
        assert.deepEqual(metadata.env_vars_from_env_file, {});
      },
    );

    await t.step(
      "embeds main.ts and every module deno info lists for it",
      async () => {
        // VFS paths are relative to the directory the entry point is in.
        assert.equal(metadata.entrypoint_key, "main.ts");
        const info = await runCommand(
          Deno.execPath(),
          ["info", "--json", "main.ts"],
          { cwd: REPO },
        );
        assert.equal(info.code, 0, info.stderr);
        const { modules, npmPackages } = JSON.parse(info.stdout) as {
          modules: InfoModule[];
          npmPackages: Record<string, unknown>;
        };
        assert.deepEqual(npmPackages, {}, "npm packages: check node_modules");
        assert.equal(payload.hasNpmSnapshot, false);
        // node: modules are built into the runtime.
        const needed = modules.filter((module) => module.kind !== "node");
        const local = needed.filter((m) => m.specifier.startsWith("file:"));
        const remote = needed.filter((m) => !m.specifier.startsWith("file:"));
        const paths = local.map((m) =>
          fileURLToPath(m.specifier).slice(REPO.length)
        );
        assert.ok(paths.includes("main.ts") && paths.includes("server.ts"));
        assert.deepEqual([...payload.files.keys()].sort(), paths.sort());
        for (const path of paths) {
          const embedded = payload.files.get(path)!;
          const source = await Deno.readFile(`${REPO}${path}`);
          assert.ok(sameBytes(embedded, source), `${path} as embedded differs`);
        }
        assert.deepEqual(
          [...payload.remoteModules.keys()].sort(),
          remote.map((m) => m.specifier).sort(),
        );
        for (const module of remote) {
          const source = await Deno.readFile(module.local!);
          const embedded = payload.remoteModules.get(module.specifier)!;
          assert.ok(sameBytes(embedded, source), `${module.specifier} differs`);
        }
      },
    );
  }, { prefix: "echo-server-compile-" }),
);

/** What a command printed in a terminal, and whether it prompted. */
interface TerminalResult {
  code: number;
  /** The terminal's non-empty lines. */
  lines: string[];
  /** It asked for a permission (and was stopped there). */
  prompted: boolean;
}

const hasScript = (() => {
  try {
    return new Deno.Command("script", { args: ["--version"] }).outputSync()
      .success;
  } catch {
    return false;
  }
})();

/**
 * Runs a command in a pseudo-terminal with util-linux `script`, as a user
 * at a shell would. A permission prompt would wait there forever, and so
 * would a server that started after all, so at the first prompt or
 * `listening on` line `script` is stopped, which hangs the command up.
 */
async function runInTerminal(
  args: string[],
  cwd: string,
): Promise<TerminalResult> {
  const quoted = args.map((arg) => `'${arg.replaceAll("'", `'\\''`)}'`);
  const child = spawnChild(
    "script",
    ["--quiet", "--return", "--command", quoted.join(" "), "/dev/null"],
    { cwd, stderr: "null" },
  );
  using _timeout = killAfter(child, 60_000);
  let output = "";
  let stopped = false;
  for await (const text of child.stdout.pipeThrough(new TextDecoderStream())) {
    output += text;
    if (!stopped && /Deno requests|Allow\?|^listening on /m.test(output)) {
      stopped = true;
      child.kill("SIGTERM");
    }
  }
  const prompted = /Deno requests|Allow\?/.test(output);
  const { code } = await child.status;
  return { code, lines: output.split(/\r?\n/).filter(Boolean), prompted };
}

const NO_SCRIPT = " (skipped: no util-linux script for a terminal)";

Deno.test({
  name:
    `deno task start in a terminal prints one line for a log it may not write, exits 1, never prompts${
      hasScript ? "" : NO_SCRIPT
    }`,
  ignore: !hasScript,
  fn: withTempDir(async (dir) => {
    const logPath = `${dir}/outside/access.log`;
    const result = await runInTerminal(
      [Deno.execPath(), "task", "start", "--port", "0", "--log", logPath],
      REPO,
    );
    assert.ok(!result.prompted, result.lines.join("\n"));
    assert.equal(result.code, 1);
    assert.deepEqual(result.lines.filter((l) => !l.startsWith("Task start ")), [
      `echo-server: cannot open access log ${logPath}: Deno's --allow-write ` +
      "does not grant it (the tasks and the compiled binary may write only " +
      "in /var/log/echo-server: log there, or run main.ts with " +
      "--allow-write naming the log's directory)",
    ]);
  }, { prefix: "echo-server-compile-" }),
});

Deno.test({
  name:
    `deno task start without --allow-net in a terminal prints one line, exits 1, never prompts${
      hasScript ? "" : NO_SCRIPT
    }`,
  ignore: !hasScript,
  fn: withTempDir(async (dir) => {
    const flags = runFlags(startTask)
      .filter((flag) => flag !== "--allow-net")
      .map((flag) =>
        flag.startsWith("--allow-write=") ? `--allow-write=${dir}` : flag
      );
    const result = await runInTerminal(
      [
        Deno.execPath(),
        "run",
        ...flags,
        "main.ts",
        "--port",
        "0",
        "--log",
        `${dir}/access.log`,
      ],
      REPO,
    );
    assert.ok(!result.prompted, result.lines.join("\n"));
    assert.equal(result.code, 1);
    assert.deepEqual(result.lines, [
      "echo-server: cannot listen on 127.0.0.1:0: permission to use the " +
      "network was not granted (run with --allow-net)",
    ]);
  }, { prefix: "echo-server-compile-" }),
});

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
  assert.equal(result.code, 1);
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
  using _timeout = killAfter(child, 60_000);
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
    assert.match(stderr, /^stopped after 1 client$/m);
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
  await t.step(
    "prints --help and --version as deno run main.ts does",
    () => checkHelpAndVersion(server),
  );
  await t.step(
    "refuses a log outside the log dir in one line",
    () => checkLogOutsideLogDir(server, dir),
  );
  await t.step(
    "serves and logs a client, exits 0 on SIGTERM",
    () => checkServesAndStops(server, dir),
  );
}

Deno.test(
  "deno task compile fails naming a missing DENORT_BIN",
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
  "deno task compile's flags under deno run pass the ./echo-server checks",
  withTempDir(async (dir, t) => {
    const run = [Deno.execPath(), "run"] as const;
    const server: Server = {
      exact: [...run, ...runFlags(compileTask), "main.ts"],
      withTempLog: [
        ...run,
        ...runFlags(["deno", ...compileArgs("", dir)]),
        `${REPO}/main.ts`,
      ],
    };
    await checkServer(t, server, dir);
  }, { prefix: "echo-server-compile-" }),
);

const denort = findDenort();

Deno.test({
  name: denort.found
    ? `deno task compile builds an ./echo-server that passes its checks (denort: ${denort.reason})`
    : `deno task compile builds an ./echo-server that passes its checks (skipped: ${denort.reason})`,
  ignore: !denort.found,
  fn: withTempDir(async (dir, t) => {
    const exact = `${dir}/echo-server`;
    const withTempLog = `${dir}/echo-server-test-log`;
    await t.step(
      "builds the binaries",
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
