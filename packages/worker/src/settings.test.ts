import { describe, expect, it } from 'vitest';
import { TrainSettingsError } from './errors.js';
import { augmentationOf, DEFAULTS, resolveSettings, resumeSettings, type TrainSettings } from './settings.js';

describe('resolveSettings', () => {
  it('takes the data set’s native size and the documented defaults', () => {
    const s = resolveSettings({ dataset: 'fashion-mnist' });
    expect(s).toMatchObject({ ...DEFAULTS, dataset: 'fashion-mnist', imageSize: 28 });
    expect(resolveSettings({ dataset: 'cifar10' }).imageSize).toBe(32);
  });

  it('the fashion-mnist and cifar10 presets: the modern recipe on each data set, overridable', () => {
    const recipe = { batchSize: 128, lr: 0.1, momentum: 0.9, nesterov: true, weightDecay: 5e-4, skipNormBiasDecay: true, labelSmoothing: 0.1, lrSchedule: 'cosine', warmupEpochs: 1, augment: true };
    expect(resolveSettings({ preset: 'fashion-mnist' })).toMatchObject({ ...recipe, dataset: 'fashion-mnist', imageSize: 32, epochs: 30, lrScaling: 'none' });
    expect(resolveSettings({ preset: 'cifar10' })).toMatchObject({ ...recipe, dataset: 'cifar10', imageSize: 96, epochs: 30 });
    // Two workers at half the batch: the same global batch, the same lr.
    expect(resolveSettings({ preset: 'fashion-mnist', batchSize: 64, epochs: 3 })).toMatchObject({ ...recipe, batchSize: 64, epochs: 3 });
  });

  it('augmentation by name: true is the data set’s usual crop and flip, a list is exactly what it names', () => {
    expect(augmentationOf({ dataset: 'fashion-mnist', augment: true })).toEqual({ cropPadding: 2, horizontalFlip: true });
    expect(augmentationOf({ dataset: 'cifar10', augment: true })).toEqual({ cropPadding: 4, horizontalFlip: true });
    expect(augmentationOf({ dataset: 'cifar10', augment: ['crop'] })).toEqual({ cropPadding: 4, horizontalFlip: false });
    expect(augmentationOf({ dataset: 'cifar10', augment: ['flip'] })).toEqual({ cropPadding: 0, horizontalFlip: true });
    expect(augmentationOf({ dataset: 'cifar10', augment: false })).toBeUndefined();
    expect(augmentationOf({ dataset: 'cifar10', augment: [] })).toBeUndefined();
    expect(resolveSettings({ dataset: 'fashion-mnist', augment: ['crop'] }).augment).toEqual(['crop']);
  });

  it('applies the tutorial preset, and explicit values override it', () => {
    const t = resolveSettings({ preset: 'tutorial' });
    expect(t).toMatchObject({ dataset: 'cifar10', imageSize: 96, batchSize: 64, evalBatchSize: 128, lr: 0.01, momentum: 0, epochs: 20, init: 'xavier-uniform', augment: false });
    const o = resolveSettings({ preset: 'tutorial', epochs: 2, lr: 0.1, imageSize: 64 });
    expect(o).toMatchObject({ dataset: 'cifar10', epochs: 2, lr: 0.1, imageSize: 64, batchSize: 64 });
  });

  it('names the setting that is wrong', () => {
    const bad: Array<[Parameters<typeof resolveSettings>[0], RegExp]> = [
      [{}, /no data set given/],
      [{ dataset: 'mnist' }, /unknown data set 'mnist'/],
      [{ dataset: 'cifar10', batchSize: 0 }, /batchSize must be a positive integer/],
      [{ dataset: 'cifar10', lr: 0 }, /lr must be positive/],
      [{ dataset: 'cifar10', momentum: 1 }, /momentum must be below 1/],
      [{ dataset: 'cifar10', imageSize: 6 }, /imageSize must be at least 7/],
      [{ dataset: 'cifar10', limitTrain: 1.5 }, /limitTrain must be a positive integer/],
      [{ preset: 'imagenet' as 'tutorial' }, /unknown preset 'imagenet'/],
      [{ dataset: 'cifar10', lrScaling: 'sqrt' as 'linear' }, /lrScaling must be one of none, linear/],
      [{ dataset: 'cifar10', lrScaling: 'linear', warmupEpochs: -1 }, /warmupEpochs must be a non-negative number/],
      [{ dataset: 'cifar10', lrSchedule: 'cosine', warmupEpochs: 10 }, /warmupEpochs 10 is not shorter than the run \(10 epochs\): nothing of the cosine/],
      [{ dataset: 'cifar10', lrSchedule: 'linear' as 'cosine' }, /lrSchedule must be one of constant, cosine, step, onecycle, got 'linear'/],
      [{ dataset: 'cifar10', lrSchedule: 'onecycle', warmupEpochs: 1 }, /warmupEpochs must be 0 with lrSchedule onecycle, which warms up itself/],
      [{ dataset: 'cifar10', lrFinal: 0.001 }, /lrFinal is the end of the cosine schedule/],
      [{ dataset: 'cifar10', lrSchedule: 'cosine', lrFinal: -1 }, /lrFinal must be a non-negative number/],
      [{ dataset: 'cifar10', lrSchedule: 'step' }, /lrMilestones must name the epochs from which the step schedule multiplies the rate/],
      [{ dataset: 'cifar10', lrSchedule: 'step', lrMilestones: [5, 3] }, /lrMilestones must be ascending epochs of at least 1, got \[5,3\]/],
      [{ dataset: 'cifar10', lrSchedule: 'step', lrMilestones: [3], lrGamma: 0 }, /lrGamma must be in \(0, 1\], got 0/],
      [{ dataset: 'cifar10', lrMilestones: [3] }, /lrMilestones and lrGamma belong to the step schedule/],
      [{ dataset: 'cifar10', augment: ['rotate'] as unknown as ['crop'] }, /^augment must be true, false or a list of crop, flip, got \["rotate"\]$/],
      [{ dataset: 'cifar10', accumulate: 0 }, /^accumulate must be a positive integer, got 0$/],
      [{ dataset: 'cifar10', nesterov: true }, /^nesterov needs a momentum above 0/],
      [{ dataset: 'cifar10', labelSmoothing: -0.1 }, /^labelSmoothing must be in \[0, 1\), got -0.1$/],
      [{ dataset: 'cifar10', labelSmoothing: 1 }, /^labelSmoothing must be in \[0, 1\), got 1$/],
      [{ dataset: 'cifar10', skipNormBiasDecay: 'yes' as unknown as boolean }, /^skipNormBiasDecay must be true or false, got yes$/],
    ];
    for (const [input, re] of bad) expect(() => resolveSettings(input), JSON.stringify(input)).toThrow(re);
    expect(() => resolveSettings({ dataset: 'cifar10', epochs: -1 })).toThrow(TrainSettingsError);
  });

  it('accepts an in-memory data set only under its own name', () => {
    expect(resolveSettings({}, { name: 'synthetic-test', imageSize: 16 })).toMatchObject({ dataset: 'synthetic-test', imageSize: 16 });
    expect(() => resolveSettings({ dataset: 'other' }, { name: 'synthetic-test', imageSize: 16 })).toThrow(/unknown data set 'other'/);
  });
});

describe('resumeSettings', () => {
  const saved = resolveSettings({ dataset: 'fashion-mnist', epochs: 2, seed: 5 });

  it('keeps the saved run’s settings and lets epochs grow', () => {
    expect(resumeSettings(saved, { epochs: 5 }, 'ck')).toEqual({ ...saved, epochs: 5 });
    expect(resumeSettings(saved, { seed: 5, dataset: 'fashion-mnist' }, 'ck')).toEqual(saved);
  });

  it('treats a checkpoint from before the lr schedule as unscaled, constant lr', () => {
    const old: Partial<TrainSettings> = { ...saved };
    delete old.lrScaling;
    delete old.warmupEpochs;
    delete old.lrSchedule;
    delete old.lrFinal;
    delete old.lrMilestones;
    delete old.lrGamma;
    delete old.accumulate;
    delete old.nesterov;
    delete old.skipNormBiasDecay;
    delete old.labelSmoothing;
    expect(resumeSettings(old as TrainSettings, {}, 'ck')).toEqual(saved);
    expect(() => resumeSettings(old as TrainSettings, { labelSmoothing: 0.1 }, 'ck')).toThrow(/labelSmoothing is 0 in ck/);
    expect(() => resumeSettings(old as TrainSettings, { lrScaling: 'linear' }, 'ck')).toThrow(/lrScaling is "none" in ck/);
  });

  it('refuses a trajectory setting that differs, naming it and the file', () => {
    expect(() => resumeSettings({ ...saved, lrScaling: 'linear', warmupEpochs: 2 }, { warmupEpochs: 1 }, 'ck')).toThrow(/warmupEpochs is 2 in ck/);
    expect(() => resumeSettings(saved, { seed: 6 }, '/r/checkpoint-e0002.ckpt')).toThrow(/seed is 5 in \/r\/checkpoint-e0002\.ckpt/);
    expect(() => resumeSettings(saved, { lr: 0.1 }, 'ck')).toThrow(/lr is 0\.01/);
    const step = resolveSettings({ dataset: 'fashion-mnist', epochs: 8, lrSchedule: 'step', lrMilestones: [3, 6] });
    expect(resumeSettings(step, { lrMilestones: [3, 6], epochs: 9 }, 'ck')).toMatchObject({ lrMilestones: [3, 6], epochs: 9 });
    expect(() => resumeSettings(step, { lrMilestones: [3, 5] }, 'ck')).toThrow(/lrMilestones is \[3,6\] in ck/);
    // A cosine or one-cycle run ends where it was planned to: its length is part of the trajectory.
    const cosine = resolveSettings({ dataset: 'fashion-mnist', epochs: 8, lrSchedule: 'cosine' });
    expect(() => resumeSettings(cosine, { epochs: 12 }, 'ck')).toThrow(/the cosine schedule of the run in ck ends at epoch 8: a resumed run keeps its length/);
    expect(resumeSettings(cosine, { epochs: 8 }, 'ck')).toEqual(cosine);
  });
});
