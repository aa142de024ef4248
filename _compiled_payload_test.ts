import assert from "node:assert/strict";
import { readCompiledPayload } from "./_compiled_payload.ts";

Deno.test("readCompiledPayload() rejects an ELF binary without a d3n0l4nd note", async () => {
  await assert.rejects(
    readCompiledPayload(Deno.execPath()),
    /^Error: 0 ELF notes named d3n0l4nd, expected 1$/,
  );
});

Deno.test("readCompiledPayload() rejects a file that is not ELF", async () => {
  await assert.rejects(
    readCompiledPayload(new URL("./main.ts", import.meta.url).pathname),
    /^Error: not an ELF file$/,
  );
});
