// For tests that call launch() or join() in the test process (here and in packages/cli).
import type { TestContext } from 'vitest';

/**
 * The workers of launch() and join() called inside the test process are children of this process
 * and in its process group, so they are killed one by one, by pid, when the test ends, however it
 * ends (their coordinator, this process, cannot be). Use the result as, or call it from, `onEvent`.
 */
export function killWorkersAtEnd(ctx: TestContext): (e: { kind: string; pid?: number }) => void {
  const pids: number[] = [];
  ctx.onTestFinished(() => {
    for (const pid of pids) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // exited
      }
    }
  });
  return (e) => {
    if (e.kind === 'spawned' && e.pid !== undefined && e.pid > 0) pids.push(e.pid);
  };
}
