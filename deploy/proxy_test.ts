/**
 * Tests of deploy/haproxy.cfg and deploy/nginx-stream.conf with the real
 * proxies on loopback, in front of three echo-server processes (main.ts)
 * that share one access log (`--instance I/3`).
 *
 * The proxies run the files in deploy/ themselves, with only what must
 * differ on a test machine rewritten: the public port (4000 -> a free
 * one), each instance's echo and metrics port (400I/940I -> the ports the
 * instances got), HAProxy's stats socket path (-> the temporary
 * directory), and HAProxy's `chroot`/`user`/`group` lines dropped (they
 * need root). Every rewrite must match exactly once, so a deploy file that
 * changes shape fails here instead of drifting from what was tested. nginx
 * gets the main context a real nginx.conf would give it (pid, error log,
 * events, the stream module) around the file. The PROXY protocol tests
 * uncomment the files' `send-proxy-v2` and `proxy_protocol on` lines in
 * front of instances run with `--proxy-protocol`, and check the parser on
 * the headers these proxies sent (deploy/testdata/proxy_headers.json).
 *
 * A test needing a proxy that is not installed is reported as ignored, with
 * the package to install in its name; `.ci/run` installs both.
 */

import assert from "node:assert/strict";
import net from "node:net";
import { fileURLToPath as fromFileUrl } from "node:url";
import { concat } from "../_bytes.ts";
import { parseProxyHeader, type ProxyAddress } from "../proxy_protocol.ts";
import {
  echo,
  findExecutable,
  Lines,
  needing,
  pattern,
  readAll,
  ServerProcess,
  within,
  withTempDir,
  writeAll,
} from "../test_util.ts";

const HAPROXY_CFG = fromFileUrl(new URL("haproxy.cfg", import.meta.url));
const NGINX_CONF = fromFileUrl(new URL("nginx-stream.conf", import.meta.url));
const INSTANCES = 3;
const LOG_LINE = /^\[client (\d+)\]: received (\d+) bytes$/;
const MIB = 1024 * 1024;
// Every process a test starts is killed after this, whatever happens.
const PROCESS_TIMEOUT_MS = 180_000;
// How long a process gets to exit on SIGTERM before SIGKILL.
const STOP_GRACE_MS = 5_000;
// Bound for waiting on a proxy or a health state; polled, never slept on.
const READY_TIMEOUT_MS = 30_000;
const POLL_MS = 20;

const HAPROXY = findExecutable("haproxy");
const NGINX = findExecutable("nginx");
// Debian builds nginx's stream module as a loadable module
// (libnginx-mod-stream); other builds may have it compiled in.
const NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so";
const NGINX_HAS_STREAM = NGINX !== undefined && (exists(NGINX_STREAM_MODULE) ||
  /--with-stream(?!=dynamic)\b/.test(
    new TextDecoder().decode(
      (await new Deno.Command(NGINX, {
        args: ["-V"],
        stdin: "null",
        signal: AbortSignal.timeout(10_000),
      }).output()).stderr,
    ),
  ));

/** {@linkcode needing} HAProxy: the test named `name` is ignored without it. */
function needingHaproxy(name: string): ReturnType<typeof needing> {
  return needing(
    name,
    HAPROXY !== undefined,
    "haproxy not installed: apt-get install haproxy",
  );
}

/** {@linkcode needing} nginx with its stream module. */
function needingNginx(name: string): ReturnType<typeof needing> {
  return needing(
    name,
    NGINX_HAS_STREAM,
    "nginx with its stream module not installed: apt-get install nginx libnginx-mod-stream",
  );
}

function exists(path: string): boolean {
  try {
    Deno.statSync(path);
    return true;
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return false;
    throw error;
  }
}

// --- processes ---------------------------------------------------------------

/** A child process stopped after PROCESS_TIMEOUT_MS, its stderr read by lines. */
class Child implements AsyncDisposable {
  readonly process: Deno.ChildProcess;
  readonly stderr: Lines;
  readonly status: Promise<Deno.CommandStatus>;
  #exited = false;

  constructor(readonly name: string, command: string, args: string[]) {
    this.process = new Deno.Command(command, {
      args,
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).spawn();
    this.stderr = new Lines(this.process.stderr);
    const timer = setTimeout(() => {
      this.stderr.lines.push(`(stopped after ${PROCESS_TIMEOUT_MS} ms)`);
      // The test sees the exit through `status`.
      this.stop().catch(() => {});
    }, PROCESS_TIMEOUT_MS);
    this.status = this.process.status.finally(() => {
      this.#exited = true;
      clearTimeout(timer);
    });
  }

  get exited(): boolean {
    return this.#exited;
  }

  kill(signal: Deno.Signal): void {
    if (this.#exited) return;
    try {
      this.process.kill(signal);
    } catch (error) {
      // It exited, and `status` has not settled yet.
      if (!(error instanceof TypeError)) throw error;
    }
  }

  /** Waits for exit and the end of stderr; returns the exit code. */
  async exit(): Promise<number> {
    const { code } = await this.status;
    await this.stderr.done;
    return code;
  }

  /** The stderr read so far, for failure messages. */
  describe(): string {
    return `--- ${this.name} stderr:\n${this.stderr.lines.join("\n")}`;
  }

  /**
   * SIGTERM, then SIGKILL if it has not exited within STOP_GRACE_MS; returns
   * the exit code. nginx's master stops its workers on SIGTERM; killed
   * outright, it would leave them running and listening.
   */
  async stop(): Promise<number> {
    this.kill("SIGTERM");
    const timer = setTimeout(() => this.kill("SIGKILL"), STOP_GRACE_MS);
    try {
      return await this.exit();
    } finally {
      clearTimeout(timer);
    }
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.stop();
  }
}

/** One echo-server process, instance `index` of INSTANCES. */
interface Instance {
  index: number;
  server: ServerProcess;
  port: number;
  metricsPort: number;
}

async function startInstance(
  dir: string,
  index: number,
  args: string[],
): Promise<Instance> {
  const server = new ServerProcess(dir, [
    "--metrics",
    "127.0.0.1:0",
    "--instance",
    `${index}/${INSTANCES}`,
    "--drain-timeout",
    "120",
    ...args,
  ], { timeoutMs: PROCESS_TIMEOUT_MS });
  try {
    const port = await server.port();
    return { index, server, port, metricsPort: await server.metricsPort() };
  } catch (error) {
    await server[Symbol.asyncDispose]();
    throw error;
  }
}

/** An instance's stderr so far, for failure messages. */
function describeInstance({ index, server }: Instance): string {
  return `--- instance ${index} stderr:\n${server.stderr.lines.join("\n")}`;
}

/** Three instances sharing `${dir}/access.log`; stops them all on dispose. */
class Cluster implements AsyncDisposable {
  constructor(readonly dir: string, readonly instances: Instance[]) {}

  /** Starts the instances, each with `args` besides the cluster's own. */
  static async start(dir: string, args: string[] = []): Promise<Cluster> {
    const instances: Instance[] = [];
    try {
      for (let i = 1; i <= INSTANCES; i++) {
        instances.push(await startInstance(dir, i, args));
      }
    } catch (error) {
      await Promise.all(
        instances.map(({ server }) => server[Symbol.asyncDispose]()),
      );
      throw error;
    }
    return new Cluster(dir, instances);
  }

  get logPath(): string {
    return `${this.dir}/access.log`;
  }

  /**
   * SIGTERMs every instance still running and returns how many clients
   * each accepted (its "stopped after N clients" line), by index.
   */
  async stop(): Promise<Map<number, number>> {
    const accepted = new Map<number, number>();
    const codes = await Promise.all(
      this.instances.map(({ server }) => server.stop()),
    );
    for (const [i, instance] of this.instances.entries()) {
      assert.equal(codes[i], 0, describeInstance(instance));
      const [, count] = await instance.server.stderr.next(
        /^stopped after (\d+) clients?$/,
      ).catch(() => assert.fail(describeInstance(instance)));
      accepted.set(instance.index, Number(count));
    }
    return accepted;
  }

  /** {@linkcode Cluster.stop}, then the access log's [client id, bytes]. */
  async stopAndReadLog(): Promise<{
    accepted: Map<number, number>;
    records: Array<[number, number]>;
  }> {
    const accepted = await this.stop();
    return { accepted, records: await readLogs([this.logPath]) };
  }

  describe(): string {
    return this.instances.map(describeInstance).join("\n");
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await Promise.all(
      this.instances.map(({ server }) => server[Symbol.asyncDispose]()),
    );
  }
}

/**
 * A port that was free a moment ago (proxies cannot bind port 0). It stands:
 * the proxy binds it itself, so there is nothing to hand over; a port taken
 * meanwhile fails the proxy's start loudly, never passes a test.
 */
function freePort(): number {
  using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  return listener.addr.port;
}

/** `error` with the stderr of `processes` after it, for a failure message. */
function withStderr(
  error: unknown,
  ...processes: Array<{ describe(): string } | undefined>
): Error {
  return new Error(
    [`${error}`, ...processes.map((process) => process?.describe() ?? "")]
      .join("\n"),
    { cause: error },
  );
}

/** Calls `probe` until it returns a value, at most READY_TIMEOUT_MS. */
async function poll<T>(
  what: string,
  probe: () => Promise<T | undefined> | T | undefined,
): Promise<T> {
  const deadline = performance.now() + READY_TIMEOUT_MS;
  for (;;) {
    const value = await probe();
    if (value !== undefined) return value;
    if (performance.now() > deadline) {
      throw new Error(`gave up after ${READY_TIMEOUT_MS} ms waiting: ${what}`);
    }
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

// --- config rewriting ----------------------------------------------------------

/** Replaces the one match of `pattern`; fails unless there is exactly one. */
function replaceOnce(
  text: string,
  pattern: RegExp,
  replacement: string,
): string {
  const global = new RegExp(pattern.source, pattern.flags + "g");
  const matches = text.match(global)?.length ?? 0;
  assert.equal(matches, 1, `${pattern} matches ${matches} times, not once`);
  return text.replace(pattern, replacement);
}

/** What {@linkcode haproxyConfig} changes in deploy/haproxy.cfg besides ports. */
interface HaproxyVariant {
  /**
   * Uncomments the file's `default-server send-proxy-v2` (the PROXY
   * protocol), as it is or as version 1's `send-proxy`.
   */
  sendProxy?: "send-proxy" | "send-proxy-v2";
  /**
   * The health checks: on the metrics port as the file has them; the same
   * with `check-send-proxy` added, which its comment forbids; or
   * `option tcp-check` on the echo port, with `check-send-proxy` (HAProxy
   * resets the connection after the header) or with
   * `tcp-check connect send-proxy linger` (it closes it with a FIN).
   *
   * @default {"metrics"}
   */
  checks?: "metrics" | "metrics-send-proxy" | "echo-send-proxy" | "echo-linger";
}

/** deploy/haproxy.cfg with the test's ports and paths (see module doc). */
function haproxyConfig(
  text: string,
  port: number,
  instances: Instance[],
  statsSocket: string,
  variant: HaproxyVariant = {},
): string {
  const { sendProxy, checks = "metrics" } = variant;
  text = replaceOnce(text, /^(\s*bind) :4000$/m, `$1 127.0.0.1:${port}`);
  text = replaceOnce(
    text,
    /^(\s*stats socket) \/run\/haproxy\/admin\.sock /m,
    `$1 ${statsSocket} `,
  );
  for (
    const line of ["chroot /var/lib/haproxy", "user haproxy", "group haproxy"]
  ) {
    text = replaceOnce(text, new RegExp(`^\\s*${line}\\n`, "m"), "");
  }
  assert.equal(text.match(/^\s*server /gm)?.length, instances.length);
  for (const { index, port, metricsPort } of instances) {
    const check = {
      "metrics": `check port ${metricsPort}`,
      "metrics-send-proxy": `check port ${metricsPort} check-send-proxy`,
      "echo-send-proxy": "check check-send-proxy",
      "echo-linger": "check",
    }[checks];
    text = replaceOnce(
      text,
      new RegExp(
        `^(\\s*server echo${index}) 127\\.0\\.0\\.1:400${index} check port 940${index}$`,
        "m",
      ),
      `$1 127.0.0.1:${port} ${check}`,
    );
  }
  if (sendProxy !== undefined) {
    text = replaceOnce(
      text,
      /^(\s*)# default-server send-proxy-v2$/m,
      `$1default-server ${sendProxy}`,
    );
  }
  if (checks === "echo-send-proxy" || checks === "echo-linger") {
    text = replaceOnce(
      text,
      /^(\s*)option httpchk$/m,
      checks === "echo-linger"
        ? "$1option tcp-check\n$1tcp-check connect send-proxy linger"
        : "$1option tcp-check",
    );
    text = replaceOnce(text, /^\s*http-check send .*\n/m, "");
    text = replaceOnce(text, /^\s*http-check expect .*\n/m, "");
  }
  return text;
}

/** What {@linkcode nginxConfig} changes in deploy/nginx-stream.conf besides ports. */
interface NginxVariant {
  /** Keeps the file's `proxy_half_close on;` line. */
  halfClose: boolean;
  /** Uncomments the file's `proxy_protocol on;`. */
  proxyProtocol?: boolean;
}

/**
 * A whole nginx.conf: the main context a real one gives (pid, error log,
 * events, the stream module), then deploy/nginx-stream.conf with the test's
 * ports, optionally without its `proxy_half_close on;` line or with its
 * `proxy_protocol on;` line uncommented.
 */
function nginxConfig(
  text: string,
  dir: string,
  port: number,
  instances: Instance[],
  options: NginxVariant,
): string {
  text = replaceOnce(text, /^(\s*listen) 4000;$/m, `$1 127.0.0.1:${port};`);
  assert.equal(text.match(/^\s*server 127\./gm)?.length, instances.length);
  for (const { index, port } of instances) {
    text = replaceOnce(
      text,
      new RegExp(`^(\\s*server) 127\\.0\\.0\\.1:400${index} `, "m"),
      `$1 127.0.0.1:${port} `,
    );
  }
  if (!options.halfClose) {
    text = replaceOnce(text, /^\s*proxy_half_close on;\n/m, "");
  }
  if (options.proxyProtocol) {
    text = replaceOnce(
      text,
      /^(\s*)# proxy_protocol on;$/m,
      "$1proxy_protocol on;",
    );
  }
  const main = [
    exists(NGINX_STREAM_MODULE) ? `load_module ${NGINX_STREAM_MODULE};` : "",
    `pid ${dir}/nginx.pid;`,
    `error_log ${dir}/nginx-error.log info;`,
    "events { worker_connections 1024; }",
  ];
  return `${main.join("\n")}\n${text}`;
}

// --- HAProxy runtime API -------------------------------------------------------

/** The backend's servers from `show stat`, by name (echo1, ...). */
async function haproxyServers(socket: string): Promise<Servers> {
  const conn = await Deno.connect({ transport: "unix", path: socket });
  let text;
  try {
    await writeAll(conn, new TextEncoder().encode("show stat\n"));
    text = new TextDecoder().decode(await readAll(conn));
  } finally {
    conn.close();
  }
  const [header, ...rows] = text.trim().split("\n");
  const names = header.replace(/^# /, "").split(",");
  const servers: Servers = new Map();
  for (const row of rows) {
    const values = row.split(",");
    const record = Object.fromEntries(
      names.map((name, i) => [name, values[i]]),
    );
    if (record.pxname === "echo_servers" && /^echo\d$/.test(record.svname)) {
      servers.set(record.svname, record);
    }
  }
  return servers;
}

/** The backend's servers from `show stat`, by name. */
type Servers = Map<string, Record<string, string>>;

/** HAProxy run on a rewritten deploy/haproxy.cfg, with its stats socket. */
class Haproxy extends Child {
  constructor(
    name: string,
    cfg: string,
    readonly socket: string,
    args: string[],
  ) {
    super(name, HAPROXY!, ["-db", "-f", cfg, ...args]);
  }

  /** Polls `show stat` until `ready` holds for it (the socket may not exist yet). */
  poll(what: string, ready: (servers: Servers) => boolean): Promise<Servers> {
    return poll(what, async () => {
      if (this.exited) {
        throw new Error(`haproxy exited\n${this.describe()}`);
      }
      let servers;
      try {
        servers = await haproxyServers(this.socket);
      } catch (error) {
        if (
          error instanceof Deno.errors.NotFound ||
          error instanceof Deno.errors.ConnectionRefused
        ) return undefined;
        throw error;
      }
      return ready(servers) ? servers : undefined;
    });
  }

  /** {@linkcode Haproxy.poll} until all INSTANCES servers are there and `each` holds for every one. */
  pollEvery(
    what: string,
    each: (server: Record<string, string>) => boolean,
  ): Promise<Servers> {
    return this.poll(
      what,
      (servers) =>
        servers.size === INSTANCES && [...servers.values()].every(each),
    );
  }
}

/** What {@linkcode startHaproxy} runs besides the {@linkcode HaproxyVariant}. */
interface HaproxyOptions extends HaproxyVariant {
  /** The process's name in messages, and its config's file name. @default {"haproxy"} */
  name?: string;
  /** More arguments for haproxy. @default {[]} */
  args?: string[];
}

/**
 * Writes `dir`/`name`.cfg from deploy/haproxy.cfg (see {@linkcode haproxyConfig})
 * for `instances` behind `port`, with its stats socket at `dir`/haproxy.sock,
 * and starts HAProxy on it.
 */
async function startHaproxy(
  dir: string,
  port: number,
  instances: Instance[],
  options: HaproxyOptions = {},
): Promise<Haproxy> {
  const { name = "haproxy", args = [], ...variant } = options;
  const socket = `${dir}/haproxy.sock`;
  const cfg = `${dir}/${name}.cfg`;
  await Deno.writeTextFile(
    cfg,
    haproxyConfig(
      await Deno.readTextFile(HAPROXY_CFG),
      port,
      instances,
      socket,
      variant,
    ),
  );
  return new Haproxy(name, cfg, socket, args);
}

/** Every server UP with its /healthz check passed: HAProxy is ready. */
function upL7(server: Record<string, string>): boolean {
  return server.status === "UP" && server.check_status === "L7OK";
}

/**
 * One gauge or counter from an instance's /metrics, `name` with its labels
 * as the text format writes them (`echo_cutoffs_total{reason="idle"}`).
 */
async function metric(instance: Instance, name: string): Promise<number> {
  const response = await fetch(
    `http://127.0.0.1:${instance.metricsPort}/metrics`,
  );
  const text = await response.text();
  const escaped = name.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
  const match = new RegExp(`^${escaped} (\\S+)$`, "m").exec(text);
  assert.ok(match, `no ${name} in instance ${instance.index}'s /metrics`);
  return Number(match[1]);
}

/** {@linkcode metric} summed over `instances`. */
async function metricSum(instances: Instance[], name: string): Promise<number> {
  let sum = 0;
  for (const instance of instances) sum += await metric(instance, name);
  return sum;
}

// --- clients -------------------------------------------------------------------

function assertSameBytes(actual: Uint8Array, expected: Uint8Array): void {
  assert.equal(actual.length, expected.length, "reply length");
  for (let i = 0; i < actual.length; i++) {
    if (actual[i] !== expected[i]) {
      assert.fail(`reply of ${expected.length} B differs at byte ${i}`);
    }
  }
}

/**
 * Clients of the given sizes, `concurrency` at a time, through `port`:
 * each sends everything, half-closes, then reads; every reply must be
 * byte-exact. Waits for all before throwing the first failure.
 */
async function runClients(
  port: number,
  sizes: number[],
  concurrency: number,
): Promise<void> {
  let next = 0;
  const worker = async () => {
    while (next < sizes.length) {
      const size = sizes[next++];
      const payload = pattern(size, size);
      try {
        assertSameBytes(await echo(port, payload), payload);
      } catch (error) {
        throw new Error(`client of ${size} B: ${error}`, { cause: error });
      }
    }
  };
  const results = await Promise.allSettled(
    Array.from({ length: concurrency }, worker),
  );
  for (const result of results) {
    if (result.status === "rejected") throw result.reason;
  }
}

/**
 * `count` unique sizes from 0 B to 16 MiB: a few large ones (16 MiB, 1 MiB,
 * around 64 KiB) and many small ones. `offset` keeps batches apart.
 */
function sizes(count: number, offset: number): number[] {
  const large = [16 * MIB, MIB, 65536, 65535, 4096];
  const result = large.slice(0, Math.min(large.length, count))
    .map((size) => size + offset);
  for (let i = 0; result.length < count; i++) {
    result.push(offset + i * 97);
  }
  return result;
}

// --- the access log ------------------------------------------------------------

/** [client id, bytes] for every line of the log files, which must be whole. */
async function readLogs(paths: string[]): Promise<Array<[number, number]>> {
  const records: Array<[number, number]> = [];
  for (const path of paths) {
    const text = await Deno.readTextFile(path);
    assert.ok(text === "" || text.endsWith("\n"), `${path} ends mid-line`);
    for (const line of text.split("\n").slice(0, -1)) {
      const match = LOG_LINE.exec(line);
      assert.ok(match, `${path}: malformed line ${JSON.stringify(line)}`);
      records.push([Number(match[1]), Number(match[2])]);
    }
  }
  return records;
}

/**
 * Every client sent (sizes are unique) has exactly one line with its size,
 * and nothing else is in the log (no health check, no stray connection);
 * each instance I numbered its clients I, I+N, ... with no gap or repeat.
 */
function assertOneLinePerClient(
  records: Array<[number, number]>,
  sent: number[],
  accepted: Map<number, number>,
): void {
  const numeric = (a: number, b: number) => a - b;
  assert.equal(new Set(sent).size, sent.length, "test bug: sizes repeat");
  assert.deepEqual(
    records.map(([, bytes]) => bytes).sort(numeric),
    [...sent].sort(numeric),
    "one line per client, with its size, and no other line",
  );
  assertNumbering(records, accepted);
}

/** Each instance I numbered its clients I, I+N, ... with no gap or repeat. */
function assertNumbering(
  records: Array<[number, number]>,
  accepted: Map<number, number>,
): void {
  const numeric = (a: number, b: number) => a - b;
  for (const [index, count] of accepted) {
    const ids = records.map(([id]) => id)
      .filter((id) => (id - index) % INSTANCES === 0).sort(numeric);
    assert.deepEqual(
      ids,
      Array.from({ length: count }, (_, j) => index + j * INSTANCES),
      `instance ${index} numbered its ${count} clients ${index}, ${
        index + INSTANCES
      }, ...`,
    );
  }
}

// --- tests ---------------------------------------------------------------------

Deno.test({
  ...needingHaproxy(
    "deploy/haproxy.cfg serves through 3 instances, logs each client once, routes around a stopping one",
  ),
  fn: withTempDir(async (dir) => {
    await using cluster = await Cluster.start(dir);
    const [, second, third] = cluster.instances;
    const port = freePort();
    await using haproxy = await startHaproxy(dir, port, cluster.instances, {
      args: ["-p", `${dir}/haproxy.pid`],
    });
    const inFlight: Array<{ conn: Deno.TcpConn; payload: Uint8Array }> = [];
    try {
      // Ready: every instance has passed its /healthz check at least once.
      await haproxy.pollEvery("all instances UP and L7OK", upL7);

      const sent = sizes(64, 0);
      await runClients(port, sent, 32);

      // Clients in flight: connected and half sent, spread over the three
      // instances (leastconn), and accepted by instance 2.
      for (const size of sizes(6, 1000)) {
        const payload = pattern(size, size);
        const conn = await Deno.connect({ hostname: "127.0.0.1", port });
        inFlight.push({ conn, payload });
        await writeAll(conn, payload.subarray(0, payload.length >> 1));
        sent.push(size);
      }
      const servers = await haproxy.poll(
        "6 clients in flight at the instances",
        (servers) =>
          [...servers.values()].reduce((n, s) => n + Number(s.scur), 0) === 6,
      );
      const onSecond = Number(servers.get("echo2")!.scur);
      assert.ok(onSecond >= 1, "leastconn gave instance 2 a client in flight");
      await poll(
        "instance 2 accepted its clients in flight",
        async () =>
          await metric(second, "echo_connections_active") === onSecond
            ? true
            : undefined,
      );

      second.server.child.kill("SIGTERM");
      await second.server.waitFor(
        new RegExp(`^SIGTERM: stopping; ${onSecond} connections`),
      );
      // Right after SIGTERM, before HAProxy's checks notice: instance 2
      // refuses, HAProxy passes those clients to the others.
      const afterStop = sizes(24, 2000);
      await runClients(port, afterStop, 12);
      await haproxy.poll(
        "instance 2 DOWN",
        (servers) => servers.get("echo2")!.status.startsWith("DOWN"),
      );
      const afterDown = sizes(12, 3000);
      await runClients(port, afterDown, 12);
      sent.push(...afterStop, ...afterDown);

      // The clients in flight on instance 2 finish in full.
      for (const { conn, payload } of inFlight) {
        await writeAll(conn, payload.subarray(payload.length >> 1));
        await conn.closeWrite();
        assertSameBytes(await readAll(conn), payload);
      }
      assert.equal(
        (await second.server.exit()).code,
        0,
        describeInstance(second),
      );
      assert.equal(third.server.exited, false);

      const { accepted, records } = await cluster.stopAndReadLog();
      assertOneLinePerClient(records, sent, accepted);
      // Every client that came after the SIGTERM was served by 1 or 3.
      const after = new Set([...afterStop, ...afterDown]);
      for (const [id, bytes] of records) {
        if (after.has(bytes)) assert.notEqual(id % INSTANCES, 2);
      }
    } catch (error) {
      throw withStderr(error, haproxy, cluster);
    } finally {
      for (const { conn } of inFlight) conn.close();
    }
  }, { prefix: "echo-server-haproxy-" }),
});

/**
 * Writes `dir`/nginx.conf from deploy/nginx-stream.conf (see
 * {@linkcode nginxConfig}), runs nginx on it in `dir`, and waits until it
 * listens (its pid file).
 */
async function startNginx(
  dir: string,
  port: number,
  instances: Instance[],
  options: NginxVariant,
): Promise<Child> {
  await Deno.mkdir(dir);
  const conf = `${dir}/nginx.conf`;
  await Deno.writeTextFile(
    conf,
    nginxConfig(
      await Deno.readTextFile(NGINX_CONF),
      dir,
      port,
      instances,
      options,
    ),
  );
  const nginx = new Child("nginx", NGINX!, [
    "-p",
    `${dir}/`,
    "-c",
    conf,
    "-e",
    `${dir}/nginx-error.log`,
    "-g",
    "daemon off;",
  ]);
  try {
    // nginx writes its pid file after it has opened its listening sockets.
    await poll("nginx's pid file", () => {
      if (nginx.exited) throw new Error(`nginx exited\n${nginx.describe()}`);
      return exists(`${dir}/nginx.pid`) ? true : undefined;
    });
  } catch (error) {
    await nginx[Symbol.asyncDispose]();
    throw error;
  }
  return nginx;
}

Deno.test({
  ...needingNginx(
    "deploy/nginx-stream.conf serves through 3 instances, logs each client once, needs proxy_half_close",
  ),
  fn: withTempDir(async (dir) => {
    await using cluster = await Cluster.start(dir);
    const sent: number[] = [];
    let nginx: Child | undefined;
    try {
      const port = freePort();
      nginx = await startNginx(`${dir}/on`, port, cluster.instances, {
        halfClose: true,
      });
      const first = sizes(64, 0);
      await runClients(port, first, 32);
      sent.push(...first);

      // Rotation with three writers: rename, then SIGHUP every instance.
      await Deno.rename(cluster.logPath, `${cluster.logPath}.1`);
      for (const { server } of cluster.instances) {
        server.child.kill("SIGHUP");
        await server.waitFor(/^reopened access log /);
      }
      const second = sizes(16, 5000);
      await runClients(port, second, 16);
      sent.push(...second);
      assert.equal(await nginx.stop(), 0, nginx.describe());

      // The same file without `proxy_half_close on;`: nginx ends the session
      // at the client's FIN, and the reply never reaches the client.
      const withoutPort = freePort();
      nginx = await startNginx(
        `${dir}/off`,
        withoutPort,
        cluster.instances,
        { halfClose: false },
      );
      for (const size of [5, 1000, 100_000]) {
        const payload = pattern(size + 7, size + 7);
        let reply: Uint8Array | "reset";
        try {
          reply = await echo(withoutPort, payload);
        } catch (error) {
          if (!(error instanceof Deno.errors.ConnectionReset)) throw error;
          reply = "reset";
        }
        assert.ok(
          reply === "reset" || reply.length === 0,
          `without proxy_half_close a ${payload.length} B client got ${
            reply === "reset" ? "reset" : `${reply.length} B back`
          }, expected nothing`,
        );
        sent.push(payload.length);
      }
      assert.equal(await nginx.stop(), 0, nginx.describe());
      nginx = undefined;

      const accepted = await cluster.stop();
      const rotated = await readLogs([`${cluster.logPath}.1`]);
      assert.ok(rotated.length > 0, "the lines before the rotation");
      const records = await readLogs([`${cluster.logPath}.1`, cluster.logPath]);
      assertOneLinePerClient(records, sent, accepted);
    } catch (error) {
      throw withStderr(error, nginx, cluster);
    } finally {
      await nginx?.[Symbol.asyncDispose]();
    }
  }, { prefix: "echo-server-nginx-" }),
});

// --- the PROXY protocol --------------------------------------------------------

/** The instances' flag as deploy/'s comments give it: the proxies' address. */
const PROXY_PROTOCOL = ["--proxy-protocol", "127.0.0.1"];
const CAPTURED = fromFileUrl(
  new URL("testdata/proxy_headers.json", import.meta.url),
);
/** What a direct client sends: no header, so the instances cut it off. */
const DIRECT = new TextEncoder().encode("hello\n");

/** One entry of deploy/testdata/proxy_headers.json (fields the tests read). */
interface Captured {
  name: string;
  /** The header alone, in hex. */
  hex: string;
  /** What followed it on the connection. */
  followed_by: string;
  expect: {
    version: 1 | 2;
    command: "proxy" | "local";
    /** `host:port`, `[v6]:port`, or null for LOCAL. */
    source: string | null;
    destination: string | null;
    tlvs?: Array<{ type: number; hex: string }>;
  };
}

async function readCaptured(): Promise<Captured[]> {
  const { headers }: { headers: Captured[] } = JSON.parse(
    await Deno.readTextFile(CAPTURED),
  );
  return headers;
}

function fromHex(hex: string): Uint8Array {
  return Uint8Array.from(hex.match(/../g) ?? [], (byte) => parseInt(byte, 16));
}

/** A header from deploy/testdata/proxy_headers.json, by its name. */
async function capturedHeader(name: string): Promise<Uint8Array> {
  const header = (await readCaptured()).find((header) => header.name === name);
  assert.ok(header, `no header named ${name} in ${CAPTURED}`);
  return fromHex(header.hex);
}

/** An address as the fixtures write it: `host:port`, `[v6]:port`. */
function hostPort(address: ProxyAddress | undefined): string | null {
  if (address === undefined) return null;
  const { hostname, port } = address;
  return hostname.includes(":")
    ? `[${hostname}]:${port}`
    : `${hostname}:${port}`;
}

Deno.test("parseProxyHeader() reads every header captured from HAProxy and nginx as deploy/testdata/proxy_headers.json expects, and only once it is whole", async () => {
  const captured = await readCaptured();
  assert.ok(captured.length >= 14);
  for (const { name, hex, followed_by, expect } of captured) {
    const header = fromHex(hex);
    const bytes = concat([header, new TextEncoder().encode(followed_by)]);
    const result = parseProxyHeader(bytes);
    assert.ok(
      result.status === "complete",
      `${name}: ${JSON.stringify(result)}`,
    );
    assert.deepEqual(
      {
        version: result.header.version,
        length: result.header.length,
        command: result.header.source === undefined ? "local" : "proxy",
        source: hostPort(result.header.source),
        destination: hostPort(result.header.destination),
      },
      {
        version: expect.version,
        length: header.length,
        command: expect.command,
        source: expect.source,
        destination: expect.destination,
      },
      name,
    );
    for (let cut = 0; cut < header.length; cut++) {
      assert.deepEqual(
        parseProxyHeader(header.subarray(0, cut)),
        { status: "incomplete" },
        `${name} cut at ${cut} bytes`,
      );
    }
    // A CRC32C TLV that no longer matches the header makes it malformed.
    // (LOCAL is left out: section 2.2 has the receiver discard its block.)
    const crc = expect.tlvs?.find((tlv) => tlv.type === 3);
    if (crc !== undefined && expect.command === "proxy") {
      const at = hex.lastIndexOf(crc.hex);
      assert.ok(at % 2 === 0, `${name}: its CRC32C at byte ${at / 2}`);
      const corrupted = header.slice();
      corrupted[at / 2] ^= 1;
      const result = parseProxyHeader(corrupted);
      assert.ok(
        result.status === "invalid" && result.reason === "malformed",
        `${name} with its CRC32C changed: ${JSON.stringify(result)}`,
      );
    }
  }
});

/** What a client got back, and the port it connected from. */
interface Reply {
  bytes: Uint8Array;
  localPort: number;
}

/**
 * Connects to 127.0.0.1:`port` from `localAddress` (node:net: Deno.connect
 * cannot choose it), sends `payload`, half-closes and reads to the close.
 * Rejects on an error (a reset included) or after READY_TIMEOUT_MS.
 */
async function echoFrom(
  port: number,
  payload: Uint8Array,
  localAddress: string,
): Promise<Reply> {
  const socket = net.connect({ host: "127.0.0.1", port, localAddress });
  const closed = new Promise((resolve) => socket.once("close", resolve));
  const chunks: Uint8Array[] = [];
  let localPort = 0;
  const reply = new Promise<Reply>((resolve, reject) => {
    socket.once("connect", () => {
      localPort = socket.localPort ?? 0;
      socket.end(payload);
    });
    socket.on("data", (chunk: Uint8Array) => chunks.push(chunk));
    socket.once("error", reject);
    socket.once("close", () => resolve({ bytes: concat(chunks), localPort }));
  });
  try {
    return await within(
      reply,
      READY_TIMEOUT_MS,
      `the reply to ${payload.length} B from ${localAddress}`,
    );
  } finally {
    socket.destroy();
    await closed;
  }
}

/**
 * {@linkcode echoFrom} for a client the server refuses: the bytes it got
 * back, or "reset" if its connection was reset (or its write broke on it).
 */
async function refusedReply(
  port: number,
  payload: Uint8Array,
  localAddress: string,
): Promise<Uint8Array | "reset"> {
  try {
    return (await echoFrom(port, payload, localAddress)).bytes;
  } catch (error) {
    if (
      error instanceof Error && "code" in error &&
      (error.code === "ECONNRESET" || error.code === "EPIPE")
    ) return "reset";
    throw error;
  }
}

/** A client from `localAddress` that sends nothing until disposed. */
class SilentClient implements AsyncDisposable {
  readonly closed: Promise<void>;

  private constructor(readonly socket: net.Socket) {
    this.closed = new Promise((resolve) => socket.once("close", resolve));
    // Its eviction resets it: `closed` tells the end, whatever ended it.
    socket.on("error", () => {});
    socket.resume();
  }

  static async connect(
    port: number,
    localAddress: string,
  ): Promise<SilentClient> {
    const client = new SilentClient(
      net.connect({ host: "127.0.0.1", port, localAddress }),
    );
    try {
      await within(
        new Promise<void>((resolve, reject) => {
          client.socket.once("connect", resolve);
          client.closed.then(() => reject(new Error("closed before connect")));
        }),
        READY_TIMEOUT_MS,
        `a silent client from ${localAddress} connecting`,
      );
    } catch (error) {
      await client[Symbol.asyncDispose]();
      throw error;
    }
    return client;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    this.socket.destroy();
    await this.closed;
  }
}

/** The first line any of `instances` wrote to stderr matching `pattern`. */
function stderrLine(instances: Instance[], pattern: RegExp): Promise<string> {
  // Polled, not read with `stderr.next()`: a pending next() on the other
  // instances would move their cursors past lines later waits need.
  return poll(
    `a stderr line matching ${pattern}`,
    () =>
      instances.flatMap(({ server }) => server.stderr.lines)
        .find((line) => pattern.test(line)),
  );
}

/** The instances' flags for {@linkcode checkProxied}. */
const PROXIED_FLAGS = [...PROXY_PROTOCOL, "--max-connections", "2"];

/**
 * Checks a cluster run with `--proxy-protocol 127.0.0.1 --max-connections 2`
 * behind a proxy on `port` that sends PROXY headers of `version`: exact
 * echoes from 127.0.0.2 of 0 B, 5 B and 5 MiB; those clients counted as
 * 127.0.0.2 (two silent clients of it at each instance, then a newcomer
 * from 127.0.0.3 evicts one, and stderr names its source); direct clients
 * (no header) cut off. Returns the byte counts the log must hold, in any
 * order, besides the direct clients'; they are checked here.
 */
async function checkProxied(
  cluster: Cluster,
  port: number,
  version: 1 | 2,
): Promise<number[]> {
  const { instances } = cluster;
  const logged: number[] = [];
  for (const size of [0, 5, 5 * MIB]) {
    const payload = pattern(size, size + 1);
    assertSameBytes(
      (await echoFrom(port, payload, "127.0.0.2")).bytes,
      payload,
    );
    logged.push(size);
  }

  // Two silent clients of 127.0.0.2 at each instance, the limit. One at a
  // time, so that the proxy's least-connections balancing sees each.
  const silent: SilentClient[] = [];
  try {
    for (let held = 1; held <= 2 * INSTANCES; held++) {
      silent.push(await SilentClient.connect(port, "127.0.0.2"));
      await poll(
        `${held} silent clients held by the instances`,
        async () =>
          await metricSum(instances, "echo_connections_active") === held
            ? true
            : undefined,
      );
      logged.push(0);
    }
    for (const instance of instances) {
      assert.equal(
        await metric(instance, "echo_connections_active"),
        2,
        `instance ${instance.index} holds 2 of the silent clients`,
      );
    }
    const newcomer = pattern(7, 7);
    assertSameBytes(
      (await echoFrom(port, newcomer, "127.0.0.3")).bytes,
      newcomer,
    );
    logged.push(newcomer.length);
    const eviction = await stderrLine(instances, /evicted for a newcomer/);
    assert.match(
      eviction,
      /^client \d+: cut off after 0 bytes: evicted for a newcomer from 127\.0\.0\.3 at the limit of 2 connections: its source 127\.0\.0\.2 holds 2 of them/,
    );
  } finally {
    for (const client of silent) await client[Symbol.asyncDispose]();
  }
  await poll(
    "every silent client's end seen by the instances",
    async () =>
      await metricSum(instances, "echo_connections_active") === 0
        ? true
        : undefined,
  );
  // HAProxy sometimes resets its connection to the instance for the 0 B
  // client (it half-closes as it connects) before the instance's accept()
  // completes: an accept error, logged with 0 bytes, its header never read
  // (seen in 2 of 3 runs of this file, each time client 1 of an instance,
  // the first through HAProxy). Every other client's header is counted.
  const resetBeforeAccept = await metricSum(
    instances,
    'echo_accept_errors_total{kind="client"}',
  );
  assert.ok(resetBeforeAccept <= 1, `${resetBeforeAccept} accept errors`);
  assert.equal(
    await metricSum(
      instances,
      `echo_proxy_headers_total{version="${version}",command="proxy"}`,
    ) + resetBeforeAccept,
    logged.length,
    `a version ${version} header counted for each client through the proxy`,
  );

  // Direct clients, no header: from a trusted address (the proxies'), and
  // from another.
  const [first] = instances;
  for (
    const [from, reason] of [
      ["127.0.0.1", "proxy_missing"],
      ["127.0.0.2", "proxy_untrusted"],
    ]
  ) {
    const reply = await refusedReply(first.port, DIRECT, from);
    assert.ok(
      reply === "reset" || reply.length === 0,
      `a direct client from ${from} got ${
        reply === "reset" ? "reset" : `${reply.length} B back`
      }, expected nothing`,
    );
    await poll(
      `instance 1 counts a ${reason} cutoff`,
      async () =>
        await metric(first, `echo_cutoffs_total{reason="${reason}"}`) === 1
          ? true
          : undefined,
    );
  }
  await stderrLine(
    [first],
    /^client \d+ \(connection from 127\.0\.0\.1\): cut off after 6 bytes: no PROXY header: the connection begins "hello\\n"$/,
  );
  await stderrLine(
    [first],
    /^client \d+ \(connection from 127\.0\.0\.2\): cut off after 0 bytes: a PROXY header is accepted only from --proxy-protocol's addresses$/,
  );
  return logged;
}

/**
 * The log after {@linkcode checkProxied}: one line per client with the
 * client's own bytes (`logged`, the header never counted), one with 0
 * bytes for each direct client (none of what it sent was a client's), and
 * nothing else.
 */
async function assertProxiedLog(
  cluster: Cluster,
  logged: number[],
): Promise<void> {
  const { accepted, records } = await cluster.stopAndReadLog();
  const numeric = (a: number, b: number) => a - b;
  assert.deepEqual(
    records.map(([, bytes]) => bytes).sort(numeric),
    [...logged, 0, 0].sort(numeric),
  );
  assertNumbering(records, accepted);
}

for (const sendProxy of ["send-proxy", "send-proxy-v2"] as const) {
  Deno.test({
    ...needingHaproxy(
      `deploy/haproxy.cfg with ${sendProxy} in front of instances run with --proxy-protocol echoes exactly, logs the client's bytes, counts the client's address, and the instances cut off direct clients`,
    ),
    fn: withTempDir(async (dir) => {
      await using cluster = await Cluster.start(dir, PROXIED_FLAGS);
      const port = freePort();
      await using haproxy = await startHaproxy(dir, port, cluster.instances, {
        sendProxy,
      });
      try {
        // The /healthz checks pass: `check port` sends them no header.
        await haproxy.pollEvery("all instances UP and L7OK", upL7);
        const version = sendProxy === "send-proxy" ? 1 : 2;
        const logged = await checkProxied(cluster, port, version);
        await assertProxiedLog(cluster, logged);
      } catch (error) {
        throw withStderr(error, haproxy, cluster);
      }
    }, { prefix: "echo-server-haproxy-pp-" }),
  });
}

Deno.test({
  ...needingNginx(
    "deploy/nginx-stream.conf with proxy_protocol on in front of instances run with --proxy-protocol echoes exactly, logs the client's bytes, counts the client's address, and the instances cut off direct clients",
  ),
  fn: withTempDir(async (dir) => {
    await using cluster = await Cluster.start(dir, PROXIED_FLAGS);
    const port = freePort();
    await using nginx = await startNginx(
      `${dir}/nginx`,
      port,
      cluster.instances,
      { halfClose: true, proxyProtocol: true },
    );
    try {
      const logged = await checkProxied(cluster, port, 1);
      await assertProxiedLog(cluster, logged);
    } catch (error) {
      throw withStderr(error, nginx, cluster);
    }
  }, { prefix: "echo-server-nginx-pp-" }),
});

/** HAProxy's checks on the echo port, as {@linkcode HaproxyVariant} words them. */
const ECHO_PORT_CHECKS = [
  { checks: "echo-linger", sendProxy: undefined, version: 1, command: "proxy" },
  {
    checks: "echo-linger",
    sendProxy: "send-proxy-v2",
    version: 2,
    command: "local",
  },
  {
    checks: "echo-send-proxy",
    sendProxy: "send-proxy-v2",
    version: 2,
    command: "local",
  },
] as const;

for (const { checks, sendProxy, version, command } of ECHO_PORT_CHECKS) {
  // With check-send-proxy HAProxy resets each check right after its
  // header, most often before the instance's accept() completes: Deno then
  // cannot read the peer's address, and the instance counts an accept
  // error (and logs the client with 0 bytes) instead of reading the header.
  const reset = checks === "echo-send-proxy";
  const how = reset
    ? "check-send-proxy"
    : "tcp-check connect send-proxy linger";
  const counted =
    `echo_proxy_headers_total{version="${version}",command="${command}"}`;
  Deno.test({
    ...needingHaproxy(
      `deploy/haproxy.cfg's checks on the echo port with ${how}${
        sendProxy === undefined ? "" : ` and ${sendProxy}`
      }, to instances run with --proxy-protocol, are logged with 0 bytes each and counted as version ${version} ${command}${
        reset ? " or, reset before accept() completed, as accept errors" : ""
      }`,
    ),
    fn: withTempDir(async (dir) => {
      await using cluster = await Cluster.start(dir, PROXY_PROTOCOL);
      const { instances } = cluster;
      const port = freePort();
      try {
        {
          await using haproxy = await startHaproxy(dir, port, instances, {
            sendProxy,
            checks,
          });
          await haproxy.pollEvery(
            "all instances UP and L4OK",
            (s) => s.status === "UP" && s.check_status === "L4OK",
          );
          await poll("2 checks at each instance", async () => {
            for (const instance of instances) {
              const accepted = await metric(
                instance,
                "echo_connections_accepted_total",
              );
              if (accepted < 2) return undefined;
            }
            return true;
          });
        }
        // HAProxy has stopped; the checks in flight end.
        await poll(
          "every check's end seen by the instances",
          async () =>
            await metricSum(instances, "echo_connections_active") === 0
              ? true
              : undefined,
        );
        for (const instance of instances) {
          const name = `instance ${instance.index}`;
          const accepted = await metric(
            instance,
            "echo_connections_accepted_total",
          );
          const headers = await metric(instance, counted);
          const acceptErrors = await metric(
            instance,
            'echo_accept_errors_total{kind="client"}',
          );
          if (reset) {
            assert.equal(headers + acceptErrors, accepted, name);
          } else {
            assert.deepEqual([headers, acceptErrors], [accepted, 0], name);
            assert.deepEqual(
              instance.server.stderr.lines.filter((line) =>
                line.startsWith("client ")
              ),
              [],
              `${name}: no check cut off`,
            );
          }
          for (
            const reason of ["untrusted", "missing", "malformed", "timeout"]
          ) {
            assert.equal(
              await metric(
                instance,
                `echo_cutoffs_total{reason="proxy_${reason}"}`,
              ),
              0,
              `${name}: proxy_${reason}`,
            );
          }
        }
        const { accepted, records } = await cluster.stopAndReadLog();
        assert.equal(
          records.length,
          [...accepted.values()].reduce((sum, n) => sum + n, 0),
        );
        assert.ok(records.every(([, bytes]) => bytes === 0), "0 B each");
        assertNumbering(records, accepted);
      } catch (error) {
        throw withStderr(error, cluster);
      }
    }, { prefix: "echo-server-haproxy-checks-" }),
  });
}

Deno.test({
  ...needingHaproxy(
    "deploy/haproxy.cfg's send-proxy-v2 without the instances' --proxy-protocol gets the header echoed to the client; with check-send-proxy on the metrics port every instance is DOWN",
  ),
  fn: withTempDir(async (dir) => {
    await using cluster = await Cluster.start(dir);
    const port = freePort();
    let haproxy: Haproxy | undefined;
    try {
      haproxy = await startHaproxy(dir, port, cluster.instances, {
        sendProxy: "send-proxy-v2",
      });
      await haproxy.pollEvery("all instances UP and L7OK", upL7);
      const hello = new TextEncoder().encode("hello");
      const { bytes, localPort } = await echoFrom(port, hello, "127.0.0.2");
      // What deploy/testdata/proxy_headers.json has, up to the addresses
      // (127.0.0.2 -> 127.0.0.1), then this client's and HAProxy's ports.
      const header = concat([
        (await capturedHeader("haproxy send-proxy-v2")).subarray(0, 24),
        new Uint8Array([
          localPort >> 8,
          localPort & 255,
          port >> 8,
          port & 255,
        ]),
      ]);
      assertSameBytes(bytes, concat([header, hello]));
      await haproxy.stop();

      haproxy = await startHaproxy(dir, port, cluster.instances, {
        name: "haproxy-check-send-proxy",
        sendProxy: "send-proxy-v2",
        checks: "metrics-send-proxy",
      });
      await haproxy.pollEvery(
        "all instances DOWN, /healthz answering 400",
        (s) => s.status.startsWith("DOWN") && s.check_code === "400",
      );
      await haproxy.stop();
      haproxy = undefined;

      const { accepted, records } = await cluster.stopAndReadLog();
      assert.deepEqual(
        records.map(([, bytes]) => bytes),
        [header.length + hello.length],
        "the client's line counts the header as its bytes",
      );
      assertNumbering(records, accepted);
    } catch (error) {
      throw withStderr(error, haproxy, cluster);
    } finally {
      await haproxy?.[Symbol.asyncDispose]();
    }
  }, { prefix: "echo-server-haproxy-nopp-" }),
});

Deno.test({
  ...needingNginx(
    "deploy/nginx-stream.conf's proxy_protocol on without the instances' --proxy-protocol gets the header echoed to the client",
  ),
  fn: withTempDir(async (dir) => {
    await using cluster = await Cluster.start(dir);
    const port = freePort();
    await using nginx = await startNginx(
      `${dir}/nginx`,
      port,
      cluster.instances,
      { halfClose: true, proxyProtocol: true },
    );
    try {
      const hello = new TextEncoder().encode("hello");
      const { bytes, localPort } = await echoFrom(port, hello, "127.0.0.2");
      // The line deploy/testdata/proxy_headers.json has, with this client's
      // and nginx's ports.
      const captured = new TextDecoder().decode(
        await capturedHeader("nginx proxy_protocol on"),
      );
      const header = captured.replace(
        /^(PROXY TCP4 127\.0\.0\.2 127\.0\.0\.1) \d+ \d+\r\n$/,
        `$1 ${localPort} ${port}\r\n`,
      );
      assert.notEqual(header, captured, "the captured line's shape");
      assert.equal(new TextDecoder().decode(bytes), `${header}hello`);
      assert.equal(await nginx.stop(), 0, nginx.describe());
      const { accepted, records } = await cluster.stopAndReadLog();
      assert.deepEqual(records.map(([, bytes]) => bytes), [bytes.length]);
      assertNumbering(records, accepted);
    } catch (error) {
      throw withStderr(error, nginx, cluster);
    }
  }, { prefix: "echo-server-nginx-nopp-" }),
});
