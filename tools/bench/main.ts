// `pnpm bench <name> [args]`: runs tools/bench/<name>.ts, which exports `main(args)`.
// Benchmarks are not tests: they measure, compare with a baseline in the same run, and write
// bench-results/<name>.json.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const available = fs
  .readdirSync(here)
  .filter((f) => f.endsWith('.ts') && f !== 'main.ts' && !f.startsWith('_'))
  .map((f) => f.slice(0, -3))
  .sort();
const [name, ...args] = process.argv.slice(2);
if (!name || name === '--help' || name === '-h' || !available.includes(name)) {
  if (name && !['--help', '-h'].includes(name)) console.error(`error: no benchmark named '${name}'`);
  console.error(`usage: pnpm bench <${available.join('|')}> [options]   (each takes --help)`);
  process.exit(name && !['--help', '-h'].includes(name) ? 2 : 0);
}
const mod = (await import(pathToFileURL(path.join(here, `${name}.ts`)).href)) as { main(args: string[]): Promise<void> };
await mod.main(args);
