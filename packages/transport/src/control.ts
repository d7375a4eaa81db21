// The control channel between the coordinator and its workers: one ROUTER socket on the
// coordinator (MASTER_ADDR:MASTER_PORT), one DEALER per worker. Small protobuf messages only
// (Hello, Welcome, Error, Heartbeat, StepReport, Command); gradients never travel here.
import * as zmq from 'zeromq';
import { RingSetupError, TransportError } from './errors.js';
import {
  countAuthRefused,
  countRejected,
  decodeMessage,
  encodeMessage,
  logRejection,
  MAX_ENVELOPE_BYTES,
  peerLabel,
  PROTOCOL_VERSION,
  type Bodies,
  type BodyKind,
  type Message,
} from './protocol.js';
import {
  clientSocketOptions,
  createServerRouter,
  heartbeats,
  helloKeyProof,
  verifyHelloKeyProof,
  type CurveSecurity,
  type Security,
  type ZapRegistration,
} from './security.js';

/**
 * Inbound limits of the control socket, per worker connection: frames over CONTROL_MAX_FRAME_BYTES
 * drop the connection (workers send small messages: Hello, Heartbeat, StepReport, FileRequest,
 * Error), and at most CONTROL_RECEIVE_HWM messages wait unread before libzmq stops reading it.
 * Together: at most 256 MiB queued per connection.
 */
export const CONTROL_MAX_FRAME_BYTES = 4 * 1024 * 1024;
export const CONTROL_RECEIVE_HWM = 64;
/**
 * Messages queued per peer at the coordinator before it drops more (a ROUTER drops at its
 * high-water mark): bounds what a peer that stops reading can hold here (64 file chunks, 256 MiB,
 * not libzmq's default 1,000). A live worker's I/O thread keeps reading into its own queue.
 */
export const CONTROL_SEND_HWM = 64;

/** What a worker may send to the coordinator; anything else on the control socket is dropped. */
const FROM_WORKERS: ReadonlySet<BodyKind> = new Set<BodyKind>(['hello', 'heartbeat', 'stepReport', 'fileRequest', 'error']);

/** A wait on the control channel ran past its timeout (coordinator unreachable, workers missing). */
export class ControlTimeoutError extends TransportError {
  readonly code = 'E_CONTROL_TIMEOUT' as const;
}

/** The other end of a control connection went away (process died, link down). */
export class ControlLostError extends TransportError {
  readonly code = 'E_CONTROL_LOST' as const;
}

/** One message from a worker, with the routing id to answer it on. */
export interface ControlEnvelope {
  peer: Buffer;
  message: Message;
  /**
   * With CURVE, on a Hello: the CURVE public key its sender proved it holds (Hello.curve_public_key,
   * checked against Hello.curve_key_proof; see security.ts). A Hello claiming an allow-listed key
   * without a valid proof never gets here. Undefined without CURVE, and on a Hello that claims no
   * key or one not in the allow-list (the coordinator refuses those with its own message).
   */
  authenticatedKey?: string;
}

/** Reasons a control message is dropped as a replay (transportCounters().byReason). */
export const REPLAY_REASONS = {
  replayed: 'replayed or out-of-order message',
  unnumbered: 'unnumbered message from a numbering peer',
} as const;
/** Reason a Hello is refused when it claims an allow-listed key it does not prove it holds. */
export const HELLO_KEY_NOT_PROVEN = 'hello key not proven';

/** Per-peer sequence numbers kept by a ControlServer; beyond this many peers the oldest is forgotten. */
const MAX_SEQ_PEERS = 4096;

function remember(map: Map<string, number>, key: string, value: number): void {
  if (!map.has(key) && map.size >= MAX_SEQ_PEERS) map.delete(map.keys().next().value as string);
  map.set(key, value);
}

/** A message with the raw frames that followed its envelope (FileChunk data). */
export type ControlMessage = Message & { payload: Buffer[] };

export interface ControlServerOptions {
  /** Address to bind (default 127.0.0.1; 0.0.0.0 for all interfaces). */
  listen?: string;
  /** TCP port (default 0: any free port). */
  port?: number;
  runId?: string;
  /** Send timeout (default 30 s); liveness of workers comes from their Heartbeat messages. */
  timeoutMs?: number;
  /** CURVE with an allow-list of worker keys, or none (absent: none, warned about off loopback). */
  security?: Security;
}

/**
 * The coordinator's end. Every received frame is decoded and verified; garbage is dropped and
 * counted, a Hello of another protocol version is answered with Error{PROTOCOL_VERSION}.
 */
export class ControlServer {
  readonly endpoint: string;
  readonly port: number;
  readonly runId: string;
  private readonly router: zmq.Router;
  private handler: ((e: ControlEnvelope) => void) | undefined;
  private backlog: ControlEnvelope[] = [];
  private sendChain: Promise<void> = Promise.resolve();
  private closed = false;
  private readonly zapReg: ZapRegistration | undefined;
  private readonly counts: ServerCounts;
  /** CURVE: this server's keys and allow-list, to check the key a Hello claims. */
  private readonly curve: { publicKey: string; secretKey: string; allowed: Set<string> } | undefined;
  /** Highest Envelope.seq accepted from, and last sent to, each routing id (hex). */
  private readonly recvSeq = new Map<string, number>();
  private readonly sendSeq = new Map<string, number>();

  private constructor(router: zmq.Router, endpoint: string, runId: string, zapReg: ZapRegistration | undefined, counts: ServerCounts, security: Security | undefined) {
    this.router = router;
    this.zapReg = zapReg;
    this.counts = counts;
    this.curve = security?.kind === 'curve'
      ? { publicKey: security.publicKey, secretKey: security.secretKey, allowed: new Set((security as CurveSecurity).allowedClientKeys ?? []) }
      : undefined;
    this.endpoint = endpoint;
    this.port = Number(endpoint.slice(endpoint.lastIndexOf(':') + 1));
    this.runId = runId;
    void this.loop();
  }

  static async bind(opts: ControlServerOptions = {}): Promise<ControlServer> {
    const timeoutMs = opts.timeoutMs ?? 30_000;
    const listen = opts.listen ?? '127.0.0.1';
    const counts: ServerCounts = { rejected: 0, authRefused: 0, helloRefused: 0, replayed: 0 };
    const { router, zapReg } = await createServerRouter({
      security: opts.security,
      listen,
      what: "the coordinator's control socket",
      zapName: 'control',
      options: {
        linger: 0,
        sendTimeout: timeoutMs,
        maxMessageSize: CONTROL_MAX_FRAME_BYTES,
        receiveHighWaterMark: CONTROL_RECEIVE_HWM,
        sendHighWaterMark: CONTROL_SEND_HWM,
        // No ZMTP heartbeats here (a socket open to strangers): see the ring's data socket in
        // ring-prev-link.ts for the libzmq abort they can cause. Liveness of workers comes from the
        // application's Heartbeat messages; each worker's DEALER still pings this socket.
      },
      onRefused: (reason, address) => {
        counts.authRefused++;
        countAuthRefused(reason);
        logRejection(`address ${address}`, reason, 'the control socket refused a connection from');
      },
    });
    const address = `tcp://${listen}:${opts.port ?? 0}`;
    try {
      await router.bind(address);
    } catch (e) {
      router.close();
      zapReg?.release();
      throw new RingSetupError(
        `the coordinator could not listen on ${address} (${(e as Error).message}): choose another --port or address`,
      );
    }
    return new ControlServer(router, router.lastEndpoint ?? address, opts.runId ?? '', zapReg, counts, opts.security);
  }

  /**
   * Messages this server dropped (`replayed` of them as replays), connections it refused at the
   * CURVE handshake, and Hellos it refused for claiming a key they did not prove.
   */
  stats(): ServerCounts {
    return { ...this.counts };
  }

  private reject(reason: string, peer: Buffer | undefined): void {
    this.counts.rejected++;
    countRejected(reason);
    logRejection(peerLabel(peer), reason, 'the control socket rejected a message from');
  }

  /** Messages received before a handler was set are delivered to it at once, in order. */
  onMessage(handler: (e: ControlEnvelope) => void): void {
    this.handler = handler;
    const queued = this.backlog;
    this.backlog = [];
    for (const e of queued) handler(e);
  }

  private async loop(): Promise<void> {
    for (;;) {
      let frames: Buffer[];
      try {
        frames = await this.router.receive();
      } catch {
        if (this.closed) return;
        continue;
      }
      const [peer, frame0] = frames;
      if (frames.length !== 2) {
        // Control messages are one envelope; extra frames are garbage (count them once).
        this.reject(frames.length < 2 ? 'no frame' : 'unexpected extra frames', peer);
        continue;
      }
      const r = decodeMessage(frame0);
      if (!r.ok) {
        // decodeMessage counted it process-wide already.
        this.counts.rejected++;
        logRejection(peerLabel(peer), r.reason, 'the control socket rejected a message from');
        continue;
      }
      const m = r.message;
      if (m.protocolVersion !== PROTOCOL_VERSION) {
        if (m.kind === 'hello') {
          this.send(peer, 'error', {
            code: 1, // PROTOCOL_VERSION
            message: `this coordinator speaks dtrain protocol version ${PROTOCOL_VERSION}, the worker ${m.protocolVersion}: run the same dtrain version on every machine`,
            rank: -1,
          }).catch(() => undefined);
        }
        this.reject('protocol version', peer);
        continue;
      }
      if (!FROM_WORKERS.has(m.kind)) {
        this.reject(`unexpected ${m.kind} from a worker`, peer);
        continue;
      }
      if (m.kind !== 'hello' && this.runId !== '' && m.runId !== this.runId) {
        this.reject('foreign run', peer);
        continue;
      }
      if (!this.inSequence(peer, m.seq)) continue;
      const e: ControlEnvelope = { peer, message: m };
      if (m.kind === 'hello' && this.curve !== undefined) {
        const key = this.helloKey(peer, m);
        if (key === null) continue;
        if (key !== undefined) e.authenticatedKey = key;
      }
      if (this.handler) this.handler(e);
      else this.backlog.push(e);
    }
  }

  /**
   * Whether a message numbered `seq` from `peer` may pass: numbers must increase per routing id,
   * and a peer that numbered once must keep numbering (an older peer sends 0 throughout).
   */
  private inSequence(peer: Buffer, seq: number): boolean {
    const key = peer.toString('hex');
    const last = this.recvSeq.get(key);
    if (seq === 0 && last === undefined) return true;
    if (seq === 0 || (last !== undefined && seq <= last)) {
      this.counts.replayed++;
      this.reject(seq === 0 ? REPLAY_REASONS.unnumbered : REPLAY_REASONS.replayed, peer);
      return false;
    }
    remember(this.recvSeq, key, seq);
    return true;
  }

  /**
   * The key a Hello proves (see ControlEnvelope.authenticatedKey), undefined when it claims none
   * or one not allow-listed, or null when it claims an allow-listed key without proof: then it is
   * answered with Error REFUSED, counted, logged, and not delivered.
   */
  private helloKey(peer: Buffer, m: Message): string | undefined | null {
    const curve = this.curve!;
    const h = m.body as { host?: string; curvePublicKey?: string; curveKeyProof?: Uint8Array };
    const claimed = h.curvePublicKey ?? '';
    if (claimed === '' || !curve.allowed.has(claimed)) return undefined;
    if (verifyHelloKeyProof(claimed, h.curveKeyProof, curve.publicKey, curve.secretKey, m.runId)) return claimed;
    this.counts.helloRefused++;
    countAuthRefused(HELLO_KEY_NOT_PROVEN);
    const host = String(h.host ?? '?').slice(0, 64);
    logRejection(peerLabel(peer), `${HELLO_KEY_NOT_PROVEN}: a Hello from host ${JSON.stringify(host)} claims key ${claimed} without proving it holds its secret key`, 'the control socket refused a Hello from');
    this.send(peer, 'error', {
      code: 3, // REFUSED
      message: `host ${host} is not allowed: its Hello claims the CURVE key ${claimed} but does not prove it holds that key's secret ` +
        `(a machine may only use its own key pair: pass this machine's key directory with --keys, and run the same dtrain version everywhere)`,
      rank: -1,
      host,
    }).catch(() => undefined);
    return null;
  }

  /** Sends one message to one worker (sends are queued: zeromq allows one at a time); `payload` frames follow the envelope. */
  send<K extends BodyKind>(peer: Buffer, kind: K, body: Bodies[K], payload: Buffer[] = []): Promise<void> {
    const key = peer.toString('hex');
    const seq = (this.sendSeq.get(key) ?? 0) + 1;
    remember(this.sendSeq, key, seq);
    const frames = [peer, encodeMessage(kind, body, this.runId, PROTOCOL_VERSION, seq), ...payload];
    const p = this.sendChain.then(() => this.router.send(frames));
    this.sendChain = p.catch(() => undefined);
    return p;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.sendChain;
    this.router.close();
    this.zapReg?.release();
  }
}

/** What a ControlServer counted (ControlServer.stats()). */
export interface ServerCounts {
  rejected: number;
  authRefused: number;
  helloRefused: number;
  replayed: number;
}

export interface ControlClientOptions {
  /** How long `receive` waits by default, and the liveness timeout of the connection (default 30 s). */
  timeoutMs?: number;
  runId?: string;
  /** Used in error messages: who is connecting (e.g. "rank 1 on host a"). */
  who?: string;
  /** CURVE (with the coordinator's public key as serverPublicKey) or none. */
  security?: Security;
}

/** A worker's end: connects to the coordinator's control socket. */
export class ControlClient {
  readonly endpoint: string;
  runId: string;
  private readonly dealer: zmq.Dealer;
  private readonly timeoutMs: number;
  private readonly who: string;
  private sendChain: Promise<void> = Promise.resolve();
  private connected = false;
  private closed = false;
  /** Why the coordinator refused our CURVE handshake, if it did (named in the timeout error). */
  private refused: string | undefined;
  private lostHandler: ((e: ControlLostError) => void) | undefined;
  private readonly curve: CurveSecurity | undefined;
  /** Envelope.seq of our last message, and the highest the coordinator's messages reached. */
  private sendSeq = 0;
  private recvSeq = 0;

  constructor(endpoint: string, opts: ControlClientOptions = {}) {
    this.endpoint = endpoint;
    this.curve = opts.security?.kind === 'curve' ? opts.security : undefined;
    this.timeoutMs = opts.timeoutMs ?? 30_000;
    this.runId = opts.runId ?? '';
    this.who = opts.who ?? 'this worker';
    this.dealer = new zmq.Dealer({
      linger: 0,
      sendTimeout: this.timeoutMs,
      sendHighWaterMark: 0,
      // Only the coordinator talks to this socket; FileChunks are its largest messages.
      maxMessageSize: 2 * MAX_ENVELOPE_BYTES,
      ...heartbeats(this.timeoutMs),
      ...clientSocketOptions(opts.security, opts.security?.kind === 'curve' ? opts.security.serverPublicKey : undefined, this.who),
    });
    this.dealer.events.on('connect', () => {
      this.connected = true;
      // A new connection: the coordinator numbers its messages on it afresh.
      this.recvSeq = 0;
    });
    // libzmq keeps retrying a refused handshake; the reason is kept for the timeout's message.
    this.dealer.events.on('handshake:error:auth', () => {
      this.refused = 'the coordinator refused this machine\'s CURVE key: it is not in the coordinator\'s allowed_keys (there: pnpm cli keys add-peer \'<line of pnpm cli keys show here>\')';
    });
    this.dealer.events.on('handshake:error:protocol', () => {
      this.refused = 'the CURVE handshake failed: the coordinator key given here is wrong, or one side runs without CURVE (--keys / --insecure must agree; a launch given neither uses keys of its own that only its local workers hold)';
    });
    this.dealer.events.on('disconnect', () => {
      if (this.connected && !this.closed) {
        this.lostHandler?.(new ControlLostError(`${this.who} lost its connection to the coordinator at ${this.endpoint}: the coordinator exited or the network is down`));
      }
    });
    this.dealer.connect(endpoint);
  }

  /** Called once when an established connection drops (the coordinator died or is unreachable). */
  onLost(handler: (e: ControlLostError) => void): void {
    this.lostHandler = handler;
  }

  /**
   * Sends one message, numbered (Envelope.seq). A Hello that claims this client's own CURVE key
   * gets the proof that it holds it (Hello.curve_key_proof).
   */
  send<K extends BodyKind>(kind: K, body: Bodies[K]): Promise<void> {
    let b: Bodies[K] = body;
    if (kind === 'hello' && this.curve?.serverPublicKey !== undefined) {
      const h = body as Bodies['hello'];
      if (h.curvePublicKey === this.curve.publicKey && h.curveKeyProof == null) {
        b = { ...h, curveKeyProof: helloKeyProof(this.curve.publicKey, this.curve.secretKey, this.curve.serverPublicKey, this.runId) } as Bodies[K];
      }
    }
    const frame = encodeMessage(kind, b, this.runId, PROTOCOL_VERSION, ++this.sendSeq);
    const p = this.sendChain
      .then(() => this.dealer.send(frame))
      .catch((e: unknown) => {
        // ZeroMQ's own "Operation was not possible or timed out": no connection within the timeout.
        if ((e as { code?: string }).code === 'EAGAIN') throw this.silenceError(this.timeoutMs, `sending its ${kind}`);
        throw e;
      });
    this.sendChain = p.catch(() => undefined);
    return p;
  }

  private silenceError(timeoutMs: number, during: string): ControlTimeoutError {
    return new ControlTimeoutError(
      `${this.who} heard nothing from the coordinator at ${this.endpoint} for ${timeoutMs} ms during ${during}: ` +
        `check the coordinator's address and port (MASTER_ADDR/MASTER_PORT), that it is running and that the port is open` +
        (this.refused ? ` (${this.refused})` : this.connected ? ' (the connection itself was up: the coordinator is waiting for something else)' : ' (no connection was made)'),
    );
  }

  /**
   * The next valid message, or ControlTimeoutError after `timeoutMs` naming `during`. Garbage and
   * messages of another run or protocol version are dropped (and counted) without ending the wait.
   */
  async receive(during: string, timeoutMs = this.timeoutMs): Promise<ControlMessage> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const left = deadline - Date.now();
      if (left <= 0) break;
      this.dealer.receiveTimeout = Math.max(1, left);
      let frames: Buffer[];
      try {
        frames = await this.dealer.receive();
      } catch (e) {
        if ((e as { code?: string }).code === 'EAGAIN') continue;
        throw new ControlLostError(`${this.who}: control connection to ${this.endpoint} failed during ${during}: ${(e as Error).message}`);
      }
      const r = decodeMessage(frames[0]);
      if (!r.ok) continue;
      const m = r.message;
      if (m.protocolVersion !== PROTOCOL_VERSION && m.kind !== 'error') {
        countRejected('protocol version');
        continue;
      }
      if (this.runId !== '' && m.runId !== this.runId && m.kind !== 'error') {
        countRejected('foreign run');
        continue;
      }
      if (m.seq === 0 ? this.recvSeq > 0 : m.seq <= this.recvSeq) {
        const reason = m.seq === 0 ? REPLAY_REASONS.unnumbered : REPLAY_REASONS.replayed;
        countRejected(reason);
        logRejection(`the coordinator at ${this.endpoint}`, reason, `${this.who} rejected a message from`);
        continue;
      }
      if (m.seq !== 0) this.recvSeq = m.seq;
      return { ...m, payload: frames.slice(1) };
    }
    throw this.silenceError(timeoutMs, during);
  }

  /** Waits until queued sends are handed to ZeroMQ, then closes (linger 0 after a short grace). */
  async close(graceMs = 200): Promise<void> {
    if (this.closed) return;
    await this.sendChain;
    // linger 0 drops unsent frames: give the I/O thread a moment to write the last report.
    this.dealer.linger = graceMs;
    this.closed = true;
    this.dealer.close();
  }
}
