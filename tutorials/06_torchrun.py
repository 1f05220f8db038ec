"""06 Several processes: DP training with ``dp_microclip.distributed`` under torchrun.

    torchrun --standalone --nproc-per-node 2 tutorials/06_torchrun.py

What this shows (explained in tutorials/06_torchrun.md): two CPU processes (gloo) train one
model with DP-SGD at micro_batch_size=1. Every rank runs this whole file. ``mcd.attach``
checks that the ranks agree, broadcasts the weights and one engine seed from rank 0 (drawn
from the OS: no seed is passed), and ``mcd.data_loader`` gives each rank its share of ONE
global Poisson batch per step; the clipped sums are combined before one noise draw. The
epsilon is that of a one-process run with the same q, z and steps. Data: scikit-learn's
bundled digits (no download). About 15 s on 2 CPU cores.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import dp_microclip
import dp_microclip.distributed as mcd
from tutorials.data import digits


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)                      # data split and initialisation only (rank 0's weights are broadcast)
    train_set, test_set, _ = digits(seed=0)   # the WHOLE dataset on every rank: the loader picks each rank's share
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.5)
    epochs, q = 15, 256 / len(train_set)      # q describes the GLOBAL batch
    engine = mcd.attach(model, optimizer, micro_batch_size=1, max_grad_norm=1.0,
                        privacy=dp_microclip.DP(target_epsilon=8.0, delta=1e-5, sample_rate=q, epochs=epochs))

    shares = []
    for _ in range(epochs):
        for x, y in mcd.data_loader(engine, train_set):
            shares.append(len(y))
            optimizer.zero_grad()
            # Per-example losses, checked and reduced by the engine; an empty share gives 0 and still steps.
            engine.loss(F.cross_entropy, model(x), y, reduction="none").backward()
            optimizer.step()                                             # one all-reduce, then the same noise everywhere

    # The ranks hold the same model: compare a checksum of the parameters.
    checksum = torch.tensor([sum(float(p.double().sum()) for p in model.parameters())], dtype=torch.float64)
    sums = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(sums, checksum)
    all_shares = [None] * world
    dist.all_gather_object(all_shares, shares)
    if rank == 0:
        for r, s in enumerate(all_shares):
            print(f"rank {r}: {len(s)} steps; its shares of the first 5 global batches: {s[:5]}")
        print(f"global batch sizes (expected 256): {[sum(s[i] for s in all_shares) for i in range(5)]}")
        x, y = test_set.tensors
        with torch.no_grad():
            acc = (model(x).argmax(1) == y).float().mean().item()
        print(f"world size {world}; calibrated z = {engine.noise_multiplier:.3f}")
        print(f"parameter checksums on the ranks: {[round(float(s), 10) for s in sums]} (identical: "
              f"{len({float(s) for s in sums}) == 1})")
        print(f"test accuracy {acc:.4f}; epsilon = {engine.epsilon():.3f} at delta = 1e-05 (same on every rank)")
    engine.detach()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
