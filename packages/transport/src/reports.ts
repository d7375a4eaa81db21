// What a StepReport's detail_json holds, for the reports both sides read: written by the worker,
// read by the coordinator, defined once here.

/** A `kind: 'regroup'` report: a worker left its group (ROLLBACK, REGROUP, or its ring failed) and is ready for the next. */
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
