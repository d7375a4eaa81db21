#!/usr/bin/env python3
"""The tutorial's ResNet as a PyTorch module whose state_dict names are the ones `pnpm cli export`
writes (0.0.weight, 0.1.running_mean, 2.0.conv1.weight, 3.0.conv3.bias, 8.weight, ...), and a check
that a file loads into it.

The network (packages/core/src/architecture.ts):
  0  Sequential(Conv2d(C, 64, 7, stride 2, no padding, bias), BatchNorm2d(64, eps 1e-3), ReLU)
  1  MaxPool2d(3, 2, padding 1)
  2-5  a Sequential per stage of two Residual blocks: conv3x3(stride s) -> BN -> ReLU -> conv3x3 -> BN
       -> ReLU -> + shortcut -> ReLU; the shortcut is conv3 = Conv2d(c_in, c_out, 1, stride s, bias)
       where the shape changes
  6  AdaptiveAvgPool2d(1), 7 Flatten, 8 Linear(512, classes)

    python3 tools/export/tutorial_resnet.py FILE.safetensors --channels 1 --classes 10 --image-size 32 [--input X.f32 --n N]

loads FILE with load_state_dict(strict=True) (safetensors.torch.load_file when the package is there,
else this file's own reader of the format) and prints JSON: the entries loaded and, with --input
(N images, NHWC float32 as our pipeline feeds them), the evaluation-mode logits.
"""
import argparse
import json
import struct
import sys

import torch
import torch.nn as nn


class Residual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv3 = nn.Conv2d(cin, cout, 1, stride, 0, bias=True) if (stride != 1 or cin != cout) else None

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))  # the tutorial's ReLU before the addition
        return torch.relu(y + (self.conv3(x) if self.conv3 is not None else x))


def tutorial_resnet(channels: int, classes: int) -> nn.Sequential:
    stage = lambda cin, cout, s: nn.Sequential(Residual(cin, cout, s), Residual(cout, cout, 1))
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(channels, 64, 7, 2, 0, bias=True), nn.BatchNorm2d(64, eps=1e-3), nn.ReLU()),
        nn.MaxPool2d(3, 2, 1),
        stage(64, 64, 1), stage(64, 128, 2), stage(128, 256, 2), stage(256, 512, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes),
    )


def load_file(path: str) -> dict:
    try:
        from safetensors.torch import load_file as st_load
        return st_load(path)
    except ImportError:
        pass
    with open(path, 'rb') as f:
        raw = f.read()
    (n,) = struct.unpack('<Q', raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop('__metadata__', None)
    dtypes = {'F32': torch.float32, 'I64': torch.int64}
    out = {}
    for name, e in header.items():
        b, end = e['data_offsets']
        t = torch.frombuffer(bytearray(raw[8 + n + b:8 + n + end]), dtype=dtypes[e['dtype']])
        out[name] = t.reshape(e['shape'])
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument('file')
    p.add_argument('--channels', type=int, required=True)
    p.add_argument('--classes', type=int, default=10)
    p.add_argument('--image-size', type=int, required=True)
    p.add_argument('--input', help='N images, NHWC float32 (our pipeline\'s), to run in evaluation mode')
    p.add_argument('--n', type=int, default=0)
    a = p.parse_args()
    model = tutorial_resnet(a.channels, a.classes)
    state = load_file(a.file)
    model.load_state_dict(state, strict=True)
    model.eval()
    result = {'loaded': len(state), 'torch': torch.__version__}
    if a.input:
        with open(a.input, 'rb') as f:
            x = torch.frombuffer(bytearray(f.read()), dtype=torch.float32).reshape(a.n, a.image_size, a.image_size, a.channels)
        with torch.no_grad():
            result['logits'] = model(x.permute(0, 3, 1, 2).contiguous()).tolist()
    json.dump(result, sys.stdout)


if __name__ == '__main__':
    main()
