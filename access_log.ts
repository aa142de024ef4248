/**
 * The access log: one line per finished client, `[client N]: received X bytes`.
 *
 * Lines are written synchronously, one `write` of a whole line at a time, to a
 * file opened with `O_APPEND`. That gives the guarantees the log promises:
 * a line is in the file before the next client's line is started, lines never
 * interleave (not even with another process appending), and nothing waits in
 * a user-space buffer to be lost at exit. A local append of ~40 bytes costs a
 * few microseconds, cheaper than the promise an async write would need.
 *
 * @module
 */

const encoder = new TextEncoder();

/** An append-only access log file that can be reopened after rotation. */
export class AccessLog {
  #path: string;
  #file: Deno.FsFile;

  private constructor(path: string, file: Deno.FsFile) {
    this.#path = path;
    this.#file = file;
  }

  /**
   * Opens (creating it and its directory if missing) the log at `path` for
   * appending. It never truncates. Fails at once, with a message that names
   * the path, if the file cannot be written.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * const dir = await Deno.makeTempDir();
   * const log = AccessLog.open(`${dir}/echo/access.log`);
   * log.record(1, 5);
   * log.close();
   * assert.equal(
   *   await Deno.readTextFile(`${dir}/echo/access.log`),
   *   "[client 1]: received 5 bytes\n",
   * );
   * await Deno.remove(dir, { recursive: true });
   * ```
   */
  static open(path: string): AccessLog {
    return new AccessLog(path, openForAppend(path));
  }

  /** The path the log was opened with. */
  get path(): string {
    return this.#path;
  }

  /** Appends the line for one finished client in a single write. */
  record(clientId: number, bytesReceived: number): void {
    const line = encoder.encode(
      `[client ${clientId}]: received ${bytesReceived} bytes\n`,
    );
    // A regular file takes the whole line in one write; the loop only guards
    // the short write POSIX allows, so a line is never cut short.
    for (let written = 0; written < line.length;) {
      written += this.#file.writeSync(line.subarray(written));
    }
  }

  /**
   * Opens the path again and switches to the new file, for log rotation by
   * rename: lines written before the call are in the old (renamed) file,
   * lines after it in the new one. If the path cannot be opened the log keeps
   * writing to the old file and the error is thrown.
   */
  reopen(): void {
    const next = openForAppend(this.#path);
    this.#file.close();
    this.#file = next;
  }

  /** Closes the file. Every recorded line is already written. */
  close(): void {
    this.#file.close();
  }
}

function openForAppend(path: string): Deno.FsFile {
  try {
    const slash = path.lastIndexOf("/");
    if (slash > 0) Deno.mkdirSync(path.slice(0, slash), { recursive: true });
    return Deno.openSync(path, { append: true, create: true });
  } catch (error) {
    throw new Error(`cannot open access log ${path}: ${describe(error)}`, {
      cause: error,
    });
  }
}

function describe(error: unknown): string {
  if (
    error instanceof Deno.errors.PermissionDenied ||
    error instanceof Deno.errors.NotCapable
  ) {
    return "permission denied (run as a user who may write there, or pass " +
      "--log PATH and grant --allow-write for that path)";
  }
  return error instanceof Error ? error.message : String(error);
}
