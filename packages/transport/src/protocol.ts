import { dtrain } from './generated/dtrain.js';

export { dtrain };

/** Bump on any change an older peer would misread (see proto/dtrain.proto). */
export const PROTOCOL_VERSION = 2;

/** Frame 0 (the envelope) larger than this is rejected before decoding. The largest legitimate
 * envelope is a ShardAssignment of a few hundred thousand indices. */
export const MAX_ENVELOPE_BYTES = 8 * 1024 * 1024;
const MAX_STRING = 64 * 1024;
const MAX_REPEATED = 4 * 1024 * 1024;

/**
 * The largest envelope each body may come in, checked before decoding (what decoding costs grows
 * with the envelope: a 4 MiB Hello of 2 million empty entries took 1.1 s and 225 MiB of heap).
 * Sized to what the protocol needs: a Hello is a host name, a few endpoints, digests and a key; a
 * Welcome carries every peer and the run's configuration; a ShardAssignment a rank's indices.
 */
const MAX_BODY_BYTES: Record<BodyKind, number> = {
  hello: 64 * 1024,
  welcome: MAX_ENVELOPE_BYTES,
  error: 1024 * 1024,
  heartbeat: 4 * 1024,
  ringHello: 4 * MAX_STRING,
  ringChunk: 4 * 1024,
  ringAbort: 4 * MAX_STRING,
  shardAssignment: MAX_ENVELOPE_BYTES,
  command: 4 * MAX_STRING,
  stepReport: 4 * MAX_STRING,
  fileRequest: 4 * MAX_STRING,
  fileChunk: 4 * MAX_STRING,
  ringClose: 4 * 1024,
  ringCredit: 4 * 1024,
  rankAssignment: 64 * 1024,
};

/** Entries a repeated field may have, where far fewer than MAX_REPEATED are legitimate. */
const MAX_ENTRIES: Record<string, number> = {
  'hello.dataEndpoints': 16,
  'hello.datasets': 64,
  'welcome.peers': 65536,
  'error.logTail': 1000,
  'rankAssignment.ranks': 4096,
};

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
  | 'ringClose'
  | 'ringCredit'
  | 'rankAssignment';

export const BODY_KINDS: readonly BodyKind[] = [
  'hello', 'welcome', 'error', 'heartbeat', 'ringHello', 'ringChunk', 'ringAbort',
  'shardAssignment', 'command', 'stepReport', 'fileRequest', 'fileChunk', 'ringClose',
  'ringCredit', 'rankAssignment',
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
  ringCredit: dtrain.RingCredit.$Properties;
  rankAssignment: dtrain.RankAssignment.$Properties;
}

/** A decoded, verified envelope: exactly one body, protocol version checked by the caller. */
export interface Message<K extends BodyKind = BodyKind> {
  protocolVersion: number;
  runId: string;
  /** Envelope.seq: the sender's message number on a control connection (0: not numbered). */
  seq: number;
  kind: K;
  body: Bodies[K];
}

// Counters of every message this process decoded from the network, by outcome, and of
// connections refused at the CURVE handshake. Global because issue 7 wants one metric per process;
// each Ring and ControlServer also keeps its own.
const counters = {
  accepted: 0,
  rejected: 0,
  byReason: new Map<string, number>(),
  authRefused: 0,
  authByReason: new Map<string, number>(),
};

/** Distinct reasons kept in the counters; a flood of novel reason strings cannot grow the map. */
const MAX_REASONS = 256;

function bump(map: Map<string, number>, reason: string): void {
  const key = map.has(reason) || map.size < MAX_REASONS ? reason : 'other';
  map.set(key, (map.get(key) ?? 0) + 1);
}

export interface TransportCounters {
  /** Messages from the network that decoded and verified. */
  accepted: number;
  /** Messages dropped as malformed, foreign, stale or unexpected (dtrain_malformed_messages_rejected_total). */
  rejected: number;
  byReason: Record<string, number>;
  /** Connections refused at the CURVE handshake (no CURVE, wrong server key, key not allowed). */
  authRefused: number;
  authByReason: Record<string, number>;
}

/** Snapshot of this process's protocol counters: messages accepted, rejected, and why. */
export function transportCounters(): TransportCounters {
  return {
    accepted: counters.accepted,
    rejected: counters.rejected,
    byReason: Object.fromEntries(counters.byReason),
    authRefused: counters.authRefused,
    authByReason: Object.fromEntries(counters.authByReason),
  };
}

/** Count a message rejected for `reason` (used by receivers for their own semantic checks too). */
export function countRejected(reason: string): void {
  counters.rejected++;
  bump(counters.byReason, reason);
}

/** Adds counts made elsewhere in this process (a ring's thread) to the process's counters. */
export function addTransportCounters(c: TransportCounters): void {
  counters.accepted += c.accepted;
  counters.rejected += c.rejected;
  counters.authRefused += c.authRefused;
  for (const [reason, n] of Object.entries(c.byReason)) for (let i = 0; i < n; i++) bump(counters.byReason, reason);
  for (const [reason, n] of Object.entries(c.authByReason)) for (let i = 0; i < n; i++) bump(counters.authByReason, reason);
}

export function countAccepted(): void {
  counters.accepted++;
}

/** Count a connection refused at the handshake. */
export function countAuthRefused(reason: string): void {
  counters.authRefused++;
  // Reasons name the refused key: keep the counter's keys generic.
  const generic = reason.endsWith('not on this link') ? 'key not allowed on this link' : 'key not allowed';
  bump(counters.authByReason, reason.startsWith('client key ') ? generic : reason);
}

// Rejections are logged once per peer, then at most once per LOG_INTERVAL_MS per peer with the
// count since, so a flood cannot fill the log. Peers beyond MAX_LOGGED_PEERS share one entry.
const LOG_INTERVAL_MS = 60_000;
const MAX_LOGGED_PEERS = 256;
type Logger = (line: string) => void;
const defaultLogger: Logger = (line) => {
  process.stderr.write(`dtrain transport: ${line}\n`);
};
let logger: Logger = defaultLogger;
const logState = new Map<string, { last: number; suppressed: number }>();

/** Where rejection and refusal lines go (default: stderr). `undefined` restores the default. */
export function setTransportLogger(fn: Logger | undefined): void {
  logger = fn ?? defaultLogger;
}

/** One line to the transport's log (the caller makes sure it is not repeated per message). */
export function logTransport(line: string): void {
  logger(line);
}

/** Logs a rejected message or refused connection from `peer`, rate-limited per peer. */
export function logRejection(peer: string, reason: string, verb = 'rejected a message from'): void {
  const now = Date.now();
  let key = peer;
  if (!logState.has(key) && logState.size >= MAX_LOGGED_PEERS) key = '(other peers)';
  const st = logState.get(key);
  if (st === undefined) {
    logState.set(key, { last: now, suppressed: 0 });
    logger(`${verb} ${key}: ${reason} (further ones from this peer: at most one line per ${LOG_INTERVAL_MS / 1000} s)`);
    return;
  }
  if (now - st.last < LOG_INTERVAL_MS) {
    st.suppressed++;
    return;
  }
  logger(`${verb} ${key}: ${reason} (${st.suppressed} more since the last line)`);
  st.last = now;
  st.suppressed = 0;
}

/** A printable name for bytes chosen by a peer (a ZeroMQ routing id): never raw control bytes. */
export function peerLabel(id: Uint8Array | undefined): string {
  if (id === undefined || id.length === 0) return '(no routing id)';
  const b = Buffer.from(id.buffer, id.byteOffset, Math.min(id.byteLength, 48));
  const printable = b.every((c) => c >= 0x20 && c < 0x7f);
  const text = printable ? JSON.stringify(b.toString('latin1')) : `0x${b.toString('hex')}`;
  return `routing id ${text}${id.byteLength > 48 ? '...' : ''}`;
}

/** Encodes an envelope with our protocol version; `seq` numbers control-channel messages (0: none). */
export function encodeMessage<K extends BodyKind>(kind: K, body: Bodies[K], runId = '', version = PROTOCOL_VERSION, seq = 0): Buffer {
  const env: dtrain.Envelope.$Properties = { protocolVersion: version, runId };
  if (seq !== 0) env.seq = seq;
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
  const peeked = bodyKindOf(frame);
  if (peeked !== undefined && frame.byteLength > MAX_BODY_BYTES[peeked]) return { ok: false, reason: 'envelope too large' };
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
  const seq = toSafeInt(env.seq);
  if (version === undefined || seq === undefined || seq < 0) return { ok: false, reason: 'invalid envelope' };
  const body = plainBody((env as unknown as Record<string, unknown>)[kind]);
  if ('error' in body) return { ok: false, reason: `invalid ${kind}: ${body.error}` };
  for (const [field, v] of Object.entries(body.value)) {
    const most = MAX_ENTRIES[`${kind}.${field}`];
    if (most !== undefined && Array.isArray(v) && v.length > most) return { ok: false, reason: `invalid ${kind}: ${field} too long` };
  }
  return { ok: true, message: { protocolVersion: version, runId: env.runId ?? '', seq, kind, body: body.value as Bodies[BodyKind] } };
}

/** Each body's field number in Envelope's oneof (proto/dtrain.proto; protocol.test.ts checks them). */
export const BODY_FIELD_NUMBERS: Record<BodyKind, number> = {
  hello: 10, welcome: 11, error: 12, heartbeat: 13, ringHello: 14, ringChunk: 15, ringAbort: 16,
  shardAssignment: 17, command: 18, stepReport: 19, fileRequest: 20, fileChunk: 21, ringClose: 22, ringCredit: 23,
  rankAssignment: 24,
};
const KIND_OF_FIELD = new Map<number, BodyKind>(BODY_KINDS.map((k) => [BODY_FIELD_NUMBERS[k], k]));

/**
 * The body kind of an encoded envelope, read from the wire format without decoding it (tags and
 * lengths only), or undefined when the frame is not well-formed up to the body: decoding then
 * rejects it.
 */
function bodyKindOf(frame: Uint8Array): BodyKind | undefined {
  let i = 0;
  const varint = (): number | undefined => {
    let v = 0;
    for (let shift = 0; shift < 49; shift += 7) {
      if (i >= frame.length) return undefined;
      const b = frame[i++];
      v += (b & 0x7f) * 2 ** shift;
      if (b < 0x80) return v;
    }
    return undefined;
  };
  while (i < frame.length) {
    const tag = varint();
    if (tag === undefined) return undefined;
    const field = Math.floor(tag / 8);
    const kind = KIND_OF_FIELD.get(field);
    if (kind !== undefined) return kind;
    const wire = tag % 8;
    if (wire === 0) {
      if (varint() === undefined) return undefined;
    } else if (wire === 2) {
      const n = varint();
      if (n === undefined) return undefined;
      i += n;
    } else return undefined;
  }
  return undefined;
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
