/**
 * How an error reads in one line, and the checked-integer guard, shared by
 * the server's modules and the bench tools so each says it the same way.
 * Internal (leading underscore): not part of the package's surface.
 *
 * @module
 */

/**
 * An error as `Name: message` (`String(error)` for a non-error), for lines
 * where the class says something (a reset or a refusal).
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * assert.equal(describe(new RangeError("too big")), "RangeError: too big");
 * assert.equal(describe("odd"), "odd");
 * ```
 */
export function describe(error: unknown): string {
  if (error instanceof Error) return `${error.name}: ${error.message}`;
  return String(error);
}

/**
 * An error's message alone (`String(error)` for a non-error), for lines
 * meant for a user.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * assert.equal(errorMessage(new Error("no such file")), "no such file");
 * ```
 */
export function errorMessage(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/**
 * Throws a `RangeError` naming `name` unless `value` is a whole number from
 * `min` to `max`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * checkInteger("port", 4000, 1, 65535);
 * assert.throws(() => checkInteger("port", 0.5, 1, 65535), RangeError);
 * ```
 */
export function checkInteger(
  name: string,
  value: number,
  min: number,
  max: number,
): void {
  if (!(Number.isInteger(value) && value >= min && value <= max)) {
    throw new RangeError(
      `${name} must be a whole number from ${min} to ${max}, not ${value}`,
    );
  }
}
