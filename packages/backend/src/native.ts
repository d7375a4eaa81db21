// The package's native module (native/loader.c): holding fd 2 while TensorFlow loads, and loading
// a shared library by path for good. Built by `pnpm install`; null where it could not be built.
import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const require = createRequire(import.meta.url);

export interface NativeLoader {
  hold(): void;
  release(): string;
  preload(file: string): void;
}

export const NATIVE_LOADER_FILE = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'native', 'build', 'Release', 'dtrain_loader.node');

let cached: NativeLoader | null | undefined;

export function nativeLoader(): NativeLoader | null {
  if (cached !== undefined) return cached;
  cached = null;
  if (fs.existsSync(NATIVE_LOADER_FILE)) {
    try {
      cached = require(NATIVE_LOADER_FILE) as NativeLoader;
    } catch {
      // a module built for another Node: as if absent
    }
  }
  return cached;
}
