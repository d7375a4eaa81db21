// `dtrain report`: registration only; the plotting lives in ../report.ts and loads on use.
import path from 'node:path';
import { Command } from '@commander-js/extra-typings';

export function registerReport(program: Command) {
  program
    .command('report')
    .description('Plot a run from its metrics.jsonl: loss and accuracy per epoch, throughput over time, step-phase breakdown')
    .argument('<run-dir>', 'run folder (runs/<name>; pnpm cli runs lists them)')
    .option('--png <file>', 'write the four charts as one PNG image')
    .option('--html <file>', 'write a self-contained HTML page (inline SVG charts and an epoch table)')
    .addHelpText('after', '\nWithout --png and --html, writes report.png and report.html into the run folder.')
    .action(async (runDir, opts) => {
      const targets = opts.png || opts.html ? { png: opts.png, html: opts.html } : { png: path.join(runDir, 'report.png'), html: path.join(runDir, 'report.html') };
      // ECharts and resvg take seconds to load: only `report` itself pays for them.
      const { runFacts, writeReport } = await import('../report.js');
      const { run, written } = await writeReport(runDir, targets);
      const f = runFacts(run);
      console.log(f.title);
      for (const l of f.lines) console.log(`  ${l}`);
      for (const w of written) console.log(`wrote ${w}`);
    });
}
