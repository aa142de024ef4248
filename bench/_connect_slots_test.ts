import assert from "node:assert/strict";
import { ConnectSlots } from "./_connect_slots.ts";

Deno.test("ConnectSlots hands a released slot to the longest waiting, not to a newcomer", async () => {
  const slots = new ConnectSlots(2);
  assert.equal(await slots.acquire(), true);
  assert.equal(await slots.acquire(), true);
  const order: string[] = [];
  const first = (async () => {
    assert.equal(await slots.acquire(), true);
    order.push("first");
  })();
  const second = (async () => {
    assert.equal(await slots.acquire(), true);
    order.push("second");
  })();
  slots.release();
  // A newcomer arriving before the waiter runs finds no free slot.
  let newcomerGot = false;
  const newcomer = (async () => {
    newcomerGot = await slots.acquire();
    order.push("newcomer");
  })();
  await first;
  assert.deepEqual(order, ["first"]);
  slots.release();
  await second;
  assert.deepEqual(order, ["first", "second"]);
  assert.equal(newcomerGot, false);
  slots.release();
  await newcomer;
  assert.deepEqual(order, ["first", "second", "newcomer"]);
});

Deno.test("ConnectSlots.acquire() gives up on abort, and the slot skips it", async () => {
  const slots = new ConnectSlots(1);
  assert.equal(await slots.acquire(), true);
  const abort = new AbortController();
  const aborted = slots.acquire(abort.signal);
  const waiting = slots.acquire();
  abort.abort();
  assert.equal(await aborted, false);
  slots.release();
  assert.equal(await waiting, true);
  // The aborted waiter took no slot: one release frees one again.
  slots.release();
  assert.equal(await slots.acquire(), true);
  assert.equal(slots.acquire(AbortSignal.abort()), false);
});
