#!/usr/bin/env python3
"""The peer of `pnpm bench train-step` on a GPU: the tutorial's ResNet in PyTorch, one full training
step (forward, cross-entropy, backward, SGD lr 0.01) at batch 64, images/s, on the same GPU.

The network is the one of packages/core/src/architecture.ts as tools/export/tutorial_resnet.py
defines it (the module our exported weights load into), Xavier-uniform weights, zero biases.
Its parameter count is checked against the one our model reports (11,180,810 for 3 channels).

Modes, each timed in this one process on the same GPU:
  fp32       float32 everywhere, TF32 off (cuDNN and matmul): the same arithmetic as ours.
  tf32       PyTorch's defaults on Ampere and later: TF32 convolutions (cudnn.allow_tf32 is True).
  bf16-cl    channels_last + bf16 autocast: what a PyTorch user would run for speed.
  fp32-cl    channels_last, float32 (the CPU's other layout).

Writes JSON (--out) with per-step seconds, medians and spreads; runs on CPU too (--device cpu).
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'export'))
from tutorial_resnet import tutorial_resnet  # noqa: E402  the network's one definition in Python


def xavier_resnet(channels: int = 3, classes: int = 10) -> nn.Module:
    """The tutorial's ResNet initialised as our model is: Xavier-uniform weights, zero biases."""
    model = tutorial_resnet(channels, classes)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def set_tf32(on: bool) -> None:
    torch.backends.cudnn.allow_tf32 = on
    torch.backends.cuda.matmul.allow_tf32 = on


def make_step(mode: str, size: int, batch: int, channels: int, device: torch.device):
    """One training step of the tutorial network in `mode`, as a function that returns its seconds."""
    torch.manual_seed(0)
    set_tf32(mode == 'tf32')
    torch.backends.cudnn.benchmark = True  # as users run fixed-shape training
    model = xavier_resnet(channels).to(device)
    fmt = torch.channels_last if mode in ('bf16-cl', 'fp32-cl') else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(batch, channels, size, size, device=device).to(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)

    def step() -> float:
        sync()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=(mode == 'bf16-cl')):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        return time.perf_counter() - t0

    return step


def time_mode(mode: str, size: int, batch: int, warmup: int, steps: int, channels: int, device: torch.device) -> list:
    step = make_step(mode, size, batch, channels, device)
    times = [step() for _ in range(warmup + steps)]
    return times[warmup:]


def serve(a, device: torch.device) -> int:
    """--serve: one model per (size, mode), kept; each stdin line 'SIZE MODE STEPS' times that many
    steps and answers one JSON line of seconds. Lets a benchmark interleave PyTorch with its own
    steps in rounds, so that a noisy machine slows both alike."""
    models = {}
    for line in sys.stdin:
        size, mode, steps = line.split()
        key = (int(size), mode)
        if key not in models:
            models[key] = make_step(mode, int(size), a.batch, a.channels, device)
        print(json.dumps({'torch': torch.__version__, 'seconds': [models[key]() for _ in range(int(steps))]}), flush=True)
    return 0


def spread(xs: list) -> dict:
    return {'median': statistics.median(xs), 'min': min(xs), 'max': max(xs), 'n': len(xs)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--sizes', default='32,96')
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--warmup', type=int, default=5)
    p.add_argument('--steps', type=int, default=20)
    p.add_argument('--channels', type=int, default=3)
    p.add_argument('--modes', default='fp32,tf32,bf16-cl')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--out', help='write the results here (JSON)')
    p.add_argument('--serve', action='store_true', help="answer 'SIZE MODE STEPS' lines on stdin with step times (JSON lines)")
    a = p.parse_args()
    device = torch.device(a.device)
    if a.serve:
        return serve(a, device)
    params = sum(t.numel() for t in xavier_resnet(a.channels).parameters())
    expected = 11_180_810 if a.channels == 3 else None
    if expected is not None and params != expected:
        print(f'error: the PyTorch network has {params} parameters, ours {expected}: the definitions differ', file=sys.stderr)
        return 1
    gpu = torch.cuda.get_device_name(device) if device.type == 'cuda' else None
    print(f'torch {torch.__version__} on {gpu or platform.processor() or "cpu"}; {params} parameters; batch {a.batch}, {a.warmup} warm-up + {a.steps} timed steps')
    rows = []
    for size in [int(s) for s in a.sizes.split(',')]:
        for mode in a.modes.split(','):
            secs = time_mode(mode, size, a.batch, a.warmup, a.steps, a.channels, device)
            s = spread(secs)
            rows.append({'size': size, 'mode': mode, 'imgPerSec': a.batch / s['median'], 'secPerStep': s, 'samplesS': secs})
            print(f'{size}x{size} {mode}: {a.batch / s["median"]:.1f} img/s (median {s["median"]:.4f} s/step, {s["min"]:.4f}-{s["max"]:.4f})', flush=True)
            write(a, device, gpu, params, rows)  # after every row: a run stopped by a time limit keeps what it measured
    if a.out:
        print(f'wrote {a.out}')
    return 0


def write(a, device, gpu, params, rows) -> None:
    if not a.out:
        return
    result = {
        'torch': torch.__version__,
        'cuda': torch.version.cuda,
        'cudnn': torch.backends.cudnn.version() if device.type == 'cuda' else None,
        'device': gpu or 'cpu',
        'params': params,
        'batch': a.batch,
        'warmup': a.warmup,
        'steps': a.steps,
        'results': rows,
        'command': ' '.join(sys.argv),
        'writtenAt': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
    }
    with open(a.out + '.tmp', 'w') as f:
        json.dump(result, f, indent=2)
    os.replace(a.out + '.tmp', a.out)


if __name__ == '__main__':
    sys.exit(main())
