// An in-process elastic group for tests: N replicas in one process (createInProcessGroup per
// generation) whose membership changes the way the coordinator changes a real one. A lost replica
// makes every later collective of its generation fail with GroupChangedError on the survivors;
// the survivors' regroup() calls resolve together once all of them arrived, with a new
// generation of the survivors (old-rank order) plus any joiners, root = the survivor with the
// most advanced committed progress, stop = fewer than minWorkers.

import { createInProcessGroup, GroupChangedError, type Collective, type ElasticCollective, type Progress, type RegroupResult } from '../collective.js';

/** What the lost replica's own collective call gets: the "process" died there. */
export class ReplicaKilledError extends Error {
  override get name(): string {
    return 'ReplicaKilledError';
  }
}

interface Generation {
  id: number;
  members: ElasticMember[];
  inner: Collective[];
  calls: number[];
  /** Call index from which every collective of this generation fails. */
  failedAt: number | null;
  lost: ElasticMember[];
  pending: Set<{ id: number; reject: (e: Error) => void }>;
  arrivals: Map<ElasticMember, { progress: Progress; resolve: (r: RegroupResult) => void }>;
  done: boolean;
}

/** One replica's ElasticCollective; rank and worldSize change at every regroup. */
export class ElasticMember implements ElasticCollective {
  readonly elastic = true as const;
  rank = 0;
  worldSize = 0;
  initialRoot = 0;
  regroupRequested = false;
  dead = false;
  gen!: Generation;
  constructor(
    private readonly group: ElasticInProcessGroup,
    /** Stable identity across regroups: launch rank, then joiners numbered on. */
    readonly id: number,
  ) {}
  allReduceMean(buf: Float32Array): Promise<void> {
    return this.group.call(this, 'allReduceMean', buf, -1);
  }
  allReduceSum(buf: Float32Array): Promise<void> {
    return this.group.call(this, 'allReduceSum', buf, -1);
  }
  broadcast(buf: Float32Array, root: number): Promise<void> {
    return this.group.call(this, 'broadcast', buf, root);
  }
  regroup(committed: Progress): Promise<RegroupResult> {
    return this.group.regroup(this, committed);
  }
}

export interface GenerationRecord {
  generation: number;
  /** Member ids in rank order. */
  members: number[];
  root: number;
  stop: boolean;
  reason: string;
  /** Committed progress each survivor reported, by member id. */
  committed: Record<number, Progress>;
}

export class ElasticInProcessGroup {
  /** The launch members, rank order. */
  readonly members: ElasticMember[];
  /** One record per regroup. */
  readonly generations: GenerationRecord[] = [];
  private gen: Generation;
  private nextId: number;
  private readonly losses = new Map<number, Array<{ rank: number; at: number; afterOthers?: boolean }>>();
  private joiners: Array<{ member: ElasticMember; resolve: (m: ElasticMember) => void }> = [];

  constructor(
    worldSize: number,
    private readonly minWorkers = 1,
  ) {
    this.members = Array.from({ length: worldSize }, (_, i) => new ElasticMember(this, i));
    this.nextId = worldSize;
    this.gen = this.makeGeneration(0, this.members);
  }

  /** The current generation's number (0 at launch, +1 per regroup). */
  get generation(): number {
    return this.gen.id;
  }

  /**
   * The replica at `rank` of generation `generation` (default: the current one) dies at its
   * `atCall`-th collective of that generation (0-based; the start sync is calls 0..6, step j of
   * the first epoch is call 7 + j): that call rejects with ReplicaKilledError, and every call of
   * the others from that index on rejects with GroupChangedError.
   */
  lose(rank: number, atCall: number, generation = this.gen.id): void {
    const list = this.losses.get(generation) ?? [];
    list.push({ rank, at: atCall });
    this.losses.set(generation, list);
  }

  /**
   * As `lose`, but the others complete that collective (a ring that broke in its last pieces: some
   * ranks have the result, this one never gets it); their collectives after it fail.
   */
  loseAfterOthersComplete(rank: number, atCall: number, generation = this.gen.id): void {
    const list = this.losses.get(generation) ?? [];
    list.push({ rank, at: atCall, afterOthers: true });
    this.losses.set(generation, list);
  }

  /** As the coordinator's REGROUP command: every member's regroupRequested becomes true. */
  requestRegroup(): void {
    for (const m of this.gen.members) m.regroupRequested = true;
  }

  /**
   * A new replica asks to join: it is admitted at the next regroup (requested here), and the
   * promise resolves with its collective (rank, worldSize, initialRoot set) once it is in.
   */
  join(): Promise<ElasticMember> {
    const member = new ElasticMember(this, this.nextId++);
    const p = new Promise<ElasticMember>((resolve) => this.joiners.push({ member, resolve }));
    this.requestRegroup();
    return p;
  }

  private makeGeneration(id: number, members: ElasticMember[]): Generation {
    const gen: Generation = {
      id,
      members,
      inner: createInProcessGroup(members.length),
      calls: new Array<number>(members.length).fill(0),
      failedAt: null,
      lost: [],
      pending: new Set(),
      arrivals: new Map(),
      done: false,
    };
    members.forEach((m, rank) => {
      m.rank = rank;
      m.worldSize = members.length;
      m.gen = gen;
      m.regroupRequested = false;
    });
    return gen;
  }

  /** @internal */
  call(m: ElasticMember, op: 'allReduceMean' | 'allReduceSum' | 'broadcast', buf: Float32Array, root: number): Promise<void> {
    if (m.dead) return Promise.reject(new ReplicaKilledError(`replica ${m.id} is dead`));
    const gen = m.gen;
    const id = gen.calls[m.rank]++;
    const loss = this.losses.get(gen.id)?.find((l) => l.rank === m.rank && id >= l.at);
    if (loss?.afterOthers && id === loss.at) {
      // Its share goes in, so the others get their result; its own never arrives.
      const inner = op === 'broadcast' ? gen.inner[m.rank].broadcast(buf, root) : gen.inner[m.rank][op](buf);
      return inner.then(() => Promise.reject(this.kill(m, gen, id + 1)));
    }
    if (loss) return Promise.reject(this.kill(m, gen, id));
    if (gen.failedAt !== null && id >= gen.failedAt) {
      return Promise.reject(new GroupChangedError(`generation ${gen.id} lost ${gen.lost.map((x) => `replica ${x.id}`).join(', ')} (collective #${id})`));
    }
    const inner = op === 'broadcast' ? gen.inner[m.rank].broadcast(buf, root) : gen.inner[m.rank][op](buf);
    return new Promise<void>((resolve, reject) => {
      const entry = { id, reject };
      gen.pending.add(entry);
      inner.then(
        () => {
          if (gen.pending.delete(entry)) resolve();
        },
        (e: Error) => {
          if (gen.pending.delete(entry)) reject(e);
        },
      );
    });
  }

  /** Marks `m` dead and every collective of its generation from `failFrom` on failed; returns its own error. */
  private kill(m: ElasticMember, gen: Generation, failFrom: number): ReplicaKilledError {
    const id = gen.calls[m.rank] - 1;
    m.dead = true;
    gen.lost.push(m);
    gen.failedAt = Math.min(gen.failedAt ?? failFrom, failFrom);
    const err = new GroupChangedError(`replica ${m.id} (rank ${m.rank} of generation ${gen.id}) was lost at collective #${id}`);
    for (const p of [...gen.pending]) {
      if (p.id >= failFrom) {
        gen.pending.delete(p);
        p.reject(err);
      }
    }
    this.tryAdvance(gen);
    return new ReplicaKilledError(`replica ${m.id} was killed at collective #${id} of generation ${gen.id}`);
  }

  /** @internal */
  regroup(m: ElasticMember, committed: Progress): Promise<RegroupResult> {
    const gen = m.gen;
    return new Promise<RegroupResult>((resolve) => {
      gen.arrivals.set(m, { progress: { ...committed }, resolve });
      this.tryAdvance(gen);
    });
  }

  private tryAdvance(gen: Generation): void {
    if (gen.done || gen !== this.gen) return;
    const survivors = gen.members.filter((x) => !x.dead);
    if (gen.arrivals.size === 0 || !survivors.every((x) => gen.arrivals.has(x))) return;
    gen.done = true;
    const joiners = this.joiners.splice(0);
    const next = [...survivors, ...joiners.map((j) => j.member)];
    // The most advanced committed state: epoch, then positions done, then steps; ties: lowest rank.
    let root = 0;
    const key = (p: Progress) => [p.epoch, p.done, p.step];
    survivors.forEach((x, i) => {
      const a = key(gen.arrivals.get(x)!.progress);
      const b = key(gen.arrivals.get(survivors[root])!.progress);
      const cmp = a[0] - b[0] || a[1] - b[1] || a[2] - b[2];
      if (cmp > 0) root = i;
    });
    const stop = next.length < this.minWorkers;
    const parts = [
      ...(gen.lost.length ? [`lost ${gen.lost.map((x) => `replica ${x.id}`).join(', ')}`] : []),
      ...(joiners.length ? [`admitted ${joiners.map((j) => `replica ${j.member.id}`).join(', ')}`] : []),
    ];
    const reason = `${parts.join('; ') || 'regroup requested'}: ${next.length} workers${stop ? `, fewer than --min-workers ${this.minWorkers}` : ''}`;
    const committed = Object.fromEntries(survivors.map((x) => [x.id, gen.arrivals.get(x)!.progress]));
    this.gen = this.makeGeneration(gen.id + 1, next);
    this.generations.push({ generation: this.gen.id, members: next.map((x) => x.id), root, stop, reason, committed });
    for (const j of joiners) {
      j.member.initialRoot = root;
      j.resolve(j.member);
    }
    for (const x of survivors) gen.arrivals.get(x)!.resolve({ root, stop, reason });
  }
}
