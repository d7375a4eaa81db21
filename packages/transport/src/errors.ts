/** Base class of every error this package throws at its users: a literal `code` and a message
 * that names the rank, host or endpoint involved and says what to do. */
export abstract class TransportError extends Error {
  abstract readonly code: string;
  override get name(): string {
    return this.constructor.name;
  }
}

/** A peer speaks another protocol version: different dtrain versions in one run. */
export class ProtocolVersionError extends TransportError {
  readonly code = 'E_PROTOCOL_VERSION' as const;
  constructor(
    readonly ours: number,
    readonly theirs: number,
    readonly peer: string,
  ) {
    super(
      `${peer} speaks dtrain protocol version ${theirs}, this process speaks ${ours}: ` +
        `run the same dtrain version on every machine of the run.`,
    );
  }
}

/** A ring neighbour went silent for longer than the timeout. */
export class PeerTimeoutError extends TransportError {
  readonly code = 'E_PEER_TIMEOUT' as const;
  constructor(
    readonly rank: number,
    readonly host: string,
    readonly timeoutMs: number,
    readonly during: string,
    readonly reporterRank: number,
  ) {
    super(
      `rank ${rank} on host ${host} sent nothing for ${timeoutMs} ms during ${during} ` +
        `(noticed by rank ${reporterRank}): that worker died, hung or cannot be reached. ` +
        `Check its log; raise the timeout if it is only slow.`,
    );
  }
}

/** A ring neighbour's connection dropped (process died, link down), or another rank reported so. */
export class PeerLostError extends TransportError {
  readonly code = 'E_PEER_LOST' as const;
  constructor(
    readonly rank: number,
    readonly host: string,
    readonly reason: string,
    readonly reporterRank: number,
  ) {
    super(
      `lost rank ${rank} on host ${host}: ${reason} (noticed by rank ${reporterRank}). ` +
        `Check that worker's log; the ring must be rebuilt before the next collective.`,
    );
  }
}

/** The ring could not be formed (bad peer list, unreachable neighbour, handshake timeout). */
export class RingSetupError extends TransportError {
  readonly code = 'E_RING_SETUP' as const;
}

/** A call was used wrongly (bad arguments, ring closed). */
export class RingUsageError extends TransportError {
  readonly code = 'E_RING_USAGE' as const;
}

/** The ring was aborted on purpose (Ring.abort): an elastic run is regrouping. */
export class RingAbortedError extends TransportError {
  readonly code = 'E_RING_ABORTED' as const;
}
