"""PyTorch's own sequence modules, unchanged: nn.LSTM / GRU / RNN (packed too), nn.Transformer,
nn.TransformerDecoder, nn.TransformerEncoder with batch_first=False."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from .data import CLASSES, VOCAB, lengths
from .harness import B, ZooCase, assert_matches, zoo_params

D = 16


class RNNClassifier(nn.Module):
    """What a user writes around torch's RNN: embedding -> rnn -> head on the last valid step."""

    def __init__(self, rnn: nn.RNNBase, packed: bool = False):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.rnn = rnn
        self.packed = packed
        self.head = nn.Linear(rnn.hidden_size, CLASSES)

    def forward(self, ids, n):  # ids (B, T), n (B,) valid lengths
        x = self.embed(ids)
        if not self.rnn.batch_first:
            x = x.transpose(0, 1)
        if self.packed:
            _, h = self.rnn(pack_padded_sequence(x, n.cpu(), batch_first=self.rnn.batch_first, enforce_sorted=False))
            h = h[0] if isinstance(h, tuple) else h  # LSTM: (h_n, c_n)
            return self.head(h[-1])
        out, _ = self.rnn(x)
        out = out if self.rnn.batch_first else out.transpose(0, 1)
        return self.head(out[torch.arange(out.shape[0]), n - 1])


def _ids_batch(B, T, dtype, g):
    return ({"ids": torch.randint(1, VOCAB, (B, T), generator=g), "n": lengths(B, T)},
            torch.randint(0, CLASSES, (B,), generator=g))


def _rnn_forward(model, kw):
    return model(kw["ids"], kw["n"])


def _rnn_case(make, packed=False):
    return ZooCase(lambda T=None: RNNClassifier(make(), packed), _ids_batch, _rnn_forward, F.cross_entropy)


# ---------------------------------------------------------------- transformers, attached bare
# The attached model IS the torch module; the loss reads its output through a fixed projection
# (not a parameter), per example: mean over positions of a cross-entropy against per-example targets.
_PROJ = torch.randn(D, CLASSES, generator=torch.Generator().manual_seed(7))


def _seq_first_loss(out, y):  # out (T, B, D), y (B,)
    logits = (out.mean(0) @ _PROJ.to(out.dtype))
    return F.cross_entropy(logits, y)


def _encoder(T=None):
    layer = nn.TransformerEncoderLayer(D, 2, dim_feedforward=32, dropout=0.0)  # batch_first=False
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def _decoder(T=None):
    layer = nn.TransformerDecoderLayer(D, 2, dim_feedforward=32, dropout=0.0)
    return nn.TransformerDecoder(layer, 1)


def _transformer(T=None):
    return nn.Transformer(D, 2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32, dropout=0.0)


def _seq_first_batch(B, T, dtype, g):
    # Inputs are sequence-first (T, B, D); the batch dimension is 1. Memory has a different length (T + 1).
    return ({"src": torch.randn(T, B, D, generator=g, dtype=dtype),
             "mem": torch.randn(T + 1, B, D, generator=g, dtype=dtype)},
            torch.randint(0, CLASSES, (B,), generator=g))


def _causal(T, dtype):
    return nn.Transformer.generate_square_subsequent_mask(T, dtype=dtype)


CASES = {
    "lstm": _rnn_case(lambda: nn.LSTM(D, 12, num_layers=2, batch_first=True)),
    "gru_seq_first": _rnn_case(lambda: nn.GRU(D, 12, batch_first=False)),
    "rnn": _rnn_case(lambda: nn.RNN(D, 12, batch_first=True, nonlinearity="tanh")),
    "lstm_packed": _rnn_case(lambda: nn.LSTM(D, 12, batch_first=True), packed=True),
    "gru_packed": _rnn_case(lambda: nn.GRU(D, 12, batch_first=True), packed=True),
    "encoder_seq_first": ZooCase(_encoder, _seq_first_batch, lambda m, kw: m(kw["src"]), _seq_first_loss, batch_dim=1),
    "decoder_seq_first": ZooCase(
        _decoder, _seq_first_batch,
        lambda m, kw: m(kw["src"], kw["mem"], tgt_mask=_causal(kw["src"].shape[0], kw["src"].dtype)),
        _seq_first_loss, batch_dim=1),
    "transformer_seq_first": ZooCase(
        _transformer, _seq_first_batch,
        lambda m, kw: m(kw["mem"], kw["src"], tgt_mask=_causal(kw["src"].shape[0], kw["src"].dtype)),
        _seq_first_loss, batch_dim=1),
}

EXPECTED: dict = {}  # packed sequences were refused until the RNN capture unpacked them (layers/rnn.py)


@pytest.mark.parametrize("name, b, T", zoo_params(CASES, EXPECTED))
def test_matches_naive_loop(name, b, T):
    assert_matches(CASES[name], B=B, T=T, b=b)
