// reportDetail: a decoded StepReport.report back in the shapes the launcher prints (the worker's
// WorkerReport), with proto3's missing zeros restored and null where those types have null.
import { decodeMessage, encodeMessage, type Bodies } from '@dtrain/transport';
import { describe, expect, it } from 'vitest';
import { reportDetail, type StepReportBody } from './report-metrics.js';

const wire = (body: Bodies['stepReport']): StepReportBody => {
  const d = decodeMessage(encodeMessage('stepReport', body, 'run'));
  if (!d.ok) throw new Error(d.reason);
  return d.message.body as StepReportBody;
};

describe('reportDetail', () => {
  it("a final report: zeros back, a summary's absent run folder and checkpoint as null; ranks other than 0 have no summary", () => {
    const summary = { status: 'completed', dataset: 'fashion-mnist', epochs: 2, steps: 10, bestEpoch: 0, resumed: false, worldSize: 2 };
    const d = reportDetail(wire({ rank: 0, final: { rank: 0, host: 'a', stateSha256: 'ab', collectiveSec: 0, collectiveCalls: 4, summary } }));
    expect(d).toMatchObject({ kind: 'done', rank: 0, host: 'a', stateSha256: 'ab', collectiveSec: 0, collectiveCalls: 4 });
    expect(d?.summary).toMatchObject({ ...summary, finalTestAcc: 0, runDir: null, lastCheckpoint: null });
    expect(reportDetail(wire({ rank: 1, final: { rank: 1, host: 'b', stateSha256: 'ab' } }))).not.toHaveProperty('summary');
  });

  it('an epoch line keeps a zero phase (one worker: no all-reduce); a start report says null for no resume; a step report has no detail', () => {
    const phaseSec = { data: 0.5, compute: 2, allReduce: 0, optimizer: 0.25, other: 0 };
    const d = reportDetail(wire({ rank: 0, epochMetrics: { epoch: 1, epochs: 2, step: 5, loss: 0.5, phaseSec } }));
    expect(d).toMatchObject({ kind: 'epoch', metrics: { kind: 'epoch', epoch: 1, step: 5, phaseSec, trainAcc: 0 } });
    expect(reportDetail(wire({ rank: 0, start: { info: { epochs: 2, lr: 0.1, versions: { dtrain: '1' } }, worldSize: 1 } }))).toEqual({
      kind: 'start',
      info: { startEpoch: 0, epochs: 2, stepsPerEpoch: 0, trainImages: 0, testImages: 0, lr: 0.1, backend: '', versions: { dtrain: '1' }, resumedFromEpoch: null, runDir: null },
      worldSize: 1,
    });
    expect(reportDetail(wire({ rank: 0, epoch: 1, step: 5, loss: 0.5 }))).toBeUndefined();
  });
});
