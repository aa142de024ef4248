// Floods a server's --metrics port with N connections that never finish a
// request, then measures what they cost the server and its scrapes: the
// server's RSS and open descriptors (from /proc, by `cat` and `ls`), how
// many of the flood's connections the server has closed, and the latency of
// SCRAPES `GET /healthz` and as many `GET /metrics`, each on a new
// connection, one at a time, while the flood holds on.
//
// Modes: "idle" sends nothing; "header" sends a request line and HEADER_KIB
// KiB of header at once, unfinished; "trickle" sends a request line, then a
// header byte every second.
// deno run --allow-net --allow-run bench/metrics_flood.ts METRICS_PORT PID [N=1000] [idle|header|trickle] [HEADER_KIB=58] [SCRAPES=50]
import { countFds, readRssKiB } from "./_proc.ts";

const port = Number(Deno.args[0]);
const pid = Number(Deno.args[1]);
const count = Number(Deno.args[2] ?? 1000);
const mode = Deno.args[3] ?? "header";
const headerKiB = Number(Deno.args[4] ?? 58);
const scrapes = Number(Deno.args[5] ?? 50);
if (!["idle", "header", "trickle"].includes(mode)) {
  throw new Error(`mode must be idle, header or trickle, not ${mode}`);
}
const encoder = new TextEncoder();
const decoder = new TextDecoder();

const before = { rss: await readRssKiB(pid), fds: await countFds(pid) };

let closedByServer = 0;
const conns: Deno.TcpConn[] = [];
const trickling: Deno.TcpConn[] = [];
for (let i = 0; i < count; i++) {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  conns.push(conn);
  // Counts the server's close (EOF or a reset); ends when we close too.
  (async () => {
    const buffer = new Uint8Array(1024);
    try {
      while ((await conn.read(buffer)) !== null);
      closedByServer++;
    } catch (error) {
      if (error instanceof Deno.errors.ConnectionReset) closedByServer++;
    }
  })();
  const write = (text: string) =>
    conn.write(encoder.encode(text)).catch(() => {});
  if (mode === "header") {
    await write(
      `GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: ${
        "a".repeat(headerKiB * 1024)
      }`,
    );
  } else if (mode === "trickle") {
    await write("GET /metrics HTTP/1.1\r\nX-Pad: ");
    trickling.push(conn);
  }
}
const trickle = setInterval(() => {
  for (const conn of trickling) {
    conn.write(encoder.encode("a")).catch(() => {});
  }
}, 1000);
// Let the server take in what was sent.
await new Promise((resolve) => setTimeout(resolve, 3000));
const during = { rss: await readRssKiB(pid), fds: await countFds(pid) };

/** One request on a new connection; its latency in ms, or the failure. */
async function timed(path: string): Promise<number | string> {
  const started = performance.now();
  try {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port });
    try {
      await conn.write(
        encoder.encode(
          `GET ${path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`,
        ),
      );
      const buffer = new Uint8Array(64 * 1024);
      let text = "";
      const giveUp = setTimeout(() => conn.close(), 10_000);
      try {
        for (let n; (n = await conn.read(buffer)) !== null;) {
          text += decoder.decode(buffer.subarray(0, n));
        }
      } finally {
        clearTimeout(giveUp);
      }
      if (!text.startsWith("HTTP/1.1 200 ")) {
        return `got ${JSON.stringify(text.slice(0, 20))}`;
      }
    } finally {
      try {
        conn.close();
      } catch {
        // closed by the 10 s give-up
      }
    }
  } catch (error) {
    return String(error);
  }
  return performance.now() - started;
}

for (const path of ["/healthz", "/metrics"]) {
  const times: number[] = [];
  const failures: string[] = [];
  for (let i = 0; i < scrapes; i++) {
    const result = await timed(path);
    if (typeof result === "number") times.push(result);
    else failures.push(result);
  }
  times.sort((a, b) => a - b);
  const at = (q: number) =>
    times.length === 0
      ? NaN
      : times[Math.min(times.length - 1, Math.floor(q * times.length))];
  console.log(
    `${path}: ${times.length} of ${scrapes} answered, p50 ${
      at(0.5).toFixed(2)
    } ms, p99 ${at(0.99).toFixed(2)} ms, max ${at(1).toFixed(2)} ms${
      failures.length ? `; failed: ${failures[0]}` : ""
    }`,
  );
}
console.log(
  `${count} ${mode} connections: server RSS ${
    (before.rss / 1024).toFixed(1)
  } -> ${
    (during.rss / 1024).toFixed(1)
  } MiB, fds ${before.fds} -> ${during.fds}; closed by the server: ${closedByServer}`,
);
clearInterval(trickle);
for (const conn of conns) {
  try {
    conn.close();
  } catch {
    // already closed
  }
}
Deno.exit(0);
