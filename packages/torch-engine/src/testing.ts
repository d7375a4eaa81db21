// What the tests of every package that trains on the torch engine share: where the add-on is not
// built they are reported as skipped, except under CI, whose install must have built it.
import type { TestContext } from 'vitest';
import { torchEngineStatus } from './addon.js';

export const engineStatus = torchEngineStatus();

export function needsEngine(ctx: TestContext): void {
  if (!engineStatus.available && process.env.CI) throw new Error(`CI must build the torch engine (pnpm install): ${engineStatus.detail}`);
  ctx.skip(!engineStatus.available, engineStatus.detail);
}
