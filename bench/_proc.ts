/**
 * Reads another process's figures from Linux's `/proc` for the bench
 * scripts. Deno asks for `--allow-all` to read another process's `/proc`
 * files, so `cat` and `ls` read them: the scripts need `--allow-run`.
 *
 * @module
 */

/**
 * The resident set size of process `pid` (`VmRSS`), in KiB.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * assert.ok(await readRssKiB(Deno.pid) > 0);
 * ```
 */
export async function readRssKiB(pid: number): Promise<number> {
  return await readKiB(`/proc/${pid}/status`, "VmRSS");
}

/**
 * The kernel's slab memory (`Slab` in `/proc/meminfo`), in KiB: where
 * socket buffers and other kernel objects live.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * assert.ok(await readSlabKiB() > 0);
 * ```
 */
export async function readSlabKiB(): Promise<number> {
  return await readKiB("/proc/meminfo", "Slab");
}

/**
 * How many file descriptors process `pid` has open.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * assert.ok(await countFds(Deno.pid) >= 3);
 * ```
 */
export async function countFds(pid: number): Promise<number> {
  const listing = await output("ls", ["-U", `/proc/${pid}/fd`]);
  return listing.split("\n").filter((name) => name !== "").length;
}

/**
 * The soft limit on open files of process `pid`; `Infinity` if unlimited.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * assert.ok(await openFileLimit(Deno.pid) > 0);
 * ```
 */
export async function openFileLimit(pid: number): Promise<number> {
  const limits = await output("cat", [`/proc/${pid}/limits`]);
  const match = /^Max open files\s+(\d+|unlimited)/m.exec(limits);
  if (match === null) throw new Error(`no open file limit in /proc/${pid}`);
  return match[1] === "unlimited" ? Infinity : Number(match[1]);
}

/**
 * A counter of the kernel's TCP extension statistics (the `TcpExt:` lines of
 * `/proc/net/netstat`, this network namespace's), such as `EmbryonicRsts`:
 * resets received for a connection still in `SYN_RECV`, one whose final
 * handshake ACK a full accept queue dropped, which no `accept()` will see.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * assert.ok(await readTcpExt("EmbryonicRsts") >= 0);
 * ```
 */
export async function readTcpExt(name: string): Promise<number> {
  // Two lines: the counters' names, then their values.
  const [names, values] = (await output("cat", ["/proc/net/netstat"]))
    .split("\n")
    .filter((line) => line.startsWith("TcpExt: "))
    .map((line) => line.split(" "));
  const index = names?.indexOf(name) ?? -1;
  if (index < 1 || values === undefined) {
    throw new Error(`no TcpExt ${name} in /proc/net/netstat`);
  }
  return Number(values[index]);
}

async function readKiB(path: string, key: string): Promise<number> {
  const text = await output("cat", [path]);
  const match = new RegExp(`^${key}:\\s+(\\d+) kB$`, "m").exec(text);
  if (match === null) throw new Error(`no ${key} in ${path}`);
  return Number(match[1]);
}

async function output(program: string, args: string[]): Promise<string> {
  const { success, stdout, stderr } = await new Deno.Command(program, {
    args,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const decoder = new TextDecoder();
  if (!success) {
    throw new Error(`${program} ${args.join(" ")}: ${decoder.decode(stderr)}`);
  }
  return decoder.decode(stdout);
}
