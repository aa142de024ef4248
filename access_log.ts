/**
 * The access log: one line per finished client, `[client N]: received X bytes`,
 * kept whole and in order through a full disk, a failed reopen and a
 * file-size limit.
 *
 * Lines are written synchronously, one `write` of a whole line at a time, to a
 * file opened with `O_APPEND`. A local append of ~40 bytes costs a few
 * microseconds, cheaper than the promise an async write would need, and
 * nothing waits in a user-space buffer while the file takes writes.
 *
 * When the file does not take a line (ENOSPC, EDQUOT, EFBIG, EIO, or a short
 * write, which is how a disk that fills mid-line answers), the unwritten
 * bytes wait in memory, in order, in a bounded backlog:
 *
 * - A short write's remainder is the backlog's first bytes, so the next
 *   successful write finishes the line the fragment began: this process
 *   never appends another line to a fragment.
 * - The backlog is written again on the next line and on a timer (every
 *   {@linkcode AccessLogOptions.retryIntervalMs}), never in a loop; while it
 *   is not empty, new lines join its end, so the order is kept. Backlogged
 *   lines go out together, up to 64 KiB of whole lines per `write`.
 * - Past {@linkcode AccessLogOptions.maxBacklogBytes} new lines are dropped
 *   and counted ({@linkcode AccessLogStats.droppedLines}). Memory is the
 *   lines' bytes (~38 each) in 64 KiB chunks: the bound plus at most 128 KiB
 *   (the part of the first chunk already written, and the last's free room)
 *   and under 80 bytes a chunk (the room a sealed chunk leaves unused).
 * - Diagnostics come at most one per kind per
 *   {@linkcode AccessLogOptions.reportIntervalMs}, with counts.
 *
 * Several instances appending to one file (`--instance I/N`): each `write` is
 * one or more whole lines at the file's end (`O_APPEND`), so lines never
 * interleave while the file takes whole writes. After a short write this
 * process writes the remainder before any other line of its own, but another
 * instance's line can land between the fragment and its rest: that happens
 * only when the file system is at its limit (a short write), and then one
 * line in the file is broken by another instance's line. A single instance
 * never leaves a fragment that another line runs into.
 *
 * A failed {@linkcode AccessLog.reopen} (out of file descriptors) keeps
 * writing to the old file and tries to open the path again on every line and
 * on the timer until it succeeds. A fragment left in the old file is finished
 * there if it can be; otherwise its whole line goes to the new file.
 *
 * The log is only ever a regular file that is the path's own entry. A
 * symlink, a FIFO, a directory, a device or a socket at the path is refused
 * ({@linkcode RefusedLogPathError}) and nothing is written there: at
 * start-up the open throws (the server exits 1); at a reopen the old file
 * (rotated away, soon compressed and deleted) is left too and lines wait in
 * the backlog as on a full disk, while the timer and each SIGHUP try again.
 * The checks need `--allow-write` only (the compiled binary has no
 * `--allow-read`):
 *
 * 1. Create with `O_CREAT|O_EXCL` (Deno's `createNew`): a new file, the
 *    usual case after a rotation (`nocreate`). The kernel fails it with
 *    EEXIST on anything at the path, a symlink (dangling or not) included:
 *    nothing is followed, nothing blocks.
 * 2. Else probe it: `node:fs` open with `O_WRONLY|O_APPEND|O_NONBLOCK|
 *    O_NOFOLLOW` (never creating). A FIFO without a reader, or a socket,
 *    fails with ENXIO at once; a directory with EISDIR. `fstat` of the
 *    probe (`node:fs`; it needs no permission) must show a regular file.
 * 3. Check that the probe opened the path's own entry, not a symlink's
 *    target. `O_NOFOLLOW` cannot tell: with `--allow-write=DIR`, Deno 2.9
 *    resolves a symlink in the path itself before opening and opens the
 *    target (strace: `readlink` of the path, then `openat` of the target
 *    with `O_NOFOLLOW`), and `lstat` needs `--allow-read`. What needs write
 *    permission only and does not follow a symlink is `utimensat` with
 *    `AT_SYMLINK_NOFOLLOW` (`node:fs` `lutimes`): the path's entry gets an
 *    access time one to two days ahead, a whole second drawn at random (a
 *    mark no read sets under relatime, that nobody can set beforehand, and
 *    that file systems keeping whole seconds keep), and the probe's `fstat`
 *    must show it. A symlink takes the mark; its target
 *    does not.
 * 4. Open the file again with `Deno.open`, so that each line is the same
 *    `write(2)` of a `Deno.FsFile` as for a created file, and check that it
 *    is the probe's file: a second mark set through it (`futimens`) must
 *    show in the probe's `fstat`. The access time is then put back, and the
 *    modification time is what it was at the check, to the millisecond
 *    (`fstat` through Deno gives no finer; a line appended by another
 *    instance meanwhile moves it on again).
 *
 * A mark that does not show is checked again, up to 10 times after a random
 * pause (at most 64 ms): instances sharing the log check it at the same
 * moment after a rotation. Setting a
 * time needs the file's owner, so an existing log must belong to the user
 * the server runs as; if not, it is refused.
 *
 * A reopen makes every call asynchronous: Deno runs them on its blocking
 * thread pool, so an open that blocks (a stalled network file system)
 * holds a pool thread, never the event loop. Until it returns, lines go to
 * the old file, no other open starts, and a diagnostic says so once per
 * {@linkcode AccessLogOptions.reportIntervalMs}. A SIGHUP meanwhile opens
 * once more after it. Start-up opens synchronously: nothing is served yet.
 *
 * Not covered: symlinks in the directories above the file (the operator's:
 * systemd's `LogsDirectory=` is itself one), and hard links (with
 * `fs.protected_hardlinks`, Linux's default, nobody links a file they could
 * not write themselves). A FIFO put at the path in the moment between
 * steps 2 and 4 blocks step 4's open until a reader comes: at a reopen that
 * is a pool thread, at start-up the start.
 *
 * A fragment this process gives up on (the old file after a reopen, or the
 * file at {@linkcode AccessLog.close} with the disk still full) is cut off
 * with `ftruncate`, which needs no free space, if the file's size shows that
 * nothing was appended after it; so the file ends on a whole line and the
 * next process does not append to a fragment. If another instance appended
 * meanwhile, the fragment stays and a diagnostic says so.
 *
 * Lines are ASCII (built from numbers), so their bytes are their characters.
 *
 * @module
 */

import {
  closeSync,
  constants,
  fstatSync,
  lutimesSync,
  openSync,
  promises as fsPromises,
  type Stats,
} from "node:fs";
import { errorMessage } from "./_errors.ts";
import { RateLimitedReporter } from "./reporter.ts";
import { DEFAULTS } from "./options.ts";

const encoder = new TextEncoder();

/** What the log writes to: `Deno.FsFile` or, in tests, a stub. */
export interface LogFile {
  /** Writes some of `bytes`, returning how many; throws on an error. */
  writeSync(bytes: Uint8Array): number;
  /** Closes the file. */
  close(): void;
  /**
   * Moves the file offset; with `O_APPEND` the offset after a write is the
   * file's end then, and `SeekMode.End` gives its end now (unlike `fstat`,
   * this needs no read permission). A fragment is cut off only if nothing
   * was appended after it, which this tells.
   */
  seekSync?(offset: number, whence: Deno.SeekMode): number;
  /** Cuts the file to `len` bytes. */
  truncateSync?(len: number): void;
}

/** Options for {@linkcode AccessLog.open}. */
export interface AccessLogOptions {
  /**
   * Bytes of lines kept in memory while the file takes no writes; a line
   * that would pass this is dropped and counted. 16 MiB holds ~440,000
   * lines: over 7 minutes of a full disk at 1,000 clients a second.
   *
   * @default {16 * 1024 * 1024}
   */
  maxBacklogBytes?: number;
  /**
   * How often a backlog, or a reopen that failed, is tried again, in
   * milliseconds (each new line tries too).
   *
   * @default {1000}
   */
  retryIntervalMs?: number;
  /**
   * At most one diagnostic of each kind (write failed, lines dropped,
   * reopen failed) per this period, in milliseconds; the next one counts
   * what happened meanwhile.
   *
   * @default {10_000}
   */
  reportIntervalMs?: number;
  /**
   * Receives one-line diagnostics: writes failing and working again, lines
   * dropped, reopens done or failed, lines lost at close.
   *
   * @default {console.error}
   */
  onDiagnostic?: (message: string) => void;
  /**
   * Opens the path for appending at {@linkcode AccessLog.open}, and for
   * {@linkcode AccessLog.reopen} too unless `reopenFile` is given (for
   * tests: a stub that fails on purpose). A stub that throws
   * {@linkcode RefusedLogPathError} plays a path that is not a regular file.
   *
   * @default {opens it with `O_APPEND`, creating it and its directory,
   * refusing anything but a regular file of its own (see the module doc)}
   */
  openFile?: (path: string) => LogFile;
  /**
   * Opens the path again for {@linkcode AccessLog.reopen}; a promise keeps
   * the open off the event loop.
   *
   * @default {`openFile` if given, else the same checks as at start-up,
   * each an asynchronous call (run by Deno's blocking thread pool)}
   */
  reopenFile?: (path: string) => LogFile | Promise<LogFile>;
}

/**
 * Thrown by the default opener when the log path is there but is not a
 * regular file of its own: a symlink, a FIFO, a directory, a device or a
 * socket. Nothing is written there; after a reopen the lines wait in memory.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const dir = await Deno.makeTempDir();
 * await Deno.symlink(`${dir}/elsewhere`, `${dir}/access.log`);
 * assert.throws(
 *   () => AccessLog.open(`${dir}/access.log`),
 *   RefusedLogPathError,
 * );
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export class RefusedLogPathError extends Error {
  /**
   * Makes the error; `message` says what the path is, e.g.
   * `refusing access log P: it is a FIFO (named pipe)`.
   */
  constructor(message: string) {
    super(message);
    this.name = "RefusedLogPathError";
  }
}

/** Running totals of an {@linkcode AccessLog}, read through its `stats`. */
export interface AccessLogStats {
  /** Lines written completely. */
  readonly linesWritten: number;
  /** Lines waiting in memory, a partly written one included. */
  readonly backlogLines: number;
  /** Bytes waiting in memory. */
  readonly backlogBytes: number;
  /** Lines dropped because the backlog was full. */
  readonly droppedLines: number;
  /** `write` calls that failed (each retry counts). */
  readonly writeErrors: number;
  /** Whether a reopen failed and is still being retried. */
  readonly reopenPending: boolean;
}

/** Default for {@linkcode AccessLogOptions.retryIntervalMs}: 1 s. */
export const DEFAULT_RETRY_INTERVAL_MS = 1000;
/** Default for {@linkcode AccessLogOptions.reportIntervalMs}: 10 s. */
export const DEFAULT_REPORT_INTERVAL_MS = 10_000;

// Backlog chunks hold whole lines; a write of the backlog takes one chunk.
const CHUNK_BYTES = 64 * 1024;
// The longest line: two 16-digit numbers and the text around them.
const MAX_LINE_BYTES = 80;
const NEWLINE = 10;

type ReportKind = "write" | "drop" | "reopen";

/** An append-only access log file that can be reopened after rotation. */
export class AccessLog {
  #path: string;
  // Undefined while the path is refused (lines wait in the backlog).
  #file: LogFile | undefined;
  #reopenFile: (path: string) => LogFile | Promise<LogFile>;
  #maxBacklogBytes: number;
  #retryIntervalMs: number;
  #reportIntervalMs: number;
  #diagnostic: (message: string) => void;

  // The backlog: chunks of whole lines, the first read from #readOffset,
  // the last filled to #fillOffset.
  #chunks: Uint8Array[] = [];
  #readOffset = 0;
  #fillOffset = 0;
  #backlogBytes = 0;
  #backlogLines = 0;
  // The first backlogged line was partly written to the current file.
  #fragment = false;
  // The file's size just after the fragment was written, if known.
  #fragmentEnd: number | undefined;

  #linesWritten = 0;
  #droppedLines = 0;
  #writeErrors = 0;
  #reopenPending = false;
  // An asynchronous open in flight, settled when it is done.
  #reopening: Promise<void> | undefined;
  #reopeningSince = 0;
  // A SIGHUP came while an open was in flight: open again after it.
  #reopenAgain = false;
  // The last reopen refused the path: retried on the timer, not per line.
  #refused = false;
  #retryTimer: ReturnType<typeof setTimeout> | undefined;
  #closed = false;
  // Per kind, one line per report interval; the rest counted into the
  // interval's last line (reporter.ts).
  #reports: Record<ReportKind, RateLimitedReporter<ReportKind>>;
  // A reopen failure was reported since the last successful reopen.
  #reopenReported = false;
  #failingSince: number | undefined;
  #line = new Uint8Array(MAX_LINE_BYTES);

  private constructor(path: string, options: AccessLogOptions) {
    this.#path = path;
    const openFile = options.openFile ?? openForAppendSync;
    this.#reopenFile = options.reopenFile ?? options.openFile ??
      openForAppend;
    this.#file = openFile(path);
    this.#maxBacklogBytes = options.maxBacklogBytes ??
      DEFAULTS.logBacklogBytes;
    this.#retryIntervalMs = options.retryIntervalMs ??
      DEFAULT_RETRY_INTERVAL_MS;
    this.#reportIntervalMs = options.reportIntervalMs ??
      DEFAULT_REPORT_INTERVAL_MS;
    this.#diagnostic = options.onDiagnostic ?? console.error;
    const reporter = () =>
      new RateLimitedReporter<ReportKind>(this.#diagnostic, {
        linesPerPeriod: 1,
        periodMs: this.#reportIntervalMs,
        summarize: (_, count: number, last: string) =>
          `${last}${
            count === 1 ? "" : ` (${count} times since the last line)`
          }`,
      });
    this.#reports = { write: reporter(), drop: reporter(), reopen: reporter() };
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
   * assert.equal(log.close(), 0);
   * assert.equal(
   *   await Deno.readTextFile(`${dir}/echo/access.log`),
   *   "[client 1]: received 5 bytes\n",
   * );
   * await Deno.remove(dir, { recursive: true });
   * ```
   */
  static open(path: string, options: AccessLogOptions = {}): AccessLog {
    return new AccessLog(path, options);
  }

  /** The path the log was opened with. */
  get path(): string {
    return this.#path;
  }

  /** Running totals: lines written, waiting, dropped; write errors. */
  get stats(): AccessLogStats {
    return {
      linesWritten: this.#linesWritten,
      backlogLines: this.#backlogLines,
      backlogBytes: this.#backlogBytes,
      droppedLines: this.#droppedLines,
      writeErrors: this.#writeErrors,
      reopenPending: this.#reopenPending,
    };
  }

  /**
   * Appends the line for one finished client in a single write; if the file
   * does not take it whole, what is left waits in the backlog. Never throws
   * while the log is open.
   */
  record(clientId: number, bytesReceived: number): void {
    if (this.#closed) throw new Error("the access log is closed");
    const { written: length } = encoder.encodeInto(
      `[client ${clientId}]: received ${bytesReceived} bytes\n`,
      this.#line,
    );
    const line = this.#line.subarray(0, length);
    if (this.#reopenPending && !this.#refused) this.#startReopen();
    // Lines wait: they go first. Still waiting, or no file (a refused
    // path), this one joins them.
    if (this.#backlogBytes > 0) this.#writeBacklog();
    const file = this.#file;
    if (this.#backlogBytes > 0 || file === undefined) {
      return this.#enqueue(line);
    }
    let written;
    try {
      written = file.writeSync(line);
    } catch (error) {
      // Queued first, so the diagnostic counts it among the lines waiting.
      this.#enqueue(line);
      this.#writeFailed(error);
      return;
    }
    if (written === length) {
      this.#linesWritten++;
      return;
    }
    // A short write (the disk filled mid-line): the whole line joins the
    // empty backlog with its written start marked, so the remainder is
    // written first; try it once now, as POSIX would have us, which gives
    // the error (ENOSPC, EFBIG) or finishes the line.
    this.#enqueue(line, { force: true });
    this.#readOffset = written;
    this.#backlogBytes -= written;
    this.#fragment = written > 0;
    this.#noteFragment();
    this.#writeBacklog();
  }

  /**
   * Opens the path again and switches to the new file, for log rotation by
   * rename: lines written before the switch are in the old (renamed) file,
   * backlogged and later lines in the new one. The open runs off the event
   * loop; until it is done lines keep going to the old file.
   *
   * If the path cannot be opened (out of file descriptors), lines keep
   * going to the old file and the open is tried again on every line and on
   * a timer until it succeeds. If the path is refused (a symlink, a FIFO,
   * anything but a regular file: {@linkcode RefusedLogPathError}), the old
   * file is closed and lines wait in the backlog, as on a full disk, while
   * the timer and each SIGHUP try again. A diagnostic says which.
   *
   * Resolves, once the open this call started (or one already in flight and
   * then one more) is done, with whether the new file is open (false, and
   * nothing done, once the log is closed).
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * const dir = await Deno.makeTempDir();
   * const log = AccessLog.open(`${dir}/access.log`, { onDiagnostic() {} });
   * log.record(1, 5);
   * await Deno.rename(`${dir}/access.log`, `${dir}/access.log.1`);
   * assert.equal(await log.reopen(), true);
   * log.record(2, 7);
   * log.close();
   * assert.equal(
   *   await Deno.readTextFile(`${dir}/access.log`),
   *   "[client 2]: received 7 bytes\n",
   * );
   * await Deno.remove(dir, { recursive: true });
   * ```
   */
  async reopen(): Promise<boolean> {
    // A SIGHUP can come after close(), in the exit's last stderr flush.
    if (this.#closed) return false;
    this.#reopenPending = true;
    // One in flight opened the path as it was before this call: once more.
    if (this.#reopening !== undefined) this.#reopenAgain = true;
    else this.#startReopen();
    while (this.#reopening !== undefined) await this.#reopening;
    return !this.#reopenPending && !this.#closed;
  }

  /**
   * Tries to write the backlog until it is empty, `timeoutMs` has passed or
   * `signal` is aborted (every {@linkcode AccessLogOptions.retryIntervalMs});
   * resolves with the lines still waiting. An abort ends the wait at once.
   *
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   * const dir = await Deno.makeTempDir();
   * const log = AccessLog.open(`${dir}/access.log`);
   * log.record(1, 5);
   * assert.equal(await log.flush({ timeoutMs: 1000 }), 0);
   * log.close();
   * await Deno.remove(dir, { recursive: true });
   * ```
   */
  async flush(
    options: { timeoutMs?: number; signal?: AbortSignal } = {},
  ): Promise<number> {
    const { signal } = options;
    const deadline = performance.now() + (options.timeoutMs ?? 0);
    if (this.#reopenPending) this.#startReopen();
    this.#writeBacklog();
    while (this.#backlogBytes > 0 && !this.#closed && !signal?.aborted) {
      const wait = Math.min(
        this.#retryIntervalMs,
        deadline - performance.now(),
      );
      if (wait <= 0) break;
      await new Promise<void>((resolve) => {
        const done = () => {
          clearTimeout(timer);
          signal?.removeEventListener("abort", done);
          resolve();
        };
        const timer = setTimeout(done, wait);
        signal?.addEventListener("abort", done);
      });
      if (signal?.aborted) break;
      if (this.#reopenPending) this.#startReopen();
      this.#writeBacklog();
    }
    return this.#backlogLines;
  }

  /**
   * Tries the backlog once more, closes the file and stops the timers.
   * Returns how many lines were never written: dropped while the backlog
   * was full, or still waiting now (a diagnostic gives both counts). A
   * reopen still pending is not tried (an open in flight is closed when it
   * is done): {@linkcode AccessLog.flush} tries it.
   */
  close(): number {
    if (this.#closed) return this.#droppedLines + this.#backlogLines;
    this.#writeBacklog();
    this.#abandonFragment("counted below as not written");
    this.#closed = true;
    clearTimeout(this.#retryTimer);
    this.#retryTimer = undefined;
    this.#file?.close();
    this.#flushReports();
    const lost = this.#droppedLines + this.#backlogLines;
    if (lost > 0) {
      this.#diagnostic(
        `access log ${this.#path}: ${lost} ${
          plural(lost, "line")
        } never written (${this.#backlogLines} still waiting at exit, ${this.#droppedLines} dropped past the backlog bound)`,
      );
    }
    return lost;
  }

  /**
   * Appends a line to the backlog, or drops and counts it past the bound
   * (never with `force`: the line a fragment began is always kept).
   */
  #enqueue(line: Uint8Array, options: { force?: boolean } = {}): void {
    if (
      !options.force &&
      this.#backlogBytes + line.length > this.#maxBacklogBytes
    ) {
      this.#droppedLines++;
      this.#report(
        "drop",
        `lines dropped: the backlog is full (${this.#backlogBytes} bytes, --log-backlog ${this.#maxBacklogBytes})`,
      );
      return;
    }
    const last = this.#chunks.at(-1);
    if (last === undefined || this.#fillOffset + line.length > last.length) {
      // Seal the last chunk at what it holds; a chunk holds whole lines.
      if (last !== undefined) {
        this.#chunks[this.#chunks.length - 1] = last.subarray(
          0,
          this.#fillOffset,
        );
      }
      this.#chunks.push(new Uint8Array(CHUNK_BYTES));
      this.#fillOffset = 0;
    }
    this.#chunks.at(-1)!.set(line, this.#fillOffset);
    this.#fillOffset += line.length;
    this.#backlogBytes += line.length;
    this.#backlogLines++;
    this.#armRetry();
  }

  /**
   * Writes backlogged bytes, a chunk per write, until done or a failure;
   * nothing while the path is refused (no file).
   */
  #writeBacklog(): void {
    const file = this.#file;
    if (file === undefined) return;
    while (this.#backlogBytes > 0) {
      const chunk = this.#chunks[0];
      const end = this.#chunks.length === 1 ? this.#fillOffset : chunk.length;
      const pending = chunk.subarray(this.#readOffset, end);
      let written;
      try {
        written = file.writeSync(pending);
      } catch (error) {
        this.#writeFailed(error);
        return;
      }
      if (written === 0) return; // nothing taken and no error: try later
      const done = countNewlines(pending.subarray(0, written));
      this.#linesWritten += done;
      this.#backlogLines -= done;
      this.#fragment = pending[written - 1] !== NEWLINE;
      this.#noteFragment();
      this.#readOffset += written;
      this.#backlogBytes -= written;
      if (this.#readOffset === end) {
        this.#chunks.shift();
        this.#readOffset = 0;
      }
    }
    // Empty: drop the chunks (memory back) and say the file works again.
    this.#chunks = [];
    this.#readOffset = this.#fillOffset = 0;
    this.#fragment = false;
    if (!this.#reopenPending) {
      // A failed reopen still needs the timer (no line may come to try it).
      clearTimeout(this.#retryTimer);
      this.#retryTimer = undefined;
    }
    if (this.#failingSince !== undefined) {
      const seconds = (performance.now() - this.#failingSince) / 1000;
      this.#failingSince = undefined;
      this.#flushReports();
      this.#diagnostic(
        `access log ${this.#path}: writing again after ${
          seconds.toFixed(1)
        } s; the backlog is written${
          this.#droppedLines > 0
            ? ` (${this.#droppedLines} lines dropped so far)`
            : ""
        }`,
      );
    }
  }

  #writeFailed(error: unknown): void {
    this.#writeErrors++;
    this.#failingSince ??= performance.now();
    this.#report(
      "write",
      `write failed: ${errorMessage(error)}; ${this.#backlogLines} ${
        this.#backlogLines === 1 ? "line waits" : "lines wait"
      } in memory, retried every ${this.#retryIntervalMs / 1000} s`,
    );
    this.#armRetry();
  }

  /**
   * Starts opening the path again if a reopen is pending and no open is in
   * flight. A synchronous opener (a test's stub) is done when this returns.
   */
  #startReopen(): void {
    if (!this.#reopenPending || this.#closed || this.#reopening) return;
    let opened;
    try {
      opened = this.#reopenFile(this.#path);
    } catch (error) {
      this.#reopenFailed(error);
      return;
    }
    if (!(opened instanceof Promise)) return this.#reopened(opened);
    this.#reopeningSince = performance.now();
    this.#armRetry(); // says so if the open does not return
    this.#reopening = opened.then(
      (file) => {
        this.#reopening = undefined;
        if (this.#closed) file.close();
        else this.#reopened(file);
      },
      (error) => {
        this.#reopening = undefined;
        if (!this.#closed) this.#reopenFailed(error);
      },
    ).then(() => {
      if (!this.#reopenAgain || this.#closed) return;
      this.#reopenAgain = false;
      this.#reopenPending = true;
      this.#startReopen();
    });
  }

  /** Switches to the newly opened file. */
  #reopened(next: LogFile): void {
    this.#reopenPending = false;
    this.#refused = false;
    this.#leaveFile("the whole line goes to the new file");
    this.#file = next;
    const hadReopenReport = this.#reopenReported;
    this.#reports.reopen.reset();
    this.#reopenReported = false;
    this.#diagnostic(
      `reopened access log ${this.#path}${
        hadReopenReport ? " (after failing)" : ""
      }`,
    );
    this.#writeBacklog();
  }

  /**
   * After a failed open: lines keep going to the old file. After a refused
   * path: the old file is left too and lines wait in memory.
   */
  #reopenFailed(error: unknown): void {
    const every = `${this.#retryIntervalMs / 1000} s`;
    this.#refused = error instanceof RefusedLogPathError;
    if (this.#refused) this.#leaveFile("the whole line waits in memory");
    this.#report(
      "reopen",
      this.#refused
        ? `${errorMessage(error)}; ${this.#backlogLines} ${
          this.#backlogLines === 1 ? "line waits" : "lines wait"
        } in memory, trying again every ${every} and on SIGHUP`
        : `${describeOpenError(error)}; ${
          this.#file === undefined
            ? "lines wait in memory"
            : "still writing to the old file"
        }, trying again on every line and every ${every}`,
    );
    this.#armRetry();
  }

  /**
   * Closes the current file, if any, after finishing the line a fragment
   * began there if it takes it (else the line is written whole later).
   */
  #leaveFile(then: string): void {
    const file = this.#file;
    if (file === undefined) return;
    if (this.#fragment) {
      this.#finishFragment(file);
      this.#abandonFragment(then);
    }
    try {
      file.close();
    } catch {
      // Closing the old file cannot lose a line: each write went straight
      // to the kernel (no user-space buffer).
    }
    this.#file = undefined;
    this.#fragment = false;
  }

  /** Writes the backlog's first line's remainder, if the file takes it. */
  #finishFragment(file: LogFile): void {
    const chunk = this.#chunks[0];
    const end = chunk.indexOf(NEWLINE, this.#readOffset) + 1;
    try {
      const written = file.writeSync(
        chunk.subarray(this.#readOffset, end),
      );
      this.#readOffset += written;
      this.#backlogBytes -= written;
      if (this.#readOffset === end) {
        this.#fragment = false;
        this.#linesWritten++;
        this.#backlogLines--;
        // The chunk's last line: on to the next, as #writeBacklog() does (it
        // would write the empty rest of this one forever).
        if (end === chunk.length && this.#chunks.length > 1) {
          this.#chunks.shift();
          this.#readOffset = 0;
        }
      } else {
        this.#noteFragment();
      }
    } catch (error) {
      this.#writeFailed(error);
    }
  }

  #noteFragment(): void {
    if (!this.#fragment) return;
    try {
      this.#fragmentEnd = this.#file?.seekSync?.(0, Deno.SeekMode.Current);
    } catch {
      this.#fragmentEnd = undefined; // a file that cannot seek: left as is
    }
  }

  /**
   * Gives up finishing the fragment in the current file (it is being left
   * for another, or the process exits): cuts it off the file if nothing was
   * appended after it (ftruncate, which needs no space), and puts the line
   * back to be written whole.
   */
  #abandonFragment(then: string): void {
    const file = this.#file;
    if (!this.#fragment || file === undefined) return;
    const chunk = this.#chunks[0];
    let start = this.#readOffset;
    while (start > 0 && chunk[start - 1] !== NEWLINE) start--;
    const length = this.#readOffset - start;
    let cut = false;
    try {
      const size = file.seekSync?.(0, Deno.SeekMode.End);
      if (
        size !== undefined && size === this.#fragmentEnd &&
        file.truncateSync !== undefined
      ) {
        file.truncateSync(size - length);
        cut = true;
      }
    } catch {
      // Left in the file; said below.
    }
    this.#backlogBytes += length;
    this.#readOffset = start;
    this.#fragment = false;
    this.#fragmentEnd = undefined;
    this.#diagnostic(
      `access log ${this.#path}: ${
        cut
          ? `cut off the ${length} bytes of an unfinished line at its end`
          : `the file ends in ${length} bytes of an unfinished line (another line followed it, or it could not be cut)`
      }; ${then}`,
    );
  }

  #armRetry(): void {
    if (this.#retryTimer !== undefined || this.#closed) return;
    this.#retryTimer = setTimeout(() => {
      this.#retryTimer = undefined;
      if (this.#reopenPending) this.#startReopen();
      this.#writeBacklog();
      this.#reportStalledOpen();
      if (this.#backlogBytes > 0 || this.#reopenPending) this.#armRetry();
    }, this.#retryIntervalMs);
  }

  /** Says so when an open in flight has not returned for a while. */
  #reportStalledOpen(): void {
    if (this.#reopening === undefined) return;
    const seconds = (performance.now() - this.#reopeningSince) / 1000;
    if (seconds * 1000 < this.#reportIntervalMs) return;
    this.#report(
      "reopen",
      `cannot open access log ${this.#path}: the open has not returned after ${
        seconds.toFixed(1)
      } s (a stalled file system?); ${
        this.#file === undefined
          ? "lines wait in memory"
          : "still writing to the old file"
      }`,
    );
  }

  /** Writes the lines held back of every kind, in this order. */
  #flushReports(): void {
    for (const kind of ["write", "drop", "reopen"] as const) {
      this.#reports[kind].flush();
    }
  }

  /** One line per kind per report interval; the rest counted. */
  #report(kind: ReportKind, message: string): void {
    if (kind === "reopen") this.#reopenReported = true;
    // A reopen's error already names the path (openForAppend).
    const subject = kind === "reopen" ? "" : `access log ${this.#path}: `;
    this.#reports[kind].report(kind, `${subject}${message}`);
  }
}

function countNewlines(bytes: Uint8Array): number {
  let count = 0;
  for (
    let i = bytes.indexOf(NEWLINE);
    i >= 0;
    i = bytes.indexOf(NEWLINE, i + 1)
  ) {
    count++;
  }
  return count;
}

function plural(count: number, word: string): string {
  return count === 1 ? word : `${word}s`;
}

// The probe's flags: never blocks on a FIFO (ENXIO without a reader), never
// creates, and fails (ELOOP) on a symlink that appears at the path after
// Deno resolved it (Deno resolves the last component's symlinks itself
// before opening when --allow-write names a directory).
const PROBE_FLAGS = constants.O_WRONLY | constants.O_APPEND |
  constants.O_NONBLOCK | constants.O_NOFOLLOW;
// Checking an existing file marks its access time a day ahead: a reader
// (a log shipper) cannot move it there under relatime, only an explicit set.
// Marks are whole seconds, since some file systems keep no finer (ext3,
// HFS+, ext4 with 128-byte inodes), and one of a day's worth at random, so
// that nobody can set a symlink's target to the mark ahead of time.
const MARK_AHEAD_MS = 86_400_000;
const MARK_STEP_MS = 1000;
// Instances sharing the log check it at once after a rotation's SIGHUP to
// them all (or a start together), each mark overwriting the others': a
// mismatch is checked again, up to this many times, after a random pause
// that doubles (at most 1, 2, 4, ... 64 ms), so that checks in lockstep
// drift apart. Measured: 6 processes checking one log 20 times at once
// each refused it 4 of 40 times with 3 tries and no pause.
const MARK_TRIES = 10;

/** The pause before the check after `tries` mismatched, in milliseconds. */
function markRetryMs(tries: number): number {
  return Math.random() * 2 ** Math.min(tries - 1, 6);
}

// What the synchronous opener waits on (start-up only: nothing is served).
const pauseCell = new Int32Array(new SharedArrayBuffer(4));

/**
 * Opens `path` for appending, synchronously (start-up), with the checks of
 * the module doc: a new file with O_EXCL, else an existing regular file
 * that is the path's own entry.
 */
function openForAppendSync(path: string): Deno.FsFile {
  try {
    const slash = path.lastIndexOf("/");
    if (slash > 0) Deno.mkdirSync(path.slice(0, slash), { recursive: true });
    try {
      return Deno.openSync(path, { append: true, createNew: true });
    } catch (error) {
      if (!(error instanceof Deno.errors.AlreadyExists)) throw error;
    }
    for (let tries = 1;; tries++) {
      let probe;
      try {
        probe = openSync(path, PROBE_FLAGS);
      } catch (error) {
        throw probeError(error);
      }
      try {
        const stat = fstatSync(probe);
        const mark = markTime(stat);
        try {
          lutimesSync(path, new Date(mark), stat.mtime);
        } catch (error) {
          throw markError(error);
        }
        checkEntry(fstatSync(probe), mark);
        const file = Deno.openSync(path, { append: true });
        try {
          file.utimeSync(new Date(mark + MARK_STEP_MS), stat.mtime);
          checkSameFile(fstatSync(probe), mark + MARK_STEP_MS);
          file.utimeSync(unmarked(stat), stat.mtime);
          return file;
        } catch (error) {
          file.close();
          throw error;
        }
      } catch (error) {
        if (!(error instanceof MarkMismatch) || tries === MARK_TRIES) {
          throw error;
        }
      } finally {
        closeSync(probe);
      }
      Atomics.wait(pauseCell, 0, 0, markRetryMs(tries));
    }
  } catch (error) {
    throw openError(path, error);
  }
}

/**
 * {@linkcode openForAppendSync} with every call asynchronous, so that an
 * open that blocks (a stalled network file system) holds a thread of Deno's
 * blocking pool, never the event loop.
 */
async function openForAppend(path: string): Promise<Deno.FsFile> {
  try {
    const slash = path.lastIndexOf("/");
    if (slash > 0) {
      await Deno.mkdir(path.slice(0, slash), { recursive: true });
    }
    try {
      return await Deno.open(path, { append: true, createNew: true });
    } catch (error) {
      if (!(error instanceof Deno.errors.AlreadyExists)) throw error;
    }
    for (let tries = 1;; tries++) {
      let probe;
      try {
        probe = await fsPromises.open(path, PROBE_FLAGS);
      } catch (error) {
        throw probeError(error);
      }
      try {
        const stat = await probe.stat();
        const mark = markTime(stat);
        try {
          await fsPromises.lutimes(path, new Date(mark), stat.mtime);
        } catch (error) {
          throw markError(error);
        }
        checkEntry(await probe.stat(), mark);
        const file = await Deno.open(path, { append: true });
        try {
          await file.utime(new Date(mark + MARK_STEP_MS), stat.mtime);
          checkSameFile(await probe.stat(), mark + MARK_STEP_MS);
          await file.utime(unmarked(stat), stat.mtime);
          return file;
        } catch (error) {
          file.close();
          throw error;
        }
      } catch (error) {
        if (!(error instanceof MarkMismatch) || tries === MARK_TRIES) {
          throw error;
        }
      } finally {
        await probe.close();
      }
      await new Promise((resolve) => setTimeout(resolve, markRetryMs(tries)));
    }
  } catch (error) {
    throw openError(path, error);
  }
}

/** A check's mark did not show on the file opened: checked again. */
class MarkMismatch extends RefusedLogPathError {}

/** The access time that marks the file: ahead of anything a read sets. */
function markTime(stat: Stats): number {
  const after = Math.floor(Math.max(Date.now(), stat.atimeMs) / MARK_STEP_MS);
  const random = Math.floor(Math.random() * (MARK_AHEAD_MS / MARK_STEP_MS));
  return (after + 1 + random) * MARK_STEP_MS + MARK_AHEAD_MS;
}

/** The access time to leave: the file's, unless a mark left it ahead. */
function unmarked(stat: Stats): Date {
  return new Date(Math.min(stat.atimeMs, Date.now()));
}

function hasMark(stat: Stats, mark: number): boolean {
  return Math.abs(stat.atimeMs - mark) < 0.5;
}

/**
 * The probe opened what the path's entry is (the mark set on the entry,
 * not following a symlink, shows on it) and it is a regular file.
 */
function checkEntry(stat: Stats, mark: number): void {
  if (!hasMark(stat, mark)) {
    throw new MarkMismatch(
      "it is a symlink (or it was replaced while being checked)",
    );
  }
  if (!stat.isFile()) throw new RefusedLogPathError(`it is ${kindOf(stat)}`);
}

/** The file opened to write is the one the probe checked. */
function checkSameFile(stat: Stats, mark: number): void {
  if (!hasMark(stat, mark)) {
    throw new MarkMismatch("it was replaced while being opened");
  }
}

function kindOf(stat: Stats): string {
  if (stat.isFIFO()) return "a FIFO (named pipe)";
  if (stat.isDirectory()) return "a directory";
  if (stat.isCharacterDevice()) return "a character device";
  if (stat.isBlockDevice()) return "a block device";
  if (stat.isSocket()) return "a socket";
  return "not a regular file";
}

/** The probe's open failed: a refusal if the error shows what the path is. */
function probeError(error: unknown): unknown {
  switch (nodeCode(error)) {
    case "ENXIO":
      return new RefusedLogPathError("it is a FIFO (named pipe) or a socket");
    case "EISDIR":
      return new RefusedLogPathError("it is a directory");
    case "ELOOP":
      return new RefusedLogPathError("it is a symlink");
    case "ENOENT":
      // It existed a moment ago (O_EXCL failed): a symlink to nothing.
      return new RefusedLogPathError(
        "it is a symlink to a missing file (or it was removed meanwhile)",
      );
  }
  return error;
}

/** Setting the mark failed: a refusal if it is not allowed. */
function markError(error: unknown): unknown {
  if (nodeCode(error) !== "EPERM") return error;
  return new RefusedLogPathError(
    "cannot check that it is not a symlink: it belongs to another user",
  );
}

function nodeCode(error: unknown): string | undefined {
  if (!(error instanceof Error) || !("code" in error)) return undefined;
  return typeof error.code === "string" ? error.code : undefined;
}

function openError(path: string, error: unknown): Error {
  if (error instanceof RefusedLogPathError) {
    return new RefusedLogPathError(
      `refusing access log ${path}: ${error.message}; the log must be a ` +
        "regular file of the server's user (not a symlink, FIFO, directory " +
        "or device)",
    );
  }
  return new Error(
    `cannot open access log ${path}: ${describeOpenError(error)}`,
    {
      cause: error,
    },
  );
}

function describeOpenError(error: unknown): string {
  // Deno's own permission, not the file system's: root is refused too.
  if (error instanceof Deno.errors.NotCapable) {
    const dir = DEFAULTS.logPath.slice(0, DEFAULTS.logPath.lastIndexOf("/"));
    return "Deno's --allow-write does not grant it (the tasks and the " +
      `compiled binary may write only in ${dir}: log there, or run main.ts ` +
      "with --allow-write naming the log's directory)";
  }
  if (error instanceof Deno.errors.PermissionDenied) {
    return "permission denied (run as a user who may write there, or pass " +
      "--log PATH somewhere you may write)";
  }
  return errorMessage(error);
}
