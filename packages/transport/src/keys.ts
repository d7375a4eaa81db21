// Key files of a cluster (`pnpm cli keys`): this host's CURVE key pair and the allow-list of the
// public keys that may connect to its sockets. Formats are line-based text, like SSH's:
//
//   host.key      (0600)  public-key = "<z85>" / secret-key = "<z85>"   never leaves this machine
//   host.pub      (0644)  "<z85> <name>"                                 give it to the other machines
//   allowed_keys  (0644)  one "<z85> [name]" per line, # comments        the same file on every machine
//
// Every file is written to a temporary name in the same directory, synced and renamed into place,
// so a crash never leaves a half-written key; the secret is created with mode 0600 from the start.
import { randomBytes } from 'node:crypto';
import { closeSync, fchmodSync, fsyncSync, mkdirSync, openSync, readFileSync, renameSync, rmSync, statSync, writeSync } from 'node:fs';
import { homedir, hostname } from 'node:os';
import { basename, join } from 'node:path';
import { TransportError } from './errors.js';
import { curveKeyPair, isCurveKey, type Security } from './security.js';

/** A key file is missing, malformed or readable by others. */
export class KeyFileError extends TransportError {
  readonly code = 'E_KEY_FILE' as const;
}

export const KEY_FILES = { secret: 'host.key', public: 'host.pub', allowList: 'allowed_keys' } as const;

export interface AllowedKey {
  publicKey: string;
  name: string;
}

/** What a process needs for CURVE: its key pair and the keys it lets in. */
export interface KeyMaterial {
  dir: string;
  name: string;
  publicKey: string;
  secretKey: string;
  allowed: AllowedKey[];
}

/** `$DTRAIN_KEYS_DIR`, else ~/.config/dtrain/keys. */
export function defaultKeyDir(): string {
  return process.env.DTRAIN_KEYS_DIR || join(homedir(), '.config', 'dtrain', 'keys');
}

function writeAtomic(path: string, text: string, mode: number): void {
  const tmp = `${path}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
  const fd = openSync(tmp, 'wx', mode);
  try {
    fchmodSync(fd, mode); // the umask may have narrowed it; it never widens a 0600 file
    writeSync(fd, text);
    fsyncSync(fd);
  } catch (e) {
    closeSync(fd);
    rmSync(tmp, { force: true });
    throw e;
  }
  closeSync(fd);
  renameSync(tmp, path);
}

function exists(path: string): boolean {
  try {
    statSync(path);
    return true;
  } catch {
    return false;
  }
}

function cleanName(name: string): string {
  return name.replace(/\s+/g, '-').replace(/[^\w.@:-]/g, '').slice(0, 100) || 'unnamed';
}

/** Parses an allow-list (or a host.pub): one "<key> [name]" per line; throws naming file and line. */
export function parseAllowList(text: string, file: string): AllowedKey[] {
  const out: AllowedKey[] = [];
  text.split('\n').forEach((raw, i) => {
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) return;
    const [key, ...rest] = line.split(/\s+/);
    if (!isCurveKey(key)) {
      throw new KeyFileError(`${file} line ${i + 1}: "${line.slice(0, 60)}" does not start with a CURVE public key (40 Z85 characters): fix or delete the line`);
    }
    if (!out.some((k) => k.publicKey === key)) out.push({ publicKey: key, name: rest.join(' ') });
  });
  return out;
}

function allowListText(keys: AllowedKey[]): string {
  return (
    '# dtrain allow-list: the CURVE public keys that may connect to this machine\'s dtrain sockets,\n' +
    '# one "<key> <name>" per line. Keep the same file on every machine of the cluster.\n' +
    keys.map((k) => `${k.publicKey} ${k.name}`.trimEnd() + '\n').join('')
  );
}

/** Reads the allow-list of `dir` (missing file: empty list). */
/**
 * As ssh's StrictModes: who can write the key directory or the allow-list can add their own key,
 * so either writable by group or others (or owned by another user than us or root) is refused.
 */
function refuseWritableByOthers(path: string, what: string): void {
  if (process.platform === 'win32') return;
  const st = statSync(path);
  const uid = process.getuid?.();
  if ((st.mode & 0o022) !== 0) {
    throw new KeyFileError(`${what} ${path} is writable by other users (mode ${(st.mode & 0o777).toString(8)}): anyone who can write it can add their key; run \`chmod go-w ${path}\``);
  }
  if (uid !== undefined && st.uid !== uid && st.uid !== 0) {
    throw new KeyFileError(`${what} ${path} belongs to user ${st.uid}, not to this user (${uid}) or root: whoever owns it can add their key; run \`chown ${uid} ${path}\` if it is yours`);
  }
}

export function readAllowList(dir = defaultKeyDir()): AllowedKey[] {
  const file = join(dir, KEY_FILES.allowList);
  if (!exists(file)) return [];
  refuseWritableByOthers(dir, 'the key directory');
  refuseWritableByOthers(file, 'the allow-list');
  return parseAllowList(readFileSync(file, 'utf8'), file);
}

/**
 * Creates what a host of the cluster needs in `dir`: a key pair (host.key 0600, host.pub 0644) and
 * the allow-list (0644) with this host's own key in it. Refuses to replace an existing key pair
 * unless `force` (every other machine would have to learn the new key).
 */
export function initKeyDir(opts: { dir?: string; name?: string; force?: boolean } = {}): KeyMaterial & { created: string[] } {
  const dir = opts.dir ?? defaultKeyDir();
  const name = cleanName(opts.name ?? hostname());
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const secretFile = join(dir, KEY_FILES.secret);
  if (exists(secretFile) && opts.force !== true) {
    throw new KeyFileError(
      `${secretFile} already exists: this host has a key pair (pnpm cli keys show). Pass --force to replace it; ` +
        `then put the new public key in allowed_keys on every machine.`,
    );
  }
  const kp = curveKeyPair();
  const created: string[] = [];
  writeAtomic(
    secretFile,
    `# dtrain CURVE key pair of ${name}, created ${new Date().toISOString()}.\n` +
      '# SECRET: keep it on this machine, readable only by you (mode 0600). Give others host.pub.\n' +
      `public-key = "${kp.publicKey}"\nsecret-key = "${kp.secretKey}"\n`,
    0o600,
  );
  created.push(secretFile);
  const pubFile = join(dir, KEY_FILES.public);
  writeAtomic(pubFile, `${kp.publicKey} ${name}\n`, 0o644);
  created.push(pubFile);
  const allowed = readAllowList(dir).filter((k) => k.name !== name || k.publicKey === kp.publicKey);
  if (!allowed.some((k) => k.publicKey === kp.publicKey)) allowed.push({ publicKey: kp.publicKey, name });
  const allowFile = join(dir, KEY_FILES.allowList);
  writeAtomic(allowFile, allowListText(allowed), 0o644);
  created.push(allowFile);
  return { dir, name, publicKey: kp.publicKey, secretKey: kp.secretKey, allowed, created };
}

/**
 * Loads this host's key pair and allow-list. Refuses a secret key file that others can read (as
 * ssh does), naming the file and the chmod that fixes it.
 */
export function loadKeyDir(dir = defaultKeyDir()): KeyMaterial {
  const secretFile = join(dir, KEY_FILES.secret);
  let text: string;
  let mode: number;
  try {
    mode = statSync(secretFile).mode;
    text = readFileSync(secretFile, 'utf8');
  } catch (e) {
    throw new KeyFileError(`cannot read ${secretFile} (${(e as NodeJS.ErrnoException).code ?? (e as Error).message}): run \`pnpm cli keys init --dir ${dir}\` on this machine first`);
  }
  if ((mode & 0o077) !== 0 && process.platform !== 'win32') {
    throw new KeyFileError(`${secretFile} is readable by other users (mode ${(mode & 0o777).toString(8)}): run \`chmod 600 ${secretFile}\` (and consider the key stolen if others could read it)`);
  }
  const field = (k: string) => new RegExp(`^\\s*${k}\\s*=\\s*"([^"]*)"\\s*$`, 'm').exec(text)?.[1];
  const publicKey = field('public-key');
  const secretKey = field('secret-key');
  if (!isCurveKey(publicKey) || !isCurveKey(secretKey)) {
    throw new KeyFileError(`${secretFile} does not hold a public-key and a secret-key line of 40 Z85 characters each: recreate it with \`pnpm cli keys init --force --dir ${dir}\``);
  }
  const pub = join(dir, KEY_FILES.public);
  let name = hostname();
  if (exists(pub)) name = parseAllowList(readFileSync(pub, 'utf8'), pub)[0]?.name || name;
  return { dir, name, publicKey, secretKey, allowed: readAllowList(dir) };
}

/**
 * Adds a public key to the allow-list of `dir`: `entry` is "<key> [name]" (a host.pub line) or the
 * path of a host.pub file. Returns the added key and whether it was new.
 */
export function addAllowedKey(entry: string, opts: { dir?: string; name?: string } = {}): { key: AllowedKey; added: boolean } {
  const dir = opts.dir ?? defaultKeyDir();
  let text = entry.trim();
  let source = 'the key given';
  if (!isCurveKey(text.split(/\s+/)[0]) && exists(text)) {
    source = text;
    text = readFileSync(text, 'utf8');
  }
  const keys = parseAllowList(text, source);
  if (keys.length !== 1) throw new KeyFileError(`${source}: expected exactly one public key line ("<40 Z85 characters> [name]"), found ${keys.length}`);
  const key = { publicKey: keys[0].publicKey, name: cleanName(opts.name ?? (keys[0].name || basename(source))) };
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const allowed = readAllowList(dir);
  if (allowed.some((k) => k.publicKey === key.publicKey)) return { key, added: false };
  allowed.push(key);
  writeAtomic(join(dir, KEY_FILES.allowList), allowListText(allowed), 0o644);
  return { key, added: true };
}

/** Security for a server socket (ControlServer, Ring): this host's keys, the allow-list. */
export function curveServerSecurity(k: KeyMaterial): Security {
  return { kind: 'curve', publicKey: k.publicKey, secretKey: k.secretKey, allowedClientKeys: k.allowed.map((a) => a.publicKey) };
}

/** Security for a ControlClient: this host's keys and the coordinator's public key. The allow-list
 * is kept too, so the same object serves the worker's Ring. */
export function curveClientSecurity(k: KeyMaterial, serverPublicKey: string): Security {
  return { ...curveServerSecurity(k), serverPublicKey } as Security;
}
