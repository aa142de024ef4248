import assert from "node:assert/strict";
import { Admission, type ClientProgress, newProgress } from "./admission.ts";

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

Deno.test("Admission.slotVictim() picks the lowest recent rate, never a client in its grace", () => {
  const admission = new Admission({ evictionGraceMs: 2000 });
  const bulk = client(0, { bytesReceived: 50 * MIB });
  const trickler = client(0, { bytesReceived: 5, lastActivity: 9000 });
  const silent = client(0, { lastActivity: 0 });
  const newcomer = client(9900);
  const all = [bulk, trickler, silent, newcomer];
  assert.equal(admission.slotVictim(all, 10_000), silent);
  assert.equal(
    admission.slotVictim([bulk, trickler, newcomer], 10_000),
    trickler,
  );
  assert.equal(admission.slotVictim([newcomer], 10_000), undefined);
  // One already cut off is on its way out: not picked twice.
  silent.cutOffReason = "evicted";
  assert.equal(admission.slotVictim(all, 10_000), trickler);
  assert.equal(
    new Admission({ evictionGraceMs: 0 }).slotVictim(all, 10_000),
    undefined,
  );
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
  assert.equal(admission.slotVictim([steady, hog], 10_000), hog);
});

Deno.test("Admission.slotVictim() takes a newcomer silent for an eighth of the grace, not one still moving", () => {
  const admission = new Admission({ evictionGraceMs: 2000 });
  // Reconnected 1 s ago, sent a byte at once, silent since.
  const reconnected = client(9000, { bytesReceived: 1, lastActivity: 9000 });
  // Connected as long, sending 1 MiB/s.
  const sending = client(9000, { bytesReceived: MIB, lastActivity: 9999 });
  // Half-closed: its echo is on the way, whatever its reader does.
  const echoing = client(9000, { bytesReceived: 5, eofAt: 9000 });
  assert.equal(
    admission.slotVictim([sending, echoing, reconnected], 10_000),
    reconnected,
  );
  assert.equal(admission.slotVictim([sending, echoing], 10_000), undefined);
});

Deno.test("Admission.slotVictim() never takes a newcomer whose bytes the server has not read yet", () => {
  const admission = new Admission({ evictionGraceMs: 2000 });
  // Accepted 1 s ago; its bytes may still sit unread in the kernel.
  const unread = client(9000);
  // Connected as long, sent a byte at once, silent since.
  const trickler = client(9000, { bytesReceived: 1, lastActivity: 9000 });
  assert.equal(admission.slotVictim([unread, trickler], 10_000), trickler);
  assert.equal(admission.slotVictim([unread], 10_000), undefined);
  // Past the whole grace it is as evictable as any.
  assert.equal(admission.slotVictim([unread], 11_000), unread);
});

Deno.test("Admission.msUntilEvictable() waits for the first grace to end", () => {
  const admission = new Admission({ evictionGraceMs: 2000 });
  // Silent since a first byte: past the grace 250 ms after it.
  assert.equal(
    admission.msUntilEvictable([
      client(900, { bytesReceived: 1, lastActivity: 900 }),
      client(800, { bytesReceived: 1, lastActivity: 800 }),
    ], 1000),
    50,
  );
  // Nothing read yet: the whole grace.
  assert.equal(
    admission.msUntilEvictable([client(900), client(800)], 1000),
    1800,
  );
  // Moving bytes: an eighth of the grace after its last byte at most.
  assert.equal(
    admission.msUntilEvictable([
      client(500, { bytesReceived: 1, lastActivity: 1000 }),
    ], 1000),
    250,
  );
  assert.equal(
    admission.msUntilEvictable([client(500, { eofAt: 600 })], 1000),
    1500,
  );
  assert.equal(admission.msUntilEvictable([client(0)], 3000), 0);
  assert.equal(admission.msUntilEvictable([], 3000), Infinity);
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
