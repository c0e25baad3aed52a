"""The same CIFAR ResNet18 in PyTorch (eager or compiled, float32 or bfloat16), for comparing frameworks.

    pip install torch --index-url https://download.pytorch.org/whl/cpu   # not a dependency of the launcher
    python -m benchmarks.pytorch_twin --width 64 --batch 128 --channels_last 1
    python -m benchmarks.pytorch_twin --precision bfloat16 --compile 1   # torch.autocast + torch.compile
    python -m benchmarks.best_vs_best --rounds 3     # both frameworks' best paths alternated, medians
    python -m benchmarks.throughput --batch 128 --precisions float32 --end_to_end_precision float32 --xla false \
        --batch_norm fused,keras --skip keras_fit,workers,startup         # the TensorFlow side, same batch

The network mirrors resnet18/models/resnet.py (11,173,962 trainable parameters at width 64, as
tests/test_model.py pins for ours; 3x3 stem without max-pool, two basic blocks per
stage, 1x1 projection shortcuts, global average pool, dense head) and the step is the
launcher's (SGD with Nesterov momentum, cross-entropy; no weight decay, which is a few
element-wise ops) on one synthetic batch in memory, so both sides time the model step
alone. Prints one JSON line.

--precision bfloat16 is PyTorch's recommended mixed precision on CPUs: the forward pass under
torch.autocast("cpu", torch.bfloat16), float32 weights and optimizer (as Keras' mixed_bfloat16
policy keeps them). --compile 1 wraps the model in torch.compile (Inductor, which needs a C++
compiler); its compilation happens in the warm-up steps, outside the timed ones.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pytorch_twin", description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--channels_last", type=int, choices=(0, 1), default=1,
                        help="NHWC memory format (oneDNN's preferred layout on CPUs)")
    parser.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                        help="bfloat16: the forward pass under torch.autocast (mixed precision)")
    parser.add_argument("--compile", type=int, choices=(0, 1), default=0, help="torch.compile the model")
    return parser.parse_args(argv)


def build_resnet18(width: int, num_classes: int = 10):
    import torch.nn as nn
    import torch.nn.functional as F

    class BasicBlock(nn.Module):
        def __init__(self, inputs: int, filters: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(inputs, filters, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(filters)
            self.conv2 = nn.Conv2d(filters, filters, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(filters)
            self.shortcut = nn.Sequential()
            if stride != 1 or inputs != filters:
                projection = nn.Conv2d(inputs, filters, 1, stride, bias=False)
                self.shortcut = nn.Sequential(projection, nn.BatchNorm2d(filters))

        def forward(self, x):
            y = F.relu(self.bn1(self.conv1(x)))
            return F.relu(self.shortcut(x) + self.bn2(self.conv2(y)))

    class ResNet18(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
            blocks, inputs = [], width
            for stage, multiplier in enumerate((1, 2, 4, 8)):
                for block in range(2):
                    blocks.append(BasicBlock(inputs, width * multiplier, 2 if stage > 0 and block == 0 else 1))
                    inputs = width * multiplier
            self.blocks = nn.Sequential(*blocks)
            self.head = nn.Linear(8 * width, num_classes)

        def forward(self, x):
            return self.head(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))

    return ResNet18()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(os.cpu_count() or 1)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = build_resnet18(args.width).to(memory_format=memory_format)
    forward = torch.compile(model) if args.compile else model
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bfloat16")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, 32, 32, generator=generator).to(memory_format=memory_format)
    labels = torch.randint(0, 10, (args.batch,), generator=generator)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(forward(images), labels)
        loss.backward()
        optimizer.step()
        return loss.item()  # blocks until the step is done

    for _ in range(max(args.warmup, 3 if args.compile else 0)):  # compiling takes the first steps
        step()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = time.perf_counter() - started
    print(json.dumps({"framework": f"pytorch {torch.__version__}", "width": args.width, "batch": args.batch,
                      "channels_last": bool(args.channels_last), "precision": args.precision,
                      "compile": bool(args.compile), "threads": torch.get_num_threads(),
                      "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "native"),
                      "images_per_sec": round(args.steps * args.batch / seconds, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
