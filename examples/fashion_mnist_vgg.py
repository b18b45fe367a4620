"""Train a small VGG with batch norm on Fashion-MNIST with Neural Rejuvenation (nrfx driver).

Data: the Debian package ``dataset-fashion-mnist`` (``sudo apt-get install dataset-fashion-mnist``)
puts the four IDX gzip files in /usr/share/datasets/fashion-mnist/; ``--data DIR`` reads them
from elsewhere.  Exit code 2 when they are missing.

    python examples/fashion_mnist_vgg.py --quick            # ~1-3 minutes on 2 CPU cores
    python examples/fashion_mnist_vgg.py --epochs 10 --history h.json --plot h.png
"""

from __future__ import annotations

import argparse
import gzip
import os
import struct
import sys
import time

import torch
from torch import nn

import nrfx

DEFAULT_DATA = "/usr/share/datasets/fashion-mnist"
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
MEAN, STD = 0.2860, 0.3530


def read_idx(path: str) -> torch.Tensor:
    """An IDX file (gzip) as a uint8 tensor: magic 0x0803 images (n, rows, cols) or 0x0801 labels (n,)."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).reshape(shape)


def load(root: str, split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images (n, 1, 28, 28) and labels of one split."""
    images, labels = (read_idx(os.path.join(root, name)) for name in FILES[split])
    images, labels = images[:limit], labels[:limit]
    return ((images.float() / 255 - MEAN) / STD).unsqueeze(1), labels.long()


def missing_files(root: str) -> list[str]:
    """The IDX files not found under ``root``."""
    return [name for pair in FILES.values() for name in pair if not os.path.isfile(os.path.join(root, name))]


def vgg_bn(config=(16, 16, "M", 32, 32, "M", 64, 64, "M"), classes: int = 10) -> nn.Module:
    """A small VGG: conv3×3-BN-ReLU blocks, max pooling, global pooling, one linear classifier."""
    layers: list[nn.Module] = []
    channels = 1
    for item in config:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(channels, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), nn.ReLU()]
            channels = item
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> float:
    """Top-1 accuracy in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    correct = sum(int((model(images[i:i + batch]).argmax(1) == labels[i:i + batch]).sum())
                  for i in range(0, len(images), batch))
    model.train(was_training)
    return correct / len(images)


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options; --quick sets a short run that still rejuvenates."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="folder with the four IDX gzip files")
    parser.add_argument("--quick", action="store_true", help="6k training images, 4 epochs, fast λ schedule")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--train-limit", type=int, default=None, help="use only the first N training images")
    parser.add_argument("--target", type=float, default=0.5, help="rejuvenate when r(θ) falls below this")
    parser.add_argument("--interval", type=int, default=50, help="steps between utilization checks (Δt)")
    parser.add_argument("--delta-r", type=float, default=0.01)
    parser.add_argument("--delta-lambda", type=float, default=5e-5)
    parser.add_argument("--max-rounds", type=int, default=None)
    parser.add_argument("--scheme", default="nr", choices=("nr", "cr", "ca"))
    parser.add_argument("--rescale", action="store_true", help="neural rescaling (NR-BR)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--progress", choices=("tqdm", "rich"), default=None)
    parser.add_argument("--history", default=None, help="write the r/λ history as JSON here")
    parser.add_argument("--plot", default=None, help="plot r(θ) and λ here (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.train_limit, args.batch_size = 4, args.train_limit or 6000, 64
        args.interval, args.delta_lambda, args.lr = 10, 2e-3, 0.05
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    missing = missing_files(args.data)
    if missing:
        print(f"Fashion-MNIST not found in {args.data} (missing: {', '.join(missing)}).\n"
              "Install it with:  sudo apt-get install dataset-fashion-mnist   (Debian/Ubuntu)\n"
              "or pass --data DIR with the four IDX gzip files.", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_x, train_y = load(args.data, "train", args.train_limit)
    test_x, test_y = load(args.data, "test", 2000 if args.quick else None)
    steps_per_epoch = (len(train_x) + args.batch_size - 1) // args.batch_size

    nr = nrfx.NeuralRejuvenation(
        vgg_bn(), lambda params: torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=1e-4),
        example_inputs=torch.zeros(2, 1, 28, 28), target=args.target, interval=args.interval,
        delta_r=args.delta_r, delta_lambda=args.delta_lambda, scheme=args.scheme, rescale=args.rescale,
        max_rounds=args.max_rounds, seed=args.seed,
        scheduler_factory=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs),
        progress=args.progress or False, total=args.epochs * steps_per_epoch)
    print(f"VGG-BN: {sum(p.numel() for p in nr.module.parameters()):,} params, budget {nr.budget.params:,}, "
          f"{len(train_x):,} training images")
    criterion = nn.CrossEntropyLoss()
    for epoch in range(args.epochs):
        start, total_loss = time.time(), 0.0
        order = torch.randperm(len(train_x))
        for i in range(steps_per_epoch):
            index = order[i * args.batch_size:(i + 1) * args.batch_size]
            loss = criterion(nr.model(train_x[index]), train_y[index])
            nr.optimizer.zero_grad()
            loss.backward()
            nr.step()
            total_loss += loss.item()
        nr.scheduler.step()
        last = nr.history[-1] if nr.history else {"r": 1.0}
        acc = accuracy(nr.model, test_x, test_y)
        print(f"epoch {epoch + 1}: loss {total_loss / steps_per_epoch:.4f}  test acc {acc:.4f}  "
              f"r {last['r']:.3f}  λ {nr.lam:.2e}  rounds {nr.rounds}  "
              f"params {sum(p.numel() for p in nr.module.parameters()):,}  ({time.time() - start:.0f}s)")
    nr.close()
    for record in nr.history:
        if record["event"] == "rejuvenate":
            print(f"rejuvenated at step {record['step']}: r {record['r']:.3f} → {record['r_after']:.3f}, "
                  f"λ was {record['lam_before']:.2e}, widths {record['widths']}")
    if args.history:
        nr.save_history(args.history)
    if args.plot and nr.plot_history(args.plot):
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
