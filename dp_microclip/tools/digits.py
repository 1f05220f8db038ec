"""The command line's built-in task: scikit-learn's bundled digits (no download) and a small MLP.

Kept apart from :mod:`dp_microclip.tools.sweep`, which works on any model and data, so that the sweep's
machinery reads without this one task's data handling.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import ConfigurationError

__all__ = ["digits_splits", "digits_mlp"]


def digits_splits(label_noise: float = 0.0, seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2):
    """scikit-learn's bundled digits (no download) as flat 64-d train/val/test tensors, plus the flipped mask.

    ``label_noise`` flips that fraction of training and validation labels to another class
    (the validation split is as noisy as the training data, as a user's would be; the test
    labels stay clean). ``seed`` draws both the split and the flips: give each seed its own.
    Returns ``(train, val, test, flipped_train)``.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise ConfigurationError("The digits task needs scikit-learn: pip install scikit-learn.") from exc
    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    x_rest, x_te, y_rest, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=seed)
    x_tr, x_val, y_tr, y_val = train_test_split(x_rest, y_rest, test_size=val_fraction / (1 - test_fraction),
                                                stratify=y_rest, random_state=seed)
    rng = np.random.default_rng(seed)

    def flip(labels):
        mask = rng.random(len(labels)) < label_noise
        labels = labels.copy()
        labels[mask] = (labels[mask] + rng.integers(1, 10, mask.sum())) % 10
        return labels, mask

    y_tr, flipped = flip(y_tr)
    y_val, _ = flip(y_val)
    t = torch.from_numpy
    return (t(x_tr), t(y_tr)), (t(x_val), t(y_val)), (t(x_te), t(y_te)), t(flipped)


def digits_mlp(hidden: int = 128) -> nn.Module:
    """The default model of ``dp-microclip sweep``: 64 -> hidden -> 10 with ReLU."""
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
