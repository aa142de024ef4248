import assert from "node:assert/strict";
import denoJson from "./deno.json" with { type: "json" };
import { exchange, USAGE } from "./send.ts";
import {
  assertUsageError,
  closedPort,
  killAfter,
  readAll,
  runCommand,
  startServer,
} from "./test_util.ts";

const REPO = new URL(".", import.meta.url).pathname;
const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** `deno task send`'s command, word for word from deno.json. */
const sendTask = denoJson.tasks.send.trim().split(/\s+/);

/** The result of one run of the send task, stdout as bytes. */
interface SendRun {
  code: number;
  stdout: Uint8Array;
  stderr: string;
}

/** Runs the send task with `args`, and `input` (or nothing) on stdin. */
async function runSend(args: string[], input?: Uint8Array): Promise<SendRun> {
  assert.deepEqual(sendTask.slice(0, 2), ["deno", "run"]);
  const child = new Deno.Command(Deno.execPath(), {
    args: [...sendTask.slice(1), ...args],
    cwd: REPO,
    stdin: input ? "piped" : "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  using _timeout = killAfter(child, 60_000);
  if (input) {
    const writer = child.stdin.getWriter();
    await writer.write(input);
    await writer.close();
  }
  const output = await child.output();
  return {
    code: output.code,
    stdout: output.stdout,
    stderr: decoder.decode(output.stderr),
  };
}

/** Asserts that a send run exited 1 with exactly `stderr`. */
function assertFailed(result: SendRun, stderr: string): void {
  assert.equal(result.stderr, stderr);
  assert.equal(result.code, 1);
}

/**
 * A peer on an ephemeral port that reads one client to EOF and answers
 * with `reply(received)` instead of an echo.
 */
function startPeer(reply: (received: Uint8Array) => Uint8Array) {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  let accepted = false;
  const served = (async () => {
    using conn = await listener.accept();
    accepted = true;
    const answer = reply(await readAll(conn));
    for (let n = 0; n < answer.length;) {
      n += await conn.write(answer.subarray(n));
    }
  })();
  return {
    port: listener.addr.port,
    async [Symbol.asyncDispose]() {
      // Closed first, so that an accept() still waiting (the client never
      // came: the test failed before) ends instead of hanging the test.
      listener.close();
      try {
        await served;
      } catch (error) {
        if (accepted) throw error;
      }
    },
  };
}

Deno.test("exchange() sends a message, half-closes and returns the reply", async () => {
  await using s = startServer();
  const message = encoder.encode("hello");
  {
    using conn = await Deno.connect({ hostname: "127.0.0.1", port: s.port });
    assert.deepEqual(await exchange(conn, message), message);
  }
  await s.server.shutdown();
  assert.deepEqual(s.records, [[1, 5]]);
});

Deno.test("exchange() gets an empty reply to an empty message", async () => {
  await using s = startServer();
  {
    using conn = await Deno.connect({ hostname: "127.0.0.1", port: s.port });
    assert.deepEqual(await exchange(conn, new Uint8Array()), new Uint8Array());
  }
  await s.server.shutdown();
  assert.deepEqual(s.records, [[1, 0]]);
});

Deno.test("deno task send prints the reply on stdout, the counts on stderr, exits 0", async () => {
  await using s = startServer();
  const result = await runSend(["--port", String(s.port), "hello"]);
  assert.equal(result.stderr, "sent 5 bytes, received 5 bytes\n");
  assert.equal(decoder.decode(result.stdout), "hello");
  assert.equal(result.code, 0);
});

Deno.test("deno task send sends standard input without a message, byte for byte", async () => {
  await using s = startServer();
  const input = new Uint8Array(1024 * 1024);
  for (let i = 0; i < input.length; i += 65536) {
    crypto.getRandomValues(input.subarray(i, i + 65536));
  }
  const result = await runSend(["--port", String(s.port)], input);
  assert.equal(result.stderr, "sent 1048576 bytes, received 1048576 bytes\n");
  assert.ok(
    result.stdout.length === input.length &&
      result.stdout.every((byte, i) => byte === input[i]),
    "stdout is the input",
  );
  assert.equal(result.code, 0);
});

Deno.test("deno task send exits 1 when the reply differs, and says from which byte", async () => {
  await using peer = startPeer(() => encoder.encode("hellO"));
  const result = await runSend(["--port", String(peer.port), "hello"]);
  assert.equal(decoder.decode(result.stdout), "hellO");
  assertFailed(
    result,
    "sent 5 bytes, received 5 bytes\n" +
      "send: the reply differs from what was sent, from byte 4 on\n",
  );
});

Deno.test("deno task send exits 1 when the server cuts it off", async () => {
  await using s = startServer({ maxClientBytes: 1000 });
  const result = await runSend(
    ["--port", String(s.port)],
    new Uint8Array(1024 * 1024),
  );
  // Cut off while sending or reading: a reset, or a short reply.
  assert.match(
    result.stderr,
    /^(send: lost the connection to 127\.0\.0\.1:\d+: .+|sent 1048576 bytes, received 0 bytes\nsend: the reply differs from what was sent, from byte 0 on)\n$/,
  );
  assert.equal(result.code, 1);
});

Deno.test("deno task send prints one line for a refused connection, exits 1", async () => {
  const port = closedPort();
  const result = await runSend(["--port", String(port), "hello"]);
  assertFailed(
    result,
    `send: cannot connect to 127.0.0.1:${port}: connection refused (is the server running? check --host and --port)\n`,
  );
  assert.equal(result.stdout.length, 0);
});

Deno.test("deno task send reaches only this machine, names the command for another host", async () => {
  // 192.0.2.1 is TEST-NET-1: the permission check refuses it before any
  // packet is sent.
  const result = await runSend(["--host", "192.0.2.1", "hello"]);
  assertFailed(
    result,
    "send: cannot connect to 192.0.2.1:4000: not allowed (the send task reaches only this machine; " +
      "run deno run --allow-net=192.0.2.1:4000 send.ts --host 192.0.2.1 --port 4000)\n",
  );
});

Deno.test("deno task send rejects bad flags with the usage, exits 2", async () => {
  const usage = USAGE.split("\n")[0];
  const run = (args: string[]) =>
    runCommand(Deno.execPath(), [...sendTask.slice(1), ...args], {
      cwd: REPO,
    });
  assertUsageError(
    await run(["--bogus"]),
    "send: Unknown option '--bogus'",
    usage,
  );
  assertUsageError(
    await run(["--port", "0", "hi"]),
    "send: --port must be a whole number from 1 to 65535, not '0'",
    usage,
  );
  assertUsageError(
    await run(["hello", "world"]),
    "send: one MESSAGE at most (quote it if it has spaces), not 2",
    usage,
  );
  assertUsageError(
    await run(["--host", "", "hi"]),
    "send: --host must not be empty",
    usage,
  );
});

Deno.test("deno task send --help prints the usage, exits 0", async () => {
  const result = await runCommand(
    Deno.execPath(),
    [...sendTask.slice(1), "--help"],
    { cwd: REPO },
  );
  assert.deepEqual(result, { code: 0, stdout: `${USAGE}\n`, stderr: "" });
});

Deno.test("./send.ts runs with deno task send's flags through its shebang line", async () => {
  const firstLine = (await Deno.readTextFile(`${REPO}send.ts`)).split("\n")[0];
  assert.equal(
    firstLine,
    `#!/usr/bin/env -S ${sendTask.slice(0, -1).join(" ")}`,
  );
  assert.equal(sendTask.at(-1), "send.ts");
});
