import assert from "node:assert/strict";
import { connect } from "node:net";
import {
  crc32c,
  parseProxyHeader,
  PROXY_HEADER_MAX_BYTES,
  PROXY_V1_MAX_BYTES,
  PROXY_V2_SIGNATURE,
  type ProxyHeader,
  type ProxyHeaderParse,
} from "./proxy_protocol.ts";
import {
  findExecutable,
  killAfter,
  Lines,
  needing,
  spawnChild,
  within,
  withTempDir,
} from "./test_util.ts";

const encoder = new TextEncoder();

function bytesOf(...parts: (string | ArrayLike<number>)[]): Uint8Array {
  const chunks = parts.map((part) =>
    typeof part === "string" ? encoder.encode(part) : Uint8Array.from(part)
  );
  const bytes = new Uint8Array(chunks.reduce((sum, c) => sum + c.length, 0));
  let offset = 0;
  for (const chunk of chunks) {
    bytes.set(chunk, offset);
    offset += chunk.length;
  }
  return bytes;
}

/** A v2 header: signature, the two nibble bytes, `body`'s length, `body`. */
function v2(
  versionCommand: number,
  familyTransport: number,
  body: ArrayLike<number> = [],
  length: number = body.length,
): Uint8Array {
  return bytesOf(
    PROXY_V2_SIGNATURE,
    [versionCommand, familyTransport, length >> 8, length & 0xff],
    body,
  );
}

/** A TLV: type, 2-byte length, value. */
function tlv(type: number, value: ArrayLike<number>): number[] {
  return [type, value.length >> 8, value.length & 0xff, ...Array.from(value)];
}

/** `header` with a CRC32C TLV appended and filled in as section 2.2.3 says. */
function withCrc32c(header: Uint8Array): Uint8Array {
  const rest = ((header[14] << 8) | header[15]) + 7;
  const bytes = bytesOf(header, tlv(0x03, [0, 0, 0, 0]));
  bytes[14] = rest >> 8;
  bytes[15] = rest & 0xff;
  new DataView(bytes.buffer).setUint32(bytes.length - 4, crc32c(bytes));
  return bytes;
}

const ipv4Block = [
  ...[192, 168, 0, 1],
  ...[192, 168, 0, 11],
  ...[0xdc, 0x04], // 56324
  ...[0x01, 0xbb], // 443
];

function ipv6Block(source: number[], destination: number[]): number[] {
  return [...source, ...destination, 0x30, 0x39, 0x00, 0x50]; // 12345, 80
}

function ipv6Bytes(...groups: number[]): number[] {
  return groups.flatMap((group) => [group >> 8, group & 0xff]);
}

function assertComplete(bytes: Uint8Array, header: ProxyHeader): void {
  assert.deepEqual(parseProxyHeader(bytes), { status: "complete", header });
}

function assertInvalid(
  bytes: Uint8Array,
  reason: "missing" | "malformed",
  message?: string,
): void {
  const result = parseProxyHeader(bytes);
  assert.equal(result.status, "invalid", `${JSON.stringify(result)}`);
  if (result.status !== "invalid") return;
  assert.equal(result.reason, reason, result.message);
  if (message !== undefined) assert.equal(result.message, message);
  // deno-lint-ignore no-control-regex
  assert.doesNotMatch(result.message, /[\x00-\x1f\x7f-\uffff]/);
}

function assertMalformed(bytes: Uint8Array | string, message?: string): void {
  assertInvalid(
    typeof bytes === "string" ? encoder.encode(bytes) : bytes,
    "malformed",
    message,
  );
}

const v1Examples: Record<string, [string, ProxyHeader]> = {
  tcp4: [
    "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
    {
      version: 1,
      length: 47,
      source: { hostname: "192.168.0.1", port: 56324 },
      destination: { hostname: "192.168.0.11", port: 443 },
    },
  ],
  tcp4Longest: [
    "PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
    {
      version: 1,
      length: 56,
      source: { hostname: "255.255.255.255", port: 65535 },
      destination: { hostname: "255.255.255.255", port: 65535 },
    },
  ],
  tcp6Longest: [
    `PROXY TCP6 ${"ffff:".repeat(7)}ffff ${
      "ffff:".repeat(7)
    }ffff 65535 65535\r\n`,
    {
      version: 1,
      length: 104,
      source: { hostname: `${"ffff:".repeat(7)}ffff`, port: 65535 },
      destination: { hostname: `${"ffff:".repeat(7)}ffff`, port: 65535 },
    },
  ],
  unknown: ["PROXY UNKNOWN\r\n", { version: 1, length: 15 }],
  unknownLongest: [
    `PROXY UNKNOWN ${"ffff:".repeat(7)}ffff ${
      "ffff:".repeat(7)
    }ffff 65535 65535\r\n`,
    { version: 1, length: 107 },
  ],
  zeros: [
    "PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n",
    {
      version: 1,
      length: 32,
      source: { hostname: "0.0.0.0", port: 0 },
      destination: { hostname: "0.0.0.0", port: 0 },
    },
  ],
};

const v2Examples: Record<string, [Uint8Array, ProxyHeader]> = {
  tcp4: [v2(0x21, 0x11, ipv4Block), {
    version: 2,
    length: 28,
    source: { hostname: "192.168.0.1", port: 56324 },
    destination: { hostname: "192.168.0.11", port: 443 },
  }],
  tcp6: [
    v2(
      0x21,
      0x21,
      ipv6Block(
        ipv6Bytes(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1),
        ipv6Bytes(0, 0, 0, 0, 0, 0xffff, 0x0102, 0x0304),
      ),
    ),
    {
      version: 2,
      length: 52,
      source: { hostname: "2001:db8::1", port: 12345 },
      destination: { hostname: "::ffff:1.2.3.4", port: 80 },
    },
  ],
  local: [v2(0x20, 0x00), { version: 2, length: 16 }],
  unix: [v2(0x21, 0x31, new Uint8Array(216).fill(0x61)), {
    version: 2,
    length: 232,
  }],
  tcp4WithTlvs: [
    withCrc32c(
      v2(0x21, 0x11, [
        ...ipv4Block,
        ...tlv(0x04, []), // PP2_TYPE_NOOP
        ...tlv(0x02, encoder.encode("example.com")), // PP2_TYPE_AUTHORITY
        ...tlv(0xea, encoder.encode("vpce-0123456789abcdef")), // AWS
      ]),
    ),
    {
      version: 2,
      length: 28 + 3 + 14 + 24 + 7,
      source: { hostname: "192.168.0.1", port: 56324 },
      destination: { hostname: "192.168.0.11", port: 443 },
    },
  ],
};

const examples: [string, Uint8Array, ProxyHeader][] = [
  ...Object.entries(v1Examples).map((
    [name, [line, header]],
  ): [string, Uint8Array, ProxyHeader] => [
    `v1 ${name}`,
    encoder.encode(line),
    header,
  ]),
  ...Object.entries(v2Examples).map((
    [name, [bytes, header]],
  ): [string, Uint8Array, ProxyHeader] => [`v2 ${name}`, bytes, header]),
];

// ---------------------------------------------------------------- v1

Deno.test("parseProxyHeader() reads the specification's v1 TCP4 example", () => {
  // Section 2.1, before an HTTP request.
  assertComplete(
    bytesOf(
      "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
      "GET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n",
    ),
    v1Examples.tcp4[1],
  );
});

Deno.test("parseProxyHeader() reads the specification's longest v1 lines (56, 104, 15 and 107 bytes)", () => {
  for (
    const name of ["tcp4Longest", "tcp6Longest", "unknown", "unknownLongest"]
  ) {
    const [line, header] = v1Examples[name];
    assert.equal(line.length, header.length, name);
    assertComplete(encoder.encode(line), header);
  }
  assert.equal(v1Examples.unknownLongest[0].length, PROXY_V1_MAX_BYTES);
});

Deno.test("parseProxyHeader() ignores anything after v1 UNKNOWN up to CRLF", () => {
  for (
    const rest of [
      " 1.2.3.4 5.6.7.8 1 2",
      " garbage  with  spaces ",
      " \x00\x7f\xff bytes",
      " ",
    ]
  ) {
    const line = `PROXY UNKNOWN${rest}\r\n`;
    const bytes = Uint8Array.from(line, (c) => c.charCodeAt(0));
    assertComplete(bytes, { version: 1, length: line.length });
  }
});

Deno.test("parseProxyHeader() returns v1 addresses canonical however they were written", () => {
  const cases: [string, string][] = [
    ["2001:DB8:0:0:0:0:0:1", "2001:db8::1"],
    ["2001:0db8:0000::0001", "2001:db8::1"],
    ["2001:db8::1", "2001:db8::1"],
    ["::FFFF:1.2.3.4", "::ffff:1.2.3.4"],
    ["::ffff:0102:0304", "::ffff:1.2.3.4"],
    ["0:0:0:0:0:0:0:1", "::1"],
    ["::", "::"],
    ["fe80:0:0:0:1::", "fe80::1:0:0:0"],
    ["1:0:0:2:0:0:0:3", "1:0:0:2::3"],
    ["1:0:0:2:0:0:3:4", "1::2:0:0:3:4"],
    ["::1.2.3.4", "::102:304"],
  ];
  for (const [written, canonical] of cases) {
    const result = parseProxyHeader(
      encoder.encode(`PROXY TCP6 ${written} ::1 1 2\r\n`),
    );
    assert.equal(
      result.status === "complete" && result.header.source?.hostname,
      canonical,
      written,
    );
  }
});

Deno.test("parseProxyHeader() refuses v1 lines with bad addresses", () => {
  const cases: [string, string, string][] = [
    ["TCP4", "256.0.0.1", "source"],
    ["TCP4", "1.2.3.04", "source"],
    ["TCP4", "01.2.3.4", "source"],
    ["TCP4", "00.2.3.4", "source"],
    ["TCP4", "1.2.3", "source"],
    ["TCP4", "1.2.3.4.5", "source"],
    ["TCP4", "1..3.4", "source"],
    ["TCP4", ".1.2.3", "source"],
    ["TCP4", "1.2.3.", "source"],
    ["TCP4", "1.2.3.1000", "source"],
    ["TCP4", "::1", "source"],
    ["TCP4", "::ffff:1.2.3.4", "source"],
    ["TCP4", "a.b.c.d", "source"],
    ["TCP6", "1.2.3.4", "source"],
    ["TCP6", "1::2::3", "source"],
    ["TCP6", "1:2:3:4:5:6:7:8:9", "source"],
    ["TCP6", "1:2:3:4:5:6:7", "source"],
    ["TCP6", "1:2:3:4:5:6:7::8", "source"],
    ["TCP6", "12345::1", "source"],
    ["TCP6", ":1::2", "source"],
    ["TCP6", "1::2:", "source"],
    ["TCP6", ":::", "source"],
    ["TCP6", "::ffff:1.2.3.256", "source"],
    ["TCP6", "::ffff:1.2.3.04", "source"],
    ["TCP6", "1:2:3:4:5:6:7:1.2.3.4", "source"],
    ["TCP6", "1.2.3.4::", "source"],
  ];
  for (const [protocol, address, which] of cases) {
    const family = protocol === "TCP4" ? "IPv4" : "IPv6";
    assertMalformed(
      `PROXY ${protocol} ${address} ${address} 1 2\r\n`,
      `PROXY v1 header: "${protocol}" with ${which} address "${address}", not ${family}`,
    );
  }
  assertMalformed(
    "PROXY TCP4 1.2.3.4 ::1 1 2\r\n",
    'PROXY v1 header: "TCP4" with destination address "::1", not IPv4',
  );
  assertMalformed(
    "PROXY TCP6 ::1 1.2.3.4 1 2\r\n",
    'PROXY v1 header: "TCP6" with destination address "1.2.3.4", not IPv6',
  );
  assertMalformed(
    "PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
    'PROXY v1 header: "%" in "TCP6" line, not an address or port',
  );
  assertMalformed(
    "PROXY TCP6 [::1] ::1 1 2\r\n",
    'PROXY v1 header: "[" in "TCP6" line, not an address or port',
  );
});

Deno.test("parseProxyHeader() refuses v1 lines with bad ports", () => {
  for (const port of ["65536", "01", "00", "100000", "99999", "1a"]) {
    assertMalformed(
      `PROXY TCP4 1.2.3.4 5.6.7.8 ${port} 2\r\n`,
      `PROXY v1 header: source port "${port}", not a decimal 0-65535 without leading zeros`,
    );
    assertMalformed(
      `PROXY TCP4 1.2.3.4 5.6.7.8 2 ${port}\r\n`,
      `PROXY v1 header: destination port "${port}", not a decimal 0-65535 without leading zeros`,
    );
  }
  assertMalformed(
    "PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
    'PROXY v1 header: "-" in "TCP4" line, not an address or port',
  );
  assertMalformed(
    "PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
    'PROXY v1 header: "+" in "TCP4" line, not an address or port',
  );
  assertMalformed(
    "PROXY TCP4 1.2.3.4 5.6.7.8  2\r\n",
    "PROXY v1 header: two spaces in a row",
  );
  assertMalformed(
    "PROXY TCP4 1.2.3.4 5.6.7.8 1 \r\n",
    "PROXY v1 header: a space before CRLF",
  );
  assertComplete(encoder.encode("PROXY TCP4 1.2.3.4 5.6.7.8 65535 0\r\n"), {
    version: 1,
    length: 36,
    source: { hostname: "1.2.3.4", port: 65535 },
    destination: { hostname: "5.6.7.8", port: 0 },
  });
});

Deno.test("parseProxyHeader() refuses v1 lines with a bad protocol, spacing or field count", () => {
  const cases: [string, string][] = [
    [
      "PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n",
      'protocol "tcp4", not TCP4, TCP6 or UNKNOWN',
    ],
    [
      "PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
      'protocol "TCP5", not TCP4, TCP6 or UNKNOWN',
    ],
    [
      "PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
      'protocol "UDP4", not TCP4, TCP6 or UNKNOWN',
    ],
    ["PROXY UNKNOWNX\r\n", 'protocol "UNKNOWNX", not TCP4, TCP6 or UNKNOWN'],
    ["PROXY unknown\r\n", 'protocol "unknown", not TCP4, TCP6 or UNKNOWN'],
    ["PROXY \r\n", 'protocol "", not TCP4, TCP6 or UNKNOWN'],
    ["PROXY TCP\r\n", 'protocol "TCP", not TCP4, TCP6 or UNKNOWN'],
    ["PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "two spaces in a row"],
    ["PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "two spaces in a row"],
    ["PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "two spaces in a row"],
    ["PROXY TCP4 1.2.3.4 5.6.7.8 1  2\r\n", "two spaces in a row"],
    [
      "PROXY TCP4\t1.2.3.4 5.6.7.8 1 2\r\n",
      'protocol "TCP4\\x091.2.3.4", not TCP4, TCP6 or UNKNOWN',
    ],
    [
      "PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n",
      '"\\x09" in "TCP4" line, not an address or port',
    ],
    ["PROXY TCP4\r\n", '"TCP4" with 0 fields after it, not 4'],
    [
      "PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
      '"TCP4" with 3 fields after it, not 4',
    ],
    [
      "PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
      '"TCP4" with 5 fields after it, not 4',
    ],
    ["PROXY TCP6 ::1 ::1\r\n", '"TCP6" with 2 fields after it, not 4'],
  ];
  for (const [line, message] of cases) {
    assertMalformed(line, `PROXY v1 header: ${message}`);
  }
});

Deno.test("parseProxyHeader() refuses a v1 line ended by a bare LF or a CR without LF", () => {
  assertMalformed(
    "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
    "PROXY v1 header: LF without CR before it",
  );
  assertMalformed(
    "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rGET",
    "PROXY v1 header: CR without LF after it",
  );
  assertMalformed(
    "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n",
    "PROXY v1 header: CR without LF after it",
  );
  assertMalformed(
    "PROXY UNKNOWN\n",
    "PROXY v1 header: LF without CR before it",
  );
  assertMalformed(
    "PROXY UNKNOWN bare \n in it\r\n",
    "PROXY v1 header: LF without CR before it",
  );
  assertMalformed("PROXY \n", "PROXY v1 header: LF without CR before it");
});

Deno.test("parseProxyHeader() refuses a v1 line with no CRLF within 107 bytes", () => {
  const start = "PROXY UNKNOWN ";
  const noCrlf = start + "x".repeat(PROXY_V1_MAX_BYTES - start.length);
  assert.equal(noCrlf.length, 107);
  assert.deepEqual(parseProxyHeader(encoder.encode(noCrlf.slice(0, -1))), {
    status: "incomplete",
  });
  assertMalformed(noCrlf, "PROXY v1 header: no CRLF within 107 bytes");
  assertMalformed(noCrlf + "\r\n", "PROXY v1 header: no CRLF within 107 bytes");
  // The CR as the 107th byte: its LF would be the 108th.
  const lateCr = noCrlf.slice(0, -1) + "\r";
  assertMalformed(lateCr, "PROXY v1 header: no CRLF within 107 bytes");
  assertMalformed(lateCr + "\n", "PROXY v1 header: no CRLF within 107 bytes");
  assertMalformed(
    "PROXY TCP4 " + "1".repeat(200),
    "PROXY v1 header: no CRLF within 107 bytes",
  );
  assertMalformed(
    bytesOf("PROXY UNKNOWN ", new Uint8Array(PROXY_HEADER_MAX_BYTES)),
    "PROXY v1 header: no CRLF within 107 bytes",
  );
});

Deno.test("parseProxyHeader() refuses a v1 line that cannot become valid before its CRLF arrives", () => {
  assertMalformed(
    "PROXY GET",
    'PROXY v1 header: protocol "GET", not TCP4, TCP6 or UNKNOWN',
  );
  assertMalformed(
    "PROXY TCP4 1.2.3.4 x",
    'PROXY v1 header: "x" in "TCP4" line, not an address or port',
  );
  assertMalformed(
    "PROXY TCP4 1.2.3.4  ",
    "PROXY v1 header: two spaces in a row",
  );
  assertMalformed(
    "PROXY tcp",
    'PROXY v1 header: protocol "tcp", not TCP4, TCP6 or UNKNOWN',
  );
  // A CR as the last byte so far: only an LF may follow, so the line is read.
  assertMalformed(
    "PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r",
    'PROXY v1 header: destination port "99999", not a decimal 0-65535 without leading zeros',
  );
  assertMalformed(
    "PROXY TCP4 999.2.3.4 5.6.7.8 1 2\r",
    'PROXY v1 header: "TCP4" with source address "999.2.3.4", not IPv4',
  );
  assert.deepEqual(
    parseProxyHeader(encoder.encode("PROXY TCP4 999.2.3.4 5.6.7.8 1 2")),
    { status: "incomplete" },
  );
  assertMalformed(
    bytesOf("PROXY TCP4 1.2.3.4\x00"),
    'PROXY v1 header: "\\x00" in "TCP4" line, not an address or port',
  );
  assertMalformed(
    bytesOf("PROXY TCP6 ", [0xc3, 0xa9]),
    'PROXY v1 header: "\\xc3" in "TCP6" line, not an address or port',
  );
});

// ---------------------------------------------------------------- missing

Deno.test("parseProxyHeader() calls bytes that begin with neither signature missing, from their first byte that differs", () => {
  for (
    const text of [
      "GET / HTTP/1.1\r\n",
      "hello",
      "\x16\x03\x01",
      "SSH-2.0-OpenSSH_9.6\r\n",
    ]
  ) {
    const bytes = encoder.encode(text);
    for (let length = 1; length <= bytes.length; length++) {
      assertInvalid(bytes.subarray(0, length), "missing");
    }
  }
  assertInvalid(
    encoder.encode("GET / HTTP/1.1\r\nHost: example.com\r\n"),
    "missing",
    'no PROXY header: the connection begins "GET / HTTP/1.1\\r\\n..."',
  );
  assertInvalid(
    bytesOf([0, 1, 0x7f, 0xff, 0x22, 0x5c]),
    "missing",
    'no PROXY header: the connection begins "\\x00\\x01\\x7f\\xff\\"\\\\"',
  );
  assertInvalid(
    encoder.encode("proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n"),
    "missing",
  );
  assertInvalid(encoder.encode("PROXYTCP4"), "missing");
  assertInvalid(encoder.encode("PROX "), "missing");
  assert.deepEqual(parseProxyHeader(encoder.encode("\r\n\r\n\0")), {
    status: "incomplete",
  });
  assertInvalid(encoder.encode("\r\n\r\n\n"), "missing");
});

Deno.test("parseProxyHeader() calls a signature one byte off at any position missing", () => {
  const signatures = [encoder.encode("PROXY "), PROXY_V2_SIGNATURE];
  for (const signature of signatures) {
    const header = bytesOf(signature, new Uint8Array(20));
    for (let position = 0; position < signature.length; position++) {
      for (const flip of [0x01, 0x20, 0x80]) {
        const bytes = header.slice();
        bytes[position] ^= flip;
        assertInvalid(bytes, "missing");
        assertInvalid(bytes.subarray(0, position + 1), "missing");
      }
    }
  }
});

Deno.test("parseProxyHeader() calls zero bytes and every signature prefix incomplete", () => {
  assert.deepEqual(parseProxyHeader(new Uint8Array(0)), {
    status: "incomplete",
  });
  for (const signature of [encoder.encode("PROXY "), PROXY_V2_SIGNATURE]) {
    for (let length = 1; length <= signature.length; length++) {
      assert.deepEqual(parseProxyHeader(signature.subarray(0, length)), {
        status: "incomplete",
      });
    }
  }
});

// ---------------------------------------------------------------- both

Deno.test("parseProxyHeader() calls every prefix of a valid header incomplete", () => {
  for (const [name, bytes, header] of examples) {
    for (let length = 0; length < header.length; length++) {
      assert.deepEqual(
        parseProxyHeader(bytes.subarray(0, length)),
        { status: "incomplete" },
        `${name}, ${length} of ${header.length} bytes`,
      );
    }
    assertComplete(bytes, header);
  }
});

Deno.test("parseProxyHeader() reads a header followed by client bytes the same, whatever they are", () => {
  const suffixes = [
    "GET / HTTP/1.1\r\n\r\n",
    "\r\n",
    "\n",
    "\r",
    "\0",
    "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
  ].map((text) => encoder.encode(text));
  suffixes.push(new Uint8Array(PROXY_HEADER_MAX_BYTES).fill(0xff));
  suffixes.push(PROXY_V2_SIGNATURE.slice());
  for (const [name, bytes, header] of examples) {
    for (const suffix of suffixes) {
      assert.deepEqual(
        parseProxyHeader(bytesOf(bytes, suffix)),
        { status: "complete", header },
        name,
      );
    }
  }
});

Deno.test("parseProxyHeader() gives the same address for the same client however v1 writes or v2 encodes it", () => {
  const v1 = parseProxyHeader(
    encoder.encode(
      "PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::FFFF:0102:0304 12345 80\r\n",
    ),
  );
  assert.equal(v1.status, "complete");
  if (v1.status !== "complete") return;
  assert.deepEqual(v1.header.source, v2Examples.tcp6[1].source);
  assert.deepEqual(v1.header.destination, v2Examples.tcp6[1].destination);
});

Deno.test("parseProxyHeader() never answers incomplete for PROXY_HEADER_MAX_BYTES bytes, and bytes past a result never change it", () => {
  // A small deterministic generator (xorshift32): the same cases each run.
  let seed = 0x2545f491;
  const random = () => {
    seed ^= seed << 13;
    seed ^= seed >>> 17;
    seed ^= seed << 5;
    return (seed >>> 0) / 0x100000000;
  };
  const v1Alphabet = encoder.encode("PROXY TCP46UNKOW0123456789abcdef.: \r\n");
  for (let round = 0; round < 400; round++) {
    const bytes = new Uint8Array(PROXY_HEADER_MAX_BYTES);
    for (let i = 0; i < bytes.length; i++) {
      bytes[i] = round % 2 === 0
        ? v1Alphabet[Math.floor(random() * v1Alphabet.length)]
        : Math.floor(random() * 256);
    }
    if (round % 2 === 0) {
      bytes.set(encoder.encode("PROXY "));
    } else {
      bytes.set(PROXY_V2_SIGNATURE);
      // Mostly valid nibbles and lengths, to get past the first checks.
      bytes[12] = 0x20 | Math.floor(random() * 2.2);
      bytes[13] = (Math.floor(random() * 4.2) << 4) |
        Math.floor(random() * 3.2);
      const length = Math.floor(random() * 300);
      bytes[14] = length >> 8;
      bytes[15] = length & 0xff;
    }
    assert.notEqual(parseProxyHeader(bytes).status, "incomplete");
    let settled: ProxyHeaderParse | undefined;
    for (let length = 0; length <= bytes.length; length++) {
      const result = parseProxyHeader(bytes.subarray(0, length));
      if (settled === undefined) {
        if (result.status !== "incomplete") settled = result;
      } else if (settled.status === "complete") {
        assert.deepEqual(result, settled);
      } else {
        assert.equal(result.status, "invalid");
      }
    }
  }
});

// ---------------------------------------------------------------- v2

Deno.test("parseProxyHeader() reads the specification's v2 layouts for TCP over IPv4 and IPv6", () => {
  assertComplete(...v2Examples.tcp4);
  assertComplete(...v2Examples.tcp6);
  assertComplete(
    v2(
      0x21,
      0x21,
      ipv6Block(ipv6Bytes(0xfe80, 0, 0, 0, 0, 0, 0, 0xab), [
        ...new Uint8Array(16),
      ]),
    ),
    {
      version: 2,
      length: 52,
      source: { hostname: "fe80::ab", port: 12345 },
      destination: { hostname: "::", port: 80 },
    },
  );
});

Deno.test("parseProxyHeader() reads v2 LOCAL as no address, skipping its whole length", () => {
  assertComplete(v2(0x20, 0x00), { version: 2, length: 16 });
  // Section 2.2: LOCAL ignores the family and any address bytes sent.
  assertComplete(v2(0x20, 0x11, ipv4Block), { version: 2, length: 28 });
  assertComplete(v2(0x20, 0x12, [1, 2, 3]), { version: 2, length: 19 });
  assertComplete(v2(0x20, 0x21, [0xff, 0xff]), { version: 2, length: 18 });
});

Deno.test("parseProxyHeader() reads v2 PROXY with family UNSPEC or UNIX as no address", () => {
  assertComplete(v2(0x21, 0x00), { version: 2, length: 16 });
  assertComplete(v2(0x21, 0x01, [9, 9, 9, 9, 9]), { version: 2, length: 21 });
  assertComplete(...v2Examples.unix);
  assertComplete(v2(0x21, 0x32, new Uint8Array(216)), {
    version: 2,
    length: 232,
  });
  assertComplete(
    v2(0x21, 0x31, [...new Uint8Array(216), ...tlv(0x04, [1, 2])]),
    { version: 2, length: 237 },
  );
});

Deno.test("parseProxyHeader() refuses a v2 version other than 2, as soon as its byte arrives", () => {
  for (const version of [0, 1, 3, 4, 15]) {
    const bytes = v2((version << 4) | 1, 0x11, ipv4Block);
    assertMalformed(bytes, `PROXY v2 header: version ${version}`);
    assertMalformed(
      bytes.subarray(0, 13),
      `PROXY v2 header: version ${version}`,
    );
  }
});

Deno.test("parseProxyHeader() refuses v2 commands other than LOCAL and PROXY", () => {
  for (let command = 2; command < 16; command++) {
    assertMalformed(
      v2(0x20 | command, 0x11, ipv4Block).subarray(0, 13),
      `PROXY v2 header: command ${command}, not LOCAL (0) or PROXY (1)`,
    );
  }
});

Deno.test("parseProxyHeader() refuses v2 families over 3 and transports over 2, for LOCAL too", () => {
  for (const command of [0x20, 0x21]) {
    for (let family = 4; family < 16; family++) {
      assertMalformed(
        v2(command, (family << 4) | 1, ipv4Block).subarray(0, 14),
        `PROXY v2 header: address family ${family}, not UNSPEC (0), INET (1), INET6 (2) or UNIX (3)`,
      );
    }
    for (let transport = 3; transport < 16; transport++) {
      assertMalformed(
        v2(command, 0x10 | transport, ipv4Block).subarray(0, 14),
        `PROXY v2 header: transport ${transport}, not UNSPEC (0), STREAM (1) or DGRAM (2)`,
      );
    }
  }
});

Deno.test("parseProxyHeader() refuses a v2 PROXY INET or INET6 address on a transport other than STREAM", () => {
  const cases: [number, string][] = [
    [0x10, "INET over UNSPEC"],
    [0x12, "INET over DGRAM"],
    [0x20, "INET6 over UNSPEC"],
    [0x22, "INET6 over DGRAM"],
  ];
  for (const [familyTransport, words] of cases) {
    assertMalformed(
      v2(0x21, familyTransport, new Uint8Array(36)),
      `PROXY v2 header: ${words}, not STREAM, on a TCP connection`,
    );
  }
});

Deno.test("parseProxyHeader() refuses a v2 length short of the family's address block", () => {
  const cases: [number, number, string][] = [
    [0x11, 12, "INET"],
    [0x21, 36, "INET6"],
    [0x31, 216, "UNIX"],
  ];
  for (const [familyTransport, block, family] of cases) {
    for (const length of [0, 1, block - 1]) {
      assertMalformed(
        v2(0x21, familyTransport, new Uint8Array(length)).subarray(0, 16),
        `PROXY v2 header: length ${length}, short of the ${block}-byte ${family} address block`,
      );
    }
    assert.equal(
      parseProxyHeader(v2(0x21, familyTransport, new Uint8Array(block))).status,
      "complete",
    );
  }
});

Deno.test("parseProxyHeader() refuses a v2 length over PROXY_HEADER_MAX_BYTES from its first 16 bytes", () => {
  const largest = PROXY_HEADER_MAX_BYTES - 16;
  const fits = v2(0x21, 0x11, [
    ...ipv4Block,
    ...tlv(0x04, new Uint8Array(largest - 15)),
  ]);
  assert.equal(fits.length, PROXY_HEADER_MAX_BYTES);
  assert.equal(parseProxyHeader(fits).status, "complete");
  for (const command of [0x20, 0x21]) {
    for (const length of [largest + 1, 60000, 65535]) {
      assertMalformed(
        v2(command, 0x11, [], length),
        `PROXY v2 header: length ${length} over the 1024 bytes accepted`,
      );
    }
  }
});

Deno.test("parseProxyHeader() refuses v2 TLVs cut off by the header's end or running past it", () => {
  const cases: [number[], string][] = [
    [[0x04], "TLV at byte 28 cut off by the header's end at 29"],
    [[0x04, 0x00], "TLV at byte 28 cut off by the header's end at 30"],
    [
      [0x04, 0x00, 0x01],
      "TLV type 0x04 at byte 28 of 4 bytes runs past the header's end at 31",
    ],
    [
      [0xe0, 0x01, 0x00, 1, 2, 3],
      "TLV type 0xe0 at byte 28 of 259 bytes runs past the header's end at 34",
    ],
    [
      [...tlv(0x04, [1]), 0x02, 0x00],
      "TLV at byte 32 cut off by the header's end at 34",
    ],
    [
      [...tlv(0x04, [1]), ...tlv(0x02, [1, 2]), 0xff, 0x00, 0x05, 1],
      "TLV type 0xff at byte 37 of 8 bytes runs past the header's end at 41",
    ],
  ];
  for (const [tlvs, message] of cases) {
    assertMalformed(
      v2(0x21, 0x11, [...ipv4Block, ...tlvs]),
      `PROXY v2 header: ${message}`,
    );
  }
  assertMalformed(
    v2(0x21, 0x21, [...new Uint8Array(36), 0x01]),
    "PROXY v2 header: TLV at byte 52 cut off by the header's end at 53",
  );
  assertMalformed(
    v2(0x21, 0x31, [...new Uint8Array(216), 0x01, 0x00, 0x09]),
    "PROXY v2 header: TLV type 0x01 at byte 232 of 12 bytes runs past the header's end at 235",
  );
});

Deno.test("parseProxyHeader() skips NOOP, registered and unknown v2 TLVs", () => {
  const tlvs = [
    ...tlv(0x04, []),
    ...tlv(0x04, [0, 0, 0]),
    ...tlv(0x01, encoder.encode("h2")),
    ...tlv(0x05, new Uint8Array(128)),
    ...tlv(0x20, [0x01, 0, 0, 0, 0, ...tlv(0x21, encoder.encode("TLSv1.3"))]),
    ...tlv(0xe0, new Uint8Array(8)),
    ...tlv(0xee, [0, 1, 2, 3, 4]),
    ...tlv(0xf8, []),
  ];
  assertComplete(v2(0x21, 0x11, [...ipv4Block, ...tlvs]), {
    ...v2Examples.tcp4[1],
    length: 28 + tlvs.length,
  });
});

Deno.test("parseProxyHeader() checks a v2 CRC32C TLV and refuses the header when it does not match", () => {
  const [bytes, header] = v2Examples.tcp4WithTlvs;
  assertComplete(bytes, header);
  const crcAt = bytes.length - 4;
  const sent = new DataView(bytes.buffer).getUint32(crcAt);
  // A flipped bit anywhere, in the checksum too, is a mismatch.
  for (let position = 16; position < bytes.length; position++) {
    // The CRC32C TLV's type byte: another type leaves no checksum to check.
    if (position === crcAt - 3) continue;
    const changed = bytes.slice();
    changed[position] ^= 0x10;
    const result = parseProxyHeader(changed);
    assert.equal(result.status, "invalid", `position ${position}`);
    if (position >= 28 && result.status === "invalid") {
      assert.match(result.message, /^PROXY v2 header: (CRC32C|TLV)/);
    }
  }
  const changed = bytes.slice();
  changed[16] ^= 0x01;
  const computed = crc32c(
    bytesOf(changed.subarray(0, crcAt), [0, 0, 0, 0]),
  );
  assertMalformed(
    changed,
    `PROXY v2 header: CRC32C 0x${
      sent.toString(16).padStart(8, "0")
    } in the header, 0x${computed.toString(16).padStart(8, "0")} computed`,
  );
  // The checksum covers the header alone, never the client's bytes.
  assertComplete(bytesOf(bytes, [1, 2, 3]), header);
  // A checksum on a UNIX header too.
  assertComplete(withCrc32c(v2Examples.unix[0]), { version: 2, length: 239 });
  const unix = withCrc32c(v2Examples.unix[0]);
  unix[100] ^= 1;
  assertMalformed(unix);
});

Deno.test("parseProxyHeader() refuses a v2 CRC32C TLV of a length other than 4, or two of them", () => {
  for (const length of [0, 3, 5, 8]) {
    assertMalformed(
      v2(0x21, 0x11, [...ipv4Block, ...tlv(0x03, new Uint8Array(length))]),
      `PROXY v2 header: CRC32C TLV with a ${length}-byte value, not 4`,
    );
  }
  const once = withCrc32c(v2(0x21, 0x11, ipv4Block));
  assertMalformed(withCrc32c(once), "PROXY v2 header: two CRC32C TLVs");
});

Deno.test("crc32c() gives the known check values", () => {
  assert.equal(crc32c(encoder.encode("123456789")), 0xe3069283);
  assert.equal(crc32c(new Uint8Array(0)), 0);
  // RFC 3720 appendix B.4.
  assert.equal(crc32c(new Uint8Array(32)), 0x8a9136aa);
  assert.equal(crc32c(new Uint8Array(32).fill(0xff)), 0x62a8ab43);
  assert.equal(
    crc32c(Uint8Array.from({ length: 32 }, (_, i) => i)),
    0x46dd794e,
  );
});

// ---------------------------------------------------------------- HAProxy

const HAPROXY = findExecutable("haproxy");

/** A TCP listener on `hostname` that keeps every connection's bytes to EOF. */
class Capture implements AsyncDisposable {
  readonly #listener: Deno.TcpListener;
  readonly received: Promise<Uint8Array>[] = [];
  readonly #loop: Promise<void>;

  constructor() {
    this.#listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    this.#loop = this.#accept();
  }

  get port(): number {
    return this.#listener.addr.port;
  }

  async #accept(): Promise<void> {
    for (;;) {
      let conn: Deno.Conn;
      try {
        conn = await this.#listener.accept();
      } catch (error) {
        if (error instanceof Deno.errors.BadResource) return; // closed
        throw error;
      }
      this.received.push(readToEnd(conn));
    }
  }

  async [Symbol.asyncDispose](): Promise<void> {
    this.#listener.close();
    await this.#loop;
    await Promise.allSettled(this.received);
  }
}

async function readToEnd(conn: Deno.Conn): Promise<Uint8Array> {
  const chunks: Uint8Array[] = [];
  try {
    const buffer = new Uint8Array(4096);
    for (;;) {
      const read = await conn.read(buffer);
      if (read === null) break;
      chunks.push(buffer.slice(0, read));
    }
  } finally {
    conn.close();
  }
  return bytesOf(...chunks);
}

/** A port the kernel has free on `hostname` now. */
function freePort(hostname: string): number {
  using listener = Deno.listen({ hostname, port: 0 });
  return listener.addr.port;
}

/**
 * Sends `payload` from `localAddress` to `host:port`, half-closes and waits
 * for the close; returns the port the client had.
 */
function sendFrom(
  localAddress: string,
  host: string,
  port: number,
  payload: string,
): Promise<number> {
  const { promise, resolve, reject } = Promise.withResolvers<number>();
  const socket = connect({ host, port, localAddress }, () => {
    const localPort = socket.localPort;
    socket.end(payload);
    socket.on("close", () => resolve(localPort ?? -1));
  });
  socket.on("error", reject);
  socket.resume(); // reads and drops whatever comes back
  return promise;
}

Deno.test(
  needing(
    "parseProxyHeader() reads the headers HAProxy sends with send-proxy and send-proxy-v2 (CRC32C and unique-id TLVs), for IPv4 and IPv6 clients",
    HAPROXY !== undefined,
    "haproxy not installed (apt-get install haproxy)",
  ),
  withTempDir(async (dir) => {
    await using capture = new Capture();
    const fronts = {
      v1: { ipv4: freePort("127.0.0.1"), ipv6: freePort("::1") },
      v2: { ipv4: freePort("127.0.0.1"), ipv6: freePort("::1") },
    };
    const config = `${dir}/haproxy.cfg`;
    await Deno.writeTextFile(
      config,
      [
        "defaults",
        "  mode tcp",
        "  timeout connect 5s",
        "  timeout client 30s",
        "  timeout server 30s",
        "frontend v1",
        `  bind 127.0.0.1:${fronts.v1.ipv4}`,
        `  bind [::1]:${fronts.v1.ipv6}`,
        "  default_backend v1",
        "frontend v2",
        `  bind 127.0.0.1:${fronts.v2.ipv4}`,
        `  bind [::1]:${fronts.v2.ipv6}`,
        "  unique-id-format %{+X}o\\ %ci:%cp_%fi:%fp_%Ts_%rt:%pid",
        "  default_backend v2",
        "backend v1",
        `  server capture 127.0.0.1:${capture.port} send-proxy`,
        "backend v2",
        `  server capture 127.0.0.1:${capture.port} send-proxy-v2 proxy-v2-options crc32c,unique-id`,
        "",
      ].join("\n"),
    );
    // Master-worker mode (-W) says "Loading success." once the worker is
    // up, its listeners bound; -db keeps it in the foreground.
    const haproxy = spawnChild(HAPROXY!, ["-W", "-db", "-f", config], {
      stdout: "null",
    });
    using _timeout = killAfter(haproxy, 60_000);
    const stderr = new Lines(haproxy.stderr);
    const stop = async () => {
      try {
        haproxy.kill("SIGTERM");
      } catch (error) {
        if (!(error instanceof TypeError)) throw error; // it has exited
      }
      await haproxy.status;
      await stderr.done;
    };
    try {
      await within(stderr.next(/Loading success/), 30_000, "haproxy ready");
      const clients = [
        {
          version: 1,
          from: "127.0.0.2",
          to: "127.0.0.1",
          port: fronts.v1.ipv4,
        },
        { version: 1, from: "::1", to: "::1", port: fronts.v1.ipv6 },
        {
          version: 2,
          from: "127.0.0.3",
          to: "127.0.0.1",
          port: fronts.v2.ipv4,
        },
        { version: 2, from: "::1", to: "::1", port: fronts.v2.ipv6 },
      ];
      const sent = await within(
        Promise.all(
          clients.map((client, i) =>
            sendFrom(client.from, client.to, client.port, `client ${i}`)
          ),
        ),
        30_000,
        "the clients' echo through haproxy",
      );
      const received = await Promise.all(capture.received);
      for (const [i, client] of clients.entries()) {
        const payload = encoder.encode(`client ${i}`);
        const bytes = received.find((bytes) =>
          bytes.length > payload.length &&
          bytes.subarray(bytes.length - payload.length).every((byte, j) =>
            byte === payload[j]
          )
        );
        assert.ok(bytes !== undefined, `nothing received for client ${i}`);
        const result = parseProxyHeader(bytes);
        assert.equal(result.status, "complete", JSON.stringify(result));
        if (result.status !== "complete") continue;
        assert.deepEqual(result.header, {
          version: client.version,
          length: bytes.length - payload.length,
          source: { hostname: client.from, port: sent[i] },
          destination: { hostname: client.to, port: client.port },
        });
        if (client.version === 1) {
          const family = client.from === "::1" ? "TCP6" : "TCP4";
          assert.equal(
            new TextDecoder().decode(bytes.subarray(0, result.header.length)),
            `PROXY ${family} ${client.from} ${client.to} ${
              sent[i]
            } ${client.port}\r\n`,
          );
        } else {
          // The checksum is checked: a changed byte of the unique ID (the
          // header's last byte) makes the header malformed.
          const changed = bytes.slice();
          changed[result.header.length - 1] ^= 1;
          assertMalformed(changed);
        }
      }
    } catch (error) {
      await stop();
      throw new Error(
        `${error}\n--- haproxy stderr:\n${stderr.lines.join("\n")}`,
      );
    }
    await stop();
  }),
);
