// N clients each send SIZE bytes and wait (no half-close yet); the server's
// RSS growth per client, then all are echoed and checked.
// deno run --allow-net --allow-run=cat bench/hold_memory.ts PORT SERVER_PID N SIZE
const [port, pid, n, size] = Deno.args.map(Number);
// Deno only reads another process's /proc files with -A; cat needs less.
const status = () =>
  new TextDecoder().decode(
    new Deno.Command("cat", { args: [`/proc/${pid}/status`] }).outputSync()
      .stdout,
  );
const kib = (key: string) =>
  Number(new RegExp(`${key}:\\s+(\\d+)`).exec(status())![1]);
const payload = new Uint8Array(size).fill(7);
const before = kib("VmRSS");
const conns = await Promise.all(
  Array.from({ length: n }, () => Deno.connect({ port })),
);
await Promise.all(conns.map(async (c) => {
  for (let o = 0; o < size;) o += await c.write(payload.subarray(o));
}));
await new Promise((r) => setTimeout(r, 2000)); // the server reads what the kernel still buffers
const held = kib("VmRSS") - before;
await Promise.all(conns.map(async (c) => {
  await c.closeWrite();
  const b = new Uint8Array(1 << 20);
  let got = 0;
  for (let k; (k = await c.read(b)) !== null;) got += k;
  c.close();
  if (got !== size) throw new Error(`short reply: ${got}`);
}));
console.log(
  `held: +${(held / 1024).toFixed(0)} MiB = ${
    (held * 1024 / n / size).toFixed(3)
  }x payload per client; ` +
    `peak after echoing: ${(kib("VmHWM") / 1024).toFixed(0)} MiB (started at ${
      (before / 1024).toFixed(0)
    } MiB)`,
);
