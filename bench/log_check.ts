/**
 * Checks an echo server's access log against what a load client saw: reads
 * the lines appended since it was opened, and compares them with the
 * connections that succeeded. Every line must read exactly
 * `[client N]: received X bytes`, no `N` may repeat, there must be one line
 * per connection, and the byte counts the client knows for sure (a verified
 * echo, say) must each be there.
 *
 * @module
 */

/** What the log should show, from the client's side. */
export interface LogExpectation {
  /** Connections that certainly completed: each must have exactly one line. */
  connections: number;
  /**
   * Connections that may or may not have completed (a connect cut off at the
   * end of the run); each may have a line.
   *
   * @default {0}
   */
  uncertain?: number;
  /**
   * Byte counts that must appear: bytes → at least that many lines with
   * exactly those bytes. None by default.
   */
  requiredSizes?: ReadonlyMap<number, number>;
}

/** A byte count that appears on fewer lines than it should. */
export interface MissingSize {
  /** The byte count. */
  bytes: number;
  /** Lines that must show it. */
  expected: number;
  /** Lines that do. */
  found: number;
}

/** The outcome of {@linkcode LogTail.check}. */
export interface LogReport {
  /** Lines appended since the log was opened, well formed or not. */
  lines: number;
  /** Lines expected: {@linkcode LogExpectation.connections}. */
  expected: number;
  /** Of those, lines that may be there or not. */
  uncertain: number;
  /** Connections without a line (0 when there are enough lines). */
  missing: number;
  /** Lines beyond one per connection. */
  extra: number;
  /** Lines not of the form `[client N]: received X bytes`. */
  malformed: number;
  /** Lines whose client number appeared before in the lines read. */
  duplicates: number;
  /** Byte counts on fewer lines than {@linkcode LogExpectation.requiredSizes} asks. */
  missingSizes: MissingSize[];
  /** The first few malformed and duplicate lines, quoted. */
  samples: string[];
  /** True when nothing above is wrong. */
  ok: boolean;
}

/** Options for {@linkcode LogTail.waitFor}. */
export interface WaitOptions {
  /**
   * Stop waiting once the line count has not changed for this long, in ms.
   *
   * @default {2000}
   */
  quietMs?: number;
  /**
   * Stop waiting after this long whatever happens, in ms.
   *
   * @default {30_000}
   */
  timeoutMs?: number;
  /**
   * Once the count is reached, how long to keep watching for lines beyond
   * it, in ms.
   *
   * @default {300}
   */
  settleMs?: number;
  /**
   * Time between reads of the file, in ms.
   *
   * @default {50}
   */
  pollMs?: number;
  /**
   * Settles once the server will write no more lines for these connections
   * (it exited, or finished every one of them). When given, the wait is for
   * it, not for a quiet period: the lines read after it are the final count,
   * and it throws if this has not settled within
   * {@linkcode WaitOptions.timeoutMs}. Without it, only a quiet period can
   * tell a server that is slow from one that loses lines.
   */
  finished?: Promise<unknown>;
}

const LINE = /^\[client ([1-9]\d*)\]: received (0|[1-9]\d*) bytes$/;
const MAX_SAMPLES = 5;

/**
 * Parses one access-log line (without its newline) into the client number
 * and byte count, or returns undefined if it is not exactly of the form
 * `[client N]: received X bytes`.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * assert.deepEqual(parseLogLine("[client 7]: received 5 bytes"), [7, 5]);
 * assert.equal(parseLogLine("[client 7]: received 5 byte"), undefined);
 * ```
 */
export function parseLogLine(line: string): [number, number] | undefined {
  const match = LINE.exec(line);
  if (match === null) return undefined;
  const clientId = Number(match[1]);
  const bytes = Number(match[2]);
  if (!Number.isSafeInteger(clientId) || !Number.isSafeInteger(bytes)) {
    return undefined;
  }
  return [clientId, bytes];
}

/**
 * Follows an access log from where it ends when opened: reads the lines
 * appended since, a poll at a time, and keeps counts (not the lines), so it
 * can follow millions of lines.
 *
 * @example
 * ```ts ignore
 * using tail = await LogTail.open("/tmp/echo/access.log");
 * // ... run clients; 120 connections succeeded, 100 echoes of 5 B verified
 * await tail.waitFor(120);
 * const report = tail.check({ connections: 120, requiredSizes: new Map([[5, 100]]) });
 * if (!report.ok) console.log(formatLogReport(report));
 * ```
 */
export class LogTail implements Disposable {
  readonly #file: Deno.FsFile;
  readonly #decoder = new TextDecoder();
  readonly #buffer = new Uint8Array(256 * 1024);
  #partial = "";
  #lines = 0;
  #malformed = 0;
  #duplicates = 0;
  #seen = new Uint8Array(1024);
  readonly #sizes = new Map<number, number>();
  readonly #samples: string[] = [];

  private constructor(file: Deno.FsFile) {
    this.#file = file;
  }

  /**
   * Opens the log at `path` for reading from its current end. Rejects if it
   * does not exist: the server under test creates it at start-up.
   */
  static async open(path: string): Promise<LogTail> {
    const file = await Deno.open(path, { read: true });
    try {
      await file.seek(0, Deno.SeekMode.End);
    } catch (error) {
      file.close();
      throw error;
    }
    return new LogTail(file);
  }

  /** Complete lines read so far. */
  get lines(): number {
    return this.#lines;
  }

  /** Reads whatever was appended since the last poll; returns {@linkcode LogTail.lines}. */
  async poll(): Promise<number> {
    for (;;) {
      const n = await this.#file.read(this.#buffer);
      if (n === null) break;
      const text = this.#partial +
        this.#decoder.decode(this.#buffer.subarray(0, n), { stream: true });
      const lines = text.split("\n");
      this.#partial = lines.pop()!;
      for (const line of lines) this.#add(line);
      if (n < this.#buffer.length) break;
    }
    return this.#lines;
  }

  /**
   * Polls until there are at least `expected` lines and no more arrive for
   * {@linkcode WaitOptions.settleMs}, or the count stops changing for
   * {@linkcode WaitOptions.quietMs}, or {@linkcode WaitOptions.timeoutMs}
   * passes; or, given {@linkcode WaitOptions.finished}, waits for that and
   * reads the rest. Returns the line count.
   */
  async waitFor(expected: number, options: WaitOptions = {}): Promise<number> {
    const {
      quietMs = 2000,
      timeoutMs = 30_000,
      settleMs = 300,
      pollMs = 50,
      finished,
    } = options;
    if (finished !== undefined) {
      let timer: ReturnType<typeof setTimeout> | undefined;
      const timeout = new Promise<never>((_, reject) => {
        timer = setTimeout(
          () =>
            reject(
              new Error(
                `The server did not finish its log within ${timeoutMs} ms: wait longer, or check it is running`,
              ),
            ),
          timeoutMs,
        );
      });
      try {
        await Promise.race([finished, timeout]);
      } finally {
        clearTimeout(timer);
      }
      return await this.poll();
    }
    const start = performance.now();
    let count = await this.poll();
    let changedAt = start;
    for (;;) {
      const now = performance.now();
      const waitedFor = now - changedAt;
      if (count >= expected && waitedFor >= settleMs) break;
      if (waitedFor >= quietMs || now - start >= timeoutMs) break;
      await new Promise((resolve) => setTimeout(resolve, pollMs));
      const next = await this.poll();
      if (next !== count) changedAt = performance.now();
      count = next;
    }
    return count;
  }

  /** Compares what was read with `expectation`. */
  check(expectation: LogExpectation): LogReport {
    const expected = expectation.connections;
    const uncertain = expectation.uncertain ?? 0;
    const lines = this.#lines + (this.#partial === "" ? 0 : 1);
    const malformed = this.#malformed + (this.#partial === "" ? 0 : 1);
    const samples = [...this.#samples];
    if (this.#partial !== "" && samples.length < MAX_SAMPLES) {
      samples.push(`unterminated line: ${JSON.stringify(this.#partial)}`);
    }
    const missingSizes: MissingSize[] = [];
    for (const [bytes, want] of expectation.requiredSizes ?? []) {
      const found = this.#sizes.get(bytes) ?? 0;
      if (found < want) missingSizes.push({ bytes, expected: want, found });
    }
    missingSizes.sort((a, b) => a.bytes - b.bytes);
    const missing = Math.max(0, expected - lines);
    const extra = Math.max(0, lines - expected - uncertain);
    return {
      lines,
      expected,
      uncertain,
      missing,
      extra,
      malformed,
      duplicates: this.#duplicates,
      missingSizes,
      samples,
      ok: missing === 0 && extra === 0 && malformed === 0 &&
        this.#duplicates === 0 && missingSizes.length === 0,
    };
  }

  /** Closes the file. */
  close(): void {
    this.#file.close();
  }

  /** Closes the file, for `using`. */
  [Symbol.dispose](): void {
    this.close();
  }

  #add(line: string): void {
    this.#lines++;
    const parsed = parseLogLine(line);
    if (parsed === undefined) {
      this.#malformed++;
      this.#sample(`malformed line: ${JSON.stringify(line)}`);
      return;
    }
    const [clientId, bytes] = parsed;
    if (this.#markSeen(clientId)) {
      this.#duplicates++;
      this.#sample(`duplicate client number: ${JSON.stringify(line)}`);
    }
    this.#sizes.set(bytes, (this.#sizes.get(bytes) ?? 0) + 1);
  }

  /** Marks `clientId` seen; returns whether it had been seen already. */
  #markSeen(clientId: number): boolean {
    if (clientId >= this.#seen.length * 8) {
      let length = this.#seen.length;
      while (clientId >= length * 8) length *= 2;
      const grown = new Uint8Array(length);
      grown.set(this.#seen);
      this.#seen = grown;
    }
    const mask = 1 << (clientId & 7);
    const index = clientId >>> 3;
    const seen = (this.#seen[index] & mask) !== 0;
    this.#seen[index] |= mask;
    return seen;
  }

  #sample(message: string): void {
    if (this.#samples.length < MAX_SAMPLES) this.#samples.push(message);
  }
}

/**
 * Formats a {@linkcode LogReport} as the lines the command line prints.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * const text = formatLogReport({
 *   lines: 9, expected: 10, uncertain: 0, missing: 1, extra: 0,
 *   malformed: 0, duplicates: 0, missingSizes: [], samples: [], ok: false,
 * });
 * assert.match(text, /1 connections without a line/);
 * ```
 */
export function formatLogReport(report: LogReport): string {
  const expected = report.uncertain === 0
    ? `${report.expected}`
    : `${report.expected} to ${report.expected + report.uncertain}`;
  const out = [
    `log          ${report.lines} lines added, ${expected} expected: ${
      report.ok ? "ok" : "FAILED"
    }`,
  ];
  const problems = [
    report.missing > 0 && `${report.missing} connections without a line`,
    report.extra > 0 && `${report.extra} lines more than connections`,
    report.malformed > 0 && `${report.malformed} malformed lines`,
    report.duplicates > 0 && `${report.duplicates} duplicate client numbers`,
    ...report.missingSizes.map(({ bytes, expected, found }) =>
      `${bytes} bytes: ${found} lines, at least ${expected} expected`
    ),
  ].filter((problem) => problem !== false);
  for (const problem of problems) out.push(`             ${problem}`);
  for (const sample of report.samples) out.push(`             ${sample}`);
  return out.join("\n");
}
