// The environment for node-gyp builds started by our install scripts (tools/provision-tfjs.mjs,
// tools/build-native-addon.mjs): node-gyp downloads Node's headers unless told
// where they are, which fails on offline machines; Node's installed headers are used when they
// match this Node. The root's node-gyp (a devDependency) is named for tools that look for one.
import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';

/** Node's headers next to this Node, if they are its version: { npm_config_nodedir } or {}. */
function nodedirEnv() {
  if (process.env.npm_config_nodedir) return {};
  const prefix = path.resolve(path.dirname(process.execPath), '..');
  const header = path.join(prefix, 'include', 'node', 'node_version.h');
  if (fs.existsSync(header)) {
    const text = fs.readFileSync(header, 'utf8');
    const v = (k) => text.match(new RegExp(`#define NODE_${k}_VERSION (\\d+)`))?.[1];
    if (`v${v('MAJOR')}.${v('MINOR')}.${v('PATCH')}` === process.version) {
      return { npm_config_nodedir: prefix };
    }
  }
  return {};
}

/**
 * process.env plus npm_config_nodedir (see above) and npm_config_node_gyp (the node-gyp of the
 * workspace `root`, when installed; absent otherwise).
 */
export function nodeGypEnv(root) {
  const req = createRequire(path.join(root, 'package.json'));
  const env = { ...process.env, ...nodedirEnv() };
  try {
    env.npm_config_node_gyp = req.resolve('node-gyp/bin/node-gyp.js');
  } catch {
    /* callers fall back (node-pre-gyp: the node-gyp that npm bundles) or say it is missing */
  }
  return env;
}
