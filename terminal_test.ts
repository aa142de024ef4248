/**
 * Ctrl-C and a closed terminal as a person meets them: the README's start
 * command typed into a shell in a real pseudo-terminal (tmux), and the key
 * sent to that terminal, which signals the whole foreground process group
 * (`npx`, `deno task` and the server), not just the server as `kill` does;
 * or the terminal closed, which hangs up the pseudo-terminal and SIGHUPs
 * the shell and its jobs.
 *
 * @module
 */

import assert from "node:assert/strict";
import denoJson from "./deno.json" with { type: "json" };
import { SAME_SIGNAL_WINDOW_MS } from "./main.ts";
import { echo, findExecutable, readAll, withTempDir } from "./test_util.ts";

const TMUX = findExecutable("tmux");
const MAIN = new URL("./main.ts", import.meta.url).pathname;

/** A process and its command line, NUL-separated as /proc shows it. */
interface Process {
  pid: number;
  cmdline: string;
}

/** A shell in a tmux pane of its own tmux server, removed on dispose. */
class Terminal implements AsyncDisposable {
  readonly #socket: string;
  // What the shell ran when the terminal was closed: reparented to init by
  // then, so no longer below the shell, but killed on dispose all the same.
  #closedOver: Process[] = [];

  private constructor(socket: string) {
    this.#socket = socket;
  }

  /** Starts an interactive bash in `cwd` on a fresh tmux server. */
  static async open(dir: string, cwd: string): Promise<Terminal> {
    const terminal = new Terminal(`${dir}/tmux.sock`);
    await terminal.#tmux(
      "new-session",
      "-d",
      "-x",
      "250",
      "-y",
      "50",
      "-c",
      cwd,
      "env NO_COLOR=1 PS1='$ ' bash --norc --noprofile -i",
    );
    return terminal;
  }

  async #tmux(...args: string[]): Promise<string> {
    const { code, stdout, stderr } = await new Deno.Command(TMUX!, {
      args: ["-S", this.#socket, "-f", "/dev/null", ...args],
      stdin: "null",
    }).output();
    const text = new TextDecoder().decode(stdout);
    assert.equal(code, 0, new TextDecoder().decode(stderr));
    return text;
  }

  /** The pid of the pane's shell. */
  async #shell(): Promise<number> {
    const [shell] = (await this.#tmux("list-panes", "-F", "#{pane_pid}"))
      .trim().split("\n").map(Number);
    return shell;
  }

  /** Everything the shell runs, with command lines. */
  async processes(): Promise<Process[]> {
    return await withCmdlines(await descendants(await this.#shell()));
  }

  /**
   * Closes the terminal as its window's close button does: tmux closes the
   * pane's pseudo-terminal (a hangup: the session's processes lose it and
   * the shell gets SIGHUP, which it sends on to its jobs). `how` is the
   * tmux command; with one pane, each ends the session and the tmux server.
   */
  async close(
    how: "kill-pane" | "kill-window" | "kill-session",
  ): Promise<void> {
    this.#closedOver = await this.processes();
    await this.#tmux(how, "-t", how === "kill-session" ? "=0" : "0");
  }

  /** Types `line` and Enter. */
  async type(line: string): Promise<void> {
    await this.#tmux("send-keys", "-t", "0", "-l", line);
    await this.#tmux("send-keys", "-t", "0", "Enter");
  }

  /** Presses Ctrl-C in the terminal. */
  async ctrlC(): Promise<void> {
    await this.#tmux("send-keys", "-t", "0", "C-c");
  }

  /** Everything the pane shows, wrapped lines joined. */
  screen(): Promise<string> {
    return this.#tmux("capture-pane", "-p", "-J", "-S", "-", "-t", "0");
  }

  /** Polls the pane until `pattern` matches; fails after `timeoutMs`. */
  async waitFor(
    pattern: RegExp,
    timeoutMs = 60_000,
  ): Promise<RegExpMatchArray> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const screen = await this.screen();
      const match = screen.match(pattern);
      if (match) return match;
      if (Date.now() > deadline) {
        throw new Error(`the terminal never showed ${pattern}:\n${screen}`);
      }
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  }

  async [Symbol.asyncDispose]() {
    // After a failed test the server may still be serving, and it would
    // outlive the suite; so whatever the shell runs, or ran when the
    // terminal was closed, is killed first (if still the same process).
    const running = this.#closedOver.length > 0
      ? this.#closedOver
      : await this.processes();
    const still = new Set(
      (await withCmdlines(running.map(({ pid }) => pid)))
        .map(({ pid, cmdline }) => `${pid} ${cmdline}`),
    );
    for (const { pid, cmdline } of running) {
      if (!still.has(`${pid} ${cmdline}`)) continue;
      try {
        Deno.kill(pid, "SIGKILL");
      } catch (error) {
        if (!(error instanceof Deno.errors.NotFound)) throw error;
      }
    }
    // Closing the last pane ended the tmux server already.
    if (this.#closedOver.length === 0) await this.#tmux("kill-server");
  }
}

/**
 * `pids` with their command lines, leaving out those that have exited
 * (zombies included, whose command line is empty).
 */
async function withCmdlines(pids: number[]): Promise<Process[]> {
  const found: Process[] = [];
  for (const pid of pids) {
    const { stdout } = await new Deno.Command("sh", {
      args: ["-c", `cat /proc/${pid}/cmdline 2>/dev/null`],
      stdin: "null",
    }).output();
    const cmdline = new TextDecoder().decode(stdout);
    if (cmdline !== "") found.push({ pid, cmdline });
  }
  return found;
}

/**
 * The server among `processes`: the one that is `deno run` (npx and
 * `sh -c` name main.ts too; `deno task` is `deno task`).
 */
function serverProcess(processes: Process[]): Process {
  const servers = processes.filter(({ cmdline }) => {
    const [command, subcommand] = cmdline.split("\0");
    return command.endsWith("deno") && subcommand === "run";
  });
  assert.equal(servers.length, 1, JSON.stringify(processes));
  return servers[0];
}

/** Polls until none of `processes` runs; fails after `timeoutMs`. */
async function waitForExit(
  processes: Process[],
  timeoutMs = 60_000,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const running = await withCmdlines(processes.map(({ pid }) => pid));
    if (running.length === 0) return;
    if (Date.now() > deadline) {
      throw new Error(`still running: ${JSON.stringify(running)}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/**
 * The processes below `pid`, from each process's parent in /proc/PID/stat
 * (read with cat: Deno lets only --allow-all read /proc, and the test task
 * grants --allow-read).
 */
async function descendants(pid: number): Promise<number[]> {
  // A process that exits between the glob and its read is an error to ignore.
  const { stdout } = await new Deno.Command("sh", {
    args: ["-c", "cat /proc/[0-9]*/stat 2>/dev/null"],
    stdin: "null",
  }).output();
  const parents = new Map<number, number>();
  for (const stat of new TextDecoder().decode(stdout).split("\n")) {
    if (stat === "") continue;
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    const [, ppid] = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    parents.set(Number.parseInt(stat), Number(ppid));
  }
  const found: number[] = [];
  const below = (parent: number) => {
    for (const [child, ppid] of parents) {
      if (ppid === parent) {
        found.push(child);
        below(child);
      }
    }
  };
  below(pid);
  return found;
}

/**
 * A project beside the test's files whose start task is the real one with
 * its log directory moved to `dir/project/log`, so a test writes only there.
 */
async function startTaskIn(dir: string): Promise<string> {
  const start = denoJson.tasks.start
    .replace("/var/log/echo-server", `${dir}/project/log`)
    .replace(" main.ts", ` ${MAIN}`);
  assert.notEqual(start, denoJson.tasks.start);
  await Deno.mkdir(`${dir}/project`);
  await Deno.writeTextFile(
    `${dir}/project/deno.json`,
    JSON.stringify({ tasks: { start } }),
  );
  return `${dir}/project`;
}

/** Polls `path` until it holds a line; fails after `timeoutMs`. */
async function waitForFile(path: string, timeoutMs = 60_000): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      const text = await Deno.readTextFile(path);
      if (text.endsWith("\n")) return text.trim();
    } catch (error) {
      if (!(error instanceof Deno.errors.NotFound)) throw error;
    }
    if (Date.now() > deadline) throw new Error(`${path} never written`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/** Polls `path` until `pattern` matches it; fails after `timeoutMs`. */
async function waitForMatch(
  path: string,
  pattern: RegExp,
  timeoutMs = 60_000,
): Promise<RegExpMatchArray> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    let text = "";
    try {
      text = await Deno.readTextFile(path);
    } catch (error) {
      if (!(error instanceof Deno.errors.NotFound)) throw error;
    }
    const match = text.match(pattern);
    if (match) return match;
    if (Date.now() > deadline) {
      throw new Error(`${path} never showed ${pattern}:\n${text}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

const encoder = new TextEncoder();

/**
 * Types `deno` and then `args` (the start task or the README's normal-user
 * command, with `--port 0` and `--log ./log/access.log`) in `dir/project`,
 * holds a client open, presses Ctrl-C `presses` times a second apart, then
 * finishes the client (after one press) or reads it to the end. Returns the
 * client's reply, the screen and, unless the command is under npx (which
 * always ends killed by SIGINT, 130, so the shell skips the rest of the
 * line), the exit status.
 */
async function ctrlCWhileServing(
  dir: string,
  deno: string,
  args: string,
  presses: number,
): Promise<{ reply: string; screen: string; status?: string; log: string }> {
  const cwd = await startTaskIn(dir);
  await using terminal = await Terminal.open(dir, cwd);
  await terminal.type(
    `${deno} ${args} --port 0 --log ./log/access.log; ` +
      `echo $? > ${dir}/status`,
  );
  const [, port] = await terminal.waitFor(/listening on 127\.0\.0\.1:(\d+)/);
  const conn = await Deno.connect({ hostname: "127.0.0.1", port: +port });
  let reply;
  try {
    await conn.write(encoder.encode("in "));
    // A later client's full round trip proves the first was accepted.
    const x = await echo(+port, encoder.encode("x"));
    assert.equal(new TextDecoder().decode(x), "x");
    await terminal.ctrlC();
    await terminal.waitFor(/SIGINT: stopping; 1 connection /);
    for (let press = 1; press < presses; press++) {
      // A deliberate second press a second later (the README's promise, so
      // not derived from the window): the window must end before it.
      assert.ok(
        SAME_SIGNAL_WINDOW_MS < 1000,
        "a second Ctrl-C a second later must cut off (README, Signals)",
      );
      await new Promise((resolve) => setTimeout(resolve, 1000));
      // The first press alone cut nobody off.
      const screen = await terminal.screen();
      assert.doesNotMatch(screen, /again: cutting off/, screen);
      await terminal.ctrlC();
      await terminal.waitFor(/SIGINT again: cutting off/);
    }
    try {
      // A client cut off has nothing more to send: it only reads.
      if (presses === 1) {
        await conn.write(encoder.encode("flight"));
        await conn.closeWrite();
      }
      reply = new TextDecoder().decode(await readAll(conn));
    } catch (error) {
      if (!(error instanceof Deno.errors.ConnectionReset)) throw error;
      reply = "";
    }
  } finally {
    conn.close();
  }
  await terminal.waitFor(/stopped after 2 clients/);
  const status = deno.startsWith("npx")
    ? undefined
    : await waitForFile(`${dir}/status`);
  const log = await Deno.readTextFile(`${cwd}/log/access.log`);
  return { reply, screen: await terminal.screen(), status, log };
}

const ignore = TMUX === undefined;
if (ignore) console.warn("terminal_test.ts: skipped, tmux is not installed");

/** The README's normal-user command, its log in the test's directory. */
const RUN = `run --no-prompt --v8-flags=--max-semi-space-size=1 --allow-net ` +
  `--allow-write=./log ${MAIN}`;

for (const deno of ["npx -y deno@2.9.6", Deno.execPath()]) {
  for (const args of ["task start", RUN]) {
    const name = `${deno.startsWith("npx") ? deno : "deno"} ${
      args === RUN ? "run main.ts" : args
    }`;
    Deno.test({
      name: `${name} on one Ctrl-C in a terminal drains, exits 0`,
      ignore,
      fn: withTempDir(async (dir) => {
        const { reply, screen, status, log } = await ctrlCWhileServing(
          dir,
          deno,
          args,
          1,
        );
        assert.equal(reply, "in flight", screen);
        assert.doesNotMatch(screen, /again: cutting off/);
        if (status !== undefined) assert.equal(status, "0", screen);
        assert.equal(
          log,
          "[client 2]: received 1 bytes\n[client 1]: received 9 bytes\n",
        );
      }),
    });
  }
}

Deno.test({
  name: "deno task start on two Ctrl-C a second apart cuts off, exits 130",
  ignore,
  fn: withTempDir(async (dir) => {
    const { reply, screen, status, log } = await ctrlCWhileServing(
      dir,
      Deno.execPath(),
      "task start",
      2,
    );
    assert.match(screen, /SIGINT again: cutting off 1 connection now/);
    assert.equal(reply, "", screen);
    assert.equal(status, "130", screen);
    assert.equal(
      log,
      "[client 2]: received 1 bytes\n[client 1]: received 3 bytes\n",
    );
  }),
});

/**
 * Closes the terminal (`how`) while `deno` `args` serves a client in
 * flight, as in {@linkcode ctrlCWhileServing} (`redirect` is typed after
 * the flags), then finishes that client. Returns its reply, what the
 * terminal ran and the access log, once nothing of it runs any more.
 */
async function closeWhileServing(
  dir: string,
  deno: string,
  args: string,
  how: "kill-pane" | "kill-window" | "kill-session",
  redirect = "",
): Promise<{ reply: string; processes: Process[]; log: string }> {
  const cwd = await startTaskIn(dir);
  await using terminal = await Terminal.open(dir, cwd);
  await terminal.type(
    `${deno} ${args} --port 0 --log ./log/access.log ${redirect}`,
  );
  const listening = /listening on 127\.0\.0\.1:(\d+)/;
  const [, port] = redirect === ""
    ? await terminal.waitFor(listening)
    : await waitForMatch(`${dir}/stderr.log`, listening);
  const processes = await terminal.processes();
  serverProcess(processes);
  const conn = await Deno.connect({ hostname: "127.0.0.1", port: +port });
  let reply;
  try {
    await conn.write(encoder.encode("in "));
    // A later client's full round trip proves the first was accepted.
    const x = await echo(+port, encoder.encode("x"));
    assert.equal(new TextDecoder().decode(x), "x");
    await terminal.close(how);
    // Only stderr in a file shows when the drain starts; a probing client
    // would be one more client in the log.
    if (redirect !== "") {
      await waitForMatch(`${dir}/stderr.log`, /terminal closed: stopping/);
    }
    await conn.write(encoder.encode("flight"));
    await conn.closeWrite();
    reply = new TextDecoder().decode(await readAll(conn));
  } finally {
    conn.close();
  }
  // The server, and npx and deno task above it, all exit: no orphan.
  await waitForExit(processes);
  await assert.rejects(
    Deno.connect({ hostname: "127.0.0.1", port: +port }),
    Deno.errors.ConnectionRefused,
  );
  const log = await Deno.readTextFile(`${cwd}/log/access.log`);
  return { reply, processes, log };
}

for (
  const [deno, args, how, redirect] of [
    ["npx -y deno@2.9.6", "task start", "kill-pane", ""],
    [Deno.execPath(), RUN, "kill-window", ""],
    [Deno.execPath(), "task start", "kill-session", "2> ../stderr.log"],
  ] as const
) {
  const name = `${deno.startsWith("npx") ? deno : "deno"} ${
    args === RUN ? "run main.ts" : args
  }${redirect === "" ? "" : " 2> FILE"}`;
  Deno.test({
    name:
      `${name} in a terminal closed (tmux ${how}) drains its client, logs every line and exits`,
    ignore,
    fn: withTempDir(async (dir) => {
      const { reply, log } = await closeWhileServing(
        dir,
        deno,
        args,
        how,
        redirect,
      );
      assert.equal(reply, "in flight");
      assert.equal(
        log,
        "[client 2]: received 1 bytes\n[client 1]: received 9 bytes\n",
      );
      if (redirect !== "") {
        // stdin and stdout were the terminal: its hangup is seen on them.
        const stderr = await Deno.readTextFile(`${dir}/stderr.log`);
        assert.match(
          stderr,
          /\nSIGHUP, terminal closed: stopping; 1 connection gets up to 10 s to finish\nstopped after 2 clients\n$/,
          stderr,
        );
      }
    }),
  });
}

Deno.test({
  name:
    "deno task start in a terminal on kill -HUP to the server reopens the log and keeps serving",
  ignore,
  fn: withTempDir(async (dir) => {
    const cwd = await startTaskIn(dir);
    await using terminal = await Terminal.open(dir, cwd);
    await terminal.type(
      `${Deno.execPath()} task start --port 0 --log ./log/access.log; ` +
        `echo $? > ${dir}/status`,
    );
    const [, port] = await terminal.waitFor(
      /listening on 127\.0\.0\.1:(\d+)/,
    );
    const { pid } = serverProcess(await terminal.processes());
    assert.equal(await echoText(+port, "rotated"), "rotated");
    await Deno.rename(`${cwd}/log/access.log`, `${cwd}/log/access.log.1`);
    // logrotate's postrotate, as deploy/logrotate.conf sends it.
    const kill = await new Deno.Command("kill", {
      args: ["-HUP", String(pid)],
      stdin: "null",
    }).output();
    assert.equal(kill.code, 0);
    await terminal.waitFor(/reopened access log \.\/log\/access\.log/);
    assert.equal(await echoText(+port, "new"), "new");
    await terminal.ctrlC();
    await terminal.waitFor(/stopped after 2 clients/);
    assert.equal(await waitForFile(`${dir}/status`), "0");
    assert.equal(
      await Deno.readTextFile(`${cwd}/log/access.log.1`),
      "[client 1]: received 7 bytes\n",
    );
    assert.equal(
      await Deno.readTextFile(`${cwd}/log/access.log`),
      "[client 2]: received 3 bytes\n",
    );
    const screen = await terminal.screen();
    assert.doesNotMatch(screen, /SIGHUP, terminal closed/, screen);
  }),
});

/** The echo of `text` from the server on `port`. */
async function echoText(port: number, text: string): Promise<string> {
  return new TextDecoder().decode(await echo(port, encoder.encode(text)));
}

Deno.test({
  name:
    "deno run main.ts started with & and disown outlives its closed terminal, says so, and then a SIGHUP reopens the log and keeps serving",
  ignore,
  fn: withTempDir(async (dir) => {
    const cwd = await startTaskIn(dir);
    await using terminal = await Terminal.open(dir, cwd);
    // stdin stays the terminal; the shell sends a disowned job no SIGHUP.
    const stderrPath = `${dir}/stderr.log`;
    await terminal.type(
      `${Deno.execPath()} ${RUN} --port 0 --log ./log/access.log ` +
        `> ${stderrPath} 2>&1 & disown`,
    );
    const [, port] = await waitForMatch(
      stderrPath,
      /listening on 127\.0\.0\.1:(\d+)/,
    );
    const { pid } = serverProcess(await terminal.processes());
    assert.equal(await echoText(+port, "rotated"), "rotated");
    await terminal.close("kill-session");
    await waitForMatch(
      stderrPath,
      /\nthe terminal closed and its hangup did not reach the server: serving on; SIGHUP reopens the access log\n/,
      30_000,
    );
    await Deno.rename(`${cwd}/log/access.log`, `${cwd}/log/access.log.1`);
    // logrotate's postrotate, hours later.
    const signal = async (name: string) => {
      const kill = await new Deno.Command("kill", {
        args: [`-${name}`, String(pid)],
        stdin: "null",
      }).output();
      assert.equal(kill.code, 0);
    };
    await signal("HUP");
    await waitForMatch(
      stderrPath,
      /\nreopened access log \.\/log\/access\.log\n/,
    );
    assert.equal(await echoText(+port, "new"), "new");
    await signal("TERM");
    const stderr = await waitForMatch(stderrPath, /stopped after 2 clients\n/);
    assert.doesNotMatch(stderr.input!, /terminal closed: stopping/);
    assert.equal(
      await Deno.readTextFile(`${cwd}/log/access.log.1`),
      "[client 1]: received 7 bytes\n",
    );
    assert.equal(
      await Deno.readTextFile(`${cwd}/log/access.log`),
      "[client 2]: received 3 bytes\n",
    );
  }),
});
