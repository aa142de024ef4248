/**
 * Parses the PROXY protocol header (HAProxy's, versions 1 and 2) that a
 * proxy sends before its client's bytes.
 *
 * The rules follow HAProxy's `doc/proxy-protocol.txt` (revision 2026/04/27);
 * comments cite its sections. The parser is pure: the server reads into a
 * buffer and calls {@linkcode parseProxyHeader} on the bytes so far after
 * each read, until the result is `complete` (the client's own bytes start at
 * `header.length`) or `invalid`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const bytes = new TextEncoder().encode(
 *   "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\n",
 * );
 * const result = parseProxyHeader(bytes);
 * assert.equal(result.status, "complete");
 * if (result.status === "complete") {
 *   assert.deepEqual(result.header.source, { hostname: "192.168.0.1", port: 56324 });
 *   assert.equal(result.header.length, 47);
 * }
 * ```
 *
 * @module
 */

import {
  formatIPv4,
  formatIPv6,
  parseIPv4,
  parseIPv6,
  readIPv4,
} from "./_ip.ts";

/**
 * The longest header accepted, in bytes (a v2 header is 16 bytes plus its
 * length field). A v1 header is at most 107 bytes (section 2.1); a v2 one
 * may announce up to 16 + 65,535, which would let any trusted proxy's
 * mistake hold 64 KiB per connection. The specification designs both to
 * fit the smallest TCP segment every host must accept, 536 bytes (section
 * 2); 1024 is twice that, and holds the addresses (at most 216 bytes, for
 * UNIX) with the TLVs the usual senders add: AWS's VPC endpoint ID (0xEA,
 * about 25 bytes), GCP's PSC connection ID (0xE0, 8 bytes), Azure's Private
 * Link ID (0xEE, 5 bytes), HAProxy's ALPN, authority (SNI, at most 255),
 * unique ID (at most 128), CRC32C and SSL TLV with version, CN, cipher and
 * algorithms. Too small only for HAProxy's raw client certificate
 * (PP2_SUBTYPE_SSL_CLIENT_CERT, a DER certificate of a kilobyte or more),
 * which a proxy in front of an echo server has no reason to send.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const oversized = new Uint8Array(16);
 * oversized.set(PROXY_V2_SIGNATURE);
 * oversized.set([0x21, 0x11, 0x03, 0xf1], 12); // length 1009: 1025 bytes
 * assert.equal(parseProxyHeader(oversized).status, "invalid");
 * assert.equal(PROXY_HEADER_MAX_BYTES, 1024);
 * ```
 */
export const PROXY_HEADER_MAX_BYTES = 1024;

/**
 * The longest v1 header, CRLF included (section 2.1: `PROXY UNKNOWN` with
 * two full IPv6 addresses and ports).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const line = "PROXY UNKNOWN " + "ffff:".repeat(7) + "ffff " +
 *   "ffff:".repeat(7) + "ffff 65535 65535\r\n";
 * assert.equal(line.length, PROXY_V1_MAX_BYTES);
 * ```
 */
export const PROXY_V1_MAX_BYTES = 107;

/** Section 2.2: the 12 bytes that begin a v2 header. */
const V2_SIGNATURE = [
  0x0d,
  0x0a,
  0x0d,
  0x0a,
  0x00,
  0x0d,
  0x0a,
  0x51,
  0x55,
  0x49,
  0x54,
  0x0a,
];

/**
 * The 12 bytes that begin a v2 header (section 2.2); a copy, so changing
 * it changes nothing the parser does.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * assert.equal(PROXY_V2_SIGNATURE.length, 12);
 * assert.equal(PROXY_V2_SIGNATURE[4], 0);
 * ```
 */
export const PROXY_V2_SIGNATURE: Uint8Array = new Uint8Array(V2_SIGNATURE);

/**
 * An address and port as the proxy saw them.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const address: ProxyAddress = { hostname: "::1", port: 443 };
 * assert.equal(address.port, 443);
 * ```
 */
export interface ProxyAddress {
  /** Dotted IPv4, or IPv6 in RFC 5952 form (`::ffff:a.b.c.d` if mapped). */
  hostname: string;
  /** The TCP port, 0 to 65535. */
  port: number;
}

/**
 * A complete, valid PROXY header.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const result = parseProxyHeader(new TextEncoder().encode("PROXY UNKNOWN\r\n"));
 * assert.deepEqual(result, { status: "complete", header: { version: 1, length: 15 } });
 * ```
 */
export interface ProxyHeader {
  /** 1 for the text header, 2 for the binary one. */
  version: 1 | 2;
  /** Bytes the header took: the client's own bytes start at this offset. */
  length: number;
  /**
   * The client as the proxy saw it; undefined for v2 LOCAL, v1 UNKNOWN, and
   * v2 PROXY with family UNSPEC or UNIX: the connection's own address
   * stands.
   */
  source?: ProxyAddress;
  /** The address the client connected to at the proxy; undefined when source is. */
  destination?: ProxyAddress;
}

/**
 * What {@linkcode parseProxyHeader} made of the bytes so far: a `complete`
 * header; `incomplete`, every byte so far fits a header, so read more
 * (never for {@linkcode PROXY_HEADER_MAX_BYTES} bytes or more); or
 * `invalid`: `missing` when the bytes do not begin with either signature,
 * `malformed` when they do and something after it is wrong. `message` is a
 * short lower-case fragment for an operator's line, without control bytes.
 *
 * A v1 line's addresses and ports are read once its CRLF is in (section
 * 2.1: "the receiver must wait for the CRLF sequence before starting to
 * decode the addresses"); before it, `incomplete` means the protocol word,
 * the spacing and every character fit, so `PROXY TCP4 999.` is still
 * incomplete, and malformed at its CR.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const result: ProxyHeaderParse = parseProxyHeader(new TextEncoder().encode("PROX"));
 * assert.deepEqual(result, { status: "incomplete" });
 * ```
 */
export type ProxyHeaderParse =
  | { status: "complete"; header: ProxyHeader }
  | { status: "incomplete" }
  | { status: "invalid"; reason: "missing" | "malformed"; message: string };

const INCOMPLETE: ProxyHeaderParse = Object.freeze({ status: "incomplete" });

const V1_SIGNATURE = [0x50, 0x52, 0x4f, 0x58, 0x59, 0x20]; // "PROXY "
const CR = 0x0d;
const LF = 0x0a;
const SPACE = 0x20;

/**
 * Parses the PROXY header at the start of `bytes`, the bytes read so far.
 * Bytes past the header are the client's and never change the result.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const encode = (text: string) => new TextEncoder().encode(text);
 * assert.equal(parseProxyHeader(encode("PROXY TCP6 ::1 ::1 1 2\r\nhi")).status, "complete");
 * assert.deepEqual(parseProxyHeader(encode("PROXY TCP4 1.2.3.4")), { status: "incomplete" });
 * const missing = parseProxyHeader(encode("GET / HTTP/1.1\r\n"));
 * assert.equal(missing.status === "invalid" && missing.reason, "missing");
 * const malformed = parseProxyHeader(encode("PROXY TCP4 ::1 ::1 1 2\r\n"));
 * assert.deepEqual(malformed, {
 *   status: "invalid",
 *   reason: "malformed",
 *   message: 'PROXY v1 header: "TCP4" with source address "::1", not IPv4',
 * });
 * ```
 */
export function parseProxyHeader(bytes: Uint8Array): ProxyHeaderParse {
  if (bytes.length === 0) return INCOMPLETE;
  // Section 2.2: the v2 signature starts with CR, v1's with "P"; nothing
  // else starts a header.
  const signature = bytes[0] === CR ? V2_SIGNATURE : V1_SIGNATURE;
  const compared = Math.min(bytes.length, signature.length);
  for (let i = 0; i < compared; i++) {
    if (bytes[i] !== signature[i]) {
      return invalid(
        "missing",
        `no PROXY header: the connection begins ${quoteBytes(bytes, 0, 16)}`,
      );
    }
  }
  if (compared < signature.length) return INCOMPLETE;
  return signature === V2_SIGNATURE ? parseV2(bytes) : parseV1(bytes);
}

function invalid(
  reason: "missing" | "malformed",
  message: string,
): ProxyHeaderParse {
  return { status: "invalid", reason, message };
}

function malformedV1(message: string): ProxyHeaderParse {
  return invalid("malformed", `PROXY v1 header: ${message}`);
}

function malformedV2(message: string): ProxyHeaderParse {
  return invalid("malformed", `PROXY v2 header: ${message}`);
}

// ---------------------------------------------------------------- v1

function parseV1(bytes: Uint8Array): ProxyHeaderParse {
  // Section 2.1: the line ends at the first CRLF, within 107 bytes; a bare
  // CR or LF never ends it.
  const limit = Math.min(bytes.length, PROXY_V1_MAX_BYTES);
  let cr = -1;
  for (let i = V1_SIGNATURE.length; i < limit; i++) {
    const byte = bytes[i];
    if (byte === LF) return malformedV1("LF without CR before it");
    if (byte === CR) {
      cr = i;
      break;
    }
  }
  if (cr < 0) {
    if (bytes.length >= PROXY_V1_MAX_BYTES) {
      return malformedV1(`no CRLF within ${PROXY_V1_MAX_BYTES} bytes`);
    }
    return checkV1Prefix(bytes);
  }
  if (cr + 2 > PROXY_V1_MAX_BYTES) {
    return malformedV1(`no CRLF within ${PROXY_V1_MAX_BYTES} bytes`);
  }
  if (cr + 1 === bytes.length) {
    // Only an LF can come next: the line is whole, and a line that is wrong
    // now stays wrong.
    const result = parseV1Line(bytes, cr);
    return result.status === "complete" ? INCOMPLETE : result;
  }
  if (bytes[cr + 1] !== LF) return malformedV1("CR without LF after it");
  return parseV1Line(bytes, cr);
}

/** Parses the v1 line `bytes[0, cr)`, to be followed by LF. */
function parseV1Line(bytes: Uint8Array, cr: number): ProxyHeaderParse {
  const length = cr + 2;
  const line = latin1(bytes, V1_SIGNATURE.length, cr);
  // Section 2.1: for UNKNOWN the receiver ignores the rest of the line.
  if (line === "UNKNOWN" || line.startsWith("UNKNOWN ")) {
    return { status: "complete", header: { version: 1, length } };
  }
  const problem = v1LineProblem(line, true);
  if (problem !== undefined) return malformedV1(problem);
  const fields = line.split(" ");
  const protocol = fields[0];
  if (fields.length !== 5) {
    return malformedV1(
      `"${protocol}" with ${fields.length - 1} fields after it, not 4`,
    );
  }
  const ipv4 = protocol === "TCP4";
  const source = v1Address(fields[1], ipv4);
  if (source === undefined) {
    return malformedV1(
      `"${protocol}" with source address ${quote(fields[1])}, not ${
        ipv4 ? "IPv4" : "IPv6"
      }`,
    );
  }
  const destination = v1Address(fields[2], ipv4);
  if (destination === undefined) {
    return malformedV1(
      `"${protocol}" with destination address ${quote(fields[2])}, not ${
        ipv4 ? "IPv4" : "IPv6"
      }`,
    );
  }
  const sourcePort = v1Port(fields[3]);
  if (sourcePort < 0) {
    return malformedV1(
      `source port ${
        quote(fields[3])
      }, not a decimal 0-65535 without leading zeros`,
    );
  }
  const destinationPort = v1Port(fields[4]);
  if (destinationPort < 0) {
    return malformedV1(
      `destination port ${
        quote(fields[4])
      }, not a decimal 0-65535 without leading zeros`,
    );
  }
  return {
    status: "complete",
    header: {
      version: 1,
      length,
      source: { hostname: source, port: sourcePort },
      destination: { hostname: destination, port: destinationPort },
    },
  };
}

/**
 * What is wrong with the text after "PROXY " (the whole line if `whole`, a
 * prefix of it otherwise) that no further byte can mend, if anything: a
 * protocol other than TCP4, TCP6 or UNKNOWN, two spaces in a row, a space
 * before CRLF, a character no address or port has.
 */
function v1LineProblem(line: string, whole: boolean): string | undefined {
  if (line.charCodeAt(0) === SPACE) return "two spaces in a row";
  const space = line.indexOf(" ");
  const protocol = space < 0 ? line : line.slice(0, space);
  if (
    whole || space >= 0
      ? !V1_PROTOCOLS.includes(protocol)
      : !V1_PROTOCOLS.some((word) => word.startsWith(protocol))
  ) {
    return `protocol ${quote(protocol)}, not TCP4, TCP6 or UNKNOWN`;
  }
  if (protocol === "UNKNOWN") return undefined;
  if (line.includes("  ")) return "two spaces in a row";
  if (whole && line.endsWith(" ")) return "a space before CRLF";
  for (let i = space + 1; space >= 0 && i < line.length; i++) {
    const c = line.charCodeAt(i);
    const allowed = c === SPACE || c === 0x2e || c === 0x3a ||
      (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x46) ||
      (c >= 0x61 && c <= 0x66);
    if (!allowed) {
      return `${quote(line[i])} in "${protocol}" line, not an address or port`;
    }
  }
  return undefined;
}

/** The text after "PROXY " so far, when no CR has come yet. */
function checkV1Prefix(bytes: Uint8Array): ProxyHeaderParse {
  const line = latin1(bytes, V1_SIGNATURE.length, bytes.length);
  const problem = v1LineProblem(line, false);
  return problem === undefined ? INCOMPLETE : malformedV1(problem);
}

const V1_PROTOCOLS = ["TCP4", "TCP6", "UNKNOWN"];

const asciiDecoder = new TextDecoder();

/**
 * `bytes[start, end)` as text, one character per byte: every byte outside
 * printable ASCII is then refused by the field checks, and escaped in a
 * message. ASCII (every valid line) goes through a `TextDecoder`, which
 * reads it as UTF-8 would, in one step.
 */
function latin1(bytes: Uint8Array, start: number, end: number): string {
  for (let i = start; i < end; i++) {
    if (bytes[i] >= 0x80) {
      let text = "";
      for (let j = start; j < end; j++) text += String.fromCharCode(bytes[j]);
      return text;
    }
  }
  return asciiDecoder.decode(bytes.subarray(start, end));
}

const v1Scratch = new Uint8Array(16);

/** The canonical address, or undefined if `text` is not one of the family. */
function v1Address(text: string, ipv4: boolean): string | undefined {
  if (ipv4) {
    const address = parseIPv4(text);
    return address === undefined ? undefined : formatIPv4(address);
  }
  const address = parseIPv6(text, v1Scratch);
  return address === undefined ? undefined : formatIPv6(address);
}

/** The port, or -1 unless `text` is decimal 0-65535 without leading zeros. */
function v1Port(text: string): number {
  if (text.length === 0 || text.length > 5) return -1;
  if (text.length > 1 && text.charCodeAt(0) === 0x30) return -1;
  let port = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c < 0x30 || c > 0x39) return -1;
    port = port * 10 + c - 0x30;
  }
  return port <= 65535 ? port : -1;
}

// ---------------------------------------------------------------- v2

const COMMAND_LOCAL = 0x0;
const COMMAND_PROXY = 0x1;
const FAMILY_NAMES = ["UNSPEC", "INET", "INET6", "UNIX"];
const TRANSPORT_NAMES = ["UNSPEC", "STREAM", "DGRAM"];
/** Section 2.2: the address block's length for each family. */
const ADDRESS_BLOCK_BYTES = [0, 12, 36, 216];
const TRANSPORT_STREAM = 0x1;
const PP2_TYPE_CRC32C = 0x03;

function parseV2(bytes: Uint8Array): ProxyHeaderParse {
  // Section 2.2: the 13th byte holds the version (high nibble, only 2) and
  // the command (low nibble, LOCAL or PROXY; receivers drop others).
  if (bytes.length < 13) return INCOMPLETE;
  const version = bytes[12] >> 4;
  if (version !== 2) return malformedV2(`version ${version}`);
  const command = bytes[12] & 0xf;
  if (command !== COMMAND_LOCAL && command !== COMMAND_PROXY) {
    return malformedV2(`command ${command}, not LOCAL (0) or PROXY (1)`);
  }
  // Section 2.2: the 14th byte holds the family (high nibble) and the
  // transport (low nibble); other values "must be rejected as invalid".
  if (bytes.length < 14) return INCOMPLETE;
  const family = bytes[13] >> 4;
  if (family >= FAMILY_NAMES.length) {
    return malformedV2(
      `address family ${family}, not UNSPEC (0), INET (1), INET6 (2) or UNIX (3)`,
    );
  }
  const transport = bytes[13] & 0xf;
  if (transport >= TRANSPORT_NAMES.length) {
    return malformedV2(
      `transport ${transport}, not UNSPEC (0), STREAM (1) or DGRAM (2)`,
    );
  }
  const inet = family === 1 || family === 2;
  if (command === COMMAND_PROXY && inet && transport !== TRANSPORT_STREAM) {
    // The connection carrying the header is TCP: a UDP or unspecified
    // transport for an INET address cannot be its client's.
    return malformedV2(
      `${FAMILY_NAMES[family]} over ${
        TRANSPORT_NAMES[transport]
      }, not STREAM, on a TCP connection`,
    );
  }
  // Section 2.2: the 15th and 16th bytes are the length of the rest, in
  // network order; the header is always 16 + that many bytes.
  if (bytes.length < 16) return INCOMPLETE;
  const rest = (bytes[14] << 8) | bytes[15];
  const length = 16 + rest;
  if (length > PROXY_HEADER_MAX_BYTES) {
    return malformedV2(
      `length ${rest} over the ${PROXY_HEADER_MAX_BYTES} bytes accepted`,
    );
  }
  const addressBytes = ADDRESS_BLOCK_BYTES[family];
  if (command === COMMAND_PROXY && rest < addressBytes) {
    return malformedV2(
      `length ${rest}, short of the ${addressBytes}-byte ${
        FAMILY_NAMES[family]
      } address block`,
    );
  }
  if (bytes.length < length) return INCOMPLETE;
  // Section 2.2: LOCAL's family and addresses are ignored and the receiver
  // "must not assume zero is presented": how many address bytes come
  // before any TLV is unknown, so the whole block is skipped. The same
  // holds for PROXY with family UNSPEC ("ignore address information").
  if (command === COMMAND_LOCAL || family === 0) {
    return { status: "complete", header: { version: 2, length } };
  }
  const problem = v2TlvProblem(bytes, 16 + addressBytes, length);
  if (problem !== undefined) return malformedV2(problem);
  if (!inet) return { status: "complete", header: { version: 2, length } };
  let source: ProxyAddress;
  let destination: ProxyAddress;
  if (family === 1) {
    source = {
      hostname: formatIPv4(readIPv4(bytes, 16)),
      port: port(bytes, 24),
    };
    destination = {
      hostname: formatIPv4(readIPv4(bytes, 20)),
      port: port(bytes, 26),
    };
  } else {
    source = { hostname: formatIPv6(bytes, 16), port: port(bytes, 48) };
    destination = { hostname: formatIPv6(bytes, 32), port: port(bytes, 50) };
  }
  return {
    status: "complete",
    header: { version: 2, length, source, destination },
  };
}

function port(bytes: Uint8Array, offset: number): number {
  return (bytes[offset] << 8) | bytes[offset + 1];
}

/**
 * What is wrong with the TLVs in `bytes[start, end)`, if anything (section
 * 2.2): each is a type byte, a 2-byte length and that many bytes, and the
 * last ends at the header's end. A PP2_TYPE_CRC32C one (section 2.2.3) holds
 * 4 bytes, at most once, and must match the header's checksum; the others
 * (PP2_TYPE_NOOP, section 2.2.4, and every type this server has no use for)
 * are skipped.
 */
function v2TlvProblem(
  bytes: Uint8Array,
  start: number,
  end: number,
): string | undefined {
  let crcOffset = -1;
  let offset = start;
  while (offset < end) {
    if (offset + 3 > end) {
      return `TLV at byte ${offset} cut off by the header's end at ${end}`;
    }
    const type = bytes[offset];
    const valueLength = (bytes[offset + 1] << 8) | bytes[offset + 2];
    const next = offset + 3 + valueLength;
    if (next > end) {
      return `TLV type ${hex(type)} at byte ${offset} of ${
        3 + valueLength
      } bytes runs past the header's end at ${end}`;
    }
    if (type === PP2_TYPE_CRC32C) {
      if (valueLength !== 4) {
        return `CRC32C TLV with a ${valueLength}-byte value, not 4`;
      }
      if (crcOffset >= 0) return "two CRC32C TLVs";
      crcOffset = offset + 3;
    }
    offset = next;
  }
  if (crcOffset >= 0) {
    const sent = readIPv4(bytes, crcOffset);
    const computed = headerCrc32c(bytes, end, crcOffset);
    if (sent !== computed) {
      return `CRC32C ${hex(sent)} in the header, ${hex(computed)} computed`;
    }
  }
  return undefined;
}

// ---------------------------------------------------------------- CRC32c

/** CRC32c (Castagnoli, reflected polynomial 0x82F63B78), a byte at a time. */
const CRC32C_TABLE: Uint32Array = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let crc = n;
    for (let bit = 0; bit < 8; bit++) {
      crc = crc & 1 ? (crc >>> 1) ^ 0x82f63b78 : crc >>> 1;
    }
    table[n] = crc;
  }
  return table;
})();

function crc32cUpdate(
  crc: number,
  bytes: Uint8Array,
  start: number,
  end: number,
): number {
  for (let i = start; i < end; i++) {
    crc = CRC32C_TABLE[(crc ^ bytes[i]) & 0xff] ^ (crc >>> 8);
  }
  return crc;
}

/**
 * The CRC32c checksum (RFC 4960 appendix B, as section 2.2.3 asks) of
 * `bytes`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * assert.equal(crc32c(new TextEncoder().encode("123456789")), 0xe3069283);
 * ```
 */
export function crc32c(bytes: Uint8Array): number {
  return (crc32cUpdate(0xffffffff, bytes, 0, bytes.length) ^ 0xffffffff) >>>
    0;
}

/** Section 2.2.3: the CRC32c of `bytes[0, end)` with the 4 at `zeroed` as 0. */
function headerCrc32c(bytes: Uint8Array, end: number, zeroed: number): number {
  let crc = crc32cUpdate(0xffffffff, bytes, 0, zeroed);
  for (let i = 0; i < 4; i++) crc = CRC32C_TABLE[crc & 0xff] ^ (crc >>> 8);
  crc = crc32cUpdate(crc, bytes, zeroed + 4, end);
  return (crc ^ 0xffffffff) >>> 0;
}

// ---------------------------------------------------------------- messages

const MESSAGE_VALUE_CHARS = 40;

/** `text` in double quotes, bytes outside printable ASCII as `\xNN`, cut short. */
function quote(text: string): string {
  let quoted = '"';
  const shown = Math.min(text.length, MESSAGE_VALUE_CHARS);
  for (let i = 0; i < shown; i++) quoted += escapeChar(text.charCodeAt(i));
  return quoted + (text.length > shown ? '..."' : '"');
}

function quoteBytes(bytes: Uint8Array, start: number, max: number): string {
  const end = Math.min(bytes.length, start + max);
  let quoted = '"';
  for (let i = start; i < end; i++) quoted += escapeChar(bytes[i]);
  return quoted + (bytes.length > end ? '..."' : '"');
}

function escapeChar(c: number): string {
  if (c === 0x22 || c === 0x5c) return "\\" + String.fromCharCode(c);
  if (c >= 0x20 && c < 0x7f) return String.fromCharCode(c);
  if (c === CR) return "\\r";
  if (c === LF) return "\\n";
  return "\\x" + c.toString(16).padStart(2, "0");
}

function hex(value: number): string {
  return "0x" + value.toString(16).padStart(value > 0xff ? 8 : 2, "0");
}
