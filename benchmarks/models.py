"""The benchmark workloads: three models, their default batch sizes and seeded synthetic batches.

Every model is built from a fixed seed, so every method starts from the same
weights (``Workload.initial_state``) and sees the same batch. No GroupNorm or
BatchNorm anywhere, so Opacus runs the same models without changes (except the
transformer's attention, which Opacus only accepts after ``ModuleValidator.fix``).

Letters: B batch size, T sequence length, d model width.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

#: The models of the default run, in order.
MAIN_MODELS = ("mlp", "cnn", "transformer")
#: Extra models one can ask for with --models (not in the default run).
EXTRA_MODELS = ("transformer_seqfirst",)
DEFAULT_BATCH = {"mlp": 256, "cnn": 128, "transformer": 32, "transformer_seqfirst": 32}
DEFAULT_SEQ = 64
VOCAB = 1000
CLASSES = 10


class MLP(nn.Sequential):
    """784-512-512-10 with ReLU, on (B, 1, 28, 28) inputs."""

    def __init__(self):
        super().__init__(
            nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, CLASSES)
        )


class CNN(nn.Sequential):
    """Two 5x5 convolutions with max-pooling, then 512-128-10 (no normalisation layers)."""

    def __init__(self):
        super().__init__(
            nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2),  # (B, 16, 12, 12)
            nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, 4, 4)
            nn.Flatten(), nn.Linear(32 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, CLASSES),
        )


class TransformerClassifier(nn.Module):
    """Embedding + PyTorch's own, unchanged ``nn.TransformerEncoder`` + a Linear head on the mean over positions.

    2 layers, d=128, 4 heads, feed-forward 512, dropout 0 (so every method computes
    the same function and gradients can be compared). ``batch_first`` picks the
    encoder's layout: True (the default here) feeds (B, T, d); False feeds
    (T, B, d), torch's own default for ``nn.TransformerEncoderLayer``.
    """

    def __init__(self, batch_first: bool = True, d: int = 128, heads: int = 4, layers: int = 2, ff: int = 512):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(VOCAB, d)
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=ff, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens: (B, T)
        h = self.embed(tokens)  # (B, T, d)
        if not self.batch_first:
            h = h.transpose(0, 1)  # (T, B, d)
        h = self.encoder(h)
        return self.head(h.mean(1 if self.batch_first else 0))  # (B, classes)


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the batch (the engine's default ``loss_reduction="mean"``)."""
    return F.cross_entropy(output, target)


def build_model(name: str) -> nn.Module:
    if name == "mlp":
        return MLP()
    if name == "cnn":
        return CNN()
    if name == "transformer":
        return TransformerClassifier(batch_first=True)
    if name == "transformer_seqfirst":
        return TransformerClassifier(batch_first=False)
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MAIN_MODELS + EXTRA_MODELS)}")


@dataclass
class Workload:
    """One model at one batch shape: the initial weights and the batch every method uses."""

    model: str
    batch_size: int
    seq_len: int | None
    device: torch.device
    seed: int = 0
    initial_state: dict = field(init=False, repr=False)
    inputs: torch.Tensor = field(init=False, repr=False)
    targets: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        torch.manual_seed(self.seed)
        self.initial_state = copy.deepcopy(build_model(self.model).state_dict())
        g = torch.Generator().manual_seed(self.seed + 1)
        b = self.batch_size
        if self.model.startswith("transformer"):
            self.inputs = torch.randint(0, VOCAB, (b, self.seq_len), generator=g)  # (B, T)
        else:
            self.inputs = torch.randn(b, 1, 28, 28, generator=g)  # (B, 1, 28, 28)
        self.targets = torch.randint(0, CLASSES, (b,), generator=g)
        self.inputs = self.inputs.to(self.device)
        self.targets = self.targets.to(self.device)

    @property
    def tag(self) -> str:
        seq = f", T={self.seq_len}" if self.seq_len else ""
        return f"{self.model} (B={self.batch_size}{seq})"

    def fresh_model(self) -> nn.Module:
        """A new model with the workload's initial weights, on the workload's device, in train mode."""
        model = build_model(self.model)
        model.load_state_dict(self.initial_state)
        return model.to(self.device).train()


def make_workload(name: str, device, batch_size: int | None = None, seq_len: int | None = None, seed: int = 0):
    seq = (seq_len or DEFAULT_SEQ) if name.startswith("transformer") else None
    return Workload(name, batch_size or DEFAULT_BATCH[name], seq, torch.device(device), seed)
