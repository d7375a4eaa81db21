// ElasticRingCollective against a scripted coordinator: a real ControlServer on 127.0.0.1 that
// sends the Welcomes and commands the case calls for, the real CoordinatorLink and ThreadedRing.
// The edge case: a member of the new group is lost while this worker sets up the new ring.
import { afterEach, describe, expect, it } from 'vitest';
import { ControlClient, ControlServer, readRegroupReport, Ring, ThreadedRing } from '@dtrain/transport';
import { GroupChangedError } from './collective.js';
import { CommandKind, CoordinatorLink } from './coordinator-link.js';
import { ElasticRingCollective, type RegroupReport } from './elastic-ring.js';

const RUN = 'elastic-setup';
const RING_TIMEOUT_MS = 4000;
const cleanup: (() => Promise<unknown>)[] = [];
afterEach(async () => {
  for (const f of cleanup.splice(0).reverse()) await f().catch(() => undefined);
});

async function until(what: string, ok: () => boolean, ms = 5000): Promise<void> {
  for (const end = Date.now() + ms; !ok(); ) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe('ElasticRingCollective: a ROLLBACK of the generation being set up', () => {
  it('ends the setup at once (not at the ring timeout), and the next regroup reports leaving that generation', async () => {
    const server = await ControlServer.bind({ runId: RUN, timeoutMs: 10_000 });
    const reports: RegroupReport[] = [];
    let worker: Buffer | undefined;
    server.onMessage((e) => {
      worker = e.peer;
      const r = e.message.kind === 'stepReport' ? (e.message.body as { regroup?: Record<string, unknown> }).regroup : undefined;
      if (r) reports.push(readRegroupReport(r)!);
    });
    const client = new ControlClient(server.endpoint, { runId: RUN, timeoutMs: 10_000, who: 'rank 0' });
    const link = new CoordinatorLink(client, { rank: 0, heartbeatMs: 200, timeoutMs: 10_000, who: 'rank 0', endpoint: server.endpoint });
    link.start();
    const first = await ThreadedRing.create({ rank: 0, worldSize: 1, timeoutMs: RING_TIMEOUT_MS });
    await first.connect([{ rank: 0, host: first.host, endpoints: first.endpoints }], { runId: RUN, generation: 1 });
    // The new group's rank 1: a ring socket that accepts connections and never answers.
    const silent = await Ring.create({ rank: 1, worldSize: 2, timeoutMs: RING_TIMEOUT_MS });
    const ec = new ElasticRingCollective(first, {
      link, ringOptions: { timeoutMs: RING_TIMEOUT_MS }, runId: RUN, regroupTimeoutMs: 10_000,
      report: (r) => client.send('stepReport', { rank: 0, regroup: r }),
    });
    cleanup.push(() => server.close(), () => client.close(0), async () => link.stop(), () => silent.close(), () => ec.close());
    const welcome = (generation: number, worldSize: number) =>
      server.send(worker!, 'welcome', {
        rank: 0, worldSize, generation, heartbeatMs: 200, timeoutMs: RING_TIMEOUT_MS, elastic: true,
        peers: [
          { rank: 0, host: first.host, dataEndpoints: reports.at(-1)!.endpoints, curvePublicKey: '' },
          { rank: 1, host: first.host, dataEndpoints: silent.endpoints, curvePublicKey: '' },
        ].slice(0, worldSize),
      });

    const setup = ec.regroup({ epoch: 1, done: 0, step: 3 });
    setup.catch(() => undefined);
    await until('the first regroup report', () => reports.length === 1);
    expect(reports[0].generation).toBe(1);
    await welcome(2, 2);
    await new Promise((r) => setTimeout(r, 300)); // in the new ring's setup, waiting for rank 1
    const t0 = Date.now();
    await server.send(worker!, 'command', { kind: CommandKind.ROLLBACK, generation: 2, reason: 'rank 1 was lost' });
    await expect(setup).rejects.toThrow(GroupChangedError);
    expect(Date.now() - t0).toBeLessThan(RING_TIMEOUT_MS / 2);
    expect(ec.generation).toBe(2);

    // The coordinator counts a report for any other generation as malformed and ignores it.
    const again = ec.regroup({ epoch: 1, done: 0, step: 3 });
    await until('the second regroup report', () => reports.length === 2);
    expect(reports[1].generation).toBe(2);
    expect(reports[1].reason).toMatch(/rolled back the step: rank 1 was lost/);
    await welcome(3, 1);
    await expect(again).resolves.toMatchObject({ root: 0, stop: false });
    expect([ec.generation, ec.worldSize]).toEqual([3, 1]);
  });
});
