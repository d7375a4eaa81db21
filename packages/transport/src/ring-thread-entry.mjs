// Entry of a ring's thread (ring-thread.ts). Worker threads do not run the parent's TypeScript
// loader in every setup (vitest, plain node), so the thread registers tsx itself, then loads the
// TypeScript side.
import { register } from 'tsx/esm/api';

register();
await import(new URL('./ring-thread-worker.ts', import.meta.url).href);
