"""User-level DP on real users, small scale: Debian's package index, maintainers as users, section as the label.

Data: ``apt-cache dumpavail`` (the package lists already on the machine, or after ``apt-get update``):
one example per package, its Maintainer field as the user, its Section (without ``contrib/`` or
``non-free/``) as the label, restricted to the 8 largest sections; features are hashed word counts of
the package name and the short description (512 buckets, L2-normalised), the model a linear softmax.
Train and test are split by maintainer (80% / 20% of users), so test users were never trained on.

Three recipes at ONE user-level (epsilon, delta), each with the epsilon it would report for a user:

* (a) ``user``: users Poisson-sampled at q, at most k examples each, one clipped micro-batch per user
  (``DP(privacy_unit="user", max_examples_per_user=k)``); sensitivity C.
* (b) ``one-per-user``: the same user sampling with k = 1 (dp-transformers' recipe: sample users, one
  example each, per-example clipping).
* (c) ``example+group``: example-level DP-SGD (examples sampled at the same expected batch size, b = 1)
  with the noise calibrated so that group privacy over the largest contribution m_max gives the target:
  (eps/m_max, delta/(m_max e^eps)) per example gives (eps, delta) per user.

Small-scale and untuned (one learning rate, one k, a few seeds, 1 thread): a sanity check of the
mechanism on natural users, not a benchmark. Run: ``nice -n 19 python -m experiments.user_level``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import time
import zlib
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import dp_microclip
from accounting import noise_multiplier_for_epsilon
from dp_microclip import DP

RESULTS = Path(__file__).resolve().parent / "results"
DIM, SECTIONS = 512, 8


def load_debian():
    """(features, labels, maintainer ids, section names) from ``apt-cache dumpavail``."""
    text = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True, check=True).stdout
    rows = []
    for block in text.split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+): ?(.*)$", block, re.M))
        if {"Package", "Maintainer", "Section", "Description"} <= fields.keys():
            rows.append((fields["Package"], fields["Maintainer"].strip(), fields["Section"].split("/")[-1],
                         fields["Description"]))
    top = [s for s, _ in Counter(r[2] for r in rows).most_common(SECTIONS)]
    rows = [r for r in rows if r[2] in top]
    x = torch.zeros(len(rows), DIM)
    for i, (name, _, _, desc) in enumerate(rows):
        for word in re.findall(r"[a-z0-9]+", f"{name} {desc}".lower()):
            x[i, zlib.crc32(word.encode()) % DIM] += 1.0
    x = x / x.norm(dim=1, keepdim=True).clamp(min=1e-6)
    labels = torch.tensor([top.index(r[2]) for r in rows])
    names = {m: j for j, m in enumerate(dict.fromkeys(r[1] for r in rows))}
    users = torch.tensor([names[r[1]] for r in rows])
    return x, labels, users, top


def split_by_user(users: torch.Tensor, seed: int = 0, test_share: float = 0.2):
    """Boolean masks (train, test): a random 20% of maintainers go to test with all their packages."""
    g = torch.Generator().manual_seed(seed)
    num = int(users.max()) + 1
    test_users = torch.randperm(num, generator=g)[: int(test_share * num)]
    test = torch.isin(users, test_users)
    return ~test, test


def train_one(recipe, x, y, users, x_test, y_test, *, eps, delta, steps, k, users_per_step, lr, seed):
    """Train a linear model with one recipe; returns (test accuracy, z, the user-level epsilon it reports)."""
    torch.manual_seed(seed)
    model = nn.Linear(DIM, SECTIONS)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    num_users = int(users.unique().numel())
    m_max = int(torch.bincount(users).max())
    ds = TensorDataset(x, y)
    if recipe == "example+group":
        q = users_per_step * k / len(x)  # roughly the same expected number of examples per step as (a)
        eps_ex, delta_ex = eps / m_max, delta / (m_max * math.exp(eps))
        try:
            z = noise_multiplier_for_epsilon(eps_ex, delta_ex, sample_rate=q, steps=steps, accountant="rdp")
        except ValueError:  # no z <= 1e6 reaches eps / m_max: train at (a)'s z and report what group privacy gives
            z = noise_multiplier_for_epsilon(eps, delta, sample_rate=users_per_step / int(users.unique().numel()),
                                             steps=steps, accountant="rdp")
        privacy = DP(noise_multiplier=z, sample_rate=q, delta=delta_ex, accountant="rdp")
        engine = dp_microclip.attach(model, opt, micro_batch_size=1, max_grad_norm=1.0, privacy=privacy, seed=seed)
        loader = engine.data_loader(ds)
    else:
        kk = k if recipe == "user" else 1
        q = users_per_step / num_users
        z = noise_multiplier_for_epsilon(eps, delta, sample_rate=q, steps=steps, accountant="rdp")
        privacy = DP(noise_multiplier=z, sample_rate=q, delta=delta, accountant="rdp", privacy_unit="user",
                     max_examples_per_user=kk)
        engine = dp_microclip.attach(model, opt, micro_batch_size=kk, max_grad_norm=1.0, privacy=privacy, seed=seed)
        loader = engine.data_loader(ds, user_ids=users)
    done = 0
    while done < steps:
        for xb, yb in loader:
            opt.zero_grad()
            engine.loss(F.cross_entropy, model(xb), yb, reduction="none").backward()  # an empty batch gives 0
            opt.step()
            done += 1
            if done == steps:
                break
    if recipe == "example+group":
        e = engine.epsilon()
        user_eps = m_max * e  # group privacy over the largest contribution, at delta m e^{(m-1) e} delta_ex <= delta
    else:
        user_eps = engine.epsilon()
    with torch.no_grad():
        acc = float((model(x_test).argmax(1) == y_test).float().mean())
    return acc, z, user_eps


def main(argv=None):
    """Run the three recipes over a few seeds and write results/user-level.{json,md}."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--eps", type=float, default=4.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--users-per-step", type=float, default=64)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    x, y, users, sections = load_debian()
    train, test = split_by_user(users)
    tr_users = torch.unique(users[train], return_inverse=True)[1]
    counts = torch.bincount(tr_users)
    info = dict(examples=len(y), train_examples=int(train.sum()), train_users=int(counts.numel()),
                max_per_user=int(counts.max()), median_per_user=float(counts.median()), sections=sections,
                majority_test_accuracy=float((y[test] == torch.bincount(y[train]).argmax()).float().mean()))
    print(info)
    results = []
    for recipe in ("user", "one-per-user", "example+group"):
        for seed in range(a.seeds):
            t0 = time.time()
            acc, z, user_eps = train_one(recipe, x[train], y[train], tr_users, x[test], y[test], eps=a.eps,
                                         delta=a.delta, steps=a.steps, k=a.k, users_per_step=a.users_per_step,
                                         lr=a.lr, seed=seed)
            results.append(dict(recipe=recipe, seed=seed, accuracy=acc, z=z, user_epsilon=user_eps,
                                seconds=time.time() - t0))
            print(results[-1], flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "user-level.json").write_text(json.dumps(dict(settings=vars(a), data=info, runs=results), indent=1))
    lines = [f"Debian package index, maintainers as users ({info['train_users']} train users, "
             f"{info['train_examples']} train packages, largest contribution {info['max_per_user']}); "
             f"target user-level epsilon {a.eps} at delta {a.delta}, {a.steps} steps, k={a.k}, "
             f"{a.users_per_step:g} users per step, {a.seeds} seeds. Small-scale, untuned. Majority-class test "
             f"accuracy {info['majority_test_accuracy']:.3f}.", "",
             "| recipe | test accuracy (mean ± sd over seeds) | engine z | user-level epsilon reported |",
             "|---|---|---|---|"]
    for recipe in ("user", "one-per-user", "example+group"):
        rs = [r for r in results if r["recipe"] == recipe]
        accs = torch.tensor([r["accuracy"] for r in rs])
        sd = float(accs.std()) if len(rs) > 1 else 0.0
        lines.append(f"| {recipe} | {float(accs.mean()):.3f} ± {sd:.3f} | {rs[0]['z']:.3g} | "
                     f"{max(r['user_epsilon'] for r in rs):.3g} |")
    (out / "user-level.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
