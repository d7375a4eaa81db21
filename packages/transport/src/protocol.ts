import { dtrain } from './generated/dtrain.js';

export { dtrain };

/** Bump on any change an older peer would misread (see proto/dtrain.proto). */
export const PROTOCOL_VERSION = 1;

/** Frame 0 (the envelope) larger than this is rejected before decoding. The largest legitimate
 * envelope is a ShardAssignment of a few hundred thousand indices. */
export const MAX_ENVELOPE_BYTES = 8 * 1024 * 1024;
const MAX_STRING = 64 * 1024;
const MAX_REPEATED = 4 * 1024 * 1024;

export type BodyKind =
  | 'hello'
  | 'welcome'
  | 'error'
  | 'heartbeat'
  | 'ringHello'
  | 'ringChunk'
  | 'ringAbort'
  | 'shardAssignment'
  | 'command'
  | 'stepReport'
  | 'fileRequest'
  | 'fileChunk'
  | 'ringClose';

export const BODY_KINDS: readonly BodyKind[] = [
  'hello', 'welcome', 'error', 'heartbeat', 'ringHello', 'ringChunk', 'ringAbort',
  'shardAssignment', 'command', 'stepReport', 'fileRequest', 'fileChunk', 'ringClose',
];

/** The message types by body name, with the properties generated from the .proto. */
export interface Bodies {
  hello: dtrain.Hello.$Properties;
  welcome: dtrain.Welcome.$Properties;
  error: dtrain.Error.$Properties;
  heartbeat: dtrain.Heartbeat.$Properties;
  ringHello: dtrain.RingHello.$Properties;
  ringChunk: dtrain.RingChunk.$Properties;
  ringAbort: dtrain.RingAbort.$Properties;
  shardAssignment: dtrain.ShardAssignment.$Properties;
  command: dtrain.Command.$Properties;
  stepReport: dtrain.StepReport.$Properties;
  fileRequest: dtrain.FileRequest.$Properties;
  fileChunk: dtrain.FileChunk.$Properties;
  ringClose: dtrain.RingClose.$Properties;
}

/** A decoded, verified envelope: exactly one body, protocol version checked by the caller. */
export interface Message<K extends BodyKind = BodyKind> {
  protocolVersion: number;
  runId: string;
  kind: K;
  body: Bodies[K];
}

// Counters of every message this process decoded from the network, by outcome. Global because
// issue 7 wants one metric per process; each Ring also keeps its own.
const counters = { accepted: 0, rejected: 0, byReason: new Map<string, number>() };

/** Snapshot of this process's protocol counters: messages accepted, rejected, and why. */
export function transportCounters(): { accepted: number; rejected: number; byReason: Record<string, number> } {
  return { accepted: counters.accepted, rejected: counters.rejected, byReason: Object.fromEntries(counters.byReason) };
}

/** Count a message rejected for `reason` (used by receivers for their own semantic checks too). */
export function countRejected(reason: string): void {
  counters.rejected++;
  counters.byReason.set(reason, (counters.byReason.get(reason) ?? 0) + 1);
}

export function countAccepted(): void {
  counters.accepted++;
}

/** Encodes an envelope with our protocol version. */
export function encodeMessage<K extends BodyKind>(kind: K, body: Bodies[K], runId = '', version = PROTOCOL_VERSION): Buffer {
  const env: dtrain.Envelope.$Properties = { protocolVersion: version, runId };
  (env as Record<string, unknown>)[kind] = body;
  const bytes = dtrain.Envelope.encode(env).finish();
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

export type DecodeResult = { ok: true; message: Message } | { ok: false; reason: string };

/**
 * Decodes frame 0 of a network message. Never throws: anything that is not a well-formed envelope
 * with exactly one valid body comes back as `{ok: false, reason}` and is counted as rejected.
 * The protocol version is decoded but not compared: the caller decides whether a foreign version
 * is a refusal to report or garbage to drop.
 */
export function decodeMessage(frame: Uint8Array | undefined): DecodeResult {
  const r = decodeUncounted(frame);
  if (r.ok) countAccepted();
  else countRejected(r.reason);
  return r;
}

function decodeUncounted(frame: Uint8Array | undefined): DecodeResult {
  if (frame === undefined) return { ok: false, reason: 'no frame' };
  if (frame.byteLength > MAX_ENVELOPE_BYTES) return { ok: false, reason: 'envelope too large' };
  let env: dtrain.Envelope;
  try {
    env = dtrain.Envelope.decode(frame);
  } catch {
    return { ok: false, reason: 'undecodable' };
  }
  const err = dtrain.Envelope.verify(env);
  if (err !== null) return { ok: false, reason: 'invalid envelope' };
  const kind = env.body as BodyKind | undefined;
  if (kind === undefined || !BODY_KINDS.includes(kind)) return { ok: false, reason: 'no body' };
  const version = toSafeInt(env.protocolVersion);
  if (version === undefined) return { ok: false, reason: 'invalid envelope' };
  const body = plainBody((env as unknown as Record<string, unknown>)[kind]);
  if ('error' in body) return { ok: false, reason: `invalid ${kind}: ${body.error}` };
  return { ok: true, message: { protocolVersion: version, runId: env.runId ?? '', kind, body: body.value as Bodies[BodyKind] } };
}

/** Converts a decoded integer (number, or protobufjs's Long for 64-bit fields) to a number, or
 * undefined if it is not a safe non-negative... or negative 32-bit integer. */
export function toSafeInt(v: unknown): number | undefined {
  if (v === undefined || v === null) return 0;
  if (typeof v === 'number') return Number.isSafeInteger(v) ? v : undefined;
  if (typeof v === 'object' && 'low' in v && 'high' in v) {
    const { low, high, unsigned } = v as { low: number; high: number; unsigned?: boolean };
    const hi = unsigned ? high >>> 0 : high;
    const n = hi * 2 ** 32 + (low >>> 0);
    return Number.isSafeInteger(n) ? n : undefined;
  }
  return undefined;
}

// Structural checks shared by every body, which also turn it into a plain object of its own
// fields: 64-bit integers become safe numbers (receivers never see protobufjs's Long, and never a
// prototype default), strings and lists have sane sizes. Absent fields read as undefined.
function plainBody(body: unknown): { value: Record<string, unknown> } | { error: string } {
  if (typeof body !== 'object' || body === null) return { error: 'missing' };
  const out: Record<string, unknown> = {};
  for (const key of Object.keys(body)) {
    if (key === '$unknowns') continue;
    const v = (body as Record<string, unknown>)[key];
    if (typeof v === 'string') {
      if (v.length > MAX_STRING) return { error: `${key} too long` };
      out[key] = v;
    } else if (typeof v === 'object' && v !== null && 'low' in v && 'high' in v) {
      const n = toSafeInt(v);
      if (n === undefined) return { error: `${key} out of range` };
      out[key] = n;
    } else if (Array.isArray(v)) {
      if (v.length > MAX_REPEATED) return { error: `${key} too long` };
      const items: unknown[] = [];
      for (const item of v) {
        if (typeof item === 'string' && item.length > MAX_STRING) return { error: `${key} item too long` };
        if (typeof item === 'object' && item !== null && !(item instanceof Uint8Array)) {
          const sub = 'low' in item && 'high' in item ? { value: toSafeInt(item) } : plainBody(item);
          if ('error' in sub) return { error: `${key}: ${sub.error}` };
          if (sub.value === undefined) return { error: `${key} item out of range` };
          items.push(sub.value);
        } else {
          items.push(item);
        }
      }
      out[key] = items;
    } else if (typeof v === 'object' && v !== null && !(v instanceof Uint8Array)) {
      const sub = plainBody(v);
      if ('error' in sub) return sub;
      out[key] = sub.value;
    } else {
      out[key] = v;
    }
  }
  return { value: out };
}

/** Element size in bytes of a RingChunk dtype. */
export function dtypeSize(dtype: dtrain.RingChunk.DType): number {
  return dtype === dtrain.RingChunk.DType.F16 ? 2 : 4;
}
