// Test helpers shared by the socket tests: wait for a condition, capture the transport's log lines.
import { afterEach, beforeAll } from 'vitest';
import { setTransportLogger } from '../protocol.js';

/** Polls `cond` every 10 ms; fails after `timeoutMs` naming `what`. */
export async function until(what: string, cond: () => boolean, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** In a test file: the transport's log lines go into the returned array instead of stderr. */
export function captureTransportLog(): string[] {
  const lines: string[] = [];
  beforeAll(() => {
    setTransportLogger((l) => lines.push(l));
    return () => setTransportLogger(undefined);
  });
  return lines;
}

/** In a test file: a list of clean-up functions run (last first) after each test. */
export function cleanupAfterEach(): (() => unknown)[] {
  const cleanup: (() => unknown)[] = [];
  afterEach(async () => {
    for (const f of cleanup.splice(0).reverse()) await f();
  });
  return cleanup;
}
