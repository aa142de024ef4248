import assert from "node:assert/strict";
import { readRssKiB } from "./bench/_proc.ts";
import { AccessLog } from "./access_log.ts";
import {
  EXPOSITION_CONTENT_TYPE,
  renderMetrics,
  serveMetrics,
} from "./metrics.ts";
import { EchoCounters } from "./echo_stats.ts";
import {
  DURATION_BUCKETS_SECONDS,
  type EchoServer,
  serveEcho,
  type ServeOptions,
} from "./server.ts";
import {
  echo,
  findExecutable,
  readAll,
  runCommand,
  sendAndReset,
  ServerProcess,
  startServer,
  within,
  withTempDir,
  writeAll,
} from "./test_util.ts";

const HOST = "127.0.0.1";
const encoder = new TextEncoder();
const decoder = new TextDecoder();

interface HttpResponse {
  status: number;
  headers: Map<string, string>;
  body: string;
}

/** Sends `request` as is over a fresh connection, reads to EOF, parses. */
async function rawHttp(port: number, request: string): Promise<HttpResponse> {
  const conn = await Deno.connect({ hostname: HOST, port });
  try {
    await writeAll(conn, encoder.encode(request));
    const text = decoder.decode(await readAll(conn));
    const end = text.indexOf("\r\n\r\n");
    assert.ok(end > 0, `not an HTTP response: ${JSON.stringify(text)}`);
    const [statusLine, ...lines] = text.slice(0, end).split("\r\n");
    const headers = new Map<string, string>();
    for (const line of lines) {
      const colon = line.indexOf(":");
      headers.set(
        line.slice(0, colon).toLowerCase(),
        line.slice(colon + 1).trim(),
      );
    }
    return {
      status: Number(statusLine.split(" ")[1]),
      headers,
      body: text.slice(end + 4),
    };
  } finally {
    conn.close();
  }
}

/** `GET path` with `Connection: close`. */
function get(port: number, path: string, method = "GET") {
  return rawHttp(
    port,
    `${method} ${path} HTTP/1.1\r\nHost: ${HOST}\r\nConnection: close\r\n\r\n`,
  );
}

/** The samples of an exposition: `name{labels}` -> value. */
function samples(exposition: string): Map<string, number> {
  const map = new Map<string, number>();
  for (const line of exposition.split("\n")) {
    if (line === "" || line.startsWith("#")) continue;
    const space = line.lastIndexOf(" ");
    map.set(line.slice(0, space), Number(line.slice(space + 1)));
  }
  return map;
}

function sample(map: Map<string, number>, key: string): number {
  const value = map.get(key);
  assert.ok(value !== undefined, `no sample ${key}`);
  return value;
}

Deno.test("serveMetrics() answers /healthz 200 ok, then 503 once draining", async () => {
  await using s = startServer();
  await using metrics = serveMetrics(s.server, { port: 0 });
  const ok = await get(metrics.addr.port, "/healthz");
  assert.equal(ok.status, 200);
  assert.equal(ok.body, "ok\n");
  metrics.setDraining();
  const draining = await get(metrics.addr.port, "/healthz");
  assert.equal(draining.status, 503);
  assert.equal(draining.body, "draining\n");
  const exposition = await get(metrics.addr.port, "/metrics");
  assert.equal(sample(samples(exposition.body), "echo_draining"), 1);
});

Deno.test("serveMetrics() answers 404 elsewhere and 405 to other methods", async () => {
  await using s = startServer();
  await using metrics = serveMetrics(s.server, { port: 0 });
  const port = metrics.addr.port;
  assert.equal((await get(port, "/")).status, 404);
  assert.equal((await get(port, "/metrics/x")).status, 404);
  assert.equal((await get(port, "/healthz", "HEAD")).status, 200);
  const post = await get(port, "/metrics", "POST");
  assert.equal(post.status, 405);
  assert.equal(post.headers.get("allow"), "GET, HEAD");
  const metricsResponse = await get(port, "/metrics?x=1");
  assert.equal(metricsResponse.status, 200);
  assert.equal(
    metricsResponse.headers.get("content-type"),
    EXPOSITION_CONTENT_TYPE,
  );
  // Requests to the metrics port are never echo clients.
  await s.server.shutdown();
  assert.equal(s.server.clientsAccepted, 0);
  assert.deepEqual(s.records, []);
});

Deno.test("renderMetrics() counts good clients, resets and an over-limit client exactly", async () => {
  const GOOD = 5;
  const RESETS = 3;
  await using s = startServer({ maxClientBytes: 1000 });
  for (let i = 1; i <= GOOD; i++) {
    assert.equal((await echo(s.port, new Uint8Array(i * 10))).length, i * 10);
  }
  for (let i = 0; i < RESETS; i++) {
    await sendAndReset(s.port, "abc");
  }
  const over = await Deno.connect({ hostname: HOST, port: s.port });
  try {
    await writeAll(over, new Uint8Array(1001));
    await over.closeWrite();
    await readAll(over);
  } catch (error) {
    if (!(error instanceof Deno.errors.ConnectionReset)) throw error;
  } finally {
    over.close();
  }
  // One client held open: counted as accepted and active, not yet logged.
  const held = await Deno.connect({ hostname: HOST, port: s.port });
  try {
    await writeAll(held, encoder.encode("held"));
    // A later client's full round trip proves the held one was accepted.
    assert.equal((await echo(s.port, encoder.encode("x"))).length, 1);
    const during = samples(renderMetrics(s.server));
    assert.equal(sample(during, "echo_connections_active"), 1);
    assert.equal(
      sample(during, "echo_connections_accepted_total"),
      s.records.length + 1,
    );
    await held.closeWrite();
    assert.equal(decoder.decode(await readAll(held)), "held");
  } finally {
    held.close();
  }
  await s.server.shutdown();

  const m = samples(renderMetrics(s.server));
  const clients = GOOD + RESETS + 3; // + over-limit, "x" and held
  assert.equal(s.records.length, clients);
  assert.equal(sample(m, "echo_connections_accepted_total"), clients);
  assert.equal(sample(m, "echo_connections_active"), 0);
  const received = s.records.reduce((sum, [, bytes]) => sum + bytes, 0);
  assert.equal(sample(m, "echo_received_bytes_total"), received);
  const goodBytes = (GOOD * (GOOD + 1) / 2) * 10;
  assert.equal(sample(m, "echo_sent_bytes_total"), goodBytes + 1 + 4);
  assert.equal(sample(m, 'echo_cutoffs_total{reason="client_limit"}'), 1);
  // A reset lands in the read (a cut-off) or, if it beat the accept, in
  // the accept (a client's accept error); either way it was logged.
  assert.equal(
    sample(m, 'echo_cutoffs_total{reason="reset"}') +
      sample(m, 'echo_accept_errors_total{kind="client"}'),
    RESETS,
  );
  const counted = cutoffs(renderMetrics(s.server));
  assert.deepEqual(counted, {
    ...NO_CUTOFFS,
    client_limit: 1,
    reset: counted.reset, // checked with the accept errors above
  });
  assert.equal(sample(m, 'echo_accept_errors_total{kind="exhaustion"}'), 0);
  assert.equal(sample(m, "echo_log_write_errors_total"), 0);
  assert.equal(
    sample(m, "echo_connection_duration_seconds_count"),
    clients - sample(m, 'echo_accept_errors_total{kind="client"}'),
  );
  assert.equal(
    sample(m, 'echo_connection_duration_seconds_bucket{le="+Inf"}'),
    sample(m, "echo_connection_duration_seconds_count"),
  );
  let previous = 0;
  for (const le of DURATION_BUCKETS_SECONDS) {
    const count = sample(
      m,
      `echo_connection_duration_seconds_bucket{le="${le}"}`,
    );
    assert.ok(count >= previous, `bucket le=${le} is not cumulative`);
    previous = count;
  }
  assert.equal(sample(m, "echo_buffered_bytes"), 0);
  // How close to each limit: the limits beside the gauges.
  assert.equal(sample(m, "echo_connections_max"), 16384);
  assert.equal(sample(m, "echo_buffered_bytes_max"), 512 * 1024 * 1024);
  // This process's RSS as the kernel reports it: in bytes, not pages or KiB,
  // and this process's. RSS moves between the two readings, by far less
  // than the factor of 1024 or 4096 a wrong unit would make.
  // (Deno lets only --allow-all read this process's /proc, so a child does.)
  const vmRssBytes = 1024 * await readRssKiB(Deno.pid);
  const rss = sample(m, "process_resident_memory_bytes");
  assert.ok(
    rss > vmRssBytes / 2 && rss < vmRssBytes * 2,
    `${rss} bytes reported, VmRSS ${vmRssBytes} bytes`,
  );
  assert.ok(sample(m, "process_start_time_seconds") <= Date.now() / 1000);
});

/**
 * Serves clients "a" and "b" with a server that logs them to `log`, and
 * shuts it down, which resolves once both are logged (a client can see its
 * EOF first).
 */
async function serveTwoLoggedClients(log: AccessLog): Promise<EchoServer> {
  const server = serveEcho((id, bytes) => log.record(id, bytes), {
    port: 0,
    onDiagnostic: () => {},
  });
  await echo(server.addr.port, encoder.encode("a"));
  await echo(server.addr.port, encoder.encode("b"));
  await server.shutdown();
  return server;
}

Deno.test(
  "renderMetrics() counts access log lines that could not be written",
  withTempDir(async (dir) => {
    // A log whose file is already closed: every record() throws. (/dev/full
    // would be the real fault, but Deno lets only --allow-all open it.)
    const log = AccessLog.open(`${dir}/access.log`);
    log.close();
    const server = await serveTwoLoggedClients(log);
    const m = samples(renderMetrics(server));
    assert.equal(sample(m, "echo_log_write_errors_total"), 2);
    assert.equal(sample(m, "echo_connections_accepted_total"), 2);
    assert.equal(await Deno.readTextFile(`${dir}/access.log`), "");
  }),
);

Deno.test("renderMetrics() reports the access log's backlog, dropped lines and failed writes", async () => {
  // A file that takes nothing (ENOSPC), then everything.
  let full = true;
  const log = AccessLog.open("access.log", {
    openFile: () => ({
      writeSync(bytes) {
        if (full) throw new Error("No space left on device (os error 28)");
        return bytes.length;
      },
      close() {},
    }),
    maxBacklogBytes: 4096,
    onDiagnostic() {},
  });
  const server = await serveTwoLoggedClients(log);
  for (let id = 3; id <= 200; id++) log.record(id, 0);
  let m = samples(renderMetrics(server, { accessLog: log.stats }));
  const { backlogLines, backlogBytes, droppedLines } = log.stats;
  assert.ok(droppedLines > 0 && backlogBytes <= 4096);
  assert.equal(backlogLines + droppedLines, 200);
  assert.equal(sample(m, "echo_log_backlog_lines"), backlogLines);
  assert.equal(sample(m, "echo_log_backlog_bytes"), backlogBytes);
  assert.equal(sample(m, "echo_log_dropped_lines_total"), droppedLines);
  assert.equal(sample(m, "echo_log_write_errors_total"), 200);
  assert.equal(sample(m, "echo_log_reopen_pending"), 0);
  full = false;
  assert.equal(await log.flush(), 0);
  m = samples(renderMetrics(server, { accessLog: log.stats }));
  assert.equal(sample(m, "echo_log_backlog_lines"), 0);
  assert.equal(sample(m, "echo_log_backlog_bytes"), 0);
  assert.equal(sample(m, "echo_log_dropped_lines_total"), droppedLines);
  assert.equal(log.close(), droppedLines);
});

const promtool = findExecutable("promtool");

Deno.test({
  name: `serveMetrics() passes promtool check metrics${
    promtool
      ? ""
      : " (ignored: promtool not installed; apt-get install prometheus)"
  }`,
  ignore: promtool === undefined,
  fn: withTempDir(async (dir) => {
    await using s = startServer({ maxClientBytes: 10 });
    await echo(s.port, encoder.encode("hello"));
    await echo(s.port, new Uint8Array(11)).catch(() => {});
    const log = AccessLog.open(`${dir}/access.log`);
    await using metrics = serveMetrics(s.server, { port: 0, accessLog: log });
    const response = await get(metrics.addr.port, "/metrics");
    log.close();
    assert.equal(response.status, 200);
    assert.match(response.body, /^echo_log_backlog_lines 0$/m);
    await Deno.writeTextFile(`${dir}/metrics.txt`, response.body);
    const result = await runCommand("bash", [
      "-c",
      `"$0" check metrics < "$1"`,
      promtool!,
      `${dir}/metrics.txt`,
    ]);
    // promtool prints lint problems (missing HELP, bad names) and exits 1.
    assert.equal(result.code, 0, result.stdout + result.stderr);
    assert.equal(result.stdout + result.stderr, "");
  }),
});

Deno.test("serveMetrics() never lets bad requests disturb the echo port", async () => {
  await using s = startServer();
  await using metrics = serveMetrics(s.server, { port: 0 });
  const port = metrics.addr.port;
  // A client that starts a request and never finishes it, held throughout.
  const slow = await Deno.connect({ hostname: HOST, port });
  try {
    await writeAll(slow, encoder.encode("GET /metrics HTTP/1.1\r\nHost:"));
    // A 1 MiB header: refused (431) or the connection reset, nothing else.
    try {
      const huge = await rawHttp(
        port,
        `GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: ${
          "a".repeat(1024 * 1024)
        }\r\n\r\n`,
      );
      assert.equal(huge.status, 431);
    } catch (error) {
      if (
        !(error instanceof Deno.errors.ConnectionReset ||
          error instanceof Deno.errors.BrokenPipe)
      ) throw error;
    }
    // Bytes that are not HTTP at all: answered 400 or closed.
    const garbage = await Deno.connect({ hostname: HOST, port });
    try {
      const bytes = new Uint8Array(4096).fill(0xff);
      await writeAll(garbage, bytes);
      const reply = decoder.decode(await readAll(garbage));
      assert.ok(reply === "" || reply.startsWith("HTTP/1.1 400 "), reply);
    } catch (error) {
      if (!(error instanceof Deno.errors.ConnectionReset)) throw error;
    } finally {
      garbage.close();
    }
    assert.equal(
      decoder.decode(await echo(s.port, encoder.encode("still here"))),
      "still here",
    );
    assert.equal((await get(port, "/healthz")).status, 200);
    // Shutting down is not held up by the unfinished request either.
    await within(metrics.shutdown(), 30_000, "shutdown()");
  } finally {
    slow.close();
  }
  await s.server.shutdown();
  assert.deepEqual(s.records, [[1, 10]]);
});

/** Reads `conn` until a whole response head has arrived; returns it. */
async function readHead(conn: Deno.Conn): Promise<string> {
  const buffer = new Uint8Array(4096);
  let text = "";
  while (!text.includes("\r\n\r\n")) {
    const n = await conn.read(buffer);
    assert.ok(n !== null, `connection ended before a response: ${text}`);
    text += decoder.decode(buffer.subarray(0, n));
  }
  return text;
}

Deno.test("serveMetrics() shutdown() does not wait for requests whose body never ends", async () => {
  await using s = startServer();
  await using metrics = serveMetrics(s.server, { port: 0 });
  const port = metrics.addr.port;
  // Each promises 100000 bytes of body and sends 3; the handler answers
  // at once, and Deno.serve keeps the connection for the rest.
  const requests: Array<[string, number]> = [
    [
      "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nabc",
      405,
    ],
    [
      "GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nabc",
      200,
    ],
  ];
  const held: Deno.Conn[] = [];
  try {
    for (const [request, status] of requests) {
      const conn = await Deno.connect({ hostname: HOST, port });
      held.push(conn);
      await writeAll(conn, encoder.encode(request));
      assert.match(await readHead(conn), new RegExp(`^HTTP/1.1 ${status} `));
    }
    await within(metrics.shutdown(), 30_000, "shutdown()");
    // Their connections were closed, not left behind.
    for (const conn of held) await readUntilClosed(conn);
  } finally {
    for (const conn of held) conn.close();
  }
});

Deno.test("serveMetrics() restarts Deno.serve after it stops, also when restarting fails", async () => {
  await using s = startServer();
  // The first server's `finished` is ours to reject, as Deno's is on
  // EMFILE; the real server stays bound, so the first restart fails with
  // AddrInUse, and only once it is shut down can the next one succeed.
  const realServe = Deno.serve;
  const first = Promise.withResolvers<void>();
  let firstServer: Deno.HttpServer<Deno.NetAddr> | undefined;
  const stub = (...args: Parameters<typeof Deno.serve>) => {
    const server = realServe(...args) as Deno.HttpServer<Deno.NetAddr>;
    if (firstServer !== undefined) return server;
    firstServer = server;
    return Object.assign(Object.create(server), {
      addr: server.addr,
      finished: first.promise,
      shutdown: () => server.shutdown(),
    });
  };
  const diagnostics: string[] = [];
  let changed = Promise.withResolvers<void>();
  const nextDiagnostic = async (pattern: RegExp) => {
    while (!diagnostics.some((line) => pattern.test(line))) {
      await changed.promise;
    }
  };
  Object.defineProperty(Deno, "serve", { value: stub, configurable: true });
  let metrics;
  try {
    metrics = serveMetrics(s.server, {
      port: 0,
      onDiagnostic: (line) => {
        diagnostics.push(line);
        changed.resolve();
        changed = Promise.withResolvers();
      },
    });
    first.reject(new Error("Too many open files (os error 24)"));
    await nextDiagnostic(/^metrics server could not restart: /);
    await firstServer!.shutdown();
    await nextDiagnostic(/^metrics server restarted on /);
  } finally {
    Object.defineProperty(Deno, "serve", {
      value: realServe,
      configurable: true,
    });
  }
  try {
    assert.equal((await get(metrics.addr.port, "/healthz")).status, 200);
  } finally {
    await metrics.shutdown();
  }
  // As many failed retries as ran before the port was freed (one, unless
  // the machine let a 200 ms timer beat the shutdown), each waiting twice
  // as long as the one before.
  const retries = diagnostics.slice(1, -1);
  assert.ok(retries.length >= 1, diagnostics.join("\n"));
  assert.deepEqual(diagnostics, [
    "metrics server stopped: Too many open files (os error 24); restarting in 100 ms",
    ...retries.map((_, i) =>
      `metrics server could not restart: Address already in use (os error 98); restarting in ${
        200 * 2 ** i
      } ms`
    ),
    `metrics server restarted on 127.0.0.1:${metrics.addr.port}`,
  ]);
});

Deno.test(
  "echo-server --metrics under OTEL_DENO=true exports Deno's HTTP metrics, not echo_*",
  withTempDir(async (dir) => {
    // A stand-in OTLP/HTTP collector: keeps what is posted, by path.
    const posted = new Map<string, string>();
    await using collector = Deno.serve(
      { hostname: HOST, port: 0, onListen: () => {} },
      async (request) => {
        const { pathname } = new URL(request.url);
        // Protobuf: names are plain bytes; latin1 keeps them readable.
        const body = new TextDecoder("latin1").decode(
          await request.arrayBuffer(),
        );
        posted.set(pathname, (posted.get(pathname) ?? "") + body);
        return new Response(null, { status: 200 });
      },
    );
    await using server = new ServerProcess(dir, ["--metrics", ":0"], {
      env: {
        OTEL_DENO: "true",
        OTEL_EXPORTER_OTLP_ENDPOINT: `http://${HOST}:${collector.addr.port}`,
      },
    });
    await echo(await server.port(), encoder.encode("hello"));
    assert.equal(
      (await get(await server.metricsPort(), "/metrics")).status,
      200,
    );
    assert.equal(await server.stop(), 0);
    // Deno flushes at exit: the /metrics request's HTTP server metrics...
    const metrics = posted.get("/v1/metrics") ?? "";
    assert.match(metrics, /http\.server\.request\.duration/);
    // ...but nothing of ours: the echo_* counters are not bridged to OTel.
    assert.doesNotMatch(metrics, /echo_connections/);
  }),
);

for (
  const [permissions, shown] of [
    [["--allow-all"], true],
    [["--allow-net", "--allow-write"], false],
  ] as const
) {
  Deno.test(
    `echo-server --metrics ${
      shown ? "shows" : "omits"
    } process_open_fds and process_max_fds (ulimit -n) under ${
      permissions.join(" ")
    }`,
    withTempDir(async (dir) => {
      const limit = 500;
      await using server = new ServerProcess(dir, ["--metrics", ":0"], {
        permissions: [...permissions],
        maxOpenFiles: limit,
      });
      try {
        const port = await server.metricsPort();
        const exposition = (await get(port, "/metrics")).body;
        const m = samples(exposition);
        if (shown) {
          assert.equal(sample(m, "process_max_fds"), limit);
          const open = sample(m, "process_open_fds");
          assert.ok(open > 0 && open < limit, `process_open_fds ${open}`);
          assert.match(exposition, /^# TYPE process_max_fds gauge$/m);
        } else {
          assert.ok(!m.has("process_max_fds"), exposition);
          assert.ok(!m.has("process_open_fds"), exposition);
        }
      } finally {
        assert.equal(await server.stop(), 0);
      }
    }),
  );
}

/** Reads `conn` to its end, a reset counting as the end. */
async function readUntilClosed(conn: Deno.Conn): Promise<void> {
  try {
    await readAll(conn);
  } catch (error) {
    if (!(error instanceof Deno.errors.ConnectionReset)) throw error;
  }
}

/** The cut-off counters of `server`'s exposition, by reason. */
function cutoffs(exposition: string): Record<string, number> {
  const counts: Record<string, number> = {};
  for (const [key, value] of samples(exposition)) {
    const reason = /^echo_cutoffs_total\{reason="(\w+)"\}$/.exec(key)?.[1];
    if (reason !== undefined) counts[reason] = value;
  }
  return counts;
}

// Every reason at zero: a fresh server's counters, whose type names each.
const NO_CUTOFFS = { ...new EchoCounters().cutoffs };

/**
 * The cut-offs counted once one client, driven by `drive`, has met a
 * server started with `options` and the server has shut down.
 */
async function cutoffsAfterOneClient(
  options: ServeOptions,
  drive: (conn: Deno.TcpConn) => Promise<void>,
): Promise<Record<string, number>> {
  await using s = startServer(options);
  const conn = await Deno.connect({ hostname: HOST, port: s.port });
  try {
    await drive(conn);
  } finally {
    conn.close();
  }
  await s.server.shutdown();
  return cutoffs(renderMetrics(s.server));
}

Deno.test("renderMetrics() counts an idle client's cut-off as idle", async () => {
  const counted = await cutoffsAfterOneClient(
    { idleTimeoutMs: 50 },
    readUntilClosed, // sends nothing until the server gives up
  );
  assert.deepEqual(counted, { ...NO_CUTOFFS, idle: 1 });
});

Deno.test("renderMetrics() counts a trickler cut off by minRate as min_rate", async () => {
  // One of the reasons admission.ts added, under its own label in /metrics.
  const counted = await cutoffsAfterOneClient(
    { minRate: 1000, minRateGraceMs: 50 },
    async (conn) => {
      await writeAll(conn, new Uint8Array(1));
      await readUntilClosed(conn);
    },
  );
  assert.deepEqual(counted, { ...NO_CUTOFFS, min_rate: 1 });
});

Deno.test("renderMetrics() counts a cut-off over maxBufferedBytes as buffer_limit", async () => {
  const counted = await cutoffsAfterOneClient(
    { maxBufferedBytes: 64 * 1024 },
    async (conn) => {
      try {
        await writeAll(conn, new Uint8Array(1024 * 1024));
      } catch (error) {
        if (
          !(error instanceof Deno.errors.ConnectionReset ||
            error instanceof Deno.errors.BrokenPipe)
        ) throw error;
      }
    },
  );
  assert.deepEqual(counted, { ...NO_CUTOFFS, buffer_limit: 1 });
});

Deno.test("renderMetrics() counts a client still there when the drain ends as shutdown", async () => {
  await using s = startServer();
  const conn = await Deno.connect({ hostname: HOST, port: s.port });
  try {
    await writeAll(conn, encoder.encode("unfinished"));
    // A later client's full round trip proves the first was accepted.
    assert.equal((await echo(s.port, encoder.encode("x"))).length, 1);
    await s.server.shutdown({ drainTimeoutMs: 0 });
  } finally {
    conn.close();
  }
  const exposition = renderMetrics(s.server);
  assert.deepEqual(cutoffs(exposition), { ...NO_CUTOFFS, shutdown: 1 });
  assert.deepEqual(s.records.map(([id]) => id).toSorted(), [1, 2]);
});
