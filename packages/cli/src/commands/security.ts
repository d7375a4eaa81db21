// How `launch` and `join` choose the security of a run (issue 7 §3; packages/transport/README.md,
// "Wiring the launcher needs"): `--keys [DIR]` turns CURVE on with the machine's keys, `--insecure`
// turns it off, and without either a run whose addresses are all loopback uses CURVE with a key
// pair made for the run (the coordinator's launch(); other local users cannot join it) while a run
// that reaches other machines is refused, so nobody trains over a LAN unencrypted by accident.
import { defaultKeyDir, isCurveKey, isLoopback, KeyFileError, loadKeyDir, type KeyMaterial } from '@dtrain/transport';
import { UsageError } from '../errors.js';

export interface SecurityFlags {
  keys?: string | true;
  insecure?: true;
}

export const KEYS_HELP = 'CURVE: encrypt and authenticate with the key pair and allowed_keys in DIR (pnpm cli keys init; default $DTRAIN_KEYS_DIR, else ~/.config/dtrain/keys); required when any address is not loopback';
export const INSECURE_HELP = 'no encryption and no authentication, also across machines (a trusted network and machine only); without --keys or --insecure a loopback run uses keys made for it';

/**
 * The key material for CURVE, or undefined: none with --insecure, keys made for the run without it. `addresses` are every address the run binds
 * or connects to (listen, advertise, the coordinator's); `command` names the command in errors.
 */
export function chooseSecurity(o: SecurityFlags, addresses: (string | undefined)[], command: 'launch' | 'join'): KeyMaterial | undefined {
  if (o.keys !== undefined && o.insecure) throw new UsageError('give --keys DIR or --insecure, not both');
  if (o.insecure) return undefined;
  if (o.keys !== undefined) {
    const dir = o.keys === true ? defaultKeyDir() : o.keys;
    try {
      return loadKeyDir(dir);
    } catch (e) {
      if (e instanceof KeyFileError) throw new UsageError(`--keys ${dir}: ${e.message}`);
      throw e;
    }
  }
  const remote = addresses.filter((a): a is string => a !== undefined && !isLoopback(a));
  if (remote.length > 0) {
    throw new UsageError(
      `${command} on ${remote.join(', ')} reaches beyond this machine and needs encryption: run \`pnpm cli keys init\` on every machine ` +
        `(and \`pnpm cli keys add-peer\` for each other one), then pass --keys [DIR]; or pass --insecure to run without it on a network you trust`,
    );
  }
  return undefined;
}

/**
 * The coordinator's public key for `join`: `--coordinator-key` as a key, a "<key> <name>" line of
 * `pnpm cli keys show`, or the name of an allowed_keys entry; without it, the one entry of
 * allowed_keys that is not this machine's.
 */
export function coordinatorKeyOf(given: string | undefined, keys: KeyMaterial): string {
  const others = keys.allowed.filter((k) => k.publicKey !== keys.publicKey);
  if (given !== undefined) {
    const first = given.trim().split(/\s+/)[0] ?? '';
    if (isCurveKey(first)) return first;
    const byName = keys.allowed.find((k) => k.name === given.trim());
    if (byName) return byName.publicKey;
    throw new UsageError(
      `--coordinator-key '${given}' is neither a public key (40 Z85 characters, from \`pnpm cli keys show\` on the coordinator's machine) ` +
        `nor a name in ${keys.dir}/allowed_keys (${keys.allowed.map((k) => k.name).join(', ') || 'empty'})`,
    );
  }
  if (others.length === 1) return others[0].publicKey;
  throw new UsageError(
    `--keys ${keys.dir}: which key is the coordinator's? ${others.length === 0 ? 'allowed_keys lists no other machine' : `allowed_keys lists ${others.length} other machines (${others.map((k) => k.name).join(', ')})`}: ` +
      `pass --coordinator-key '<line of pnpm cli keys show on the coordinator's machine>' (or its name in allowed_keys)`,
  );
}
