"""DP training on the digits: Poisson sampling, keyed micro-batches, calibrated noise, an honest epsilon.

    python -m tutorials.dp_digits [--micro-batch-size 1] [--target-epsilon 8] [--epochs 30]

Data: scikit-learn's bundled load_digits (1437 training images). A small data set
means a large sampling rate (here 256/1437), so epsilons grow fast: this shows
the mechanics, not a state-of-the-art privacy/accuracy trade-off.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import dp_microclip

from .data import digits
from .demo_digits import accuracy
from dp_microclip import DP


def small_cnn_groupnorm() -> nn.Module:
    # GroupNorm, not BatchNorm: BatchNorm mixes examples, which DP mode refuses.
    # Few parameters: DP noise is added to every coordinate, so small models fare better.
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 2 * 2, 10),
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--micro-batch-size", type=int, default=1, help="1 for DP: b > 1 doubles the sensitivity")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=256, help="expected batch size q*N")
    parser.add_argument("--target-epsilon", type=float, default=8.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--accountant", default="prv", choices=["prv", "rdp", "pld"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    torch.manual_seed(args.seed)
    train_set, test_set, _ = digits(seed=args.seed)
    model = small_cnn_groupnorm()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.5)
    engine = dp_microclip.attach(
        model, optimizer, micro_batch_size=args.micro_batch_size, max_grad_norm=args.max_grad_norm,
        privacy=DP(target_epsilon=args.target_epsilon, delta=args.delta, epochs=args.epochs, sample_rate=args.batch_size / len(train_set), accountant=args.accountant),
    )
    print(f"calibrated noise multiplier z = {engine.noise_multiplier:.3f} "
          f"(b={args.micro_batch_size}: the accountant sees z/2 when b > 1)")
    loader = engine.data_loader(train_set)
    try:
        from tqdm import tqdm as progress
    except ImportError:
        def progress(it, desc=""):
            return it
    for _ in progress(range(args.epochs), desc="DP training"):
        for x, y in loader:
            optimizer.zero_grad()
            engine.loss(F.cross_entropy, model(x), y, reduction="none").backward()  # per-example losses, checked
            optimizer.step()
    print(f"\ntest accuracy: {accuracy(model, test_set):.4f}")
    print(f"epsilon = {engine.epsilon():.3f} at delta = {args.delta}\n")
    print(engine.privacy_statement())
    engine.detach()


if __name__ == "__main__":
    main()
