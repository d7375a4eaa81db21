// TensorFlow's start-up log, held back while the native library loads (native/loader.c says why
// no setting can do it) and written back through the filter that TF_CPP_MIN_LOG_LEVEL describes:
// at the default of 2 (set by loadBackend) the banner goes ("WARNING: All log messages before
// absl::InitializeLog()...", "I... port.cc] oneDNN custom operations are on...") and errors stay.
import { nativeLoader } from './native.js';

// Abseil/TensorFlow lines: severity letter I, W, E or F, MMDD, the time (before absl::InitializeLog
// the seconds are since the epoch: "I0000 00:00:1796586894.014914").
const SEVERITY_LINE = /^([IWEF])\d{4} \d{2}:\d{2}:\d+\.\d+ /;
const LEVEL: Record<string, number> = { I: 0, W: 1, E: 2, F: 3 };
const ABSL_PREAMBLE = /^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$/;

/**
 * The lines of `text` that TensorFlow would print at TF_CPP_MIN_LOG_LEVEL `minLevel` (0 INFO,
 * 1 WARNING, 2 ERROR, 3 FATAL only). A line without a severity continues the message before it;
 * text before any message, and anything not from TensorFlow, is kept. Abseil's preamble goes with
 * the messages it announces: it is kept only at level 0.
 */
export function filterTfLog(text: string, minLevel: number): string {
  const kept: string[] = [];
  let keep = true;
  const lines = text.split('\n');
  if (lines[lines.length - 1] === '') lines.pop(); // the final newline ends a line, starts none
  for (const line of lines) {
    const m = SEVERITY_LINE.exec(line);
    if (m) keep = LEVEL[m[1]] >= minLevel;
    else if (ABSL_PREAMBLE.test(line)) {
      kept.push(...(minLevel <= 0 ? [line] : []));
      continue;
    }
    if (keep) kept.push(line);
  }
  return kept.map((l) => `${l}\n`).join('');
}

/** TF_CPP_MIN_LOG_LEVEL as TensorFlow reads it (0 when unset or not a number). */
export function tfMinLogLevel(env: NodeJS.ProcessEnv = process.env): number {
  const n = Number.parseInt(env.TF_CPP_MIN_LOG_LEVEL ?? '0', 10);
  return Number.isFinite(n) ? n : 0;
}

/** Runs `load` (a synchronous require of the native library) with its log filtered, as above. */
export function loadQuietly<T>(load: () => T): T {
  const native = nativeLoader();
  if (!native) return load();
  native.hold();
  try {
    return load();
  } finally {
    const text = filterTfLog(native.release(), tfMinLogLevel());
    if (text !== '') process.stderr.write(text);
  }
}
