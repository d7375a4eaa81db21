// The worker's environment: torchrun's variables, or none of RANK/WORLD_SIZE when `dtrain join`
// starts it and the coordinator assigns the rank.
import { describe, expect, it } from 'vitest';
import { readWorkerEnv, WorkerEnvError, writeWorkerEnv } from './env.js';

const base = { MASTER_ADDR: '10.0.0.1', MASTER_PORT: '29500' };

describe('readWorkerEnv', () => {
  it('torchrun style: RANK and WORLD_SIZE given', () => {
    const e = readWorkerEnv({ ...base, RANK: '1', WORLD_SIZE: '2', LOCAL_RANK: '1', LOCAL_WORLD_SIZE: '2', DTRAIN_RING_PORT: '29601' });
    expect(e).toMatchObject({ rank: 1, worldSize: 2, localRank: 1, localWorldSize: 2, ringPort: 29601, listen: '0.0.0.0' });
  });

  it('joined: no RANK means "the coordinator assigns it" (-1), world size unknown (0)', () => {
    const e = readWorkerEnv({ ...base, LOCAL_RANK: '0', LOCAL_WORLD_SIZE: '3', DTRAIN_ADVERTISE: '10.0.0.2', DTRAIN_HOST: 'b' });
    expect(e).toMatchObject({ rank: -1, worldSize: 0, localRank: 0, localWorldSize: 3, ringPort: 0, advertise: '10.0.0.2', host: 'b' });
  });

  it('a local worker of a multi-machine launch: RANK without WORLD_SIZE', () => {
    expect(readWorkerEnv({ ...base, RANK: '3' })).toMatchObject({ rank: 3, worldSize: 0 });
  });

  it('wrong values are named', () => {
    expect(() => readWorkerEnv({ ...base, RANK: '2', WORLD_SIZE: '2' })).toThrow(/RANK 2 is not below WORLD_SIZE 2/);
    expect(() => readWorkerEnv({ ...base, DTRAIN_RING_PORT: '70000' })).toThrow(/DTRAIN_RING_PORT must be a TCP port/);
    expect(() => readWorkerEnv({ MASTER_ADDR: 'x' })).toThrow(WorkerEnvError);
    expect(() => readWorkerEnv({ ...base, RANK: '-1' })).toThrow(/RANK must be a non-negative integer/);
    expect(() => readWorkerEnv({ ...base, DTRAIN_INSECURE: 'yes' })).toThrow(/DTRAIN_INSECURE must be 1 .* got 'yes'/);
    expect(() => readWorkerEnv({ ...base, DTRAIN_INSECURE: '1', DTRAIN_COORDINATOR_KEY: 'rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7' })).toThrow(/exclude each other/);
  });

  it('no security unless chosen: DTRAIN_INSECURE=1 (the ring then binds 0.0.0.0 without CURVE; unset it refuses)', () => {
    expect(readWorkerEnv(base).insecure).toBe(false);
    expect(readWorkerEnv({ ...base, DTRAIN_INSECURE: '1' }).insecure).toBe(true);
  });
});

describe('writeWorkerEnv', () => {
  const spec = { masterAddr: '10.0.0.1', masterPort: 29500, localRank: 1, localWorldSize: 2, joinTimeoutMs: 5000, timeoutMs: 9000, insecure: false };

  it('writes what readWorkerEnv reads back, field for field (launch: a rank; join: none)', () => {
    const launched = readWorkerEnv(writeWorkerEnv({ ...spec, rank: 3, worldSize: 4, ringPort: 29601, host: 'a', listen: '10.0.0.1', advertise: '10.0.0.1', insecure: true }, {}));
    expect(launched).toEqual({ rank: 3, worldSize: 4, localRank: 1, localWorldSize: 2, ringPort: 29601, masterAddr: '10.0.0.1', masterPort: 29500, listen: '10.0.0.1', advertise: '10.0.0.1', host: 'a', joinTimeoutMs: 5000, timeoutMs: 9000, coordinatorKey: undefined, keysDir: undefined, insecure: true });
    const key = 'rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7';
    const joined = readWorkerEnv(writeWorkerEnv({ ...spec, keys: { dir: '/k', coordinatorKey: key } }, {}));
    expect(joined).toMatchObject({ rank: -1, worldSize: 0, coordinatorKey: key, keysDir: '/k', insecure: false });
  });

  it('never passes on the launcher’s own RANK, WORLD_SIZE or security variables', () => {
    const inherited = { RANK: '7', WORLD_SIZE: '8', DTRAIN_INSECURE: '1', DTRAIN_COORDINATOR_KEY: 'x', PATH: '/bin' };
    const env = writeWorkerEnv(spec, inherited);
    expect([env.RANK, env.WORLD_SIZE, env.DTRAIN_INSECURE, env.DTRAIN_COORDINATOR_KEY, env.PATH]).toEqual([undefined, undefined, undefined, undefined, '/bin']);
  });
});
