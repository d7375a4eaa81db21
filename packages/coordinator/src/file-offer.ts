// The data set files a multi-machine coordinator offers to workers of machines that lack them:
// checked and hashed before anything starts (a missing file is one clear error), then served a
// chunk per request (Message fileRequest -> fileChunk, the worker verifies the sha256).
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { OfferedFileError } from './errors.js';

const FILE_CHUNK_BYTES = 4 << 20;

/** Message fileRequest as decoded (a uint64 offset may come as a Long). */
export interface FileRequest {
  name?: string;
  offset?: number | { toNumber(): number };
}

export interface OfferedFile {
  name: string;
  size: number;
  sha256: string;
}

/** How the offer answers a peer: a chunk with its bytes, or a refusal (Error REFUSED). */
export interface OfferReplies {
  chunk(peer: Buffer, header: { name: string; offset: number; totalSize: number; sha256: string }, bytes: Buffer): Promise<void>;
  refuse(peer: Buffer, message: string): void;
}

export class FileOffer {
  /** Peers (hex) whose chunk is being read and sent. */
  private readonly inFlight = new Set<string>();

  private constructor(private readonly files: Map<string, OfferedFile & { file: string }>) {}

  /** Checks and hashes `names` under `root`; throws OfferedFileError naming a file that cannot be read. */
  static async prepare(offer: { root: string; names: string[] } | undefined): Promise<FileOffer> {
    const files = new Map<string, OfferedFile & { file: string }>();
    for (const name of offer?.names ?? []) {
      const file = path.join(offer!.root, name);
      let size: number;
      try {
        size = fs.statSync(file).size;
      } catch (e) {
        throw new OfferedFileError(`cannot offer ${file} to the other machines: ${(e as Error).message}`);
      }
      files.set(name, { name, file, size, sha256: await sha256Of(file) });
    }
    return new FileOffer(files);
  }

  get size(): number {
    return this.files.size;
  }

  /** What Welcome's config names (`offeredFiles`) and the 'offered' event shows. */
  list(): OfferedFile[] {
    return [...this.files.values()].map(({ name, size, sha256 }) => ({ name, size, sha256 }));
  }

  /**
   * One request read at a time per peer (a worker fetches chunk after chunk): a flood of ~30-byte
   * requests would otherwise make the coordinator read a 4 MiB chunk for each; what is queued to a
   * peer that does not read is bounded by the control socket's send high-water mark.
   */
  serve(peer: Buffer, req: FileRequest, replies: OfferReplies): void {
    const key = peer.toString('hex');
    const name = req.name ?? '';
    const offset = typeof req.offset === 'number' ? req.offset : (req.offset?.toNumber() ?? 0);
    const f = this.files.get(name);
    const refusal = !f ? `this coordinator does not offer '${name}'`
      : offset > f.size ? `offset ${offset} is beyond the ${f.size} bytes of ${name}`
      : this.inFlight.has(key) ? `one file request at a time: '${name}' at ${offset} came before the chunk of the previous one was sent`
      : undefined;
    if (!f || refusal !== undefined) return replies.refuse(peer, refusal ?? '');
    this.inFlight.add(key);
    void (async () => {
      const bytes = await readChunk(f.file, offset, Math.min(FILE_CHUNK_BYTES, f.size - offset));
      // Cleared before the send: the worker asks for the next chunk as soon as this one arrives.
      this.inFlight.delete(key);
      await replies.chunk(peer, { name, offset, totalSize: f.size, sha256: f.sha256 }, bytes);
    })().catch((err: unknown) => {
      this.inFlight.delete(key);
      replies.refuse(peer, `the coordinator could not read ${f.file}: ${(err as Error).message}`);
    });
  }
}

async function readChunk(file: string, offset: number, len: number): Promise<Buffer> {
  const fh = await fs.promises.open(file, 'r');
  try {
    const buf = Buffer.allocUnsafe(len);
    let got = 0;
    while (got < len) {
      const { bytesRead } = await fh.read(buf, got, len - got, offset + got);
      if (bytesRead === 0) break;
      got += bytesRead;
    }
    return buf.subarray(0, got);
  } finally {
    await fh.close();
  }
}

async function sha256Of(file: string): Promise<string> {
  const h = createHash('sha256');
  for await (const c of fs.createReadStream(file)) h.update(c as Buffer);
  return h.digest('hex');
}
