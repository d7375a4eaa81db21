export {
  Ring,
  IPC_IS_FASTER,
  RING_QUEUE_BYTES,
  ringInboundLimits,
  type PeerInfo,
  type RingOptions,
  type AllReduceOptions,
  type RingStats,
  type StagedAllReduce,
} from './ring.js';
export { ThreadedRing, sharedFloat32Array, closeThreadedRings } from './ring-thread.js';
export { sharedMemoryUnavailable, shmDir } from './shm.js';
export {
  TransportError,
  ProtocolVersionError,
  PeerTimeoutError,
  PeerLostError,
  RingSetupError,
  RingUsageError,
  RingAbortedError,
} from './errors.js';
export {
  dtrain,
  PROTOCOL_VERSION,
  MAX_ENVELOPE_BYTES,
  BODY_KINDS,
  encodeMessage,
  decodeMessage,
  transportCounters,
  countRejected,
  countAuthRefused,
  setTransportLogger,
  type TransportCounters,
  toSafeInt,
  type BodyKind,
  type Bodies,
  type Message,
  type DecodeResult,
} from './protocol.js';
export { addInto, addKernelNames, chooseAddKernels, addPlain, addUnrolled, makeWasmAdd, type AddKernel } from './sum.js';
export { floatToHalf, HALF_TO_FLOAT, encodeHalf, decodeHalf, roundThroughHalf } from './fp16.js';
export { workerEnv, WORKER_GLIBC_TUNABLES, writeWorkerEnv, readWorkerEnv, WorkerEnvError } from './env.js';
export type { WorkerEnv, WorkerEnvSpec } from './env.js';
export {
  ControlServer,
  ControlClient,
  ControlTimeoutError,
  ControlLostError,
  CONTROL_MAX_FRAME_BYTES,
  CONTROL_RECEIVE_HWM,
  REPLAY_REASONS,
  HELLO_KEY_NOT_PROVEN,
  type ServerCounts,
  type ControlEnvelope,
  type ControlMessage,
  type ControlServerOptions,
  type ControlClientOptions,
} from './control.js';
export {
  SecurityError,
  curveKeyPair,
  isCurveKey,
  isLoopback,
  describeSecurity,
  helloKeyProof,
  verifyHelloKeyProof,
  z85Encode,
  z85Decode,
  type Security,
  type CurveSecurity,
} from './security.js';
export {
  KeyFileError,
  defaultKeyDir,
  initKeyDir,
  loadKeyDir,
  addAllowedKey,
  readAllowList,
  curveServerSecurity,
  curveClientSecurity,
  KEY_FILES,
  type KeyMaterial,
  type AllowedKey,
} from './keys.js';
export { readRegroupReport, type RegroupReport } from './reports.js';
