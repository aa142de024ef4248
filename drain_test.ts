import assert from "node:assert/strict";
import { Drain } from "./drain.ts";
import { FakeClock } from "./test_util.ts";

function drainWith() {
  const clock = new FakeClock();
  let expiries = 0;
  const drain = new Drain(() => expiries++, { clock });
  return { clock, drain, expiries: () => expiries };
}

Deno.test("Drain.endWithin() runs onExpire once at the deadline", () => {
  const { clock, drain, expiries } = drainWith();
  drain.endWithin(10_000);
  clock.advance(9_999);
  assert.equal(drain.expired, false);
  assert.equal(expiries(), 0);
  clock.advance(1);
  assert.equal(drain.expired, true);
  assert.equal(expiries(), 1);
  clock.advance(60_000);
  assert.equal(expiries(), 1);
});

Deno.test("Drain.endWithin() brings the deadline forward, never back", () => {
  const { clock, drain, expiries } = drainWith();
  drain.endWithin(10_000);
  clock.advance(1_000);
  // A retry with the default ends at 11 s: later, so it changes nothing.
  drain.endWithin(10_000);
  assert.equal(clock.pending, 1);
  clock.advance(8_999);
  assert.equal(expiries(), 0);
  clock.advance(1);
  assert.equal(expiries(), 1);

  const second = drainWith();
  second.drain.endWithin(10_000);
  second.clock.advance(1_000);
  // A second signal's 0 cuts off at once.
  second.drain.endWithin(0);
  second.clock.advance(0);
  assert.equal(second.expiries(), 1);
  assert.equal(second.clock.pending, 0);
});

Deno.test("Drain.finish() cancels the deadline and resolves done", async () => {
  const { clock, drain, expiries } = drainWith();
  drain.endWithin(10_000);
  drain.finish();
  assert.equal(clock.pending, 0);
  await drain.done;
  // Finished: a later deadline sets no timer.
  drain.endWithin(0);
  clock.advance(20_000);
  assert.equal(clock.pending, 0);
  assert.equal(expiries(), 0);
  assert.equal(drain.expired, false);
});
