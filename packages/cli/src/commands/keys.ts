// `dtrain keys init|add-peer|show [--dir D]`: the CURVE key files of a cluster (see
// packages/transport/README.md, "Security"). The file formats and checks live in @dtrain/transport.
import { Command } from '@commander-js/extra-typings';
import { addAllowedKey, defaultKeyDir, initKeyDir, KEY_FILES, loadKeyDir } from '@dtrain/transport';
import { join } from 'node:path';

const dirHelp = `key directory (default $DTRAIN_KEYS_DIR, else ~/.config/dtrain/keys)`;

export function registerKeys(program: Command): void {
  const keys = program
    .command('keys')
    .description('CURVE keys for encrypted, authenticated multi-machine runs (one key pair per machine, one allow-list)');

  keys
    .command('init')
    .description(`create this machine's key pair (${KEY_FILES.secret} mode 0600, ${KEY_FILES.public} 0644) and the allow-list (${KEY_FILES.allowList}) with its own key`)
    .option('--dir <dir>', dirHelp)
    .option('--name <name>', 'name of this machine in the allow-list (default: host name)')
    .option('--force', 'replace an existing key pair (every machine must then learn the new public key)')
    .action((o) => {
      const k = initKeyDir({ dir: o.dir ?? defaultKeyDir(), name: o.name, force: o.force === true });
      console.log(`created ${k.created.join(', ')}`);
      console.log(`public key of ${k.name}: ${k.publicKey}`);
      console.log(
        `next: on every other machine run \`pnpm cli keys add-peer '${k.publicKey} ${k.name}'\`, and add theirs here; ` +
          `keep ${join(k.dir, KEY_FILES.secret)} on this machine only.`,
      );
    });

  keys
    .command('add-peer')
    .description('allow another machine: add its public key (a host.pub line "<key> <name>", or the path of its host.pub) to the allow-list')
    .argument('<key-or-file>', 'the "<key> <name>" line that `keys show` prints on that machine, or its host.pub file')
    .option('--dir <dir>', dirHelp)
    .option('--name <name>', 'name to record for it')
    .action((entry, o) => {
      const dir = o.dir ?? defaultKeyDir();
      const r = addAllowedKey(entry, { dir, name: o.name });
      console.log(r.added ? `allowed ${r.key.name} (${r.key.publicKey}) in ${join(dir, KEY_FILES.allowList)}` : `${r.key.publicKey} was already allowed`);
    });

  keys
    .command('show')
    .description("print this machine's public key line and the allow-list (never the secret key)")
    .option('--dir <dir>', dirHelp)
    .action((o) => {
      const k = loadKeyDir(o.dir ?? defaultKeyDir());
      console.log(`${k.publicKey} ${k.name}`);
      console.log(`allowed (${join(k.dir, KEY_FILES.allowList)}):`);
      for (const a of k.allowed) console.log(`  ${a.publicKey} ${a.name}`);
    });
}
