"""The benchmark workloads: three models, their default batch sizes and seeded synthetic batches.

Every model is built from a fixed seed, so every method starts from the same
weights (``Workload.initial_state``) and sees the same batch. No GroupNorm or
BatchNorm anywhere, so Opacus runs the same models without changes (except the
transformer's attention, which Opacus only accepts after ``ModuleValidator.fix``).

Extra models (``--models``, and the GPU run ``benchmarks/gpu.py``): small
Hugging Face BERT (sequence classification), GPT-2 and LLaMA (causal LM), built
from a config with ``transformers`` (no weights, no download): d=256, 4 layers,
4 heads, T=128, B=32, dropout 0; ``*_tiny`` variants (d=32, 2 layers, T=16, B=8)
for smoke tests.

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
#: Hugging Face models built from a config (no weights, no download): need ``transformers``.
#: ``<name>`` is d=256, 4 layers, 4 heads; ``<name>_tiny`` (smoke tests) d=32, 2 layers, 2 heads.
HF_MODELS = ("bert", "gpt2", "llama")
HF_TINY = tuple(f"{m}_tiny" for m in HF_MODELS)
#: Of those, the causal language models: per-token targets (B, T), logits returned as (B, vocab, T).
LM_MODELS = ("gpt2", "llama", "gpt2_tiny", "llama_tiny")
#: Extra models one can ask for with --models (not in the default run).
EXTRA_MODELS = ("transformer_seqfirst",) + HF_MODELS + HF_TINY
DEFAULT_BATCH = {"mlp": 256, "cnn": 128, "transformer": 32, "transformer_seqfirst": 32,
                 **{m: 32 for m in HF_MODELS}, **{m: 8 for m in HF_TINY}}
DEFAULT_SEQ = 64
#: Sequence length of the Hugging Face models (d=256, 4 layers, 4 heads).
HF_SEQ = 128
HF_WIDTH = 256
HF_LAYERS = 4
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


def hf_available() -> bool:
    try:
        import transformers  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


class HFWrapper(nn.Module):
    """A Hugging Face model called as ``model(tokens)``, returning logits in the layout ``loss_fn`` takes.

    Sequence classification (BERT): ``(B, classes)``. Causal LM (GPT-2, LLaMA):
    ``(B, vocab, T)``, so ``F.cross_entropy`` against ``(B, T)`` targets is the mean
    over all tokens, which (every example has T tokens) is the mean over examples
    of per-example means: the ``loss_reduction="mean"`` the engine and Opacus expect.

    ``position_ids`` are passed expanded to ``(B, T)``: left to the model, BERT and
    GPT-2 feed their position embedding one ``(1, T)`` row shared by the batch,
    which the engine refuses (it cannot split a shared input per example) and
    asks the user to expand, as done here. Same function either way.
    """

    def __init__(self, model: nn.Module, lm: bool):
        super().__init__()
        self.model = model
        self.lm = lm

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand(tokens.shape[0], -1)
        logits = self.model(input_ids=tokens, position_ids=positions).logits
        return logits.transpose(1, 2) if self.lm else logits


def build_hf_model(name: str, d: int = HF_WIDTH, layers: int = HF_LAYERS, heads: int = 4,
                   seq: int = HF_SEQ) -> nn.Module:
    """BERT (sequence classification), GPT-2 or LLaMA (causal LM) from a small config; dropout 0."""
    import transformers as tf

    if name == "bert":
        cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=4 * d, max_position_embeddings=max(seq, 512),
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=CLASSES)
        return HFWrapper(tf.BertForSequenceClassification(cfg), lm=False)
    if name == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_positions=max(seq, 128), n_embd=d, n_layer=layers, n_head=heads,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return HFWrapper(tf.GPT2LMHeadModel(cfg), lm=True)
    if name == "llama":
        cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=d, intermediate_size=4 * d, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=heads,
                             max_position_embeddings=max(seq, 128), attention_dropout=0.0)
        return HFWrapper(tf.LlamaForCausalLM(cfg), lm=True)
    raise ValueError(f"unknown Hugging Face model {name!r}; choose from {', '.join(HF_MODELS)}")


class PerExampleCrossEntropy(nn.Module):
    """Cross-entropy with one loss per example (the mean over its tokens), for Opacus' criterion.

    Opacus' ghost clipping sets ``criterion.reduction = "none"`` and needs a ``(B,)``
    result; ``nn.CrossEntropyLoss`` would give ``(B, T)`` on language-model logits.
    With ``"mean"`` it equals :func:`loss_fn`.
    """

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per = F.cross_entropy(output, target, reduction="none")
        per = per.flatten(1).mean(1) if per.dim() > 1 else per  # (B,)
        if self.reduction == "none":
            return per
        return per.mean() if self.reduction == "mean" else per.sum()


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
    if name in HF_MODELS:
        return build_hf_model(name)
    if name in HF_TINY:
        return build_hf_model(name[: -len("_tiny")], d=32, layers=2, heads=2, seq=16)
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
        if self.seq_len is not None:
            self.inputs = torch.randint(0, VOCAB, (b, self.seq_len), generator=g)  # (B, T)
        else:
            self.inputs = torch.randn(b, 1, 28, 28, generator=g)  # (B, 1, 28, 28)
        if self.model in LM_MODELS:
            self.targets = torch.randint(0, VOCAB, (b, self.seq_len), generator=g)  # next-token-like (B, T)
        else:
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
    if name in HF_MODELS + HF_TINY:
        seq = seq_len or (HF_SEQ if name in HF_MODELS else 16)
    else:
        seq = (seq_len or DEFAULT_SEQ) if name.startswith("transformer") else None
    return Workload(name, batch_size or DEFAULT_BATCH[name], seq, torch.device(device), seed)
