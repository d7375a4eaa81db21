// Atomic writes, and only those: a file written here is always either its old content or the whole
// new one, whenever the process dies. Checkpoints, the safetensors export, the run folder's
// config.json and summary.json (run-folder.ts) and the CLI's reports go through writeFileAtomic;
// what a writer killed half-way leaves behind is a temporary that removeStaleTemporaries clears.
import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';

export interface AtomicWriteOptions {
  /** Test seam: runs after the data is on disk (fsynced) and before the rename. */
  beforeRename?: (tmp: string) => Promise<void> | void;
}

/** Temporary names carry this marker; nothing with it is ever a finished file. */
export const TMP_MARKER = '.tmp-';

/**
 * Writes `parts` to `file` so that `file` is always either the old content or the whole new one:
 * write a temporary file in the same folder, fsync it, rename it over `file`, fsync the folder
 * (so the rename itself survives a power cut). On any failure the temporary file is removed.
 */
export async function writeFileAtomic(file: string, parts: Uint8Array | string | Array<Uint8Array | string>, options: AtomicWriteOptions = {}): Promise<void> {
  const list = Array.isArray(parts) ? parts : [parts];
  const tmp = `${file}${TMP_MARKER}${process.pid}-${randomBytes(4).toString('hex')}`;
  try {
    const fh = await fs.open(tmp, 'wx');
    try {
      for (const p of list) {
        const bytes = typeof p === 'string' ? Buffer.from(p, 'utf8') : p;
        let off = 0;
        while (off < bytes.byteLength) {
          const { bytesWritten } = await fh.write(bytes, off, bytes.byteLength - off);
          off += bytesWritten;
        }
      }
      await fh.sync();
    } finally {
      await fh.close();
    }
    await options.beforeRename?.(tmp);
    await fs.rename(tmp, file);
  } catch (err) {
    await fs.rm(tmp, { force: true });
    throw err;
  }
  await syncDir(path.dirname(file));
}

async function syncDir(dir: string): Promise<void> {
  let fh: fs.FileHandle | undefined;
  try {
    fh = await fs.open(dir, 'r');
    await fh.sync();
  } catch {
    // Some file systems refuse fsync on a directory; the rename is still atomic there.
  } finally {
    await fh?.close();
  }
}

/** Removes temporaries left by a process that died while writing into `dir`. */
export async function removeStaleTemporaries(dir: string): Promise<string[]> {
  const removed: string[] = [];
  for (const name of await fs.readdir(dir)) {
    if (name.includes(TMP_MARKER)) {
      await fs.rm(path.join(dir, name), { force: true });
      removed.push(name);
    }
  }
  return removed;
}
