// A Hello's host is printed to the operator's terminal and labels metrics: the coordinator admits
// only host names. This test is another machine's worker speaking the real protocol to launch()
// with nodes 2 (one local fake worker, testing/second-machine.ts).
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { ControlClient } from '@dtrain/transport';
import { launchForSecondMachine } from './testing/second-machine.js';

describe("a Hello's host", () => {
  it('is refused unless it is a host name: control characters, spaces, a leading dot, 254 characters', async () => {
    const root = fs.mkdtempSync(path.join(os.tmpdir(), 'dtrain-hello-host-'));
    const { endpoint, run } = await launchForSecondMachine(root, { joinTimeoutMs: 8_000 });
    const ended = run.then(
      () => 'completed',
      (err: Error) => err.message,
    );
    const refusal = async (host: string): Promise<string> => {
      const c = new ControlClient(endpoint, { timeoutMs: 10_000, who: 'a test worker' });
      try {
        await c.send('hello', { host, pid: process.pid, localRank: 0, localWorldSize: 1, requestedRank: -1, dataEndpoints: ['tcp://127.0.0.1:1'], curvePublicKey: '' });
        for (;;) {
          const m = await c.receive('the answer to a Hello', 10_000);
          if (m.kind === 'heartbeat') continue;
          expect(m.kind).toBe('error');
          return (m.body as { message?: string }).message ?? '';
        }
      } finally {
        await c.close();
      }
    };
    const rule = /^a Hello's host must be a host name: at most 253 letters, digits, '\.', '-' and '_', starting with a letter or digit; got /;
    expect(await refusal('evil\u001b[2J\nlost rank 0')).toMatch(rule);
    expect(await refusal('evil\u001b[2J\nlost rank 0')).toContain('got "evil\\u001b[2J\\nlost rank 0"');
    expect(await refusal('two words')).toMatch(rule);
    expect(await refusal('.hidden')).toMatch(rule);
    const long = await refusal('a'.repeat(254));
    expect(long).toMatch(rule);
    expect(long).toContain(`"${'a'.repeat(64)}" (and 190 more characters)`);
    // Nothing was admitted: the run still waits for its second machine, and gives up at its join timeout.
    expect(await ended).toMatch(/join|machine|waiting|joined/i);
  }, 60_000);
});
