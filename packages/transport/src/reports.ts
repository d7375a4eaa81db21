// The elastic regroup report (StepReport.regroup), for both sides: the worker writes a
// RegroupReport, the coordinator reads it back with readRegroupReport. Defined once, here.

/** A worker left its group (ROLLBACK, REGROUP, or its ring failed) and is ready for the next. */
export interface RegroupReport {
  kind: 'regroup';
  /** The generation it left. */
  generation: number;
  /** Where its committed state stands: epoch in progress, samples of it consumed, optimiser steps. */
  committed: { epoch: number; done: number; step: number };
  /** Its new ring's endpoints. */
  endpoints: string[];
  /** Its new ring's CURVE public key ('' without CURVE). */
  key: string;
  /** Why it left (the ring's error, or the coordinator's command). */
  reason: string;
}

/**
 * A decoded StepReport.regroup (a plain object of the fields present: proto3 omits zeros) as a
 * RegroupReport, or undefined when it lacks its committed position or its endpoints.
 */
export function readRegroupReport(body: Record<string, unknown>): RegroupReport | undefined {
  const c = body.committed as Partial<RegroupReport['committed']> | undefined;
  const endpoints = body.endpoints;
  if (typeof c !== 'object' || c === null || !Array.isArray(endpoints) || endpoints.length === 0) return undefined;
  const n = (x: unknown) => (typeof x === 'number' ? x : 0);
  const s = (x: unknown) => (typeof x === 'string' ? x : '');
  return {
    kind: 'regroup',
    generation: n(body.generation),
    committed: { epoch: n(c.epoch), done: n(c.done), step: n(c.step) },
    endpoints: endpoints.map(String),
    key: s(body.key),
    reason: s(body.reason) || 'its ring failed',
  };
}
