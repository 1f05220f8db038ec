"""Offline data for the tutorials: scikit-learn's bundled handwritten digits (no download).

1797 real 8x8 digits, 10 classes, shipped inside the scikit-learn wheel.
Optionally flips a known fraction of training labels: controlled "draggers",
the examples micro-batch clipping is meant to mute (Wang, "Revisit
Micro-batch Clipping", 2024).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset


def digits(test_fraction: float = 0.2, label_noise: float = 0.0, seed: int = 0):
    """Stratified train/test split of ``load_digits`` as ``TensorDataset``s of (1, 8, 8) images.

    Returns:
        ``(train, test, flipped)``; ``flipped`` is the bool mask of training
        examples whose label was replaced by a different random class.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=seed)
    rng = np.random.default_rng(seed)
    flipped = rng.random(len(y_tr)) < label_noise
    y_tr = y_tr.copy()
    y_tr[flipped] = (y_tr[flipped] + rng.integers(1, 10, flipped.sum())) % 10
    train = TensorDataset(torch.from_numpy(x_tr), torch.from_numpy(y_tr))
    test = TensorDataset(torch.from_numpy(x_te), torch.from_numpy(y_te))
    return train, test, torch.from_numpy(flipped)
