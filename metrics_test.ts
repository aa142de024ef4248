import assert from "node:assert/strict";
import { readRssKiB } from "./bench/_proc.ts";
import { AccessLog } from "./access_log.ts";
import {
  DEFAULT_METRICS_MAX_CONNECTIONS,
  DEFAULT_METRICS_MAX_HEADER_BYTES,
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
  connectMany,
  echo,
  findExecutable,
  readAll,
  runCommand,
  sendAndReset,
  ServerProcess,
  startServer,
  waitUntil,
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
    assert.deepEqual(metrics.cutoffs, {
      ...NO_METRICS_PORT_CUTOFFS,
      header_too_large: 1,
      bad_request: 1,
    });
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

Deno.test("serveMetrics() accepts again with a back-off after accept fails for want of descriptors", async () => {
  await using s = startServer();
  // A listener whose first two accepts fail as on EMFILE, then real ones.
  const realListen = Deno.listen;
  let failures = 2;
  const stub = (options: Deno.TcpListenOptions) => {
    const listener = realListen(options);
    return Object.create(listener, {
      addr: { value: listener.addr },
      accept: {
        value: () =>
          failures-- > 0
            ? Promise.reject(new Error("Too many open files (os error 24)"))
            : listener.accept(),
      },
      close: { value: () => listener.close() },
    });
  };
  const diagnostics: string[] = [];
  Object.defineProperty(Deno, "listen", { value: stub, configurable: true });
  let metrics;
  try {
    metrics = serveMetrics(s.server, {
      port: 0,
      onDiagnostic: (line) => diagnostics.push(line),
    });
  } finally {
    Object.defineProperty(Deno, "listen", {
      value: realListen,
      configurable: true,
    });
  }
  try {
    // Queued meanwhile, and answered once accepting works again.
    assert.equal((await get(metrics.addr.port, "/healthz")).status, 200);
  } finally {
    await metrics.shutdown();
  }
  assert.deepEqual(diagnostics, [
    "metrics server: accept failed: Too many open files (os error 24); accepting again in 100 ms",
    "metrics server: accept failed: Too many open files (os error 24); accepting again in 200 ms",
    "metrics server: accepting again",
  ]);
});

Deno.test("serveMetrics() answers 500 and says why when /metrics cannot be rendered, and keeps serving", async () => {
  await using s = startServer();
  const diagnostics: string[] = [];
  await using metrics = serveMetrics(s.server, {
    port: 0,
    accessLog: {
      get stats(): never {
        throw new Error("stats unavailable");
      },
    },
    onDiagnostic: (line) => diagnostics.push(line),
  });
  const failed = await get(metrics.addr.port, "/metrics");
  assert.equal(failed.status, 500);
  assert.equal(failed.body, "internal server error\n");
  assert.deepEqual(diagnostics, [
    "metrics server: GET /metrics failed: Error: stats unavailable",
  ]);
  assert.equal((await get(metrics.addr.port, "/healthz")).status, 200);
});

const NO_METRICS_PORT_CUTOFFS = {
  newcomer: 0,
  deadline: 0,
  header_too_large: 0,
  bad_request: 0,
};

/**
 * Resolves once the server has closed `conn` (EOF or a reset), with what it
 * sent first.
 */
async function closedByServer(conn: Deno.Conn): Promise<string> {
  let text = "";
  const buffer = new Uint8Array(4096);
  try {
    for (let n; (n = await conn.read(buffer)) !== null;) {
      text += decoder.decode(buffer.subarray(0, n));
    }
  } catch (error) {
    if (!(error instanceof Deno.errors.ConnectionReset)) throw error;
  }
  return text;
}

Deno.test("serveMetrics() closes the oldest connection for a newcomer beyond maxConnections, so idle ones never stop /healthz or the echo port", async () => {
  await using s = startServer();
  // No deadline within the test: only newcomers close connections here.
  await using metrics = serveMetrics(s.server, {
    port: 0,
    requestTimeoutMs: 600_000,
  });
  const port = metrics.addr.port;
  const idle = await connectMany(port, 100);
  try {
    // Accepted in the order they connected; all but the 16 newest closed.
    const oldest = idle.slice(0, 100 - DEFAULT_METRICS_MAX_CONNECTIONS);
    const sent = await within(
      Promise.all(oldest.map(closedByServer)),
      30_000,
      "the oldest idle connections closed",
    );
    assert.ok(sent.every((text) => text === ""), "no response to nothing");
    const health = await within(get(port, "/healthz"), 2_000, "/healthz");
    assert.equal(health.status, 200);
    // The 84, and the oldest left when /healthz came.
    assert.deepEqual(metrics.cutoffs, {
      ...NO_METRICS_PORT_CUTOFFS,
      newcomer: 85,
    });
    assert.equal(
      decoder.decode(await echo(s.port, encoder.encode("still here"))),
      "still here",
    );
  } finally {
    for (const conn of idle) conn.close();
  }
});

Deno.test("serveMetrics() closes a connection still trickling its request head at requestTimeoutMs", async () => {
  await using s = startServer();
  await using metrics = serveMetrics(s.server, {
    port: 0,
    requestTimeoutMs: 300,
  });
  const conn = await Deno.connect({ hostname: HOST, port: metrics.addr.port });
  // A header byte every 50 ms: always progress, never a whole head.
  await writeAll(conn, encoder.encode("GET /metrics HTTP/1.1\r\nX-Slow: "));
  const trickle = setInterval(() => {
    conn.write(encoder.encode("a")).catch(() => {});
  }, 50);
  try {
    assert.equal(
      await within(closedByServer(conn), 30_000, "the trickler closed"),
      "",
    );
  } finally {
    clearInterval(trickle);
    conn.close();
  }
  assert.deepEqual(metrics.cutoffs, {
    ...NO_METRICS_PORT_CUTOFFS,
    deadline: 1,
  });
  assert.equal((await get(metrics.addr.port, "/healthz")).status, 200);
});

Deno.test("serveMetrics() answers 431 to a request head over maxHeaderBytes, and serves one of exactly that size", async () => {
  await using s = startServer();
  await using metrics = serveMetrics(s.server, { port: 0 });
  const port = metrics.addr.port;
  /** A GET /healthz whose head is `size` bytes long. */
  const request = (size: number) => {
    const start = "GET /healthz HTTP/1.1\r\nX-Pad: ";
    const end = "\r\nConnection: close\r\n\r\n";
    return start + "a".repeat(size - start.length - end.length) + end;
  };
  const fits = await rawHttp(
    port,
    request(DEFAULT_METRICS_MAX_HEADER_BYTES),
  );
  assert.equal(fits.status, 200);
  const over = await rawHttp(
    port,
    request(DEFAULT_METRICS_MAX_HEADER_BYTES + 1),
  );
  assert.equal(over.status, 431);
  assert.equal(over.body, "request header fields too large\n");
  const exposition = (await get(port, "/metrics")).body;
  assert.match(
    exposition,
    /^echo_metrics_port_cutoffs_total\{reason="header_too_large"\} 1$/m,
  );
});

Deno.test("serveMetrics() closes the connection after each response, a keep-alive request's too", async () => {
  await using s = startServer();
  await using metrics = serveMetrics(s.server, { port: 0 });
  const conn = await Deno.connect({ hostname: HOST, port: metrics.addr.port });
  try {
    // HTTP/1.1 without `Connection: close`: keep-alive unless told.
    await writeAll(
      conn,
      encoder.encode("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
    );
    const text = await within(closedByServer(conn), 30_000, "closed");
    assert.match(text, /^HTTP\/1\.1 200 OK\r\n/);
    assert.match(text, /\r\nconnection: close\r\n/);
    assert.ok(text.endsWith("\r\n\r\nok\n"), text);
  } finally {
    conn.close();
  }
});

/**
 * `count` connections to 127.0.0.1:`port` held open, every other one
 * trickling a request head (a header byte every 100 ms to each), the rest
 * idle; one the server closes is opened again at once, as an attacker's.
 */
class MetricsFlood implements AsyncDisposable {
  /** Connects made so far. */
  connected = 0;
  /** Connections the server has closed so far. */
  closedByServer = 0;
  readonly #open = new Set<Deno.TcpConn>();
  readonly #trickling = new Set<Deno.TcpConn>();
  readonly #holders: Promise<void>[] = [];
  readonly #trickle: ReturnType<typeof setInterval>;
  #stopped = false;
  #failure: unknown;

  constructor(readonly port: number, count: number) {
    for (let i = 0; i < count; i++) {
      // Kept until the dispose, which throws it: a holder's failure is
      // the test's, not an unhandled rejection.
      this.#holders.push(
        this.#hold(i % 2 === 1).catch((error) => {
          this.#failure ??= error;
        }),
      );
    }
    this.#trickle = setInterval(() => {
      for (const conn of this.#trickling) {
        conn.write(encoder.encode("a")).catch(() => {});
      }
    }, 100);
  }

  async #hold(trickling: boolean): Promise<void> {
    while (!this.#stopped) {
      let conn;
      try {
        conn = await Deno.connect({ hostname: HOST, port: this.port });
      } catch (error) {
        // Nobody listening for a moment (as when Deno.serve stopped on
        // EMFILE), or reset while queued: try again, a little later.
        if (
          !(error instanceof Deno.errors.ConnectionRefused ||
            error instanceof Deno.errors.ConnectionReset)
        ) throw error;
        await new Promise((resolve) => setTimeout(resolve, 10));
        continue;
      }
      this.connected++;
      if (this.#stopped) {
        conn.close();
        return;
      }
      this.#open.add(conn);
      if (trickling) {
        this.#trickling.add(conn);
        conn.write(encoder.encode("GET /metrics HTTP/1.1\r\nX-Slow: "))
          .catch(() => {});
      }
      try {
        await closedByServer(conn);
      } catch (error) {
        // Closed by us, stopping: the read ends on a closed resource.
        if (!this.#stopped) throw error;
      }
      this.#trickling.delete(conn);
      // Still ours to close unless the dispose closed it.
      if (this.#open.delete(conn)) {
        conn.close();
        if (!this.#stopped) this.closedByServer++;
      }
    }
  }

  async [Symbol.asyncDispose](): Promise<void> {
    this.#stopped = true;
    clearInterval(this.#trickle);
    for (const conn of this.#open) conn.close();
    this.#open.clear();
    this.#trickling.clear();
    await Promise.all(this.#holders);
    if (this.#failure !== undefined) throw this.#failure;
  }
}

Deno.test(
  "echo-server --metrics under ulimit -n of --max-connections + 64 serves every echo client and /healthz while 290 connections flood the metrics port",
  withTempDir(async (dir) => {
    const clients = 200;
    await using server = new ServerProcess(
      dir,
      ["--max-connections", `${clients}`, "--metrics", "127.0.0.1:0"],
      { maxOpenFiles: clients + 64 },
    );
    const port = await server.port();
    const metricsPort = await server.metricsPort();
    {
      // More connections than the process has descriptors to spare, idle
      // or trickling, reopened as soon as the server closes one.
      await using flood = new MetricsFlood(metricsPort, 290);
      await waitUntil(() => flood.connected >= 290, "290 flood connections");
      const conns = await connectMany(port, clients);
      try {
        await Promise.all(
          conns.map((conn, i) => writeAll(conn, new Uint8Array([i]))),
        );
        const health = await within(
          get(metricsPort, "/healthz"),
          2_000,
          "/healthz under the flood",
        );
        assert.equal(health.status, 200);
        // Every client was accepted and held at once, and is echoed.
        const replies = await within(
          Promise.all(conns.map(async (conn) => {
            await conn.closeWrite();
            return [...await readAll(conn)];
          })),
          30_000,
          "every echo client under the flood",
        );
        assert.deepEqual(replies, conns.map((_, i) => [i]));
      } finally {
        for (const conn of conns) conn.close();
      }
      assert.ok(flood.closedByServer > 0, "the metrics port closed none");
    }
    server.child.kill("SIGTERM");
    // Every line after "metrics on ...".
    const { code, stderr } = await server.exit();
    assert.equal(code, 0, stderr);
    // Nothing about running out of descriptors, on either port.
    assert.doesNotMatch(stderr, /os error 24/);
    const log = await Deno.readTextFile(`${dir}/access.log`);
    assert.equal(log.split("\n").length - 1, clients);
  }),
);

Deno.test(
  "echo-server --metrics under OTEL_DENO=true exports Deno's runtime metrics, not echo_* nor HTTP metrics of the metrics port",
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
    // Deno flushes at exit: its own metrics, under its SDK's resource...
    const metrics = posted.get("/v1/metrics") ?? "";
    assert.match(metrics, /telemetry\.sdk\.name/);
    // ...but none for the /metrics request (its responder is not
    // Deno.serve, which Deno instruments), and nothing of ours: the echo_*
    // counters are not bridged to OTel.
    assert.doesNotMatch(metrics, /http\.server\./);
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

Deno.test("serveMetrics() refuses a limit that is not a positive number, listening on nothing", async () => {
  await using server = startServer();
  for (
    const options of [
      { maxConnections: 0 },
      { maxConnections: NaN },
      { maxConnections: 1.5 },
      { maxHeaderBytes: 0 },
      { requestTimeoutMs: 0 },
      { requestTimeoutMs: NaN },
    ]
  ) {
    assert.throws(
      () => serveMetrics(server.server, { port: 0, ...options }),
      RangeError,
      JSON.stringify(options),
    );
  }
});
