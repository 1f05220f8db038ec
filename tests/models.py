"""Small models and batches for the equality tests: one per layer type, plus three whole models."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MeanOver(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return x.mean(self.dim)


class Scale(nn.Module):
    """A module with no rule whose parameter goes through ``exp``, which the usage route does not recognise:
    exercises the generic torch.func path."""

    def __init__(self, n: int):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x):
        return torch.tanh(x * self.w.exp())


class SelfAttentionBlock(nn.Module):
    def __init__(self, d: int = 8, heads: int = 2, batch_first: bool = True):
        super().__init__()
        self.batch_first = batch_first
        self.attn = nn.MultiheadAttention(d, heads, batch_first=batch_first)

    def forward(self, x):
        out, _ = self.attn(x, x, x, need_weights=False)
        return out


class TinyTransformer(nn.Module):
    """Embedding + PyTorch's own, unchanged nn.TransformerEncoder (seq-first) + Linear head."""

    def __init__(self, vocab=13, d=16, heads=2, layers=2, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=32, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens):  # tokens: (B, T)
        h = self.embed(tokens).transpose(0, 1)  # (T, B, d)
        h = self.encoder(h)  # (T, B, d)
        return self.head(h.mean(0))


def _cls(n_in, classes=3):
    return nn.Sequential(nn.Flatten(), nn.Linear(n_in, classes))


def layer_cases(batch: int):
    """name -> (model factory, inputs factory). Inputs: (B, ...) tensors."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    return {
        "linear": (lambda: nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)), lambda: randn(batch, 6)),
        "linear_seq": (
            lambda: nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace=True), MeanOver(1), nn.Linear(5, 3)),
            lambda: randn(batch, 4, 6),
        ),
        "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.Tanh(), _cls(40)), lambda: randn(batch, 3, 10)),
        "conv2d": (
            lambda: nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.Tanh(),
                                  nn.Conv2d(4, 4, 3, groups=2, padding="same", padding_mode="reflect"), _cls(64)),
            lambda: randn(batch, 2, 7, 7),
        ),
        "embedding": (
            lambda: nn.Sequential(nn.Embedding(11, 5, padding_idx=0), MeanOver(1), nn.Linear(5, 3)),
            lambda: torch.randint(0, 11, (batch, 6), generator=g),
        ),
        "layernorm": (
            lambda: nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6), nn.Linear(6, 3)), lambda: randn(batch, 6)
        ),
        "groupnorm": (
            lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), _cls(4 * 3 * 3)), lambda: randn(batch, 2, 5, 5)
        ),
        "rmsnorm": (lambda: nn.Sequential(nn.Linear(6, 6), nn.RMSNorm(6), nn.Linear(6, 3)), lambda: randn(batch, 6)),
        "mha": (lambda: nn.Sequential(SelfAttentionBlock(8, 2), MeanOver(1), nn.Linear(8, 3)), lambda: randn(batch, 5, 8)),
        "mha_seq_first": (
            lambda: nn.Sequential(nn.Linear(8, 8), SelfAttentionBlock(8, 2, batch_first=False), MeanOver(0), nn.Linear(8, 3)),
            lambda: randn(5, batch, 8),
        ),
        "generic": (lambda: nn.Sequential(nn.Linear(6, 5), Scale(5), nn.Linear(5, 3)), lambda: randn(batch, 6)),
    }


def whole_model_cases(batch: int):
    g = torch.Generator().manual_seed(1)
    return {
        "mlp": (
            lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)),
            lambda: torch.randn(batch, 1, 8, 8, generator=g),
        ),
        "cnn": (
            lambda: nn.Sequential(
                nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 10),
            ),
            lambda: torch.randn(batch, 1, 8, 8, generator=g),
        ),
        "transformer": (lambda: TinyTransformer(), lambda: torch.randint(0, 13, (batch, 6), generator=g)),
    }


def batch_dim_of(case: str) -> int:
    return 1 if case == "mha_seq_first" else 0


def loss_fn(output, target):
    return F.cross_entropy(output, target)
