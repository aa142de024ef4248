/**
 * Tests of the deployment files: the systemd unit and the logrotate config
 * agree with the server and the compile task, and Debian's real logrotate,
 * run with deploy/logrotate.conf against a live server while clients keep
 * coming, loses, splits and duplicates no access log line.
 *
 * `.ci/run` also checks the unit with `systemd-analyze verify`.
 */

import assert from "node:assert/strict";
import { fileURLToPath as fromFileUrl } from "node:url";
import { type Config, DEFAULTS, parseFlags } from "../options.ts";
import denoJson from "../deno.json" with { type: "json" };
import {
  connectMany,
  echo,
  findExecutable,
  killAfter,
  needing,
  readAll,
  ServerProcess,
  withTempDir,
} from "../test_util.ts";

const UNIT_PATH = fromFileUrl(new URL("echo-server.service", import.meta.url));
const TEMPLATE_PATH = fromFileUrl(
  new URL("echo-server@.service", import.meta.url),
);
const HAPROXY_CFG = fromFileUrl(new URL("haproxy.cfg", import.meta.url));
const NGINX_CONF = fromFileUrl(new URL("nginx-stream.conf", import.meta.url));
const LOGROTATE_PATH = fromFileUrl(new URL("logrotate.conf", import.meta.url));
const LOG_LINE = /^\[client (\d+)\]: received (\d+) bytes$/;

// --- systemd unit ----------------------------------------------------------

/** `[Section]` -> key -> values, in order (a key may repeat). */
type Unit = Map<string, Map<string, string[]>>;

function parseUnit(text: string): Unit {
  const unit: Unit = new Map();
  let section: Map<string, string[]> | undefined;
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (line === "" || line.startsWith("#") || line.startsWith(";")) continue;
    const header = /^\[(.+)\]$/.exec(line);
    if (header) {
      section = new Map();
      unit.set(header[1], section);
      continue;
    }
    assert.ok(section, `key outside a section: ${line}`);
    assert.ok(!line.endsWith("\\"), `no line continuations, please: ${line}`);
    const eq = line.indexOf("=");
    assert.ok(eq > 0, `not a key=value line: ${line}`);
    const key = line.slice(0, eq).trim();
    section.set(key, [...(section.get(key) ?? []), line.slice(eq + 1).trim()]);
  }
  return unit;
}

/** The one value of `key` in `[section]`; fails if missing or repeated. */
function only(unit: Unit, section: string, key: string): string {
  const values = unit.get(section)?.get(key) ?? [];
  assert.equal(values.length, 1, `[${section}] ${key}= set ${values.length}x`);
  return values[0];
}

/** A systemd time span like `20s`, `1min 30s` or `90` (seconds), in ms. */
function parseTimeSpan(text: string): number {
  const units: Record<string, number> = {
    "": 1000,
    ms: 1,
    s: 1000,
    sec: 1000,
    m: 60_000,
    min: 60_000,
  };
  let total = 0;
  for (const part of text.trim().split(/\s+/)) {
    const match = /^(\d+(?:\.\d+)?)([a-z]*)$/.exec(part);
    assert.ok(match && match[2] in units, `unsupported time span: ${text}`);
    total += Number(match[1]) * units[match[2]];
  }
  return total;
}

const unit = parseUnit(await Deno.readTextFile(UNIT_PATH));
// Descriptors the server needs besides one per client: stdio, the
// listener, the access log, the metrics listener and its at most 17
// connections, and Deno's own (26 at start under `deno run`). The test "LimitNOFILE of
// --max-connections + FD_HEADROOM ..." below shows it is enough.
// Plus up to 64 newcomers waiting at --max-connections (admission.ts).
const FD_HEADROOM = 128;
const execStart = only(unit, "Service", "ExecStart").split(/\s+/);

Deno.test("deploy/echo-server.service runs the installed binary with flags main.ts accepts", () => {
  assert.equal(execStart[0], "/usr/local/bin/echo-server");
  const config = parseFlags(execStart.slice(1));
  assert.ok(typeof config === "object");
  // The binary may only write under the compile task's --allow-write dir,
  // which must be the unit's LogsDirectory.
  const logsDirectory = only(unit, "Service", "LogsDirectory");
  assert.equal(logsDirectory, "echo-server");
  assert.equal(config.logPath, DEFAULTS.logPath);
  assert.equal(
    config.logPath.slice(0, config.logPath.lastIndexOf("/")),
    `/var/log/${logsDirectory}`,
  );
  assert.ok(
    denoJson.tasks.compile.split(/\s+/).includes(
      `--allow-write=/var/log/${logsDirectory}`,
    ),
    "the compile task grants --allow-write for the LogsDirectory",
  );
});

Deno.test("deploy/echo-server.service drains on stop, reloads with SIGHUP, restarts on failure", () => {
  assert.equal(only(unit, "Service", "ExecReload"), "/bin/kill -HUP $MAINPID");
  assert.equal(only(unit, "Service", "KillSignal"), "SIGTERM");
  assert.equal(only(unit, "Service", "Restart"), "on-failure");
  const config = parseFlags(execStart.slice(1));
  assert.ok(typeof config === "object");
  assert.equal(config.drainTimeoutMs, DEFAULTS.drainTimeoutMs);
  assertStopsInTime(unit, config);
  const limitNoFile = Number(only(unit, "Service", "LimitNOFILE"));
  assert.ok(
    limitNoFile >= config.maxConnections + FD_HEADROOM,
    `LimitNOFILE (${limitNoFile}) must cover --max-connections (${config.maxConnections}) + ${FD_HEADROOM}`,
  );
  assert.equal(only(unit, "Install", "WantedBy"), "multi-user.target");
});

Deno.test("deploy/echo-server.service runs as a dynamic user with hardening, but lets V8 JIT", () => {
  const expected: Record<string, string> = {
    DynamicUser: "yes",
    NoNewPrivileges: "yes",
    ProtectSystem: "strict",
    ProtectHome: "yes",
    PrivateTmp: "yes",
    PrivateDevices: "yes",
    RestrictAddressFamilies: "AF_INET AF_INET6",
    CapabilityBoundingSet: "",
    AmbientCapabilities: "",
    ProtectKernelTunables: "yes",
    ProtectKernelModules: "yes",
    ProtectControlGroups: "yes",
    SystemCallArchitectures: "native",
    LockPersonality: "yes",
    RestrictNamespaces: "yes",
    RestrictRealtime: "yes",
    RestrictSUIDSGID: "yes",
  };
  for (const [key, value] of Object.entries(expected)) {
    assert.equal(only(unit, "Service", key), value, `${key}=`);
  }
  // V8's JIT needs writable+executable memory: this would kill the server.
  assert.ok(!unit.get("Service")!.has("MemoryDenyWriteExecute"));
  // And no key sneaks in outside [Unit], [Service], [Install].
  assert.deepEqual([...unit.keys()], ["Unit", "Service", "Install"]);
});

/**
 * systemd waits TimeoutStopSec for the --shutdown-delay, then the drain,
 * with 5 s to spare for writing the last lines and exiting.
 */
function assertStopsInTime(unit: Unit, config: Config): void {
  const timeoutStop = parseTimeSpan(only(unit, "Service", "TimeoutStopSec"));
  assert.ok(
    timeoutStop >= config.shutdownDelayMs + config.drainTimeoutMs + 5000,
    `TimeoutStopSec (${timeoutStop} ms) must leave the ${config.shutdownDelayMs} ms shutdown delay and the ${config.drainTimeoutMs} ms drain time to finish`,
  );
}

// --- systemd template unit, HAProxy and nginx --------------------------------

const template = parseUnit(await Deno.readTextFile(TEMPLATE_PATH));
// What systemd makes of the template's ExecStart for instance %i=name.
function instanceFlags(name: string): string[] {
  const [variable, instances] = only(template, "Service", "Environment")
    .split("=");
  const words = only(template, "Service", "ExecStart")
    .replaceAll("%i", name).replaceAll(`\${${variable}}`, instances)
    .split(/\s+/);
  assert.equal(words[0], "/usr/local/bin/echo-server");
  return words.slice(1);
}
const instanceCount = Number(
  only(template, "Service", "Environment").split("=")[1],
);

Deno.test("deploy/echo-server@.service differs from echo-server.service only in ports, --instance and user", () => {
  const differs = ["Description", "ExecStart", "Environment", "User"];
  for (const [section, keys] of unit) {
    for (const [key, values] of keys) {
      if (differs.includes(key)) continue;
      assert.deepEqual(
        template.get(section)?.get(key),
        values,
        `[${section}] ${key}= as in echo-server.service`,
      );
    }
  }
  for (const [section, keys] of template) {
    for (const key of keys.keys()) {
      assert.ok(
        differs.includes(key) || unit.get(section)?.has(key),
        `[${section}] ${key}= only in the template`,
      );
    }
  }
  // One dynamic user for every instance: they share LogsDirectory.
  assert.equal(only(template, "Service", "User"), "echo-server");
  assert.equal(only(template, "Service", "DynamicUser"), "yes");
});

Deno.test("deploy/echo-server@I.service serves 400I, /healthz on 940I, as instance I/N, into the single unit's log", () => {
  assert.ok(instanceCount >= 2, "ECHO_SERVER_INSTANCES is a number above 1");
  const single = parseFlags(execStart.slice(1));
  assert.ok(typeof single === "object");
  for (let i = 1; i <= instanceCount; i++) {
    const config = parseFlags(instanceFlags(`${i}`));
    assert.ok(typeof config === "object");
    assert.equal(config.hostname, "127.0.0.1");
    assert.equal(config.port, 4000 + i);
    assert.deepEqual(config.metrics, { hostname: "127.0.0.1", port: 9400 + i });
    assert.equal(config.instance, i);
    assert.equal(config.instances, instanceCount);
    assert.equal(config.logPath, single.logPath);
  }
});

/** [instance, port, metrics port] per `server` line of haproxy.cfg. */
function haproxyServers(text: string): number[][] {
  return [
    ...text.matchAll(
      /^\s*server echo(\d) 127\.0\.0\.1:(\d+) check port (\d+)$/gm,
    ),
  ].map((match) => match.slice(1).map(Number));
}

Deno.test("deploy/haproxy.cfg balances over the template's instances, checking each on its metrics port", async () => {
  const text = await Deno.readTextFile(HAPROXY_CFG);
  assert.equal(text.match(/^\s*server /gm)?.length, instanceCount);
  assert.deepEqual(
    haproxyServers(text),
    Array.from({ length: instanceCount }, (_, j) => [
      j + 1,
      4000 + j + 1,
      9400 + j + 1,
    ]),
  );
  // The public port is the single unit's: clients need not change.
  const single = parseFlags(execStart.slice(1));
  assert.ok(typeof single === "object");
  assert.match(text, new RegExp(`^\\s*bind :${single.port}$`, "m"));
  for (
    const line of [
      "mode tcp",
      "option httpchk",
      "http-check send meth GET uri /healthz ver HTTP/1.1 hdr Host localhost",
      "http-check expect status 200",
      "timeout client-fin 40s",
      "timeout server-fin 40s",
      "option redispatch 1",
    ]
  ) {
    assert.match(text, new RegExp(`^\\s*${line}$`, "m"), line);
  }
});

/**
 * The longest HAProxy can take to mark an instance down once its /healthz
 * answers 503, in ms: the next check comes within `inter`, and `fall`
 * failed checks in a row (after the first, `fastinter` apart if set) take
 * it out. Reads the `default-server` line of haproxy.cfg.
 */
function haproxyTimeToDown(text: string): number {
  const line = /^\s*default-server (.+)$/m.exec(text);
  assert.ok(line, "a default-server line");
  const words = line[1].split(/\s+/);
  const value = (name: string) => {
    const i = words.indexOf(name);
    return i < 0 ? undefined : words[i + 1];
  };
  const inter = value("inter");
  const fall = value("fall");
  assert.ok(inter !== undefined && fall !== undefined, line[0]);
  const fastinter = value("fastinter") ?? inter;
  return parseTimeSpan(inter) + (Number(fall) - 1) * parseTimeSpan(fastinter);
}

Deno.test("deploy/echo-server.service and echo-server@.service: --shutdown-delay outlasts deploy/haproxy.cfg's health checks, TimeoutStopSec the delay and the drain", async () => {
  const timeToDown = haproxyTimeToDown(await Deno.readTextFile(HAPROXY_CFG));
  assert.equal(
    haproxyTimeToDown("  default-server inter 2s fall 3 fastinter 500ms\n"),
    3000,
  );
  const configs: Array<[string, Unit, string[]]> = [
    ["echo-server.service", unit, execStart.slice(1)],
    ...Array.from(
      { length: instanceCount },
      (_, j): [string, Unit, string[]] => [
        `echo-server@${j + 1}.service`,
        template,
        instanceFlags(`${j + 1}`),
      ],
    ),
  ];
  for (const [name, unitFile, flags] of configs) {
    const config = parseFlags(flags);
    assert.ok(typeof config === "object");
    // Until HAProxy marks it down it still sends clients; they are served
    // as long as the listener is open.
    assert.ok(
      config.shutdownDelayMs > timeToDown,
      `${name}: --shutdown-delay (${config.shutdownDelayMs} ms) must exceed HAProxy's time to mark it down (${timeToDown} ms)`,
    );
    assertStopsInTime(unitFile, config);
  }
});

Deno.test("deploy/nginx-stream.conf balances over the template's instances with proxy_half_close on", async () => {
  const text = await Deno.readTextFile(NGINX_CONF);
  const servers = [...text.matchAll(/^\s*server 127\.0\.0\.1:(\d+) /gm)]
    .map((match) => Number(match[1]));
  assert.deepEqual(
    servers,
    Array.from({ length: instanceCount }, (_, j) => 4000 + j + 1),
  );
  assert.match(text, /^\s*listen 4000;$/m);
  assert.match(text, /^\s*proxy_half_close on;$/m);
});

// --- logrotate config ------------------------------------------------------

const logrotateConf = await Deno.readTextFile(LOGROTATE_PATH);

/** The directives of the config's one block, without the postrotate script. */
function parseLogrotate(text: string) {
  const block = /^(\S+) \{\n([\s\S]*?)^\}$/m.exec(text);
  assert.ok(block, "one `PATH {` ... `}` block");
  const script = /^\s*postrotate\n([\s\S]*?)^\s*endscript$/m.exec(block[2]);
  assert.ok(script, "a postrotate ... endscript script");
  const directives = block[2].replace(script[0], "").split("\n")
    .map((line) => line.trim()).filter((line) => line && !line.startsWith("#"));
  return { path: block[1], directives, postrotate: script[1].trim() };
}

Deno.test("deploy/logrotate.conf rotates the access log by rename, then SIGHUPs every running server", () => {
  const { path, directives, postrotate } = parseLogrotate(logrotateConf);
  assert.equal(path, DEFAULTS.logPath);
  for (
    const directive of [
      "daily",
      "rotate 14",
      "missingok",
      "notifempty",
      "compress",
      "delaycompress",
      "nocopytruncate",
      "nocreate",
    ]
  ) {
    assert.ok(directives.includes(directive), `missing: ${directive}`);
  }
  assert.ok(!directives.includes("copytruncate"), "copytruncate loses lines");
  assert.ok(!directives.some((d) => /^create\b/.test(d)), "the server creates");
  // Every running server sharing the log reloads, and the reload is SIGHUP.
  const glob = /^systemctl try-reload-or-restart '([^']+)'$/.exec(postrotate);
  assert.ok(glob, postrotate);
  const pattern = new RegExp(
    `^${glob[1].replaceAll(".", "\\.").replaceAll("*", ".*")}$`,
  );
  for (const name of ["echo-server.service", "echo-server@2.service"]) {
    assert.match(name, pattern);
  }
  assert.equal(only(unit, "Service", "ExecReload"), "/bin/kill -HUP $MAINPID");
  assert.equal(
    only(template, "Service", "ExecReload"),
    "/bin/kill -HUP $MAINPID",
  );
});

// --- logrotate against a live server ---------------------------------------

const LOGROTATE = findExecutable("logrotate");

/**
 * deploy/logrotate.conf for a test: the log path and the postrotate script
 * replaced (`kill -HUP PID` instead of systemctl), every option kept, so
 * compress and delaycompress are exercised too.
 */
function testConfig(logPath: string, pid: number): string {
  const { path, postrotate } = parseLogrotate(logrotateConf);
  const text = logrotateConf.replace(`${path} {`, `${logPath} {`)
    .replace(postrotate, `kill -HUP ${pid}`);
  assert.ok(text.includes(`${logPath} {`) && text.includes(`kill -HUP ${pid}`));
  return text;
}

/** Counts clients done; lets a test await progress; records a failure. */
class Progress {
  done = 0;
  #failed: { error: unknown } | undefined;
  #changed = Progress.#signal();

  static #signal(): PromiseWithResolvers<void> {
    const signal = Promise.withResolvers<void>();
    signal.promise.catch(() => {}); // rejected only while someone awaits
    return signal;
  }

  clientDone(): void {
    this.done++;
    this.#changed.resolve();
    this.#changed = Progress.#signal();
  }

  fail(error: unknown): void {
    this.#failed ??= { error };
    this.#changed.reject(error);
    this.#changed = Progress.#signal();
  }

  /** Throws the first client's failure, if one failed. */
  check(): void {
    if (this.#failed) throw this.#failed.error;
  }

  /** Resolves once `done` reaches `count`; rejects if a client failed. */
  async until(count: number): Promise<void> {
    while (this.done < count) {
      this.check();
      await this.#changed.promise;
    }
  }
}

async function readLog(path: string): Promise<string> {
  const bytes = await Deno.readFile(path);
  if (!path.endsWith(".gz")) return new TextDecoder().decode(bytes);
  const stream = new Blob([bytes]).stream()
    .pipeThrough(new DecompressionStream("gzip"));
  return await new Response(stream).text();
}

/**
 * Stops `server` with SIGTERM and asserts that it exits 0 having written
 * nothing to stderr but lines matching `expected`.
 */
async function stopCleanly(
  server: ServerProcess,
  expected: RegExp,
): Promise<void> {
  const code = await server.stop();
  const { lines } = server.stderr;
  assert.equal(code, 0, lines.join("\n"));
  for (const line of lines) assert.match(line, expected);
}

const ROTATIONS = 3;
const WORKERS = 4;
const CLIENTS_BETWEEN_ROTATIONS = 25;

Deno.test({
  ...needing(
    "deploy/logrotate.conf on a live server under load loses, splits and duplicates no line",
    LOGROTATE !== undefined,
    "logrotate not installed: apt-get install logrotate",
  ),
  fn: withTempDir(async (dir) => {
    const logPath = `${dir}/access.log`;
    await using server = new ServerProcess(dir, [], { timeoutMs: 120_000 });
    let stop = false;
    const workers: Promise<void>[] = [];
    try {
      const port = await server.port();

      const conf = `${dir}/logrotate.conf`;
      await Deno.writeTextFile(conf, testConfig(logPath, server.child.pid));
      await Deno.chmod(conf, 0o644); // logrotate refuses a writable config

      // Clients keep coming, WORKERS at a time, until told to stop. Each
      // sends a different number of bytes, some none at all.
      const sent: number[] = [];
      const progress = new Progress();
      for (let w = 0; w < WORKERS; w++) {
        workers.push(
          (async () => {
            for (let i = 0; !stop; i++) {
              const size = (w * 7919 + i * 104_729) % 3001;
              sent.push(size);
              const payload = new Uint8Array(size).fill(65 + w);
              assert.deepEqual(
                await echo(port, payload),
                payload,
                "echoed back unchanged",
              );
              progress.clientDone();
            }
          })().catch((error) => progress.fail(error)),
        );
      }

      for (let rotation = 1; rotation <= ROTATIONS; rotation++) {
        await progress.until(progress.done + CLIENTS_BETWEEN_ROTATIONS);
        // notifempty: logrotate skips an empty log and then sends no SIGHUP.
        // A client's line is written just after it sees EOF, so wait for
        // more clients (not for time) until the line is in the file.
        while ((await Deno.stat(logPath)).size === 0) {
          await progress.until(progress.done + 1);
        }
        const logrotate = new Deno.Command(LOGROTATE!, {
          args: ["-f", "-s", `${dir}/logrotate.state`, conf],
          stdin: "null",
          stdout: "piped",
          stderr: "piped",
        }).spawn();
        using _logrotateTimeout = killAfter(logrotate, 60_000);
        const result = await logrotate.output();
        const output = new TextDecoder().decode(result.stderr) +
          new TextDecoder().decode(result.stdout);
        assert.ok(result.success, `logrotate failed:\n${output}`);
        // The sync point: the server has switched to the new access.log.
        await server.waitFor(/^reopened access log /);
      }
      await progress.until(progress.done + CLIENTS_BETWEEN_ROTATIONS);

      stop = true;
      await Promise.all(workers);
      progress.check();
      // Nothing but the expected lifecycle lines: no "still writing to the
      // old file", no client that could not be logged.
      await stopCleanly(
        server,
        /^(listening on |reopened access log |SIGTERM: stopping; |stopped after \d+ clients?$)/,
      );
      assert.ok(
        server.stderr.lines.includes(`stopped after ${sent.length} clients`),
      );

      // rename + delaycompress: the newest rotated file stays plain.
      const files = [];
      for await (const entry of Deno.readDir(dir)) {
        if (entry.name.startsWith("access.log")) files.push(entry.name);
      }
      assert.deepEqual(files.sort(), [
        "access.log",
        "access.log.1",
        "access.log.2.gz",
        "access.log.3.gz",
      ]);

      const ids: number[] = [];
      const received: number[] = [];
      for (const name of files) {
        const text = await readLog(`${dir}/${name}`);
        assert.ok(text === "" || text.endsWith("\n"), `${name} ends mid-line`);
        const lines = text.split("\n").slice(0, -1);
        if (name !== "access.log") {
          assert.ok(lines.length > 0, `${name} has lines`);
        }
        for (const line of lines) {
          const match = LOG_LINE.exec(line);
          assert.ok(match, `${name}: malformed line ${JSON.stringify(line)}`);
          ids.push(Number(match[1]));
          received.push(Number(match[2]));
        }
      }
      assert.equal(ids.length, sent.length, "one line per client");
      assert.equal(new Set(ids).size, ids.length, "no duplicate client ids");
      assert.deepEqual(
        ids.sort((a, b) => a - b),
        Array.from({ length: sent.length }, (_, i) => i + 1),
        "client ids 1..N, none missing",
      );
      const sorted = (numbers: number[]) => numbers.sort((a, b) => a - b);
      assert.deepEqual(sorted(received), sorted(sent), "bytes per client");
    } finally {
      stop = true;
      await Promise.allSettled(workers);
    }
  }, { prefix: "echo-server-logrotate-" }),
});

Deno.test(
  "echo-server under LimitNOFILE of --max-connections + FD_HEADROOM serves every client at once",
  withTempDir(async (dir) => {
    const clients = 100;
    const limit = clients + FD_HEADROOM;
    // Both limits, as LimitNOFILE=N sets them (deno run would raise a lower
    // soft limit to the hard one; a compiled binary may not).
    await using server = new ServerProcess(
      dir,
      ["--max-connections", `${clients}`, "--metrics", "127.0.0.1:0"],
      { maxOpenFiles: limit },
    );
    const port = await server.port();
    const metricsPort = await server.metricsPort();
    const conns = await connectMany(port, clients);
    try {
      await Promise.all(conns.map((conn) => conn.write(new Uint8Array([1]))));
      // Every client accepted and held at once, and a scrape served then.
      while (
        !(await scrape(metricsPort)).includes(
          `\necho_connections_active ${clients}\n`,
        )
      ) {
        await new Promise((resolve) => setTimeout(resolve, 10));
      }
      for (const conn of conns) await conn.closeWrite();
      for (const conn of conns) {
        assert.deepEqual([...await readAll(conn)], [1]);
      }
    } finally {
      for (const conn of conns) conn.close();
    }
    await stopCleanly(
      server,
      /^(listening on |metrics on |SIGTERM: stopping; |stopped after \d+ clients?$)/,
    );
    const log = await Deno.readTextFile(`${dir}/access.log`);
    assert.equal(log.split("\n").length - 1, clients);
  }),
);

/** GET /metrics from 127.0.0.1:`port`; the whole response as text. */
async function scrape(port: number): Promise<string> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  try {
    await conn.write(
      new TextEncoder().encode(
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
      ),
    );
    return new TextDecoder().decode(await readAll(conn));
  } finally {
    conn.close();
  }
}
