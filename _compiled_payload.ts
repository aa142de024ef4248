/**
 * Reads what `deno compile` (Deno 2.9.6, Linux) embeds in a binary: the
 * metadata (permissions, V8 flags, entry point, ...), the files of its
 * virtual file system and its remote modules. Test support for
 * `compile_test.ts`, not part of the server.
 *
 * The layout, from Deno's source:
 * - libsui (`Elf::append`, libsui 0.16) adds one ELF note, owner `SUI`,
 *   type 0x53554901, in a `PT_NOTE` segment (and a `.note.sui` section);
 *   its descriptor is a u16 name length, the name `d3n0l4nd`, then the data.
 * - The data (`serialize_binary_data_section` in
 *   `cli/standalone/binary.rs`, read back by `cli/rt/binary.rs`), all
 *   integers little-endian: `d3n0l4nd`; u64 length + metadata JSON (struct
 *   `Metadata` in `cli/lib/standalone/binary.rs`); u64 length + npm
 *   snapshot; specifiers (u32 count, then u32 length + string, u32 id);
 *   redirects (u32 count, then two u32 ids); remote modules (u32 count, then
 *   u32 id, u8 media type, u32 length + source, u8 flags, and a u32 length +
 *   bytes for each of transpiled (flag 1), source map (2) and CJS analysis
 *   (4) whose flag is set); u64 length + VFS entries JSON; u64 length + the
 *   VFS files' bytes; `d3n0l4nd`.
 * - VFS entries (`cli/lib/standalone/virtual_fs.rs`) are
 *   `{"Dir": {"n": name, "e": entries}}`,
 *   `{"File": {"n": name, "o": [offset, length], ...}}` (offsets into the
 *   files' bytes) or `{"Symlink": ...}`. Local modules, such as main.ts,
 *   live there, as paths relative to the VFS root, which is the directory
 *   `entrypoint_key` (here `main.ts`) is relative to.
 *
 * @module
 */

/** The permissions a compiled binary runs with (Deno's `PermissionsOptions`). */
export interface PayloadPermissions {
  /** `null`: not granted; `[]`: granted for everything; else the list. */
  [permission: `${"allow" | "deny" | "ignore"}_${string}`]: string[] | null;
  /** Whether a missing permission is asked for at a terminal. */
  prompt: boolean;
}

/** The fields of the payload's metadata JSON that the tests look at. */
export interface PayloadMetadata {
  /** Arguments baked in before the user's. */
  argv: string[];
  /** What the binary may do. */
  permissions: PayloadPermissions;
  /** V8's flags, the first being a placeholder for argv[0]. */
  v8_flags: string[];
  /** The main module, relative to the VFS root. */
  entrypoint_key: string;
  /** Variables from `--env-file`, baked in. */
  env_vars_from_env_file: Record<string, string>;
  /** Every other field, as Deno wrote it. */
  [field: string]: unknown;
}

/** What a compiled binary carries. */
export interface CompiledPayload {
  /** The metadata JSON, parsed. */
  metadata: PayloadMetadata;
  /** Every file in the VFS by its path relative to the VFS root. */
  files: Map<string, Uint8Array>;
  /** Every remote module's original source by its specifier. */
  remoteModules: Map<string, Uint8Array>;
  /** Whether an npm snapshot is embedded. */
  hasNpmSnapshot: boolean;
}

const MAGIC = "d3n0l4nd";
const PT_NOTE = 4;
const SUI_NOTE_TYPE = 0x5355_4901;
const decoder = new TextDecoder("utf-8", { fatal: true });

/**
 * Reads the `d3n0l4nd` payload of the Linux binary at `path` that
 * `deno compile` wrote. Throws if it has none or if it does not parse as
 * Deno 2.9's layout.
 *
 * @example
 * ```ts ignore
 * const { metadata } = await readCompiledPayload("./echo-server");
 * metadata.permissions.prompt; // false
 * ```
 */
export async function readCompiledPayload(
  path: string,
): Promise<CompiledPayload> {
  using file = await Deno.open(path);
  return parseDataSection(await findSuiNote(file, MAGIC));
}

async function readAt(
  file: Deno.FsFile,
  offset: number,
  length: number,
): Promise<Uint8Array> {
  const bytes = new Uint8Array(length);
  await file.seek(offset, Deno.SeekMode.Start);
  for (let done = 0; done < length;) {
    const n = await file.read(bytes.subarray(done));
    if (n === null) throw new Error(`file ends before byte ${offset + length}`);
    done += n;
  }
  return bytes;
}

/** The descriptor data of libsui's note named `name`, from the PT_NOTEs. */
async function findSuiNote(
  file: Deno.FsFile,
  name: string,
): Promise<Uint8Array> {
  const header = new DataView((await readAt(file, 0, 64)).buffer);
  if (header.getUint32(0) !== 0x7f454c46) throw new Error("not an ELF file");
  if (header.getUint8(4) !== 2 || header.getUint8(5) !== 1) {
    throw new Error("not a 64-bit little-endian ELF file");
  }
  const phoff = Number(header.getBigUint64(0x20, true));
  const phentsize = header.getUint16(0x36, true);
  const phnum = header.getUint16(0x38, true);
  const table = new DataView(
    (await readAt(file, phoff, phentsize * phnum)).buffer,
  );
  const found: Uint8Array[] = [];
  for (let i = 0; i < phnum; i++) {
    const at = i * phentsize;
    if (table.getUint32(at, true) !== PT_NOTE) continue;
    const offset = Number(table.getBigUint64(at + 8, true));
    const size = Number(table.getBigUint64(at + 32, true));
    const notes = await readAt(file, offset, size);
    const view = new DataView(notes.buffer);
    for (let n = 0; n + 12 <= size;) {
      const namesz = view.getUint32(n, true);
      const descsz = view.getUint32(n + 4, true);
      const type = view.getUint32(n + 8, true);
      const owner = notes.subarray(n + 12, n + 12 + namesz);
      const descAt = n + 12 + align4(namesz);
      const desc = notes.subarray(descAt, descAt + descsz);
      n = descAt + align4(descsz);
      if (type !== SUI_NOTE_TYPE || decoder.decode(owner) !== "SUI\0") {
        continue;
      }
      const nameLength = new DataView(desc.buffer, desc.byteOffset)
        .getUint16(0, true);
      if (decoder.decode(desc.subarray(2, 2 + nameLength)) === name) {
        found.push(desc.subarray(2 + nameLength));
      }
    }
  }
  if (found.length !== 1) {
    throw new Error(`${found.length} ELF notes named ${name}, expected 1`);
  }
  return found[0];
}

function align4(n: number): number {
  return (n + 3) & ~3;
}

/** A little-endian reader over the data section that checks every length. */
class Reader {
  #view: DataView;
  #at = 0;

  constructor(readonly bytes: Uint8Array) {
    this.#view = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
  }

  get remaining(): number {
    return this.bytes.length - this.#at;
  }

  take(length: number): Uint8Array {
    if (length > this.remaining) {
      throw new Error(`payload ends ${length - this.remaining} bytes early`);
    }
    return this.bytes.subarray(this.#at, this.#at += length);
  }

  u8(): number {
    return this.take(1)[0];
  }

  u32(): number {
    const bytes = this.take(4);
    return this.#view.getUint32(bytes.byteOffset - this.bytes.byteOffset, true);
  }

  u64(): number {
    const bytes = this.take(8);
    const at = bytes.byteOffset - this.bytes.byteOffset;
    return Number(this.#view.getBigUint64(at, true));
  }

  magic(): void {
    const text = new TextDecoder().decode(this.take(MAGIC.length));
    if (text !== MAGIC) throw new Error(`expected ${MAGIC}, found ${text}`);
  }
}

function parseDataSection(data: Uint8Array): CompiledPayload {
  const r = new Reader(data);
  r.magic();
  const metadata = JSON.parse(decoder.decode(r.take(r.u64())));
  const hasNpmSnapshot = r.take(r.u64()).length > 0;
  const specifiers = new Map<number, string>();
  for (let count = r.u32(); count > 0; count--) {
    const specifier = decoder.decode(r.take(r.u32()));
    specifiers.set(r.u32(), specifier);
  }
  for (let count = r.u32(); count > 0; count--) r.take(8); // redirects
  const remoteModules = new Map<string, Uint8Array>();
  for (let count = r.u32(); count > 0; count--) {
    const id = r.u32();
    r.u8(); // media type
    const source = r.take(r.u32());
    const flags = r.u8();
    for (const flag of [1, 2, 4]) if (flags & flag) r.take(r.u32());
    const specifier = specifiers.get(id);
    if (specifier === undefined) throw new Error(`unknown specifier ${id}`);
    remoteModules.set(specifier, source);
  }
  const entries: VfsEntry[] = JSON.parse(decoder.decode(r.take(r.u64())));
  const filesData = r.take(r.u64());
  r.magic();
  if (r.remaining !== 0) throw new Error(`${r.remaining} bytes after the end`);
  const files = new Map<string, Uint8Array>();
  collectFiles(entries, "", filesData, files);
  return { metadata, files, remoteModules, hasNpmSnapshot };
}

type VfsEntry =
  | { Dir: { n: string; e: VfsEntry[] } }
  | { File: { n: string; o: [number, number] } }
  | { Symlink: { n: string } };

function collectFiles(
  entries: VfsEntry[],
  prefix: string,
  filesData: Uint8Array,
  files: Map<string, Uint8Array>,
): void {
  for (const entry of entries) {
    if ("Dir" in entry) {
      collectFiles(entry.Dir.e, `${prefix}${entry.Dir.n}/`, filesData, files);
    } else if ("File" in entry) {
      const [offset, length] = entry.File.o;
      if (offset + length > filesData.length) {
        throw new Error(`${prefix}${entry.File.n} lies outside the VFS data`);
      }
      files.set(
        `${prefix}${entry.File.n}`,
        filesData.subarray(offset, offset + length),
      );
    } else {
      throw new Error(`unexpected VFS entry ${JSON.stringify(entry)}`);
    }
  }
}
