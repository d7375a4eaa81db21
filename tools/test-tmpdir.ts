// Test setup (vitest setupFiles, see vitest.shared.ts): every test file gets a temporary directory
// of its own as TMPDIR, inherited by every process it starts, and removed when the file's tests
// end. Runs, checkpoints (45 MB each) and logs of the tests then never pile up in the machine's
// temporary directory: they did, by about 1.5 GB per full test run, until a disk filled up.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll } from 'vitest';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dtrain-test-'));
process.env.TMPDIR = dir;

afterAll(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});
