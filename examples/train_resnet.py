"""Train a ResNet on synthetic images twice -- torch.nn's BatchNorm, then bn_gpu's -- and compare.

    python examples/train_resnet.py --steps 20                     # GPU if there is one, else CPU
    python examples/train_resnet.py --model resnet50 --channels-last --amp bf16 --compile
    python examples/train_resnet.py --device cpu --backend cpu --steps 2 --image-size 32

Both runs start from the same weights and see the same batches; the script prints both losses
side by side, the largest difference between the two models' running statistics at the end, and
the time per training step (forward, backward, optimizer) of each. torchvision's resnet18/50 are
used when torchvision is installed, otherwise a small ResNet defined here.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time

import torch

import bn_gpu

try:
    from tqdm import tqdm
except ImportError:  # a progress bar when tqdm is installed; plain iteration otherwise
    tqdm = None


class BasicBlock(torch.nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(channels)
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(channels)
        self.shortcut = torch.nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = torch.nn.Sequential(torch.nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                                torch.nn.BatchNorm2d(channels))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


def small_resnet(num_classes: int) -> torch.nn.Module:
    """A ResNet-8 for small images: a stem and three stages of one basic block (16, 32, 64 channels)."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, 1, 1, bias=False), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), BasicBlock(32, 64, 2),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, num_classes))


def build_model(name: str, num_classes: int) -> tuple[torch.nn.Module, str]:
    if name != "small":
        try:
            import torchvision
        except ImportError:
            print(f"torchvision is not installed: using the small ResNet instead of {name}")
        else:
            return getattr(torchvision.models, name)(num_classes=num_classes), f"torchvision {name}"
    return small_resnet(num_classes), "small ResNet-8"


def synthetic_batches(args, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(args.seed + 1)
    batches = []
    for _ in range(args.steps):
        images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g) * 1.5 + 0.2
        labels = torch.randint(0, args.num_classes, (args.batch_size,), generator=g)
        images = images.to(device)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        batches.append((images, labels.to(device)))
    return batches


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(model, batches, args, device, label: str) -> tuple[list[float], list[float]]:
    """Losses and seconds of each step of SGD on the batches."""
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    step = torch.compile(model) if args.compile else model
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if args.amp == "bf16"
           else contextlib.nullcontext())
    losses, seconds = [], []
    progress = tqdm(batches, desc=label, unit="step") if tqdm is not None else batches
    for images, labels in progress:
        _synchronize(device)
        start = time.perf_counter()
        with amp:
            loss = torch.nn.functional.cross_entropy(step(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _synchronize(device)
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
    return losses, seconds


def largest_running_stat_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    differences = [(x.double() - y.double()).abs().max().item()
                   for (name, x), (_, y) in zip(a.named_buffers(), b.named_buffers())
                   if name.endswith(("running_mean", "running_var"))]
    return max(differences, default=0.0)


def _milliseconds_per_step(seconds: list[float]) -> str:
    timed = seconds[1:] or seconds  # the first step compiles kernels (and the model, with --compile)
    return f"{1e3 * statistics.median(timed):.2f} ms/step (median of {len(timed)})"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="resnet18", choices=["resnet18", "resnet50", "small"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto", choices=["auto", *bn_gpu.BACKENDS],
                        help="bn_gpu backend of the converted model")
    parser.add_argument("--channels-last", action="store_true", help="images and model in channels_last")
    parser.add_argument("--amp", choices=["none", "bf16"], default="none", help="autocast to bfloat16")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def check_setup(args) -> torch.device:
    """The device and the bn_gpu backend, checked before any training: a one-line reason to stop."""
    try:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda: no CUDA GPU is present here (use --device cpu)")
        bn_gpu.backends.implementation(bn_gpu.backends.resolve(args.backend, device), device)
    except (RuntimeError, ImportError) as error:
        print(f"train_resnet.py: error: {str(error).splitlines()[0]}", file=sys.stderr)
        raise SystemExit(2)
    return device


def main(argv=None) -> None:
    args = parse_args(argv)
    device = check_setup(args)
    torch.manual_seed(args.seed)
    reference, description = build_model(args.model, args.num_classes)
    reference = reference.to(device)
    if args.channels_last:
        reference = reference.to(memory_format=torch.channels_last)
    converted = bn_gpu.convert_model(copy.deepcopy(reference), backend=args.backend)
    batches = synthetic_batches(args, device)
    print(f"{description} on {device}, batch {args.batch_size} x 3 x {args.image_size}^2, {args.steps} steps, "
          f"bn_gpu backend {args.backend!r}, channels_last={args.channels_last}, amp={args.amp}, "
          f"compile={args.compile}")

    torch_losses, torch_seconds = train(reference, batches, args, device, "torch.nn")
    bn_gpu_losses, bn_gpu_seconds = train(converted, batches, args, device, "bn_gpu")

    print(f"{'step':>4}  {'loss torch.nn':>14}  {'loss bn_gpu':>14}  {'difference':>10}")
    for step, (a, b) in enumerate(zip(torch_losses, bn_gpu_losses)):
        print(f"{step:>4}  {a:>14.6f}  {b:>14.6f}  {b - a:>10.2e}")
    print(f"largest running-statistics difference: {largest_running_stat_difference(reference, converted):.3e}")
    print(f"time per step: torch.nn {_milliseconds_per_step(torch_seconds)}, "
          f"bn_gpu {_milliseconds_per_step(bn_gpu_seconds)}")


if __name__ == "__main__":
    main()
