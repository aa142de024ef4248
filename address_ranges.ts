/**
 * Sets of IP addresses, given as addresses and CIDR ranges: who may send a
 * PROXY header.
 *
 * IPv4 and IPv6 are kept apart, as the addresses of connections are: an
 * IPv4 range holds IPv4 addresses, including the IPv4-mapped IPv6 form
 * (`::ffff:10.0.0.1`) a dual-stack listener reports; an IPv6 range holds
 * IPv6 addresses only, so `::/0` is every IPv6 client and `0.0.0.0/0` every
 * IPv4 one. An IPv6 entry within `::ffff:0:0/96` is the IPv4 range it maps
 * (`::ffff:10.0.0.0/104` is `10.0.0.0/8`).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const trusted = AddressRanges.parse("127.0.0.1, 10.0.0.0/8, fd00::/8");
 * assert.ok(trusted.contains("10.1.2.3"));
 * assert.ok(trusted.contains("::ffff:127.0.0.1"));
 * assert.ok(!trusted.contains("192.168.0.1"));
 * ```
 *
 * @module
 */

import {
  formatIPv4,
  formatIPv6,
  isIPv4Mapped,
  parseIPv4,
  parseIPv6,
  readIPv4,
} from "./_ip.ts";

/**
 * A set of IPv4 and IPv6 addresses, from a comma-separated list of
 * addresses and CIDR ranges.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const ranges = AddressRanges.parse("192.168.0.0/16,::1");
 * assert.ok(ranges.contains("192.168.3.4"));
 * assert.ok(ranges.contains("::1"));
 * assert.ok(!ranges.contains("::2"));
 * assert.equal(String(ranges), "192.168.0.0/16,::1");
 * ```
 */
export class AddressRanges {
  /** Each IPv4 range as network, mask: numbers from 0 to 2^32 - 1. */
  readonly #ipv4: number[] = [];
  /** Each IPv6 range as 16 network bytes, then its prefix length. */
  readonly #ipv6: { network: Uint8Array; prefix: number }[] = [];
  readonly #entries: string[] = [];
  /** The hostname being looked up, reused so a lookup allocates nothing. */
  readonly #scratch = new Uint8Array(16);

  private constructor() {}

  /**
   * Parses "127.0.0.1,10.0.0.0/8,::1,fd00::/8". Throws RangeError with a
   * one-line message naming the bad entry and what is wrong (e.g.
   * `"10.0.0.1/8" has bits set past /8 (did you mean 10.0.0.0/8?)`,
   * `"localhost" is not an IP address or CIDR range`, empty entry, prefix
   * out of range). Spaces around entries are allowed.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * assert.equal(String(AddressRanges.parse(" 10.0.0.0/8 , ::1 ")), "10.0.0.0/8,::1");
   * assert.throws(() => AddressRanges.parse("10.0.0.1/8"), {
   *   name: "RangeError",
   *   message: '"10.0.0.1/8" has bits set past /8 (did you mean 10.0.0.0/8?)',
   * });
   * ```
   */
  static parse(text: string): AddressRanges {
    const ranges = new AddressRanges();
    const entries = text.split(",");
    for (let index = 0; index < entries.length; index++) {
      const entry = entries[index].trim();
      if (entry === "") {
        throw new RangeError(
          `entry ${index + 1} of ${JSON.stringify(text)} is empty`,
        );
      }
      ranges.#add(entry);
    }
    return ranges;
  }

  #add(entry: string): void {
    const slash = entry.indexOf("/");
    const address = slash < 0 ? entry : entry.slice(0, slash);
    const ipv4 = parseIPv4(address);
    if (ipv4 !== undefined) {
      const prefix = prefixOf(entry, slash, 32);
      const network = (ipv4 & maskIPv4(prefix)) >>> 0;
      if (network !== ipv4) {
        throw new RangeError(
          `${
            JSON.stringify(entry)
          } has bits set past /${prefix} (did you mean ${
            formatIPv4(network)
          }/${prefix}?)`,
        );
      }
      this.#addIPv4(network, prefix);
      return;
    }
    const ipv6 = parseIPv6(address);
    if (ipv6 === undefined) {
      throw new RangeError(
        `${JSON.stringify(entry)} is not an IP address or CIDR range`,
      );
    }
    const prefix = prefixOf(entry, slash, 128);
    const network = ipv6.slice();
    maskIPv6(network, prefix);
    if (!equalBytes(network, ipv6)) {
      throw new RangeError(
        `${JSON.stringify(entry)} has bits set past /${prefix} (did you mean ${
          formatIPv6(network)
        }/${prefix}?)`,
      );
    }
    if (isIPv4Mapped(network) && prefix >= 96) {
      this.#addIPv4(readIPv4(network, 12), prefix - 96);
      return;
    }
    this.#ipv6.push({ network, prefix });
    this.#entries.push(
      formatIPv6(network) + (prefix === 128 ? "" : `/${prefix}`),
    );
  }

  #addIPv4(network: number, prefix: number): void {
    this.#ipv4.push(network, maskIPv4(prefix));
    this.#entries.push(
      formatIPv4(network) + (prefix === 32 ? "" : `/${prefix}`),
    );
  }

  /**
   * True if `hostname` (as Deno's `conn.remoteAddr.hostname` gives it:
   * dotted IPv4 or IPv6 text, possibly IPv4-mapped `::ffff:1.2.3.4`, which
   * counts as that IPv4 address) is in a range. Not an IP address: false.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * const ranges = AddressRanges.parse("10.0.0.0/8");
   * assert.ok(ranges.contains("10.255.255.255"));
   * assert.ok(ranges.contains("::ffff:10.0.0.1"));
   * assert.ok(!ranges.contains("11.0.0.0"));
   * assert.ok(!ranges.contains("localhost"));
   * ```
   */
  contains(hostname: string): boolean {
    let ipv4: number | undefined;
    if (hostname.indexOf(":") < 0) {
      ipv4 = parseIPv4(hostname);
      if (ipv4 === undefined) return false;
    } else {
      const ipv6 = parseIPv6(hostname, this.#scratch);
      if (ipv6 === undefined) return false;
      if (!isIPv4Mapped(ipv6)) return this.#containsIPv6(ipv6);
      ipv4 = readIPv4(ipv6, 12);
    }
    const ranges = this.#ipv4;
    for (let i = 0; i < ranges.length; i += 2) {
      if (((ipv4 & ranges[i + 1]) >>> 0) === ranges[i]) return true;
    }
    return false;
  }

  #containsIPv6(address: Uint8Array): boolean {
    for (const { network, prefix } of this.#ipv6) {
      const whole = prefix >> 3;
      let inside = true;
      for (let i = 0; i < whole; i++) {
        if (address[i] !== network[i]) {
          inside = false;
          break;
        }
      }
      if (!inside) continue;
      const rest = prefix & 7;
      if (rest === 0) return true;
      const mask = (0xff << (8 - rest)) & 0xff;
      if ((address[whole] & mask) === network[whole]) return true;
    }
    return false;
  }

  /**
   * The entries, canonical, comma-separated: IPv4 dotted, IPv6 in RFC 5952
   * form, IPv4-mapped entries as IPv4, a single address without `/32` or
   * `/128`.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * const ranges = AddressRanges.parse("10.0.0.1/32,2001:DB8:0::/32,::ffff:10.0.0.0/104");
   * assert.equal(ranges.toString(), "10.0.0.1,2001:db8::/32,10.0.0.0/8");
   * ```
   */
  toString(): string {
    return this.#entries.join(",");
  }
}

/**
 * The prefix length after `entry`'s slash (`bits` without one): decimal
 * from 0 to `bits`, without sign or leading zeros.
 */
function prefixOf(entry: string, slash: number, bits: 32 | 128): number {
  if (slash < 0) return bits;
  const written = entry.slice(slash + 1);
  const prefix = /^(0|[1-9][0-9]{0,2})$/.test(written) ? Number(written) : -1;
  if (prefix < 0 || prefix > bits) {
    throw new RangeError(
      `${JSON.stringify(entry)} has prefix ${
        JSON.stringify(written)
      }, not a whole number from 0 to ${bits} (${
        bits === 32 ? "IPv4" : "IPv6"
      })`,
    );
  }
  return prefix;
}

/** The IPv4 mask of a prefix length from 0 to 32. */
function maskIPv4(prefix: number): number {
  return prefix === 0 ? 0 : (0xffffffff << (32 - prefix)) >>> 0;
}

/** Clears the bits of `bytes` past the first `prefix`. */
function maskIPv6(bytes: Uint8Array, prefix: number): void {
  const whole = prefix >> 3;
  if (whole >= 16) return;
  bytes[whole] &= (0xff << (8 - (prefix & 7))) & 0xff;
  bytes.fill(0, whole + 1);
}

function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  for (let i = 0; i < a.length; i++) {
    if (a[i] !== b[i]) return false;
  }
  return a.length === b.length;
}
