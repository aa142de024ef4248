import assert from "node:assert/strict";
import { Diagnostics, type DiagnosticsOutput } from "./diagnostics.ts";
import { killAfter, Lines, spawnChild } from "./test_util.ts";

/** An output whose writes complete only when the test says so. */
class StalledOutput implements DiagnosticsOutput {
  /** Every write call's text, in order. */
  readonly calls: string[] = [];
  #pending: Array<() => void> = [];

  write(bytes: Uint8Array): Promise<number> {
    this.calls.push(new TextDecoder().decode(bytes));
    const { promise, resolve } = Promise.withResolvers<number>();
    this.#pending.push(() => resolve(bytes.length));
    return promise;
  }

  /** Completes the writes in progress; returns how many there were. */
  release(): number {
    const pending = this.#pending;
    this.#pending = [];
    for (const complete of pending) complete();
    return pending.length;
  }

  /** Completes writes until no more come. */
  async releaseAll(): Promise<void> {
    while (this.release() > 0) {
      // Let the queue start its next write.
      await Promise.resolve();
      await Promise.resolve();
    }
  }
}

Deno.test("Diagnostics.write() returns at once and the lines go out in order, one write for those queued meanwhile", async () => {
  const output = new StalledOutput();
  const diagnostics = new Diagnostics({ output });
  diagnostics.write("one");
  diagnostics.write("two");
  diagnostics.write("three");
  // The first write is in progress; the others wait for it.
  assert.deepEqual(output.calls, ["one\n"]);
  await output.releaseAll();
  assert.equal(await diagnostics.flush(), true);
  assert.deepEqual(output.calls, ["one\n", "two\nthree\n"]);
  assert.equal(diagnostics.dropped, 0);
});

Deno.test("Diagnostics drops lines past maxQueuedBytes while its output is stalled, then reports how many", async () => {
  const output = new StalledOutput();
  const diagnostics = new Diagnostics({ output, maxQueuedBytes: 100 });
  // 10 bytes each with the newline: 10 fit, the write in progress included.
  for (let i = 0; i < 25; i++) diagnostics.write(`line ${i}`.padEnd(9, "."));
  assert.equal(diagnostics.dropped, 15);
  assert.equal(await diagnostics.flush({ timeoutMs: 1 }), false);
  await output.releaseAll();
  assert.equal(await diagnostics.flush(), true);
  assert.deepEqual(output.calls.join("").split("\n"), [
    ...Array.from({ length: 10 }, (_, i) => `line ${i}`.padEnd(9, ".")),
    "(15 diagnostic lines dropped: stderr was not read fast enough)",
    "",
  ]);
  // Room again: lines are queued, not dropped.
  diagnostics.write("after");
  await output.releaseAll();
  assert.equal(output.calls.at(-1), "after\n");
  assert.equal(diagnostics.dropped, 15);
});

for (
  const [cause, error] of [
    ["EPIPE", new Deno.errors.BrokenPipe("Broken pipe")],
    // What Deno.stderr.write() rejects with once the terminal has closed.
    [
      "EIO from a closed terminal",
      new Error("Input/output error (os error 5)"),
    ],
  ] as const
) {
  Deno.test(`Diagnostics stops writing once its output fails (${cause}), and counts what it drops`, async () => {
    let calls = 0;
    const diagnostics = new Diagnostics({
      output: {
        write() {
          calls++;
          return Promise.reject(error);
        },
      },
    });
    diagnostics.write("one");
    diagnostics.write("two");
    assert.equal(await diagnostics.flush(), true);
    diagnostics.write("three");
    assert.equal(await diagnostics.flush(), true);
    assert.equal(calls, 1);
    assert.equal(diagnostics.dropped, 3);
  });
}

Deno.test("Diagnostics keeps a process running while nobody reads its stderr pipe, then reports what it dropped", async () => {
  // 2000 lines of 100 bytes: three times what a pipe holds (64 KiB). With
  // console.error the child would block in write(2) at about line 650.
  const script = `
    import { Diagnostics } from ${
    JSON.stringify(new URL("./diagnostics.ts", import.meta.url).href)
  };
    const diagnostics = new Diagnostics();
    for (let i = 0; i < 2000; i++) {
      diagnostics.write(String(i).padStart(4, "0") + " " + "x".repeat(94));
      // A timer still runs between lines.
      if (i % 100 === 99) await new Promise((resolve) => setTimeout(resolve, 0));
    }
    console.log("dropped " + diagnostics.dropped);
    await diagnostics.flush({ timeoutMs: 60_000 });
  `;
  const child = spawnChild(Deno.execPath(), ["eval", "--ext=ts", script]);
  using _timeout = killAfter(child, 30_000);
  const stdout = new Lines(child.stdout);
  // stderr is not read until the child has written every line.
  const [, dropped] = await stdout.next(/^dropped (\d+)$/);
  assert.ok(Number(dropped) > 0, "nothing was dropped: was stderr read?");
  const stderr = new Lines(child.stderr);
  await Promise.all([stdout.done, stderr.done]);
  assert.equal((await child.status).code, 0, stderr.lines.join("\n"));
  const written = stderr.lines.slice(0, -1);
  written.forEach((line, i) =>
    assert.ok(line.startsWith(String(i).padStart(4, "0")), line)
  );
  assert.equal(written.length + Number(dropped), 2000);
  assert.equal(
    stderr.lines.at(-1),
    `(${dropped} diagnostic lines dropped: stderr was not read fast enough)`,
  );
});
