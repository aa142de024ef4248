// Scrapes a server's /metrics N times, one request at a time, and prints the
// server's own process_resident_memory_bytes and deno_heap_used_bytes every
// N/10 scrapes: memory must stay flat however often it is scraped. With
// "close", every scrape is a new connection (as a load balancer's health
// check makes); otherwise one kept-alive connection (as Prometheus does).
// deno run --allow-net bench/scrape_memory.ts METRICS_PORT [N=20000] [close]
const port = Number(Deno.args[0]);
const total = Number(Deno.args[1] ?? 20_000);
const newConnections = Deno.args[2] === "close";
const encoder = new TextEncoder();
const decoder = new TextDecoder();

async function scrape(): Promise<string> {
  if (!newConnections) {
    const response = await fetch(`http://127.0.0.1:${port}/metrics`);
    const text = await response.text();
    if (response.status !== 200) throw new Error(`status ${response.status}`);
    return text;
  }
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  try {
    await conn.write(encoder.encode(
      "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ));
    let text = "";
    const buffer = new Uint8Array(64 * 1024);
    for (let n; (n = await conn.read(buffer)) !== null;) {
      text += decoder.decode(buffer.subarray(0, n), { stream: true });
    }
    if (!text.startsWith("HTTP/1.1 200 ")) throw new Error(text.slice(0, 40));
    return text;
  } finally {
    conn.close();
  }
}

const sample = (text: string, name: string) =>
  Number(new RegExp(`^${name} (\\S+)$`, "m").exec(text)![1]);
const mib = (bytes: number) => (bytes / 2 ** 20).toFixed(1);
console.log("scrapes   rss_MiB  heap_used_MiB");
for (let i = 1; i <= total; i++) {
  const text = await scrape();
  if (i === 1 || i % (total / 10) === 0) {
    const rss = sample(text, "process_resident_memory_bytes");
    const heap = sample(text, "deno_heap_used_bytes");
    console.log(
      `${String(i).padStart(7)}  ${mib(rss).padStart(7)}  ${
        mib(heap).padStart(13)
      }`,
    );
  }
}
