/**
 * Polls `probe` every 200 ms until it gives a value (not undefined or false), and returns it;
 * after `ms` fails with `what()`, evaluated then (so it can say what is still there).
 */
export async function until<T>(probe: () => T | undefined | false, ms: number, what: () => string): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = probe();
    if (v !== undefined && v !== false) return v;
    if (Date.now() > deadline) throw new Error(what());
    await new Promise((r) => setTimeout(r, 200));
  }
}
