#!/usr/bin/env python3
"""The peer of `pnpm bench scaling --ddp PYTHON`: PyTorch DDP over gloo on this machine, N processes
(as torchrun starts them), each training the tutorial's ResNet (tools/export/tutorial_resnet.py's definition) on
its own batch: forward, cross-entropy, backward with DDP's bucketed all-reduce, SGD. Each process
gets cores / N intra-op threads (torchrun's OMP_NUM_THREADS=1 would starve it on a small machine).

Prints and writes (--out) images/s over all workers from rank 0's per-step times (after a barrier
each step, so a step is the slowest rank's), with the spread.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_resnet import xavier_resnet  # noqa: E402


def worker(rank: int, a, port: int, q) -> None:
    os.environ['MASTER_ADDR'] = '127.0.0.1'
    os.environ['MASTER_PORT'] = str(port)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // a.workers))
    dist.init_process_group('gloo', rank=rank, world_size=a.workers)
    torch.manual_seed(0)
    model = xavier_resnet(a.channels)
    ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=a.bucket_mb) if a.workers > 1 else model
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    x = torch.randn(a.batch, a.channels, a.size, a.size)
    y = torch.randint(0, 10, (a.batch,))
    times = []
    for i in range(a.warmup + a.steps):
        if a.workers > 1:
            dist.barrier()
        t0 = time.perf_counter()
        loss = F.cross_entropy(ddp(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if a.workers > 1:
            dist.barrier()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        q.put(times)
    dist.destroy_process_group()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--size', type=int, default=28)
    p.add_argument('--channels', type=int, default=1)
    p.add_argument('--batch', type=int, default=32)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--steps', type=int, default=6)
    p.add_argument('--bucket-mb', type=float, default=25)
    p.add_argument('--port', type=int, default=29517)
    p.add_argument('--out')
    a = p.parse_args()
    ctx = mp.get_context('spawn')
    q = ctx.SimpleQueue()
    mp.start_processes(worker, args=(a, a.port, q), nprocs=a.workers, join=True, start_method='spawn')
    times = q.get()
    med = statistics.median(times)
    per_step = [a.workers * a.batch / t for t in times]
    result = {
        'torch': torch.__version__, 'workers': a.workers, 'threadsPerWorker': max(1, (os.cpu_count() or 1) // a.workers),
        'size': a.size, 'channels': a.channels, 'batch': a.batch, 'bucketMb': a.bucket_mb, 'warmup': a.warmup, 'steps': a.steps,
        'imagesPerSec': a.workers * a.batch * len(times) / sum(times),
        'imagesPerSecPerStep': {'median': statistics.median(per_step), 'min': min(per_step), 'max': max(per_step)},
        'secPerStep': {'median': med, 'min': min(times), 'max': max(times)}, 'samplesS': times, 'command': ' '.join(sys.argv),
    }
    print(f"DDP gloo, {a.workers} workers x batch {a.batch}, {a.size}px: {result['imagesPerSec']:.1f} img/s (s/step median {med:.3f}, {min(times):.3f}-{max(times):.3f})")
    if a.out:
        with open(a.out + '.tmp', 'w') as f:
            json.dump(result, f, indent=2)
        os.replace(a.out + '.tmp', a.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
