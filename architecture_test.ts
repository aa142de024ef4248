// ARCHITECTURE.md stays true where a test can tell: the tests it names exist
// under those names, its code map lists every top-level module, and it points
// at nothing outside the repository.
import assert from "node:assert/strict";

const ROOT = new URL(".", import.meta.url);
const architecture = await Deno.readTextFile(new URL("ARCHITECTURE.md", ROOT));

/** The text of every `*_test.ts` file under `dir`, recursively. */
async function testSources(dir: URL): Promise<string[]> {
  const sources: string[] = [];
  for await (const entry of Deno.readDir(dir)) {
    if (entry.name.startsWith(".")) continue;
    if (entry.isDirectory) {
      sources.push(...await testSources(new URL(`${entry.name}/`, dir)));
    } else if (entry.isFile && entry.name.endsWith("_test.ts")) {
      sources.push(await Deno.readTextFile(new URL(entry.name, dir)));
    }
  }
  return sources;
}

/** The text between heading `## title` and the next `## ` heading. */
function section(title: string): string {
  const start = architecture.indexOf(`\n## ${title}\n`);
  assert.ok(start >= 0, `ARCHITECTURE.md has no "## ${title}" section`);
  const end = architecture.indexOf("\n## ", start + 1);
  return architecture.slice(start, end < 0 ? undefined : end);
}

Deno.test("ARCHITECTURE.md names only tests that exist", async () => {
  // A test name is backticked text of five words or more: no code span in
  // the document is that long. Each must open a string or template literal
  // in a test file, word for word, and end it (or end where a `${…}` suffix
  // such as "(ignored: …)" begins), so that it can be grepped as written.
  const names = [...architecture.matchAll(/`([^`]+)`/g)]
    .map(([, text]) => text)
    .filter((text) => text.split(/\s+/).length >= 5);
  assert.ok(names.length >= 40, `only ${names.length} test names found`);
  const sources = await testSources(ROOT);
  const missing = names.filter((name) =>
    !sources.some((source) =>
      [`"`, "`", "'"].some((quote) =>
        source.includes(quote + name + quote) ||
        source.includes(quote + name + "${")
      )
    )
  );
  assert.deepEqual(missing, []);
});

Deno.test("ARCHITECTURE.md's code map names every top-level module", async () => {
  const codeMap = section("Code map");
  const modules: string[] = [];
  for await (const entry of Deno.readDir(ROOT)) {
    if (
      entry.isFile && entry.name.endsWith(".ts") &&
      !entry.name.endsWith("_test.ts")
    ) {
      modules.push(entry.name);
    }
  }
  assert.ok(modules.includes("server.ts"));
  const missing = modules.filter((name) => !codeMap.includes(`\`${name}\``));
  assert.deepEqual(missing.sort(), []);
});

Deno.test("ARCHITECTURE.md points at no path outside the repository", () => {
  assert.deepEqual(architecture.match(/\.\.\/\S*/g) ?? [], []);
});
