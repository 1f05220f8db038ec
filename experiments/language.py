"""Language: topic classification of Debian fortunes (real English text, offline) with a small embedding model.

    python -m experiments.language [--seeds 10] [--tune-seeds 2] [--quick]

Data: the ``fortunes`` and ``fortunes-min`` Debian packages (``apt-get install -y
fortunes fortunes-min``), seven category files as classes (computers, science,
wisdom, linux, law, food, politics; about 3,500 entries). Words are lower-cased,
the 1,000 most frequent training words kept. Input: the L2-normalised
bag-of-words vector; model: a 32-unit hidden layer and a linear head (an
embedding-bag model trained several times slower per run under SGD here). Plain SGD
against fixed and adaptive micro-batch clipping at b in {1, 8, 64} (C = 1), each
tuned on validation with tuning seeds 1000, 1001, then scored over paired
reporting seeds 0..n-1; every seed draws its own 60/20/20 split (and vocabulary).
"""

from __future__ import annotations

import collections
import re
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dp_microclip.tools.sweep import SweepSettings

from .common import run_sweep, setup, write_summary

FORTUNES = Path("/usr/share/games/fortunes")
CATEGORIES = ("computers", "science", "wisdom", "linux", "law", "food", "politics")
VOCAB = 1000


def load_fortunes(categories=CATEGORIES, seed: int = 0):
    """Train/val/test (60/20/20, stratified) tensors ``(bag of words (N, 1000), label)`` and the vocabulary size.

    Raises:
        SystemExit: with the install command when the fortunes files are missing.
    """
    texts, labels = [], []
    for label, name in enumerate(categories):
        path = FORTUNES / name
        if not path.exists():
            raise SystemExit(f"{path} is missing: install the data with `apt-get install -y fortunes fortunes-min`.")
        for entry in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            words = re.findall(r"[a-z']+", entry.lower())
            if len(words) >= 3:
                texts.append(words)
                labels.append(label)
    labels = np.array(labels)
    rng = np.random.default_rng(seed)
    split = np.empty(len(labels), dtype=int)
    for c in range(len(categories)):  # stratified 60/20/20
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = len(idx)
        split[idx[: int(0.6 * n)]], split[idx[int(0.6 * n): int(0.8 * n)]], split[idx[int(0.8 * n):]] = 0, 1, 2
    counts = collections.Counter(w for t, s in zip(texts, split) if s == 0 for w in t)
    vocab = {w: i for i, (w, _) in enumerate(counts.most_common(VOCAB))}
    ids = torch.zeros(len(texts), VOCAB)
    for i, t in enumerate(texts):
        for w in t:
            if w in vocab:
                ids[i, vocab[w]] = 1.0
    ids = ids / ids.norm(dim=1, keepdim=True).clamp(min=1e-6)
    y = torch.from_numpy(labels)
    parts = [(ids[torch.from_numpy(split == s)], y[torch.from_numpy(split == s)]) for s in range(3)]
    return parts, VOCAB


def bow_mlp(vocab: int, classes: int, hidden: int = 32) -> nn.Module:
    """Bag of words -> 32 hidden units (ReLU) -> classes."""
    return nn.Sequential(nn.Linear(vocab, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def main(argv=None) -> None:
    args = setup(__doc__.split("\n\n")[0], argv, lambda p: p.add_argument("--epochs", type=int, default=10))
    out = Path(args.out)
    start = time.perf_counter()
    (train, val, test), vocab = load_fortunes()
    epochs = 5 if args.quick else args.epochs
    settings = SweepSettings(methods=("plain", "fixed", "adaptive"), micro_batch_sizes=(1, 8, 64),
                             seeds=tuple(range(args.seeds)), learning_rates=(0.03, 0.1, 0.3, 1.0, 3.0),
                             tune_seeds=args.tune_seeds, max_grad_norms=(1.0,), batch_size=64, epochs=epochs,
                             name="language-fortunes-split-per-seed")
    result, seconds = run_sweep(lambda: bow_mlp(vocab, len(CATEGORIES)), lambda seed: load_fortunes(seed=seed)[0],
                                None, None, settings, out, "language-sweep", progress=not args.no_progress)
    total = time.perf_counter() - start
    text = (f"Debian fortunes, {len(CATEGORIES)} categories ({', '.join(CATEGORIES)}); {len(train[1])} train / "
            f"{len(val[1])} val / {len(test[1])} test entries (seed 0; each seed its own split); bag of words + MLP 1000-32-7; SGD momentum 0.9, batch 64, "
            f"{epochs} epochs, {args.seeds} paired reporting seeds, {args.tune_seeds} tuning seeds, one CPU thread; this invocation took {total:.0f} s (runs already in the store are read back, not retrained).\n\n"
            f"{result.to_markdown()}\n\n![](language-sweep-vs-b.png)\n")
    write_summary(out, "language", "Language: fortunes topic classification", text,
                  {"table": result.table(), "seconds": total, "categories": CATEGORIES})
    print(text)


if __name__ == "__main__":
    main()
