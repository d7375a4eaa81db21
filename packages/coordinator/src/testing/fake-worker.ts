// A worker process for coordinator.test.ts that speaks the real control protocol over real
// sockets but trains nothing (no TensorFlow), so failure handling is tested in seconds.
// FAKE_MODE: 'ok' (join, report done, exit 0), 'crash' (rank FAKE_RANK prints and exits 3 after
// the Welcome), 'silent' (rank FAKE_RANK never says Hello), 'claim' (rank FAKE_RANK connects with
// its allowed key but names another one in its Hello), 'diverge' (every rank reports the same
// realistic state hash, except rank FAKE_RANK: the replica-divergence check, which no real worker
// can reach without a bug), 'regroupKey' (rank FAKE_RANK sends a regroup report naming a ring key
// other than its own, then finishes). FAKE_HOSTS: host names by rank, comma-separated (default fakehost).
// With DTRAIN_COORDINATOR_KEY: CURVE (and it prints its key directory and that directory's mode).
import { createHash } from 'node:crypto';
import { statSync } from 'node:fs';
import { ControlClient, curveClientSecurity, curveKeyPair, loadKeyDir } from '@dtrain/transport';

const rank = Number(process.env.RANK);
const mode = process.env.FAKE_MODE ?? 'ok';
const target = Number(process.env.FAKE_RANK ?? -1);
const host = process.env.FAKE_HOSTS?.split(',')[rank] || 'fakehost';

/** What this rank says its final state hashes to. */
function stateSha256(): string {
  if (mode !== 'diverge') return 'same';
  return createHash('sha256').update(rank === target ? 'a replica that drifted' : 'the replicas').digest('hex');
}

async function main(): Promise<void> {
  if (mode === 'silent' && rank === target) {
    console.log('sleeping instead of joining');
    await new Promise((r) => setTimeout(r, 60_000));
    return;
  }
  const coordinatorKey = process.env.DTRAIN_COORDINATOR_KEY;
  const keys = coordinatorKey ? loadKeyDir(process.env.DTRAIN_KEYS_DIR) : undefined;
  if (keys) console.log(`keys dir ${keys.dir} mode ${(statSync(keys.dir).mode & 0o777).toString(8)}`);
  const c = new ControlClient(`tcp://${process.env.MASTER_ADDR}:${process.env.MASTER_PORT}`, { timeoutMs: 20_000, security: keys && coordinatorKey ? curveClientSecurity(keys, coordinatorKey) : undefined });
  const curvePublicKey = mode === 'claim' && rank === target ? curveKeyPair().publicKey : (keys?.publicKey ?? '');
  await c.send('hello', { host, pid: process.pid, localRank: Number(process.env.LOCAL_RANK), requestedRank: rank, dataEndpoints: [`tcp://127.0.0.1:${1000 + rank}`], curvePublicKey });
  const w = await c.receive('welcome');
  if (w.kind === 'error') {
    console.error(`refused: ${(w.body as { message?: string }).message}`);
    process.exit(4);
  }
  if (w.kind !== 'welcome') throw new Error(`expected welcome, got ${w.kind}`);
  c.runId = w.runId;
  console.log(`rank ${rank} welcomed with config ${(w.body as { configJson?: string }).configJson}`);
  console.log(`rank ${rank} sees CUDA_VISIBLE_DEVICES=${process.env.CUDA_VISIBLE_DEVICES ?? '(unset)'}`);
  if (keys) console.log(`peer keys ${((w.body as { peers?: { curvePublicKey?: string }[] }).peers ?? []).map((p) => p.curvePublicKey).join(',')}`);
  if (mode === 'crash' && rank === target) {
    console.log('computing step 1');
    console.error('Error: out of memory in the fake forward pass');
    process.exit(3);
  }
  if (mode === 'regroupKey' && rank === target) {
    const forged = { kind: 'regroup', generation: 1, committed: { epoch: 0, done: 0, step: 0 }, endpoints: ['tcp://127.0.0.1:1'], key: curveKeyPair().publicKey, reason: 'a key of its choosing' };
    await c.send('stepReport', { rank, regroup: forged });
    await new Promise((r) => setTimeout(r, 300));
  }
  await c.send('stepReport', { rank, final: { rank, host, stateSha256: stateSha256() } });
  await c.receive('ack');
  await c.close();
  process.exit(0);
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
