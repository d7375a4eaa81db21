// CURVE encryption and client authentication (ZAP) for the sockets that accept connections from
// the network: the coordinator's control socket and every rank's ring data socket.
//
// libzmq asks a ZAP handler (RFC 27) about every CURVE client that completes the key exchange. The
// handler is a REP socket bound to inproc://zeromq.zap.01 in the same ZeroMQ context, so there is
// at most one per process: this module owns it and routes each request by its ZAP domain, one
// domain per server socket, each with its own allow-list. Server sockets set zapEnforceDomain, so
// if the handler is missing libzmq refuses every client instead of admitting them all.
import { createHmac, createPrivateKey, createPublicKey, diffieHellman, timingSafeEqual, type KeyObject } from 'node:crypto';
import * as zmq from 'zeromq';
import { TransportError } from './errors.js';
import { countAuthRefused, logRejection } from './protocol.js';

/**
 * How a socket protects its traffic. Absent: none, and a server socket binds loopback only.
 * `{ kind: 'none' }` is the explicit choice (`--insecure`, DTRAIN_INSECURE=1) that lets it bind any
 * address without encryption.
 */
export type Security =
  | { kind: 'none' }
  | {
      kind: 'curve';
      /** This process's long-term key pair (Z85, 40 characters each). */
      publicKey: string;
      secretKey: string;
      /** Clients (ControlClient, a ring's link to the next rank): the server's public key. A ring
       * uses each peer's `PeerInfo.publicKey` first, then this. */
      serverPublicKey?: string;
      /** Servers (ControlServer, a ring's data socket): the client public keys that may connect. */
      allowedClientKeys?: readonly string[];
    };

export type CurveSecurity = Extract<Security, { kind: 'curve' }>;

/** Security is misconfigured (no CURVE in libzmq, malformed key, empty allow-list, ...). */
export class SecurityError extends TransportError {
  readonly code = 'E_SECURITY' as const;
}

const Z85 = '0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#';
const Z85_INDEX = new Map([...Z85].map((c, i) => [c, i]));

/** Z85 (ZeroMQ RFC 32) text of bytes whose length is a multiple of 4. */
export function z85Encode(bytes: Uint8Array): string {
  if (bytes.length % 4 !== 0) throw new SecurityError(`z85Encode: length ${bytes.length} is not a multiple of 4`);
  let out = '';
  for (let i = 0; i < bytes.length; i += 4) {
    let v = ((bytes[i] << 24) >>> 0) + (bytes[i + 1] << 16) + (bytes[i + 2] << 8) + bytes[i + 3];
    let block = '';
    for (let j = 0; j < 5; j++) {
      block = Z85[v % 85] + block;
      v = Math.floor(v / 85);
    }
    out += block;
  }
  return out;
}

/** Bytes of Z85 text, or undefined if it is not valid Z85 of a multiple-of-5 length. */
export function z85Decode(text: string): Buffer | undefined {
  if (text.length % 5 !== 0) return undefined;
  const out = Buffer.alloc((text.length / 5) * 4);
  for (let i = 0; i < text.length; i += 5) {
    let v = 0;
    for (let j = 0; j < 5; j++) {
      const d = Z85_INDEX.get(text[i + j]);
      if (d === undefined) return undefined;
      v = v * 85 + d;
    }
    if (v > 0xffffffff) return undefined;
    out.writeUInt32BE(v, (i / 5) * 4);
  }
  return out;
}

/** Whether `key` is a CURVE key in Z85 (40 characters encoding 32 bytes). */
export function isCurveKey(key: unknown): key is string {
  return typeof key === 'string' && key.length === 40 && z85Decode(key) !== undefined;
}

/** A fresh CURVE key pair (Z85). */
export function curveKeyPair(): { publicKey: string; secretKey: string } {
  requireCurve();
  const kp = zmq.curveKeyPair();
  return { publicKey: kp.publicKey, secretKey: kp.secretKey };
}

export function requireCurve(): void {
  if (zmq.capability.curve !== true) {
    throw new SecurityError(
      'this ZeroMQ library was built without CURVE support (zmq.capability.curve is false): reinstall the zeromq ' +
        'package with its prebuilt addon, or run on loopback only with security { kind: "none" }',
    );
  }
}

function checkKey(key: string | undefined, what: string): string {
  if (!isCurveKey(key)) {
    throw new SecurityError(`${what} is not a CURVE key (40 Z85 characters): check the key file (pnpm cli keys show)`);
  }
  return key;
}

/** Whether an address (host or IP a socket binds to) is only reachable from this machine. */
export function isLoopback(address: string): boolean {
  return address === 'localhost' || address === '::1' || /^127\.\d+\.\d+\.\d+$/.test(address);
}

/** One line for the caller to print at start: what protects the socket at `where`. */
export function describeSecurity(security: Security | undefined, where: string): string {
  if (security === undefined || security.kind === 'none') {
    return `security: none on ${where} (no encryption, no authentication: loopback or a trusted network only)`;
  }
  const n = security.allowedClientKeys?.length;
  return `security: CURVE on ${where} (encrypted; public key ${security.publicKey}` +
    (n !== undefined ? `; ${n} allowed client key${n === 1 ? '' : 's'})` : ')');
}

// ---------------------------------------------------------------------------------------------
// The process's ZAP handler.

interface Domain {
  allowed: Set<string>;
  /** The allow-list it was registered with (restrict() narrows `allowed`, not this). */
  known: Set<string>;
  label: string;
  onRefused: (reason: string, address: string) => void;
}

const ZAP_ENDPOINT = 'inproc://zeromq.zap.01';
let zap: { socket: zmq.Reply; done: Promise<void> } | undefined;
const domains = new Map<string, Domain>();
let domainSeq = 0;

/** Checks one ZAP request and returns the reply (RFC 27). Exported for tests. */
export function zapReply(frames: Buffer[]): { reply: Buffer[] | undefined; accepted: boolean; reason: string; domain?: Domain; address: string } {
  // [version, request id, domain, address, identity, mechanism, credentials...]
  const version = frames[0]?.toString() ?? '';
  const requestId = frames[1];
  const address = frames[3]?.toString('latin1').slice(0, 64) ?? '?';
  if (requestId === undefined) return { reply: undefined, accepted: false, reason: 'malformed ZAP request', address };
  const answer = (status: '200' | '400' | '500', text: string, userId = '') =>
    [Buffer.from('1.0'), requestId, Buffer.from(status), Buffer.from(text), Buffer.from(userId), Buffer.alloc(0)];
  if (version !== '1.0' || frames.length < 6) {
    return { reply: answer('500', 'unsupported ZAP version'), accepted: false, reason: 'bad ZAP request', address };
  }
  const domain = domains.get(frames[2].toString());
  if (domain === undefined) return { reply: answer('400', 'unknown domain'), accepted: false, reason: 'unknown ZAP domain', address };
  const mechanism = frames[5].toString();
  if (mechanism !== 'CURVE') {
    return { reply: answer('400', 'CURVE required'), accepted: false, reason: `mechanism ${mechanism || 'NULL'} (no CURVE)`, domain, address };
  }
  const key = frames[6];
  if (key === undefined || key.length !== 32) {
    return { reply: answer('400', 'bad credentials'), accepted: false, reason: 'malformed CURVE credentials', domain, address };
  }
  const z = z85Encode(key);
  if (!domain.allowed.has(z)) {
    const reason = domain.known.has(z) ? `client key ${z} is allowed in the cluster but not on this link` : `client key ${z} not in the allow-list`;
    return { reply: answer('400', 'key not allowed'), accepted: false, reason, domain, address };
  }
  return { reply: answer('200', 'OK', z), accepted: true, reason: 'ok', domain, address };
}

async function zapLoop(socket: zmq.Reply): Promise<void> {
  for (;;) {
    let frames: Buffer[];
    try {
      frames = await socket.receive();
    } catch {
      return; // closed
    }
    const r = zapReply(frames);
    if (!r.accepted) {
      if (r.domain !== undefined) r.domain.onRefused(r.reason, r.address);
      else {
        countAuthRefused(r.reason);
        logRejection(`address ${r.address}`, r.reason, 'refused a connection from');
      }
    }
    if (r.reply === undefined) continue; // a REP socket must answer; libzmq never sends this
    try {
      await socket.send(r.reply);
    } catch {
      return;
    }
  }
}

let zapStarting: Promise<void> | undefined;

async function ensureZapHandler(): Promise<void> {
  if (zap !== undefined) return;
  // Several servers may be created at once: one start for all of them.
  zapStarting ??= startZapHandler().finally(() => {
    zapStarting = undefined;
  });
  return zapStarting;
}

async function startZapHandler(): Promise<void> {
  // Closing the previous handler frees the inproc address asynchronously: retry briefly.
  const deadline = Date.now() + 2000;
  for (;;) {
    const socket = new zmq.Reply({ linger: 0 });
    try {
      await socket.bind(ZAP_ENDPOINT);
      zap = { socket, done: zapLoop(socket) };
      return;
    } catch (e) {
      socket.close();
      if ((e as { code?: string }).code === 'EADDRINUSE' && Date.now() < deadline) {
        await new Promise((r) => setTimeout(r, 20));
        continue;
      }
      throw new SecurityError(
        `could not start the ZAP authentication handler on ${ZAP_ENDPOINT} (${(e as Error).message}): ` +
          'something else in this process handles ZAP; dtrain needs its own',
      );
    }
  }
}

/** Handle of a server socket's ZAP domain; release() when the socket closes. */
export interface ZapRegistration {
  domain: string;
  /** From now on admit only these keys (a ring link: its previous rank's); connections already made stay. */
  restrict(keys: readonly string[]): void;
  release(): void;
}

/**
 * Registers a server socket's allow-list and returns its ZAP domain. The handler starts with the
 * first registration and closes with the last release (a pending receive would keep Node alive).
 */
export async function registerZapDomain(
  allowed: readonly string[],
  label: string,
  onRefused: (reason: string, address: string) => void,
): Promise<ZapRegistration> {
  await ensureZapHandler();
  const domain = `dtrain-${process.pid}-${++domainSeq}`;
  const entry: Domain = { allowed: new Set(allowed), known: new Set(allowed), label, onRefused };
  domains.set(domain, entry);
  return {
    domain,
    restrict(keys) {
      entry.allowed = new Set(keys);
    },
    release() {
      if (!domains.delete(domain)) return;
      if (domains.size === 0 && zap !== undefined) {
        zap.socket.close();
        zap = undefined;
      }
    },
  };
}

/** Socket options for a CURVE server (the caller registers the ZAP domain). */
export function serverSocketOptions(security: Security | undefined, domain: string | undefined): Record<string, unknown> {
  if (security === undefined || security.kind === 'none') return {};
  requireCurve();
  return {
    curveServer: true,
    curveSecretKey: checkKey(security.secretKey, 'the secret key'),
    zapDomain: domain,
    zapEnforceDomain: true,
  };
}

/** Checks a server's security settings; returns the allow-list (curve) or undefined (none). */
export function serverAllowList(security: Security | undefined, who: string): string[] | undefined {
  if (security === undefined || security.kind === 'none') return undefined;
  if (security.kind !== 'curve') throw new SecurityError(`${who}: unknown security kind ${(security as { kind: unknown }).kind}`);
  requireCurve();
  checkKey(security.publicKey, `${who}: the public key`);
  checkKey(security.secretKey, `${who}: the secret key`);
  const allowed = security.allowedClientKeys ?? [];
  if (allowed.length === 0) {
    throw new SecurityError(`${who}: CURVE needs a non-empty allow-list of client keys (the allowed_keys file, pnpm cli keys add-peer)`);
  }
  for (const k of allowed) checkKey(k, `${who}: allow-list entry ${JSON.stringify(String(k).slice(0, 50))}`);
  return [...allowed];
}

/** Socket options for a CURVE client connecting to the server whose public key is `serverKey`. */
/**
 * ZMTP heartbeats for a connecting socket (the link to the next rank, a worker's control link):
 * ZeroMQ's I/O thread answers them even while JavaScript is busy, so they tell a dead, stopped or
 * cut-off peer (no answer) from a slow one. The link is dead after half the timeout, so a stopped
 * rank's previous rank names it before anyone's receive timeout blames a healthy, starved rank.
 * Never on sockets that accept strangers (see the ring's data socket in ring-prev-link.ts).
 */
export function heartbeats(timeoutMs: number): { heartbeatInterval: number; heartbeatTimeout: number } {
  return {
    heartbeatInterval: Math.max(1, Math.min(1000, Math.ceil(timeoutMs / 8))),
    heartbeatTimeout: Math.max(1, Math.ceil(timeoutMs / 2)),
  };
}

export function clientSocketOptions(security: Security | undefined, serverKey: string | undefined, who: string): Record<string, unknown> {
  if (security === undefined || security.kind === 'none') return {};
  requireCurve();
  if (serverKey === undefined) {
    throw new SecurityError(`${who}: CURVE needs the server's public key (serverPublicKey, or the peer's publicKey from the Welcome)`);
  }
  return {
    curveServerKey: checkKey(serverKey, `${who}: the server's public key`),
    curvePublicKey: checkKey(security.publicKey, `${who}: the public key`),
    curveSecretKey: checkKey(security.secretKey, `${who}: the secret key`),
  };
}

/**
 * Counts connections a server refused at the handshake that never reach the ZAP handler (a client
 * without CURVE, or with a wrong server key: a protocol error on our side).
 */
export function watchHandshakeFailures(socket: zmq.Socket, onRefused: (reason: string, address: string) => void): void {
  socket.events.on('handshake:error:protocol', (e) => {
    onRefused(`handshake failed (${e.error?.code ?? 'protocol error'}; no or wrong CURVE keys)`, e.address ?? '?');
  });
  socket.events.on('handshake:error:other', (e) => {
    onRefused(`handshake failed (${e.error?.code ?? 'unspecified'})`, e.address ?? '?');
  });
}

/**
 * A ROUTER that accepts connections from the network, the way every server socket of ours does:
 * with CURVE, its ZAP domain (allow-list) is registered first and handshake failures are counted;
 * without, it is refused off loopback unless no security was chosen explicitly (then a warning).
 * `options` are the socket's own limits and timeouts. The caller binds it, and releases `zapReg`
 * when it closes the socket.
 */
export async function createServerRouter(o: {
  security: Security | undefined;
  listen: string;
  /** How errors and logs name this socket, e.g. "rank 2's data socket". */
  what: string;
  /** ZAP domain prefix. */
  zapName: string;
  options: Record<string, unknown>;
  onRefused: (reason: string, address: string) => void;
}): Promise<{ router: zmq.Router; zapReg: ZapRegistration | undefined }> {
  const allowed = serverAllowList(o.security, o.what);
  if (o.security === undefined && !isLoopback(o.listen)) {
    throw new SecurityError(
      `${o.what}: refusing to listen on ${o.listen} without CURVE: anyone who reaches that address could join or inject data. ` +
        'Use keys (pnpm cli launch/join --keys; for a worker DTRAIN_COORDINATOR_KEY), or choose no security explicitly (--insecure; DTRAIN_INSECURE=1)',
    );
  }
  const zapReg = allowed === undefined ? undefined : await registerZapDomain(allowed, o.zapName, o.onRefused);
  let router: zmq.Router;
  try {
    router = new zmq.Router({ ...o.options, ...serverSocketOptions(o.security, zapReg?.domain) });
  } catch (e) {
    zapReg?.release();
    throw e;
  }
  if (zapReg !== undefined) watchHandshakeFailures(router, o.onRefused);
  else if (!isLoopback(o.listen)) {
    logRejection(o.what, `listening on ${o.listen} without CURVE: anyone who can reach this port can connect`, 'warning for');
  }
  return { router, zapReg };
}

// ---------------------------------------------------------------------------------------------
// Which key a Hello's sender holds.
//
// The coordinator must know which CURVE key a worker's control connection authenticated with:
// it hands that key to the worker's ring neighbour. libzmq knows it (the ZAP handler approved it,
// and each message carries it as the "User-Id" property), but zeromq.js 6 exposes neither
// zmq_msg_gets nor any per-connection property, and the ZAP request names only the peer's IP
// address (no port) and the server socket's own routing id, so the handler cannot tie a key to a
// routing id either. So the Hello proves its claim instead: an HMAC keyed with the X25519 shared
// secret of the claimed key and the coordinator's key, which only the holder of the claimed
// secret key (or the coordinator) can compute. The control traffic is CURVE-encrypted, so nobody
// else ever sees a proof to replay it.

const X25519_PKCS8_PREFIX = Buffer.from('302e020100300506032b656e04220420', 'hex');
const X25519_SPKI_PREFIX = Buffer.from('302a300506032b656e032100', 'hex');
const PROOF_LABEL = 'dtrain hello key proof v1';

function x25519Secret(secretKey: string): KeyObject {
  const raw = z85Decode(secretKey);
  if (raw === undefined || raw.length !== 32) throw new SecurityError('the secret key is not a CURVE key (40 Z85 characters)');
  return createPrivateKey({ key: Buffer.concat([X25519_PKCS8_PREFIX, raw]), format: 'der', type: 'pkcs8' });
}

function x25519Public(publicKey: string): KeyObject | undefined {
  const raw = isCurveKey(publicKey) ? z85Decode(publicKey) : undefined;
  if (raw === undefined) return undefined;
  return createPublicKey({ key: Buffer.concat([X25519_SPKI_PREFIX, raw]), format: 'der', type: 'spki' });
}

function proofOf(shared: Buffer, serverKey: string, clientKey: string, runId: string): Buffer {
  return createHmac('sha256', shared).update(`${PROOF_LABEL}\0${serverKey}\0${clientKey}\0${runId}`).digest();
}

/**
 * Hello.curve_key_proof for a client holding `clientSecretKey` (whose public key is `clientKey`),
 * talking to the server whose public key is `serverKey`, in an envelope of run `runId`.
 */
export function helloKeyProof(clientKey: string, clientSecretKey: string, serverKey: string, runId: string): Buffer {
  const pub = x25519Public(serverKey);
  if (pub === undefined) throw new SecurityError("the server's public key is not a CURVE key (40 Z85 characters)");
  return proofOf(diffieHellman({ privateKey: x25519Secret(clientSecretKey), publicKey: pub }), serverKey, clientKey, runId);
}

/**
 * Whether `proof` shows that the sender of a Hello holds the secret key of `claimedKey`, checked
 * by the server holding `serverSecretKey` (public key `serverKey`). Never throws.
 */
export function verifyHelloKeyProof(claimedKey: string, proof: Uint8Array | undefined, serverKey: string, serverSecretKey: string, runId: string): boolean {
  if (proof === undefined || proof.length !== 32) return false;
  try {
    const pub = x25519Public(claimedKey);
    if (pub === undefined) return false;
    // OpenSSL refuses low-order points (an all-zero shared secret) with an exception: false below.
    const shared = diffieHellman({ privateKey: x25519Secret(serverSecretKey), publicKey: pub });
    return timingSafeEqual(proofOf(shared, serverKey, claimedKey, runId), Buffer.from(proof.buffer, proof.byteOffset, proof.byteLength));
  } catch {
    return false;
  }
}
