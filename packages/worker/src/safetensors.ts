// The safetensors format (Hugging Face's; what `safetensors.torch.load_file` reads): an 8-byte
// little-endian header length, a JSON header naming each tensor's dtype, shape and byte range,
// then the tensors' bytes, little-endian. Written and read here without a dependency: F32 and I64
// are all the network needs.

import fs from 'node:fs/promises';

export interface SafeTensor {
  dtype: 'F32' | 'I64';
  shape: number[];
  data: Float32Array | BigInt64Array;
}

/** A file that is not safetensors, or not what we can read: the message names the file and what is wrong. */
export class SafetensorsError extends Error {
  readonly code = 'SAFETENSORS_INVALID' as const;
  constructor(message: string) {
    super(message);
    this.name = 'SafetensorsError';
  }
}

const BYTES = { F32: 4, I64: 8 } as const;
/** Far above any header of this network (a few KiB), far below what would hurt to parse. */
const MAX_HEADER = 16 * 1024 * 1024;

/** The file's bytes: the tensors in the order given, the header padded to 8 bytes as the reference writer does. */
export function encodeSafetensors(tensors: Map<string, SafeTensor>, metadata: Record<string, string> = {}): Buffer {
  const header: Record<string, unknown> = { __metadata__: metadata };
  let offset = 0;
  for (const [name, t] of tensors) {
    const bytes = t.data.length * BYTES[t.dtype];
    header[name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - (Buffer.byteLength(json) % 8)) % 8);
  const head = Buffer.from(json, 'utf8');
  const out = Buffer.alloc(8 + head.length + offset);
  out.writeBigUInt64LE(BigInt(head.length), 0);
  head.copy(out, 8);
  let at = 8 + head.length;
  for (const t of tensors.values()) {
    const b = Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength);
    b.copy(out, at);
    at += b.length;
  }
  return out;
}

/** A tensor as the header describes it: its bytes are [begin, end) after the header. */
export interface SafeTensorEntry {
  dtype: SafeTensor['dtype'];
  shape: number[];
  begin: number;
  end: number;
}

/** A parsed header: the entries by name, the metadata, where the data starts in the file. */
export interface SafetensorsHeader {
  entries: Map<string, SafeTensorEntry>;
  metadata: Record<string, string>;
  dataStart: number;
}

/**
 * The header of a file of `fileLength` bytes whose first bytes are `prefix` (at least the 8-byte
 * length and the JSON, when the file has them). Checks every entry's byte range against the file.
 */
export function parseSafetensorsHeader(prefix: Uint8Array, fileLength: number, file: string): SafetensorsHeader {
  const fail = (why: string): never => {
    throw new SafetensorsError(`${file}: ${why}`);
  };
  if (fileLength < 8) fail(`${fileLength} bytes: not a safetensors file (it starts with an 8-byte header length)`);
  const buf = Buffer.from(prefix.buffer, prefix.byteOffset, prefix.byteLength);
  const headerLength = Number(buf.readBigUInt64LE(0));
  if (headerLength > MAX_HEADER || 8 + headerLength > fileLength) fail(`header length ${headerLength} does not fit the file's ${fileLength} bytes: not a safetensors file, or truncated`);
  let header: Record<string, unknown>;
  try {
    header = JSON.parse(buf.subarray(8, 8 + headerLength).toString('utf8')) as Record<string, unknown>;
  } catch {
    return fail('the header is not JSON: not a safetensors file');
  }
  const dataStart = 8 + headerLength;
  const dataLength = fileLength - dataStart;
  const entries = new Map<string, SafeTensorEntry>();
  for (const [name, v] of Object.entries(header)) {
    if (name === '__metadata__') continue;
    const e = v as { dtype?: unknown; shape?: unknown; data_offsets?: unknown };
    if (e.dtype !== 'F32' && e.dtype !== 'I64') fail(`tensor ${name} is ${String(e.dtype)}; only F32 and I64 are read (save float32 weights)`);
    const dtype = e.dtype as SafeTensor['dtype'];
    const shape = e.shape;
    const offsets = e.data_offsets;
    if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && d >= 0)) fail(`tensor ${name} has no valid shape`);
    if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every((d) => Number.isSafeInteger(d) && d >= 0)) fail(`tensor ${name} has no valid data_offsets`);
    const [begin, end] = offsets as number[];
    const count = (shape as number[]).reduce((a, d) => a * d, 1);
    if (end - begin !== count * BYTES[dtype] || end > dataLength) fail(`tensor ${name}: bytes [${begin}, ${end}) do not hold its shape [${(shape as number[]).join(', ')}] in the file's ${dataLength} data bytes`);
    entries.set(name, { dtype, shape: shape as number[], begin, end });
  }
  const metadata = (header.__metadata__ ?? {}) as Record<string, string>;
  return { entries, metadata, dataStart };
}

/** The header of the safetensors file `file`, read without its tensors' bytes. */
export async function readSafetensorsHeader(file: string): Promise<SafetensorsHeader> {
  const handle = await fs.open(file, 'r');
  try {
    const { size } = await handle.stat();
    const length = Buffer.alloc(8);
    await handle.read(length, 0, Math.min(8, size), 0);
    const headerLength = size >= 8 ? Math.min(Number(length.readBigUInt64LE(0)), MAX_HEADER, size - 8) : 0;
    const prefix = Buffer.alloc(8 + headerLength);
    await handle.read(prefix, 0, Math.min(prefix.length, size), 0);
    return parseSafetensorsHeader(prefix, size, file);
  } finally {
    await handle.close();
  }
}

/**
 * The tensors of a safetensors file (`file` names it in errors). Checks every byte range before use;
 * a caller that has parsed the header already passes it, so it is parsed once.
 */
export function decodeSafetensors(
  bytes: Uint8Array,
  file: string,
  header: SafetensorsHeader = parseSafetensorsHeader(bytes, bytes.length, file),
): { tensors: Map<string, SafeTensor>; metadata: Record<string, string> } {
  const { entries, metadata, dataStart } = header;
  const tensors = new Map<string, SafeTensor>();
  for (const [name, { dtype, shape, begin, end }] of entries) {
    // A copy: aligned for the typed array, independent of the file's buffer.
    const raw = new Uint8Array(bytes.subarray(dataStart + begin, dataStart + end));
    const data = dtype === 'F32' ? new Float32Array(raw.buffer) : new BigInt64Array(raw.buffer);
    tensors.set(name, { dtype, shape, data });
  }
  return { tensors, metadata };
}
