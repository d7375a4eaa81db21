/**
 * Errors a user can hit while training. Each has a literal `code` (the CLI prints one line for
 * coded errors instead of a stack) and a message that names the file, setting or rank and says
 * what to do.
 */
export abstract class TrainError extends Error {
  abstract readonly code: string;
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** A setting is out of range, unknown, or contradicts the checkpoint being resumed. */
export class TrainSettingsError extends TrainError {
  readonly code = 'TRAIN_BAD_SETTING' as const;
  constructor(
    readonly setting: string,
    message: string,
  ) {
    super(message);
  }
}

/**
 * The loss stopped being finite: the run cannot go on from here. A settings error (the usual cause
 * is the learning rate); the run folder's summary.json says 'diverged' before it is thrown.
 */
export class TrainingDivergedError extends TrainSettingsError {
  constructor(
    readonly step: number,
    readonly epoch: number,
    message: string,
  ) {
    super('lr', message);
  }
}

/** A checkpoint file is truncated, damaged, of another format, or for another model. */
export class CheckpointError extends TrainError {
  readonly code = 'CHECKPOINT_INVALID' as const;
  constructor(
    readonly file: string,
    readonly detail: string,
    hint = 'delete it to resume from the previous checkpoint in that folder, or start a new run',
  ) {
    super(`checkpoint ${file} cannot be used: ${detail}; ${hint}`);
  }
}

/** `--resume DIR` names a folder without any checkpoint. */
export class NoCheckpointError extends TrainError {
  readonly code = 'CHECKPOINT_MISSING' as const;
  constructor(readonly dir: string) {
    super(`no checkpoint (checkpoint-e*.ckpt) in ${dir}; --resume needs the folder of a run that finished at least one epoch`);
  }
}

/** Replicas disagree (settings, model, step): a distributed run cannot continue. */
export class ReplicaMismatchError extends TrainError {
  readonly code = 'REPLICA_MISMATCH' as const;
  constructor(
    readonly rank: number,
    detail: string,
  ) {
    super(`rank ${rank}: ${detail}; start every worker with the same settings and code`);
  }
}

/** The output folder cannot be created or written. */
export class RunDirError extends TrainError {
  readonly code = 'RUN_DIR' as const;
  constructor(
    readonly dir: string,
    detail: string,
  ) {
    super(`run folder ${dir}: ${detail}`);
  }
}

/** A folder that cannot be read as a run folder (`runs`, `report`); the message names the folder and the file. */
export class RunFolderError extends TrainError {
  readonly code = 'E_RUN_FOLDER' as const;
  constructor(
    readonly dir: string,
    message: string,
  ) {
    super(`${dir}: ${message}`);
  }
}
