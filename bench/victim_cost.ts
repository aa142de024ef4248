// The CPU cost of choosing whom to evict, per newcomer, with N clients
// holding slots (admission.ts, on the function alone, no sockets): a
// newcomer at maxConnections (Admission.slotVictim) in the three shapes that
// cost the most, and a read at maxBufferedBytes (Admission.memoryVictims).
// deno run bench/victim_cost.ts [N=16384] [ROUNDS=20000]
import { Admission, type ClientProgress, newProgress } from "../admission.ts";

const clients = Number(Deno.args[0] ?? 16_384);
const rounds = Number(Deno.args[1] ?? 20_000);
const now = 100_000;

/** Microseconds per call of `choose`, over `rounds` calls after a warm-up. */
function microsPerCall(choose: () => unknown): number {
  for (let i = 0; i < 1000; i++) choose();
  const start = performance.now();
  for (let i = 0; i < rounds; i++) choose();
  return (performance.now() - start) * 1000 / rounds;
}

/** `count` clients of `source`, each shaped by `shape(client, i)`. */
function admitted(
  admission: Admission,
  count: number,
  source: string,
  shape: (client: ClientProgress, i: number) => void,
): ClientProgress[] {
  return Array.from({ length: count }, (_, i) => {
    const client = newProgress(now - 10_000 + i * 0.1, { source });
    shape(client, i);
    admission.admit(client);
    return client;
  });
}

// A zero-byte flood from one source: the victim is its oldest silent
// client; each round evicts it and admits the newcomer in its place.
{
  const admission = new Admission();
  admitted(admission, clients, "198.51.100.1", () => {});
  // A millisecond a round: the newcomers age as the flood goes on.
  let round = 0;
  const cost = microsPerCall(() => {
    const at = now + round++;
    const victim = admission.slotVictim("192.0.2.1", at)!;
    admission.leave(victim);
    admission.admit(newProgress(at, { source: "198.51.100.1" }));
  });
  console.log(
    `slotVictim, ${clients} silent clients of one source: ${
      cost.toFixed(2)
    } µs`,
  );
}

// One source of clients all moving bytes in their grace, none silent: the
// newcomer of that source is turned away after the bounded scans.
{
  const admission = new Admission();
  admitted(admission, clients, "198.51.100.1", (client, i) => {
    client.bytesReceived = 1000 + i;
    client.lastActivity = now;
  });
  const cost = microsPerCall(() => admission.slotVictim("198.51.100.1", now));
  console.log(
    `slotVictim, ${clients} moving clients, none evictable: ${
      cost.toFixed(2)
    } µs`,
  );
}

// The same for a newcomer of another source, which must take one of them:
// every scan runs, then the slowest of the oldest 32.
{
  const admission = new Admission();
  admitted(admission, clients, "198.51.100.1", (client, i) => {
    client.bytesReceived = 1000 + i;
    client.lastActivity = now;
  });
  const cost = microsPerCall(() => admission.slotVictim("192.0.2.1", now));
  console.log(
    `slotVictim, ${clients} moving clients, newcomer from another source: ${
      cost.toFixed(2)
    } µs`,
  );
}

// Memory: every client holds a buffer; one read needs 1 MiB freed.
{
  const admission = new Admission();
  const all = admitted(admission, clients, "198.51.100.1", (client, i) => {
    client.bufferedBytes = 16 * 1024 + (i % 97) * 1024;
    client.bytesReceived = client.bufferedBytes;
    client.windowRate = i % 13;
  });
  const asking = all[0];
  // Reads at the limit 1 ms apart: a ranking every 100 of them.
  let at = now;
  const cost = microsPerCall(() =>
    admission.memoryVictims(all, asking, 1024 * 1024, at++)
  );
  // A ranking for every read, as before the ranking was kept 100 ms.
  const rankCost = microsPerCall(() =>
    admission.memoryVictims(all, asking, 1024 * 1024, at += 1000)
  );
  console.log(
    `memoryVictims, ${clients} clients holding buffers, reads 1 ms apart: ${
      cost.toFixed(2)
    } µs (one ranking: ${rankCost.toFixed(0)} µs)`,
  );
}
