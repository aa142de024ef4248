import assert from "node:assert/strict";
import {
  formatIPv4,
  formatIPv6,
  isIPv4Mapped,
  parseIPv4,
  parseIPv6,
  readIPv4,
} from "./_ip.ts";

// Both lists checked against glibc's inet_pton (Python's socket.inet_pton).
const validIPv6 = [
  "::",
  "::1",
  "1::",
  "1:2:3:4:5:6:7:8",
  "1:2:3:4:5:6:7::",
  "::2:3:4:5:6:7:8",
  "1::8",
  "::ffff:1.2.3.4",
  "::1.2.3.4",
  "1:2:3:4:5:6:1.2.3.4",
  "1::1.2.3.4",
  "1:2:3:4:5::1.2.3.4",
  "ABCD:ef01::",
  "0000:0000::00:0",
  "fe80::1:0:0:0",
  "::0.0.0.0",
];
const invalidIPv6 = [
  "",
  ":",
  ":::",
  "1:::2",
  "1::2::3",
  ":1::2",
  "1::2:",
  "1:2:3:4:5:6:7",
  "1:2:3:4:5:6:7:8:9",
  "1:2:3:4:5:6:7::8",
  "::1:2:3:4:5:6:7:8",
  "12345::",
  "g::",
  "::ffff:1.2.3.04",
  "::ffff:1.2.3",
  "::ffff:1.2.3.256",
  "1:2:3:4:5:6:7:1.2.3.4",
  "1.2.3.4::",
  "::1.2.3.4:5",
  "fe80::1%eth0",
  "[::1]",
  " ::1",
  "::1 ",
  "1:2:3:4:5:6::1.2.3.4",
  "::ffff:01.2.3.4",
  "::ffff:1.2.3.4.5",
  "::ffff:.1.2.3",
  "1.2.3.4",
  "::-1",
  "::+1",
  "::0x1",
];
const validIPv4 = ["0.0.0.0", "255.255.255.255", "1.2.3.4", "10.0.0.1"];
const invalidIPv4 = [
  "01.2.3.4",
  "1.2.3",
  "1.2.3.4.5",
  "256.1.1.1",
  "1..2.3",
  ".1.2.3",
  "1.2.3.",
  "a.b.c.d",
  "1.2.3.4 ",
  " 1.2.3.4",
  "1.2.3.-4",
  "1.2.3.+4",
  "0x1.2.3.4",
  "1.2.3.0004",
  "",
];

/** A small deterministic generator (xorshift32): the same cases each run. */
function generator(seed: number): () => number {
  return () => {
    seed ^= seed << 13;
    seed ^= seed >>> 17;
    seed ^= seed << 5;
    return (seed >>> 0) / 0x100000000;
  };
}

Deno.test("parseIPv4() accepts what inet_pton accepts, and nothing else", () => {
  for (const text of validIPv4) {
    assert.equal(formatIPv4(parseIPv4(text)!), text);
  }
  for (const text of invalidIPv4) {
    assert.equal(parseIPv4(text), undefined, JSON.stringify(text));
  }
  assert.equal(parseIPv4("255.255.255.255"), 0xffffffff);
  assert.equal(parseIPv4("x1.2.3.4y", 1, 8), 0x01020304);
});

Deno.test("parseIPv6() accepts what inet_pton accepts, and nothing else", () => {
  for (const text of validIPv6) {
    assert.ok(parseIPv6(text) !== undefined, text);
  }
  for (const text of invalidIPv6) {
    assert.equal(parseIPv6(text), undefined, JSON.stringify(text));
  }
});

Deno.test("parseIPv6() reads every zero run and tail into the right bytes, overwriting a reused buffer", () => {
  const into = new Uint8Array(16).fill(0xaa);
  const cases: [string, number[]][] = [
    ["::", [0, 0, 0, 0, 0, 0, 0, 0]],
    ["::1", [0, 0, 0, 0, 0, 0, 0, 1]],
    ["1::", [1, 0, 0, 0, 0, 0, 0, 0]],
    ["1::8", [1, 0, 0, 0, 0, 0, 0, 8]],
    ["1:2::7:8", [1, 2, 0, 0, 0, 0, 7, 8]],
    ["1:2:3:4:5:6:7::", [1, 2, 3, 4, 5, 6, 7, 0]],
    ["::2:3:4:5:6:7:8", [0, 2, 3, 4, 5, 6, 7, 8]],
    ["ffff:FFFF::abcd", [0xffff, 0xffff, 0, 0, 0, 0, 0, 0xabcd]],
    ["::ffff:1.2.3.4", [0, 0, 0, 0, 0, 0xffff, 0x0102, 0x0304]],
    ["1::255.0.0.1", [1, 0, 0, 0, 0, 0, 0xff00, 0x0001]],
  ];
  for (const [text, groups] of cases) {
    into.fill(0xaa);
    assert.equal(parseIPv6(text, into), into);
    const expected = new Uint8Array(groups.flatMap((g) => [g >> 8, g & 0xff]));
    assert.deepEqual(into, expected, text);
  }
  assert.deepEqual(
    parseIPv6("[::1]", new Uint8Array(16), 1, 4),
    new Uint8Array([...new Array(15).fill(0), 1]),
  );
});

Deno.test("formatIPv6() writes RFC 5952's canonical form", () => {
  const cases: [string, string][] = [
    // RFC 5952 section 4.
    ["2001:db8:0:0:0:0:2:1", "2001:db8::2:1"], // 4.2.1: as short as possible
    ["2001:db8:0000:1:1:1:1:1", "2001:db8:0:1:1:1:1:1"], // 4.2.2: not one zero
    ["2001:0:0:1:0:0:0:1", "2001:0:0:1::1"], // 4.2.3: the longest run
    ["2001:db8:0:0:1:0:0:1", "2001:db8::1:0:0:1"], // 4.2.3: the first of equal
    ["2001:DB8::AAAA", "2001:db8::aaaa"], // 4.3: lower case
    ["2001:0db8::0001", "2001:db8::1"], // 4.1: no leading zeros
    ["::ffff:192.0.2.1", "::ffff:192.0.2.1"], // 5: IPv4-mapped
    ["::ffff:c000:201", "::ffff:192.0.2.1"],
    ["0:0:0:0:0:0:0:0", "::"],
    ["0:0:0:0:0:0:0:1", "::1"],
    ["1:0:0:0:0:0:0:0", "1::"],
    ["1:0:1:0:1:0:1:0", "1:0:1:0:1:0:1:0"],
    ["0:1:0:1:0:1:0:1", "0:1:0:1:0:1:0:1"],
    ["0:0:1:0:0:0:1:0", "0:0:1::1:0"],
    ["::1.2.3.4", "::102:304"],
    ["::fffe:1.2.3.4", "::fffe:102:304"],
    ["1::ffff:1.2.3.4", "1::ffff:102:304"],
  ];
  for (const [text, canonical] of cases) {
    assert.equal(formatIPv6(parseIPv6(text)!), canonical, text);
  }
  const bytes = new Uint8Array(20);
  bytes.set(parseIPv6("2001:db8::1")!, 4);
  assert.equal(formatIPv6(bytes, 4), "2001:db8::1");
});

Deno.test("formatIPv6() agrees with the URL parser's IPv6 serializer and parseIPv6() reads its output back", () => {
  const random = generator(0x9e3779b9);
  const bytes = new Uint8Array(16);
  for (let round = 0; round < 5000; round++) {
    // Mostly zero groups, so that runs of every length and place come up.
    for (let group = 0; group < 8; group++) {
      const value = random() < 0.6 ? 0 : Math.floor(random() * 0x10000);
      bytes[2 * group] = value >> 8;
      bytes[2 * group + 1] = value & 0xff;
    }
    const text = formatIPv6(bytes);
    if (isIPv4Mapped(bytes)) {
      assert.equal(text, `::ffff:${formatIPv4(readIPv4(bytes, 12))}`);
    } else {
      assert.equal(`[${text}]`, new URL(`http://[${text}]/`).hostname);
    }
    assert.deepEqual(parseIPv6(text), bytes, text);
    // Any other writing, full and upper case, reads as the same bytes.
    const full = Array.from(
      { length: 8 },
      (_, g) =>
        ((bytes[2 * g] << 8) | bytes[2 * g + 1]).toString(16).padStart(4, "0")
          .toUpperCase(),
    ).join(":");
    assert.deepEqual(parseIPv6(full), bytes, full);
  }
});

Deno.test("formatIPv4() and readIPv4() round-trip every octet value", () => {
  for (let octet = 0; octet < 256; octet++) {
    const text = `${octet}.${255 - octet}.${octet}.${octet ^ 0x55}`;
    const address = parseIPv4(text)!;
    assert.equal(formatIPv4(address), text);
    const bytes = new Uint8Array([9, octet, 255 - octet, octet, octet ^ 0x55]);
    assert.equal(readIPv4(bytes, 1), address);
  }
});

Deno.test("isIPv4Mapped() holds ::ffff:0:0/96 only", () => {
  assert.ok(isIPv4Mapped(parseIPv6("::ffff:0.0.0.0")!));
  assert.ok(isIPv4Mapped(parseIPv6("::ffff:255.255.255.255")!));
  for (
    const text of [
      "::",
      "::1.2.3.4",
      "::fffe:1.2.3.4",
      "1::ffff:1.2.3.4",
      "::1:ffff:1.2.3.4",
    ]
  ) {
    assert.ok(!isIPv4Mapped(parseIPv6(text)!), text);
  }
});
