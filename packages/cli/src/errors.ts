import { CommanderError } from 'commander';

/** Errors we expect users to hit (bad flags, missing files) print one clear line, not a stack. */
export class UsageError extends Error {
  readonly code = 'USAGE' as const;
  constructor(message: string) {
    super(message);
    this.name = 'UsageError';
  }
}

export function reportAndExit(err: unknown): never {
  // Commander printed its own line already (with exitOverride); --help and the like exit 0, a
  // usage mistake (unknown option, missing argument) exits 2 like every other bad input.
  if (err instanceof CommanderError) process.exit(err.exitCode === 0 ? 0 : 2);
  const e = err as { message?: string; code?: unknown; stack?: string };
  const known = typeof e?.code === 'string' && e.code.length > 0;
  const message = e?.message ?? String(err);
  console.error(`error: ${message}`);
  if (!known || process.env.DTRAIN_DEBUG) console.error(e?.stack ?? '');
  process.exit(known ? 2 : 1);
}

/** Parses a positive integer flag value, naming the flag when it is wrong. */
export function positiveInt(flag: string) {
  return (value: string): number => {
    const n = Number(value);
    if (!Number.isInteger(n) || n <= 0) throw new UsageError(`${flag} must be a positive integer, got '${value}'`);
    return n;
  };
}

/**
 * Parses a value that must be one of `values`, naming the flag (or argument) and the choices when
 * it is not. Used with `.choices(values)` so that help still lists them: commander's own choice
 * check prints two lines and exits 1, this one is a UsageError (one line, exit 2).
 */
export function oneOf<const T extends readonly string[]>(flag: string, values: T, hint = '') {
  return (value: string): T[number] => {
    if (!values.includes(value)) throw new UsageError(`${flag} must be one of ${values.join(', ')}, got '${value}'${hint}`);
    return value as T[number];
  };
}

export function nonNegativeInt(flag: string) {
  return (value: string): number => {
    const n = Number(value);
    if (!Number.isInteger(n) || n < 0) throw new UsageError(`${flag} must be a non-negative integer, got '${value}'`);
    return n;
  };
}

export function nonNegativeNumber(flag: string) {
  return (value: string): number => {
    const n = Number(value);
    if (!Number.isFinite(n) || n < 0) throw new UsageError(`${flag} must be a non-negative number, got '${value}'`);
    return n;
  };
}
