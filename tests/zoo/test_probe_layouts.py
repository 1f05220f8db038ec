"""Layouts the probe learns, and the ones it refuses: the batch is never guessed from a size.

Each case is what a user writes, attached without any layout declaration, against the naive loop (float64,
b in {1, 2, B}, T == B and T != B):

* sequence-first inputs next to a batch-first padding mask (each input cut along its own batch dimension);
* sequence-first models whose head is batch-first (LSTM / GRU on ``h_n[-1]``, an encoder with mean pooling);
* a feed-forward on flattened ``(B*T, d)`` token rows, example-major and time-major, and window attention
  on ``(B*windows, ...)``: learned row maps;
* mixtures of experts whose experts see a data-dependent subset of token rows, one of them built so that
  each expert receives exactly B rows (the size follows the batch by coincidence): refused, never guessed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dp_microclip.errors import BatchError

from .data import CLASSES, VOCAB, lengths
from .harness import B, ZooCase, assert_matches, compare, zoo_params

D = 8


def _mean_ce(logits, y):
    return F.cross_entropy(logits, y)


def _labels(B, g):
    return torch.randint(0, CLASSES, (B,), generator=g)


# ------------------------------------------------------------------ sequence-first input + batch-first mask
class MaskedSeqFirstEncoder(nn.Module):
    """nn.TransformerEncoder at its default batch_first=False, a padding mask (B, T) as PyTorch requires."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(D, 2, dim_feedforward=16, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, src, mask):  # src (T, B, D), mask (B, T) True at padding
        h = self.encoder(src, src_key_padding_mask=mask)  # (T, B, D)
        keep = (~mask).T.unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(0) / keep.sum(0))


def _masked_batch(B, T, dtype, g):
    n = lengths(B, T)
    mask = torch.arange(T)[None, :] >= n[:, None]
    return {"src": torch.randn(T, B, D, generator=g, dtype=dtype), "mask": mask}, _labels(B, g)


def _bare_encoder(T=None):
    layer = nn.TransformerEncoderLayer(D, 2, dim_feedforward=16, dropout=0.0)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


_PROJ = torch.randn(D, CLASSES, generator=torch.Generator().manual_seed(7))


def _bare_loss(out, y):  # out (T, B, D)
    return F.cross_entropy(out.mean(0) @ _PROJ.to(out.dtype), y)


# ------------------------------------------------------------------ sequence-first models, batch-first heads
class SeqFirstRNN(nn.Module):
    """LSTM / GRU at batch_first=False on a (T, B, D) input; the head reads h_n[-1] (B, H)."""

    def __init__(self, kind):
        super().__init__()
        self.rnn = kind(D, 12, num_layers=2, batch_first=False)
        self.head = nn.Linear(12, CLASSES)

    def forward(self, x):
        _, h = self.rnn(x)
        h = h[0] if isinstance(h, tuple) else h
        return self.head(h[-1])


class SeqFirstPooled(nn.Module):
    """A sequence-first encoder (T, B, D) with mean pooling over time and a batch-first head."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(D, D)
        layer = nn.TransformerEncoderLayer(D, 2, dim_feedforward=16, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, x):
        return self.head(self.encoder(self.inp(x)).mean(0))


def _seq_first_batch(B, T, dtype, g):
    return {"x": torch.randn(T, B, D, generator=g, dtype=dtype)}, _labels(B, g)


# ------------------------------------------------------------------ flattened token rows
class FlatFFN(nn.Module):
    """Embedding -> (B*T, d) rows -> feed-forward -> back to (B, T, d) -> mean -> head.

    ``time_major``: the rows are flattened from (T, B, d) instead (row r belongs to example r % B)."""

    def __init__(self, time_major=False):
        super().__init__()
        self.time_major = time_major
        self.embed = nn.Embedding(VOCAB, D)
        self.up = nn.Linear(D, 16)
        self.down = nn.Linear(16, D)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, ids):
        x = self.embed(ids)  # (B, T, D)
        b, t, d = x.shape
        rows = x.transpose(0, 1).reshape(t * b, d) if self.time_major else x.reshape(b * t, d)
        rows = self.norm(rows + self.down(torch.tanh(self.up(rows))))
        x = rows.reshape(t, b, d).transpose(0, 1) if self.time_major else rows.reshape(b, t, d)
        return self.head(x.mean(1))


def _ids_batch(B, T, dtype, g):
    return {"ids": torch.randint(0, VOCAB, (B, T), generator=g)}, _labels(B, g)


class WindowAttention(nn.Module):
    """Swin-style: a (B, H, W, C) map cut into 2x2 windows, (B*windows, 4, C) rows through qkv and proj."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Linear(3, D)
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, img):  # (B, H, W, 3), H = W = 4
        x = self.patch(img)
        b, h, w, c = x.shape
        win = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4, c)  # (B*4, 4, C)
        q, k, v = self.qkv(win).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / c ** 0.5, dim=-1) @ v
        out = self.proj(att)  # (B*4, 4, C)
        return self.head(out.reshape(b, -1, c).mean(1))


def _image_batch(B, T, dtype, g):  # T only changes the seed: the window layout is fixed
    return {"img": torch.randn(B, 4, 4, 3, generator=g, dtype=dtype)}, _labels(B, g)


# ------------------------------------------------------------------ mixtures of experts: refused
class ExpertChoiceMoE(nn.Module):
    """Each expert picks its top-B token rows (capacity = the number of examples): at B = 4 every expert's
    input is (4, d) and at B = 3 it is (3, d), so its size follows the batch; its rows do not."""

    def __init__(self, experts=2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.router = nn.Linear(D, experts)
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(experts))
        self.head = nn.Linear(D, CLASSES)

    def forward(self, ids):
        x = self.embed(ids)
        b, t, d = x.shape
        rows = x.reshape(b * t, d)
        gates = torch.softmax(self.router(x), dim=-1).reshape(b * t, -1)  # (B*T, E)
        out = rows.clone()
        for e, expert in enumerate(self.experts):
            score, idx = gates[:, e].topk(b)  # capacity B
            out = out.index_add(0, idx, score[:, None] * expert(rows[idx]))
        return self.head(out.reshape(b, t, d).mean(1))


class TokenChoiceMoE(ExpertChoiceMoE):
    """Top-1 routing: each expert gets the tokens whose best gate it is (a data-dependent count)."""

    def forward(self, ids):
        x = self.embed(ids)
        b, t, d = x.shape
        rows = x.reshape(b * t, d)
        gates = torch.softmax(self.router(rows), dim=-1)
        best = gates.argmax(-1)
        out = rows.clone()
        for e, expert in enumerate(self.experts):
            idx = (best == e).nonzero().flatten()
            out = out.index_add(0, idx, gates[idx, e:e + 1] * expert(rows[idx]))
        return self.head(out.reshape(b, t, d).mean(1))


def _forward(name):
    return lambda m, kw: m(kw[name])


CASES = {
    "encoder_mask_seq_first": ZooCase(lambda T=None: MaskedSeqFirstEncoder(), _masked_batch,
                                      lambda m, kw: m(kw["src"], kw["mask"]), _mean_ce, batch_dim=1,
                                      input_dims={"mask": 0}),
    "bare_encoder_mask_seq_first": ZooCase(_bare_encoder, _masked_batch,
                                           lambda m, kw: m(kw["src"], src_key_padding_mask=kw["mask"]), _bare_loss,
                                           batch_dim=1, input_dims={"mask": 0}),
    "lstm_seq_first_h_n": ZooCase(lambda T=None: SeqFirstRNN(nn.LSTM), _seq_first_batch, _forward("x"), _mean_ce,
                                  batch_dim=1),
    "gru_seq_first_h_n": ZooCase(lambda T=None: SeqFirstRNN(nn.GRU), _seq_first_batch, _forward("x"), _mean_ce,
                                 batch_dim=1),
    "encoder_seq_first_mean_pool": ZooCase(lambda T=None: SeqFirstPooled(), _seq_first_batch, _forward("x"),
                                           _mean_ce, batch_dim=1),
    "flat_ffn": ZooCase(lambda T=None: FlatFFN(), _ids_batch, _forward("ids"), _mean_ce),
    "flat_ffn_time_major": ZooCase(lambda T=None: FlatFFN(time_major=True), _ids_batch, _forward("ids"), _mean_ce),
    "window_attention": ZooCase(lambda T=None: WindowAttention(), _image_batch, _forward("img"), _mean_ce),
}

REFUSED = {
    "moe_expert_choice_size_coincidence": ZooCase(lambda T=None: ExpertChoiceMoE(), _ids_batch, _forward("ids"),
                                                  _mean_ce),
    "moe_token_choice": ZooCase(lambda T=None: TokenChoiceMoE(), _ids_batch, _forward("ids"), _mean_ce),
}


@pytest.mark.parametrize("name, b, T", zoo_params(CASES))
def test_learned_layout_matches_naive_loop(name, b, T):
    assert_matches(CASES[name], B=B, T=T, b=b)


@pytest.mark.parametrize("name, b, T", zoo_params(REFUSED))
def test_routed_rows_are_refused_never_guessed(name, b, T):
    with pytest.raises(BatchError, match="rows") as caught:
        compare(REFUSED[name], B=B, T=T, b=b)
    text = str(caught.value)
    assert "refuses rather than guess" in text or "did not run in both passes" in text, text


@pytest.mark.parametrize("batch_first", [False, None])
def test_a_declaration_is_checked_not_trusted(batch_first):
    """attach(batch_first=False) on the sequence-first LSTM is confirmed; batch_first=True is refused."""
    assert_matches(CASES["lstm_seq_first_h_n"], B=B, T=B, b=1, batch_first=batch_first)
    with pytest.raises(BatchError, match="declared: dimension 0"):
        compare(CASES["lstm_seq_first_h_n"], B=B, T=B + 2, b=1, batch_first=True)


def test_a_model_that_cannot_run_on_another_batch_size_is_refused_in_noise_free_mode():
    """The probe runs on one example fewer; a model fixed to one batch size is refused, with the cause."""
    import dp_microclip

    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 2)

        def forward(self, x):
            return self.linear(x).reshape(8, 2)

    model = Fixed()
    engine = dp_microclip.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=2,
                                 max_grad_norm=1.0)
    with pytest.raises(BatchError, match="the forward failed"):
        model(torch.randn(8, 3))
    engine.detach()


def test_an_input_whose_batch_dimension_cannot_be_learned_is_refused():
    """A (B, B) input the model ignores: cut along 0, along 1 or not at all, the model runs the same."""
    import dp_microclip

    class Ignores(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 2)

        def forward(self, x, extra):
            return self.linear(x)

    model = Ignores()
    engine = dp_microclip.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=1,
                                 max_grad_norm=1.0)
    with pytest.raises(BatchError, match=r"args.1.*cannot be learned"):
        model(torch.randn(4, 3), torch.randn(4, 4))
    engine.detach()
