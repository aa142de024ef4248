import assert from "node:assert/strict";
import { AddressRanges } from "./address_ranges.ts";

function assertContains(
  ranges: AddressRanges,
  inside: string[],
  outside: string[],
): void {
  for (const hostname of inside) {
    assert.ok(ranges.contains(hostname), `${ranges} should hold ${hostname}`);
  }
  for (const hostname of outside) {
    assert.ok(
      !ranges.contains(hostname),
      `${ranges} should not hold ${hostname}`,
    );
  }
}

function assertParseError(text: string, message: string): void {
  assert.throws(() => AddressRanges.parse(text), {
    name: "RangeError",
    message,
  });
}

Deno.test("AddressRanges.contains() holds an IPv4 range from its first address to its last, not one past", () => {
  assertContains(
    AddressRanges.parse("10.0.0.0/8"),
    ["10.0.0.0", "10.0.0.1", "10.128.0.0", "10.255.255.255"],
    ["9.255.255.255", "11.0.0.0", "0.0.0.0", "255.255.255.255", "138.0.0.1"],
  );
  assertContains(
    AddressRanges.parse("192.168.2.0/23"),
    ["192.168.2.0", "192.168.3.255"],
    ["192.168.1.255", "192.168.4.0", "192.168.0.0"],
  );
  assertContains(
    AddressRanges.parse("128.0.0.0/1"),
    ["128.0.0.0", "255.255.255.255"],
    ["127.255.255.255", "0.0.0.0"],
  );
  assertContains(
    AddressRanges.parse("203.0.113.6/31"),
    ["203.0.113.6", "203.0.113.7"],
    ["203.0.113.5", "203.0.113.8"],
  );
});

Deno.test("AddressRanges.contains() holds an IPv6 range from its first address to its last, not one past", () => {
  assertContains(
    AddressRanges.parse("fd00::/8"),
    ["fd00::", "fd12:3456::1", "fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"],
    ["fcff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "fe00::", "::1", "::"],
  );
  assertContains(
    AddressRanges.parse("2001:db8::/33"),
    ["2001:db8::", "2001:db8:7fff:ffff:ffff:ffff:ffff:ffff"],
    ["2001:db8:8000::", "2001:db7:ffff:ffff:ffff:ffff:ffff:ffff"],
  );
  assertContains(
    AddressRanges.parse("2001:db8:1:2::/64"),
    [
      "2001:db8:1:2::",
      "2001:db8:1:2:ffff:ffff:ffff:ffff",
      "2001:DB8:1:2:0:0:0:9",
    ],
    ["2001:db8:1:1:ffff:ffff:ffff:ffff", "2001:db8:1:3::"],
  );
});

Deno.test("AddressRanges.contains() holds exactly the one address of a /32, a /128 or a bare address", () => {
  for (const text of ["192.0.2.1", "192.0.2.1/32"]) {
    assertContains(
      AddressRanges.parse(text),
      ["192.0.2.1", "::ffff:192.0.2.1"],
      ["192.0.2.0", "192.0.2.2", "::192.0.2.1"],
    );
  }
  for (
    const text of ["2001:db8::1", "2001:db8::1/128", "2001:DB8:0:0:0:0:0:1"]
  ) {
    assertContains(
      AddressRanges.parse(text),
      ["2001:db8::1", "2001:0db8:0000:0000:0000:0000:0000:0001"],
      ["2001:db8::", "2001:db8::2", "2001:db8::1:0"],
    );
  }
});

Deno.test("AddressRanges.contains() holds every address of its family for /0, and none of the other", () => {
  assertContains(
    AddressRanges.parse("0.0.0.0/0"),
    ["0.0.0.0", "127.0.0.1", "255.255.255.255", "::ffff:8.8.8.8"],
    ["::1", "::", "2001:db8::1"],
  );
  assertContains(
    AddressRanges.parse("::/0"),
    [
      "::",
      "::1",
      "2001:db8::1",
      "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
      "::1.2.3.4",
    ],
    ["1.2.3.4", "::ffff:1.2.3.4", "0.0.0.0"],
  );
  assertContains(
    AddressRanges.parse("0.0.0.0/0,::/0"),
    ["1.2.3.4", "::ffff:1.2.3.4", "::1"],
    ["localhost"],
  );
});

Deno.test("AddressRanges.contains() takes an IPv4-mapped hostname as its IPv4 address, and a mapped entry as IPv4", () => {
  const ranges = AddressRanges.parse("127.0.0.1,10.0.0.0/8");
  assertContains(
    ranges,
    [
      "::ffff:127.0.0.1",
      "::FFFF:7f00:1",
      "0:0:0:0:0:ffff:10.1.2.3",
      "::ffff:a00:0",
    ],
    ["::ffff:127.0.0.2", "::127.0.0.1", "::ffff:0:127.0.0.1", "::1"],
  );
  const mapped = AddressRanges.parse("::ffff:10.0.0.0/104,::ffff:192.0.2.1");
  assert.equal(mapped.toString(), "10.0.0.0/8,192.0.2.1");
  assertContains(
    mapped,
    ["10.9.9.9", "::ffff:10.9.9.9", "192.0.2.1"],
    ["11.0.0.0", "::ffff:11.0.0.0", "::a09:909"],
  );
  assertContains(
    AddressRanges.parse("::ffff:0:0/96"),
    ["0.0.0.0", "255.255.255.255", "::ffff:1.2.3.4"],
    ["::1", "::1.2.3.4"],
  );
});

Deno.test("AddressRanges.contains() answers false for a hostname that is not an IP address", () => {
  const ranges = AddressRanges.parse("0.0.0.0/0,::/0");
  for (
    const hostname of [
      "",
      "localhost",
      "example.com",
      "1.2.3",
      "1.2.3.4.5",
      "01.2.3.4",
      "256.0.0.1",
      " 1.2.3.4",
      "[::1]",
      "fe80::1%eth0",
      "1::2::3",
      ":",
      "1.2.3.4/32",
    ]
  ) {
    assert.equal(ranges.contains(hostname), false, JSON.stringify(hostname));
  }
});

Deno.test("AddressRanges.parse() takes several entries with spaces around them", () => {
  const ranges = AddressRanges.parse(
    " 127.0.0.1 ,10.0.0.0/8,\t::1 , fd00::/8 ",
  );
  assert.equal(ranges.toString(), "127.0.0.1,10.0.0.0/8,::1,fd00::/8");
  assertContains(
    ranges,
    ["127.0.0.1", "10.1.1.1", "::1", "fd00::5"],
    ["127.0.0.2", "::2", "fe00::"],
  );
});

Deno.test("AddressRanges.toString() writes each entry canonical", () => {
  const cases: [string, string][] = [
    ["10.0.0.1/32", "10.0.0.1"],
    ["0.0.0.0/0", "0.0.0.0/0"],
    ["2001:DB8:0:0::/32", "2001:db8::/32"],
    ["2001:db8:0:0:0:0:0:1/128", "2001:db8::1"],
    ["::/0", "::/0"],
    ["::FFFF:10.0.0.0/104", "10.0.0.0/8"],
    ["::ffff:a00:1", "10.0.0.1"],
    ["10.0.0.0/8,10.0.0.0/8", "10.0.0.0/8,10.0.0.0/8"],
  ];
  for (const [text, canonical] of cases) {
    assert.equal(AddressRanges.parse(text).toString(), canonical, text);
    assert.equal(String(AddressRanges.parse(canonical)), canonical);
  }
});

Deno.test("AddressRanges.parse() refuses a range with bits set past its prefix, naming the range meant", () => {
  assertParseError(
    "10.0.0.1/8",
    '"10.0.0.1/8" has bits set past /8 (did you mean 10.0.0.0/8?)',
  );
  assertParseError(
    "127.0.0.1,192.168.1.1/16",
    '"192.168.1.1/16" has bits set past /16 (did you mean 192.168.0.0/16?)',
  );
  assertParseError(
    "1.2.3.4/0",
    '"1.2.3.4/0" has bits set past /0 (did you mean 0.0.0.0/0?)',
  );
  assertParseError(
    "fd00::1/8",
    '"fd00::1/8" has bits set past /8 (did you mean fd00::/8?)',
  );
  assertParseError(
    "2001:db8:8000::/32",
    '"2001:db8:8000::/32" has bits set past /32 (did you mean 2001:db8::/32?)',
  );
  assertParseError(
    "::ffff:10.0.0.1/104",
    '"::ffff:10.0.0.1/104" has bits set past /104 (did you mean ::ffff:10.0.0.0/104?)',
  );
  assertParseError(
    "::ffff:0:0/95",
    '"::ffff:0:0/95" has bits set past /95 (did you mean ::fffe:0:0/95?)',
  );
});

Deno.test("AddressRanges.parse() refuses an entry that is not an IP address or CIDR range", () => {
  for (
    const entry of [
      "localhost",
      "localhost/8",
      "example.com",
      "1.2.3",
      "01.2.3.4",
      "1.2.3.256",
      "1::2::3",
      "[::1]",
      "fe80::1%eth0",
      "/8",
      "10.0.0.0 /8",
      "*",
    ]
  ) {
    assertParseError(
      `127.0.0.1, ${entry}`,
      `${JSON.stringify(entry)} is not an IP address or CIDR range`,
    );
  }
});

Deno.test("AddressRanges.parse() refuses a prefix out of range or not in decimal", () => {
  const cases: [string, string, string][] = [
    ["10.0.0.0/33", "33", "32 (IPv4)"],
    ["10.0.0.0/-1", "-1", "32 (IPv4)"],
    ["10.0.0.0/08", "08", "32 (IPv4)"],
    ["10.0.0.0/", "", "32 (IPv4)"],
    ["10.0.0.0/x", "x", "32 (IPv4)"],
    ["10.0.0.0/ 8", " 8", "32 (IPv4)"],
    ["10.0.0.0/+8", "+8", "32 (IPv4)"],
    ["10.0.0.0/1e1", "1e1", "32 (IPv4)"],
    ["10.0.0.0/8/8", "8/8", "32 (IPv4)"],
    ["::/129", "129", "128 (IPv6)"],
    ["::/1000", "1000", "128 (IPv6)"],
    ["::/0x10", "0x10", "128 (IPv6)"],
  ];
  for (const [entry, prefix, range] of cases) {
    assertParseError(
      entry,
      `${JSON.stringify(entry)} has prefix ${
        JSON.stringify(prefix)
      }, not a whole number from 0 to ${range}`,
    );
  }
});

Deno.test("AddressRanges.parse() refuses an empty entry, naming its position", () => {
  assertParseError("", 'entry 1 of "" is empty');
  assertParseError("  ", 'entry 1 of "  " is empty');
  assertParseError("127.0.0.1,,::1", 'entry 2 of "127.0.0.1,,::1" is empty');
  assertParseError("127.0.0.1,", 'entry 2 of "127.0.0.1," is empty');
  assertParseError(",::1", 'entry 1 of ",::1" is empty');
  assertParseError("::1, ,::2", 'entry 2 of "::1, ,::2" is empty');
});

Deno.test("AddressRanges.parse() keeps its message on one line whatever the entry holds", () => {
  assertParseError(
    "10.0.0.1\n,x",
    '"x" is not an IP address or CIDR range',
  );
  assertParseError(
    "a\nb",
    '"a\\nb" is not an IP address or CIDR range',
  );
});

Deno.test("AddressRanges.contains() takes the remoteAddr.hostname Deno gives an IPv4 client of a dual-stack listener as that IPv4 address", async () => {
  using listener = Deno.listen({ hostname: "::", port: 0 });
  const accepted = listener.accept();
  using client = await Deno.connect({
    hostname: "127.0.0.1",
    port: listener.addr.port,
  });
  using server = await accepted;
  assert.equal(client.localAddr.hostname, "127.0.0.1");
  assert.equal(server.remoteAddr.hostname, "::ffff:127.0.0.1");
  assert.ok(
    AddressRanges.parse("127.0.0.0/8").contains(server.remoteAddr.hostname),
  );
  assert.ok(!AddressRanges.parse("::/0").contains(server.remoteAddr.hostname));
});
