import assert from "node:assert/strict";
import {
  Admission,
  type ClientProgress,
  newProgress,
  sourceKey,
} from "./admission.ts";

const KIB = 1024;
const MIB = 1024 * 1024;

/** A client accepted at `acceptedAt` with `fields` set. */
function client(
  acceptedAt: number,
  fields: Partial<ClientProgress> = {},
): ClientProgress {
  return Object.assign(newProgress(acceptedAt), fields);
}

/** Steps a client sending (or reading) at `rate` B/s from 0 to `until` ms,
 * checking it each second as the sweep would; returns the first verdict.
 * A step that returns true has ended the client: the server is done. */
function simulate(
  admission: Admission,
  progress: ClientProgress,
  until: number,
  step: (progress: ClientProgress, now: number) => boolean | void,
): { at: number; reason: string } | undefined {
  for (let now = 1000; now <= until; now += 1000) {
    if (step(progress, now) === true) return undefined;
    const reason = admission.check(progress, now);
    if (reason !== undefined) return { at: now, reason };
  }
  return undefined;
}

/** A {@linkcode simulate} step: one byte every 2 s, a trickle. */
function aByteEvery2s(progress: ClientProgress, now: number): void {
  if (now % 2000 === 0) {
    progress.bytesReceived++;
    progress.lastActivity = now;
  }
}

Deno.test("Admission.check() serves 64 MiB sent over a 1 Mbit/s link", () => {
  const admission = new Admission();
  const sender = client(0);
  const total = 64 * MIB;
  const verdict = simulate(admission, sender, 600_000, (c, now) => {
    c.bytesReceived = Math.min(total, 125_000 * now / 1000);
    c.lastActivity = now;
  });
  assert.equal(verdict, undefined);
});

Deno.test("Admission.check() serves a line typed into nc -N within 20 s", () => {
  const admission = new Admission();
  // Nothing arrives until Enter at 19 s, then EOF at once.
  const typist = client(0);
  const verdict = simulate(admission, typist, 19_000, (c, now) => {
    if (now === 19_000) {
      c.bytesReceived = 40;
      c.lastActivity = now;
      c.eofAt = now;
    }
  });
  assert.equal(verdict, undefined);
});

Deno.test("Admission.check() cuts off a byte every 2 s after the 20 s grace", () => {
  const admission = new Admission();
  const trickler = client(0);
  const verdict = simulate(admission, trickler, 60_000, aByteEvery2s);
  assert.deepEqual(verdict, { at: 21_000, reason: "min_rate" });
});

Deno.test("Admission.check() with minRate 0 leaves a trickler to the idle rule", () => {
  const admission = new Admission({ minRate: 0 });
  const trickler = client(0);
  const verdict = simulate(admission, trickler, 120_000, aByteEvery2s);
  assert.equal(verdict, undefined);
});

Deno.test("Admission.check() cuts off a silent client as idle", () => {
  const admission = new Admission({ idleTimeoutMs: 10_000 });
  assert.deepEqual(simulate(admission, client(0), 60_000, () => {}), {
    at: 11_000,
    reason: "idle",
  });
});

Deno.test("Admission.check() serves a reader at 16 KiB/s whose writes complete 80 s apart", () => {
  const admission = new Admission();
  // Linux wakes the writer after ~1/3 of a 4 MiB send buffer drained: the
  // kernel takes 4 MiB at once, then 1.33 MiB per 85 s at 16 KiB/s.
  const reader = client(0, { eofAt: 0, bytesSent: 4 * MIB });
  const total = 64 * MIB;
  // Until the last write completes: then the server closes.
  const verdict = simulate(admission, reader, 5_000_000, (c, now) => {
    const read = 16 * KIB * now / 1000;
    const queued = c.bytesSent - read;
    if (queued <= (4 * MIB * 2) / 3 && c.bytesSent < total) {
      c.bytesSent = Math.min(total, read + 4 * MIB);
      c.lastActivity = now;
    }
    return c.bytesSent === total;
  });
  assert.equal(verdict, undefined);
});

Deno.test("Admission.check() lets go a reader of 1 KiB every 10 s", () => {
  const admission = new Admission();
  // The kernels took 4 MiB of a 16 MiB echo, then the reader stalls.
  const reader = client(0, { eofAt: 0, bytesSent: 4 * MIB });
  const verdict = simulate(admission, reader, 1_000_000, () => {});
  assert.deepEqual(verdict, { at: 287_000, reason: "slow_reader" });
});

Deno.test("Admission.check() lets go a reader that read fast and then stalled within idleTimeoutMs + 4 MiB / minReadRate of its last write", () => {
  const admission = new Admission();
  // Measured on loopback: a client that read 8 MiB of a 64 MiB echo at
  // once and then stopped; its receive buffer had grown as it read, and
  // the kernels took 15,069,634 bytes in all, the last write at 1 s.
  // Credited with all of it, it was held until 950 s.
  const taken = 15_069_634;
  const reader = client(0, { eofAt: 0, bytesSent: taken, lastActivity: 1000 });
  const verdict = simulate(admission, reader, 2_000_000, () => {});
  assert.deepEqual(verdict, { at: 288_000, reason: "slow_reader" });
});

Deno.test("Admission.check() allows idleTimeoutMs + the last burst / minReadRate of silence after it", () => {
  const admission = new Admission();
  // 4 MiB at the half-close, then a wakeup that took 256 KiB at 100 s:
  // 30 s + 256 KiB / 16 KiB/s = 46 s of silence after it.
  const reader = client(0, { eofAt: 0, bytesSent: 4 * MIB });
  const verdict = simulate(admission, reader, 1_000_000, (c, now) => {
    if (now === 100_000) {
      c.bytesSent += 256 * KIB;
      c.lastActivity = now;
    }
  });
  assert.deepEqual(verdict, { at: 147_000, reason: "slow_reader" });
});

Deno.test("Admission.check() counts the writes of one wakeup as one burst", () => {
  const admission = new Admission();
  const reader = client(0, { eofAt: 0, bytesSent: 4 * MIB });
  assert.equal(admission.check(reader, 99_000), undefined);
  // Two writes 500 ms apart, the sweep between them: one burst of 1 MiB.
  reader.bytesSent += 512 * KIB;
  reader.lastActivity = 100_000;
  assert.equal(admission.check(reader, 100_100), undefined);
  reader.bytesSent += 512 * KIB;
  reader.lastActivity = 100_500;
  assert.equal(admission.check(reader, 101_600), undefined);
  assert.equal(reader.lastBurst, MIB);
  // 30 s + 1 MiB / 16 KiB/s = 94 s after the last write.
  assert.equal(admission.check(reader, 194_500), undefined);
  assert.equal(admission.check(reader, 194_600), "slow_reader");
});

Deno.test("Admission.check() serves a reader at 16 KiB/s whatever its send buffer, with the receive window opening in steps", () => {
  const admission = new Admission();
  const total = 64 * MIB;
  // The send buffer drains as the receiver's window opens, in steps of a
  // 16th of a 6 MiB receive buffer; the writer wakes once a third of the
  // send buffer is free and fills it.
  const windowStep = 6 * MIB / 16;
  for (const sendBuffer of [64 * KIB, MIB, 4 * MIB]) {
    const reader = client(0, { eofAt: 0, bytesSent: sendBuffer + 6 * MIB });
    const verdict = simulate(admission, reader, 10_000_000, (c, now) => {
      const read = 16 * KIB * now / 1000;
      const drained = Math.floor(read / windowStep) * windowStep;
      const queued = c.bytesSent - 6 * MIB - drained;
      if (queued <= (sendBuffer * 2) / 3 && c.bytesSent < total) {
        c.bytesSent = Math.min(total, drained + 6 * MIB + sendBuffer);
        c.lastActivity = now;
      }
      return c.bytesSent === total;
    });
    assert.equal(verdict, undefined, `send buffer ${sendBuffer}`);
  }
});

Deno.test("Admission.check() with minReadRate 0 cuts off a stalled reader as idle", () => {
  const admission = new Admission({ minReadRate: 0 });
  const reader = client(0, { eofAt: 0, bytesSent: 4 * MIB });
  assert.deepEqual(simulate(admission, reader, 100_000, () => {}), {
    at: 31_000,
    reason: "idle",
  });
});

const A = "192.0.2.1";
const B = "198.51.100.2";
const C = "203.0.113.3";

/** `admission` with `clients` admitted, in that order. */
function holding(
  admission: Admission,
  clients: ClientProgress[],
): Admission {
  for (const c of clients) admission.admit(c);
  return admission;
}

Deno.test("Admission.slotVictim() takes from the biggest source for a newcomer from a smaller one, grace or not", () => {
  const attackers = Array.from(
    { length: 5 },
    (_, i) => client(9800 + i, { source: B }),
  );
  const good = client(0, { source: A, bytesReceived: 100, lastActivity: 0 });
  const admission = holding(new Admission({ evictionGraceMs: 2000 }), [
    good,
    ...attackers,
  ]);
  // All five are in their grace (accepted 100 ms ago): the oldest goes.
  assert.equal(admission.slotVictim(A, 10_000), attackers[0]);
  assert.equal(admission.slotVictim(C, 10_000), attackers[0]);
  // Once it is gone, the next oldest.
  admission.leave(attackers[0]);
  assert.equal(admission.slotVictim(A, 10_000), attackers[1]);
  assert.equal(admission.biggestSourceConnections, 4);
  assert.equal(admission.connections, 5);
});

Deno.test("Admission.slotVictim() takes from the biggest source one past its grace before one in it", () => {
  // Honest clients behind one address with slowloris among them.
  const admission = new Admission({ evictionGraceMs: 2000 });
  const hog = client(0, { source: B, bytesReceived: 5, lastActivity: 9000 });
  const upload = client(7000, {
    source: B,
    bytesReceived: 5 * MIB,
    lastActivity: 9999,
  });
  const good = client(9990, {
    source: B,
    bytesReceived: 50,
    lastActivity: 9995,
  });
  const fresh = client(9999, { source: B });
  holding(admission, [hog, upload, good, fresh]);
  // The hog, silent for 1 s, first.
  assert.equal(admission.slotVictim(A, 10_000), hog);
  admission.leave(hog);
  // Then one past its grace, moving bytes or not.
  assert.equal(admission.slotVictim(A, 10_000), upload);
  admission.leave(upload);
  // Grace or not, the source is the biggest: the slowest of those accepted
  // 125 ms ago or more, not the newest, whose bytes may not be read yet.
  assert.equal(admission.slotVictim(A, 10_000), undefined);
  assert.equal(admission.slotVictim(A, 10_200), fresh);
  // A newcomer that waited 125 ms takes the slowest of all.
  assert.equal(admission.slotVictim(A, 10_000, { waitedMs: 125 }), fresh);
});

Deno.test("Admission.slotVictim() treats a source one smaller than the biggest as the biggest", () => {
  // A swap would only make it the bigger of the two, and the next newcomer
  // of the other would swap back.
  const admission = new Admission({ evictionGraceMs: 2000 });
  const a = [client(9900, { source: A }), client(9900, { source: A })];
  const b = [1, 2, 3].map(() => client(9800, { source: B }));
  holding(admission, [...a, ...b]);
  assert.equal(admission.slotVictim(A, 10_000), undefined);
  assert.equal(admission.slotVictim(A, 10_900), a[0]);
  admission.leave(a[1]);
  assert.equal(admission.slotVictim(A, 10_000), b[0]);
});

Deno.test("Admission.slotVictim() gives a newcomer from the biggest source only one of its own past its grace", () => {
  const admission = new Admission({ evictionGraceMs: 2000 });
  const mine = [client(9900, { source: B }), client(9950, { source: B })];
  const theirs = client(0, { source: A });
  holding(admission, [theirs, ...mine]);
  // Its own are in their grace; the other source's silent client, far past
  // it, is not its to take.
  assert.equal(admission.slotVictim(B, 10_000), undefined);
  // A silent one is past its grace an eighth of the grace after it came.
  assert.equal(admission.slotVictim(B, 10_900), mine[0]);
  // A tie is as big: the same rule.
  admission.leave(mine[1]);
  assert.equal(admission.slotVictim(B, 10_000), undefined);
  assert.equal(admission.slotVictim(A, 10_000), theirs);
  assert.equal(
    new Admission({ evictionGraceMs: 0 }).slotVictim(A, 0),
    undefined,
  );
  assert.equal(new Admission().slotVictim(A, 0), undefined);
});

Deno.test("Admission.slotVictim() takes a silent client before an honest upload past its grace, from one address", () => {
  // Grace cycling: silent clients that leave after 1.8 s and reconnect,
  // beside an upload at 200 KB/s running for 2.5 s.
  const admission = new Admission({ evictionGraceMs: 2000 });
  const upload = client(7500, {
    source: A,
    bytesReceived: 500_000,
    lastActivity: 9990,
  });
  const cycling = [8300, 9000, 9800].map((at) => client(at, { source: A }));
  holding(admission, [upload, ...cycling]);
  assert.equal(admission.slotVictim(A, 10_000), cycling[0]);
  admission.leave(cycling[0]);
  assert.equal(admission.slotVictim(A, 10_000), cycling[1]);
  admission.leave(cycling[1]);
  // Only one in its grace is left beside the upload: the upload, moving
  // bytes, is not traded for a newcomer while a silent client waits.
  assert.equal(admission.slotVictim(A, 10_000), undefined);
  // Once none is silent, the upload past its 2 s is the one left to take.
  cycling[2].bytesReceived = 10;
  cycling[2].lastActivity = 9990;
  assert.equal(admission.slotVictim(A, 10_100), upload);
});

Deno.test("Admission.slotVictim() picks the lowest recent rate past the grace when none is silent", () => {
  const admission = new Admission({ evictionGraceMs: 2000 });
  const bulk = client(0, { source: A, bytesReceived: 50 * MIB });
  const trickler = client(0, {
    source: A,
    bytesReceived: 5,
    lastActivity: 9000,
  });
  const sending = client(9000, {
    source: A,
    bytesReceived: MIB,
    lastActivity: 9999,
  });
  const echoing = client(9000, { source: A, bytesReceived: 5, eofAt: 9000 });
  holding(admission, [bulk, trickler, sending, echoing]);
  assert.equal(admission.slotVictim(A, 10_000), trickler);
  // One already cut off is on its way out: not picked twice.
  trickler.cutOffReason = "evicted";
  assert.equal(admission.slotVictim(A, 10_000), bulk);
  admission.leave(trickler);
  admission.leave(bulk);
  // Moving bytes or echoing: in the grace.
  assert.equal(admission.slotVictim(A, 10_000), undefined);
});

Deno.test("Admission.slotVictim() judges a hog by its last window, not its fast start", () => {
  const admission = new Admission({ rateWindowMs: 5000 });
  // 63 MiB in the first second, then a byte every 5 s.
  const hog = client(0, { bytesReceived: 63 * MIB, lastActivity: 1000 });
  admission.check(hog, 5000);
  hog.bytesReceived++;
  admission.check(hog, 10_000);
  // Steady at 200 KB/s since accept.
  const steady = client(0, { bytesReceived: 2 * MIB, lastActivity: 10_000 });
  holding(admission, [steady, hog]);
  assert.equal(admission.slotVictim("", 10_000), hog);
});

Deno.test("Admission.biggestSourceConnections follows sources as they grow and shrink", () => {
  const admission = new Admission();
  const a = [client(0, { source: A }), client(0, { source: A })];
  const b = [1, 2, 3].map(() => client(0, { source: B }));
  holding(admission, [...a, ...b]);
  assert.equal(admission.biggestSourceConnections, 3);
  admission.leave(b[0]);
  assert.equal(admission.biggestSourceConnections, 2);
  admission.leave(b[1]);
  admission.leave(b[1]);
  assert.equal(admission.biggestSourceConnections, 2);
  assert.equal(admission.sourceConnections(B), 1);
  for (const c of a) admission.leave(c);
  assert.equal(admission.biggestSourceConnections, 1);
  admission.leave(b[2]);
  assert.equal(admission.biggestSourceConnections, 0);
  assert.equal(admission.connections, 0);
});

Deno.test("Admission.slotVictim() looks at a bounded number of a big source's clients", () => {
  // 16,384 clients of one source, none silent, the slowest the newest: a
  // newcomer gets the slowest of the oldest 32, not a scan of all.
  const admission = new Admission({ evictionGraceMs: 2000 });
  const clients = Array.from({ length: 16_384 }, (_, i) =>
    client(0, {
      source: A,
      bytesReceived: (16_384 - i) * KIB,
      lastActivity: 0,
    }));
  holding(admission, clients);
  assert.equal(admission.slotVictim(A, 10_000), clients[31]);
});

Deno.test("sourceKey() counts an IPv6 /64 as one source and IPv4 addresses one by one", () => {
  assert.equal(sourceKey("127.0.0.2"), "127.0.0.2");
  assert.equal(sourceKey("fd00:25::2"), "fd00:25:0:0::/64");
  assert.equal(sourceKey("fd00:25:0:0:ffff::9"), "fd00:25:0:0::/64");
  assert.equal(sourceKey("fd00:25:0:1::2"), "fd00:25:0:1::/64");
  assert.equal(sourceKey("FD00:0025:0000:0000::1"), "fd00:25:0:0::/64");
  assert.equal(sourceKey("[fe80::1%eth0]"), "fe80:0:0:0::/64");
  assert.equal(sourceKey("::ffff:127.0.0.2"), "127.0.0.2");
  assert.equal(sourceKey("64:ff9b::192.0.2.1"), "64:ff9b:0:0::/64");
  assert.equal(sourceKey("1:2:3:4:5:6:7:8"), "1:2:3:4::/64");
});

Deno.test("Admission.memoryVictims() frees the most buffer for the least progress first, as few as fit", () => {
  const admission = new Admission({ evictionGraceMs: 2000 });
  const hogs = [1, 2, 3].map(() =>
    client(0, { bufferedBytes: 63 * MIB, windowRate: 0.2 })
  );
  const tricklers = Array.from(
    { length: 100 },
    () => client(0, { bufferedBytes: 16 * KIB + 64, windowRate: 0.2 }),
  );
  const uploader = client(0, { bufferedBytes: 40 * MIB, windowRate: 80 * MIB });
  const asking = client(9990, { bufferedBytes: 64 });
  const all = [uploader, ...tricklers, ...hogs, asking];
  const victims = admission.memoryVictims(all, asking, 1 * MIB, 10_000);
  assert.deepEqual(victims, [hogs[0]]);
  const more = admission.memoryVictims(all, asking, 100 * MIB, 10_000);
  assert.deepEqual(more, [hogs[0], hogs[1]]);
  // Not enough to free even with everyone: evict no one.
  assert.equal(
    admission.memoryVictims(all, asking, 1000 * MIB, 10_000),
    undefined,
  );
  // The asking client is never chosen; nobody is with eviction off.
  assert.equal(admission.memoryVictims([asking], asking, 1, 10_000), undefined);
  assert.equal(
    new Admission({ evictionGraceMs: 0 }).memoryVictims(
      all,
      asking,
      1,
      10_000,
    ),
    undefined,
  );
});

Deno.test("Admission.rate() credits a reader with its average since the half-close", () => {
  const admission = new Admission({ rateWindowMs: 5000 });
  const reader = client(0, { bytesReceived: MIB, eofAt: 1000 });
  admission.check(reader, 5000);
  reader.bytesSent = 2 * MIB;
  admission.check(reader, 10_000);
  reader.windowRate = 0; // nothing completed in the last window
  assert.equal(admission.rate(reader, 11_000), 2 * MIB * 1000 / 10_000);
});

Deno.test("Admission.memoryVictims() between scans scores its candidates afresh and counts clients admitted since", () => {
  const admission = new Admission({ evictionGraceMs: 2000 });
  const source = { source: "192.0.2.7" };
  const fast = newProgress(0, source);
  fast.bufferedBytes = 4 * MIB;
  fast.windowRate = 50 * MIB;
  const slow = newProgress(0, source);
  slow.bufferedBytes = 1 * MIB;
  slow.windowRate = 20 * MIB;
  const asking = newProgress(0, source);
  const clients = new Set([fast, slow, asking]);
  for (const client of clients) admission.admit(client);
  // The scan: fast scores higher than slow.
  assert.deepEqual(admission.memoryVictims(clients, asking, 1, 1000), [fast]);
  // slow stalls with more held: it goes first now, not as scanned.
  slow.bufferedBytes = 8 * MIB;
  slow.windowRate = 0;
  assert.deepEqual(admission.memoryVictims(clients, asking, 1, 1010), [slow]);
  // A hog admitted after the scan is a candidate before the next one.
  const hog = newProgress(1020, source);
  hog.bufferedBytes = 32 * MIB;
  hog.windowRate = 0;
  clients.add(hog);
  admission.admit(hog);
  assert.deepEqual(admission.memoryVictims(clients, asking, 1, 1030), [hog]);
});
