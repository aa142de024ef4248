/**
 * IPv4 and IPv6 addresses read from text and written back canonical, shared
 * by the PROXY protocol parser and the address ranges. Internal (leading
 * underscore): not part of the package's surface.
 *
 * An IPv4 address is a number from 0 to 2^32 - 1; an IPv6 address is 16
 * bytes in network order, read into a buffer the caller may reuse so that a
 * lookup allocates nothing.
 *
 * @module
 */

/**
 * The IPv4 address `text[start, end)` as a number from 0 to 2^32 - 1, or
 * `undefined` unless it is exactly four decimal numbers from 0 to 255
 * without leading zeros, joined by single dots (the PROXY protocol's rule,
 * section 2.1, and glibc's `inet_pton(AF_INET)`).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * assert.equal(parseIPv4("10.0.0.1"), 0x0a000001);
 * assert.equal(parseIPv4("10.0.0.01"), undefined);
 * assert.equal(parseIPv4("at 1.2.3.4", 3), 0x01020304);
 * ```
 */
export function parseIPv4(
  text: string,
  start = 0,
  end: number = text.length,
): number | undefined {
  let value = 0;
  let part = 0;
  let digits = 0;
  let dots = 0;
  for (let i = start; i < end; i++) {
    const c = text.charCodeAt(i);
    if (c >= 48 && c <= 57) {
      if (digits === 1 && part === 0) return undefined; // a leading zero
      part = part * 10 + c - 48;
      if (part > 255) return undefined;
      digits++;
    } else if (c === 46 && digits > 0 && dots < 3) {
      value = value * 256 + part;
      part = 0;
      digits = 0;
      dots++;
    } else {
      return undefined;
    }
  }
  if (digits === 0 || dots !== 3) return undefined;
  return value * 256 + part;
}

/**
 * Reads the IPv6 address `text[start, end)` into `into` (16 bytes, network
 * order) and returns it, or returns `undefined` unless the text is one
 * glibc's `inet_pton(AF_INET6)` accepts: eight groups of 1-4 hex digits
 * (either case) joined by colons, one `::` standing for one or more zero
 * groups, and optionally a dotted IPv4 address as the last 32 bits. No zone
 * (`%eth0`) and no brackets.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const bytes = parseIPv6("2001:DB8::1");
 * assert.deepEqual(bytes, new Uint8Array([0x20, 1, 0x0d, 0xb8, ...new Array(11).fill(0), 1]));
 * assert.equal(parseIPv6("::ffff:1.2.3.4")?.[15], 4);
 * assert.equal(parseIPv6("1::2::3"), undefined);
 * ```
 */
export function parseIPv6(
  text: string,
  into: Uint8Array = new Uint8Array(16),
  start = 0,
  end: number = text.length,
): Uint8Array | undefined {
  let groups = 0; // 16-bit groups written to into[0, 2 * groups)
  let gap = -1; // the group index where `::` stands
  let i = start;
  if (end - start >= 2 && text.charCodeAt(i) === 58) {
    if (text.charCodeAt(i + 1) !== 58) return undefined; // a lone leading ":"
    gap = 0;
    i += 2;
  }
  while (i < end) {
    const groupStart = i;
    let value = 0;
    while (i < end && i - groupStart < 5) {
      const digit = hexDigit(text.charCodeAt(i));
      if (digit < 0) break;
      value = value * 16 + digit;
      i++;
    }
    if (i < end && text.charCodeAt(i) === 46) {
      // The dotted IPv4 tail: the last 32 bits, and the end of the text.
      if (groups > 6) return undefined;
      const ipv4 = parseIPv4(text, groupStart, end);
      if (ipv4 === undefined) return undefined;
      into[2 * groups] = ipv4 >>> 24;
      into[2 * groups + 1] = (ipv4 >>> 16) & 0xff;
      into[2 * groups + 2] = (ipv4 >>> 8) & 0xff;
      into[2 * groups + 3] = ipv4 & 0xff;
      groups += 2;
      i = end;
      break;
    }
    const digits = i - groupStart;
    if (digits === 0 || digits > 4 || groups === 8) return undefined;
    into[2 * groups] = value >>> 8;
    into[2 * groups + 1] = value & 0xff;
    groups++;
    if (i === end) break;
    if (text.charCodeAt(i) !== 58) return undefined;
    i++;
    if (i < end && text.charCodeAt(i) === 58) {
      if (gap >= 0) return undefined; // a second `::`
      gap = groups;
      i++;
    } else if (i === end) {
      return undefined; // a lone trailing ":"
    }
  }
  if (gap < 0) return groups === 8 ? into : undefined;
  if (groups > 7) return undefined; // `::` stands for at least one group
  const zeros = 8 - groups;
  into.copyWithin(2 * (gap + zeros), 2 * gap, 2 * groups);
  into.fill(0, 2 * gap, 2 * (gap + zeros));
  return into;
}

function hexDigit(c: number): number {
  if (c >= 48 && c <= 57) return c - 48;
  if (c >= 97 && c <= 102) return c - 87;
  if (c >= 65 && c <= 70) return c - 55;
  return -1;
}

/**
 * An IPv4 address (a number from 0 to 2^32 - 1) as a dotted quad.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * assert.equal(formatIPv4(0xc0a8000b), "192.168.0.11");
 * ```
 */
export function formatIPv4(address: number): string {
  return `${address >>> 24}.${(address >>> 16) & 0xff}.${
    (address >>> 8) & 0xff
  }.${address & 0xff}`;
}

/**
 * The IPv4 address in `bytes[offset, offset + 4)` (network order) as a
 * number from 0 to 2^32 - 1.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * assert.equal(readIPv4(new Uint8Array([0, 127, 0, 0, 1]), 1), 0x7f000001);
 * ```
 */
export function readIPv4(bytes: Uint8Array, offset = 0): number {
  return (bytes[offset] * 0x1000000) +
    ((bytes[offset + 1] << 16) | (bytes[offset + 2] << 8) |
      bytes[offset + 3]);
}

/**
 * True if the IPv6 address in `bytes[offset, offset + 16)` is IPv4-mapped
 * (`::ffff:0:0/96`, RFC 4291 section 2.5.5.2): its last 4 bytes are then
 * the IPv4 address.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * assert.ok(isIPv4Mapped(parseIPv6("::ffff:10.0.0.1")!));
 * assert.ok(!isIPv4Mapped(parseIPv6("::10.0.0.1")!));
 * ```
 */
export function isIPv4Mapped(bytes: Uint8Array, offset = 0): boolean {
  for (let i = offset; i < offset + 10; i++) {
    if (bytes[i] !== 0) return false;
  }
  return bytes[offset + 10] === 0xff && bytes[offset + 11] === 0xff;
}

/**
 * The IPv6 address in `bytes[offset, offset + 16)` (network order) in RFC
 * 5952's canonical text: lower case, no leading zeros in a group, the
 * longest run of two or more zero groups (the first of equal runs) as `::`,
 * and an IPv4-mapped address as `::ffff:a.b.c.d` (section 5). Deno's
 * `conn.remoteAddr.hostname` writes IPv6 addresses the same way.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * assert.equal(formatIPv6(parseIPv6("2001:0DB8:0:0:1:0:0:1")!), "2001:db8::1:0:0:1");
 * assert.equal(formatIPv6(parseIPv6("::FFFF:7f00:1")!), "::ffff:127.0.0.1");
 * ```
 */
export function formatIPv6(bytes: Uint8Array, offset = 0): string {
  if (isIPv4Mapped(bytes, offset)) {
    return `::ffff:${formatIPv4(readIPv4(bytes, offset + 12))}`;
  }
  let bestStart = -1;
  let bestLength = 1; // a single zero group is never compressed
  let runStart = -1;
  for (let group = 0; group <= 8; group++) {
    const zero = group < 8 && bytes[offset + 2 * group] === 0 &&
      bytes[offset + 2 * group + 1] === 0;
    if (zero) {
      if (runStart < 0) runStart = group;
    } else if (runStart >= 0) {
      if (group - runStart > bestLength) {
        bestStart = runStart;
        bestLength = group - runStart;
      }
      runStart = -1;
    }
  }
  let text = "";
  for (let group = 0; group < 8; group++) {
    if (group === bestStart) {
      text += "::";
      group += bestLength - 1;
      continue;
    }
    if (text !== "" && !text.endsWith(":")) text += ":";
    text += ((bytes[offset + 2 * group] << 8) | bytes[offset + 2 * group + 1])
      .toString(16);
  }
  return text;
}
