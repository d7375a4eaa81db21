// Tests that play another machine's worker: launch() with nodes 2 and one local fake worker, and
// the control endpoint it listens on, for the test's own ControlClient.
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { launch, type LaunchOptions, type LaunchResult } from '../coordinator.js';

const FAKE = fileURLToPath(new URL('./fake-worker.ts', import.meta.url));

/** Resolves once the coordinator listens; `run` is the launch itself (waiting for the second machine). */
export async function launchForSecondMachine(root: string, o: Pick<LaunchOptions, 'offerFiles' | 'joinTimeoutMs'>): Promise<{ endpoint: string; run: Promise<LaunchResult> }> {
  let listening!: (endpoint: string) => void;
  const ready = new Promise<string>((r) => (listening = r));
  const run = launch({
    workers: 1,
    nodes: 2,
    entry: FAKE,
    runDir: path.join(root, 'run'),
    config: {},
    env: { FAKE_MODE: 'ok', DTRAIN_HOST: 'host-a' },
    timeoutMs: 10_000,
    // The test's own client plays the other machine's worker, without keys.
    insecure: true,
    ...o,
    onEvent: (e) => {
      if (e.kind === 'listening') listening(e.endpoint);
    },
  });
  run.catch(() => undefined);
  return { endpoint: await ready, run };
}
