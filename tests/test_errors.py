"""Every error a user can hit names the problem and the fix."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dp_microclip
from dp_microclip import DP
from dp_microclip import BatchError, ConfigurationError, UnsupportedModuleError

from .models import Scale


def _attach(model, optimizer=None, **kwargs):
    kwargs.setdefault("micro_batch_size", 2)
    kwargs.setdefault("max_grad_norm", 1.0)
    optimizer = optimizer if optimizer is not None else torch.optim.SGD(model.parameters(), lr=0.1)
    return dp_microclip.attach(model, optimizer, **kwargs)


def test_batch_not_divisible_names_the_fix():
    model = nn.Linear(3, 2)
    _attach(model, micro_batch_size=4)
    with pytest.raises(BatchError, match=r"micro_batch_size=4 does not divide the batch size 6.*multiple of 4.*keyed"):
        model(torch.randn(6, 3)).sum().backward()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"micro_batch_size": 0}, "micro_batch_size must be an integer >= 1"),
        ({"clipping": "clip"}, "clipping='clip' is not one of"),
        ({"grad_mode": "fast"}, "grad_mode='fast' is not one of"),
        ({"grouping": "random"}, "grouping='random' is not one of"),
        ({"max_grad_norm": -1.0}, "max_grad_norm must be a finite number > 0"),
        ({"max_grad_norm": float("nan")}, "max_grad_norm must be a finite number > 0"),
        ({"max_grad_norm": float("inf")}, "max_grad_norm must be a finite number > 0"),
        ({"clipping": "per_layer", "max_grad_norm": [1.0, float("nan")]}, "every per-parameter bound"),
        ({"normalize_gamma": float("nan")}, "normalize_gamma must be a finite number > 0"),
        ({"privacy": DP(noise_multiplier=1.0, sample_rate=0.1, expected_batch_size=0)},
         "expected_batch_size must be a finite number > 0"),
        ({"privacy": DP(noise_multiplier=-0.5, sample_rate=0.1)}, "noise_multiplier must be a finite number >= 0"),
        ({"privacy": DP(noise_multiplier=float("nan"), sample_rate=0.1)}, "noise_multiplier must be a finite number >= 0"),
        ({"privacy": DP(sample_rate=0.1)}, r"privacy=DP\(\.\.\.\) needs noise"),
        ({"on_nonfinite": "ignore"}, "on_nonfinite='ignore' is not one of"),
        ({"loss_reduction": "none"}, "loss_reduction='none' is not one of"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        _attach(nn.Linear(3, 2), **kwargs)


def test_per_layer_bounds_must_cover_every_parameter():
    with pytest.raises(ConfigurationError, match=r"Missing: \['bias'\]"):
        _attach(nn.Linear(3, 2), clipping="per_layer", max_grad_norm={"weight": 1.0})
    with pytest.raises(ConfigurationError, match="Give one per parameter"):
        _attach(nn.Linear(3, 2), clipping="per_layer", max_grad_norm=[1.0, 1.0, 1.0])


def test_module_without_rule_with_fallback_error_names_the_module():
    # Whether the usage route can take a module without a rule is known at its first forward: the refusal
    # names the module, the use it cannot take (Scale's w.exp()) and the fixes.
    model = nn.Sequential(nn.Linear(3, 3), Scale(3))
    _attach(model, fallback="error")
    with pytest.raises(UnsupportedModuleError, match=r"1 \(Scale\).*exp.*register_rule.*fallback=\"generic\""):
        model(torch.randn(4, 3))


def test_generic_fallback_warns_once_naming_the_module():
    model = nn.Sequential(nn.Linear(3, 3), Scale(3))
    engine = _attach(model)
    with pytest.warns(UserWarning, match=r"1 \(Scale\) has no rule.*exp.*generic torch.func path"):
        model(torch.randn(4, 3)).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        model(torch.randn(4, 3)).sum().backward()
    assert "generic torch.func" in engine.summary()
    assert engine.last_strategies["1"] == "func"


def test_sparse_embedding_refused():
    with pytest.raises(UnsupportedModuleError, match="sparse=False, scale_grad_by_freq=False"):
        _attach(nn.Embedding(5, 3, sparse=True))


def test_batchnorm_warns_when_noise_free():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.warns(UserWarning, match="nn.GroupNorm"):
        _attach(model)


def test_optimizer_with_foreign_parameter():
    model = nn.Linear(3, 2)
    stranger = nn.Parameter(torch.zeros(2))
    with pytest.raises(ConfigurationError, match="not in the model.*Decide which parameters train before"):
        dp_microclip.attach(model, torch.optim.SGD([*model.parameters(), stranger], lr=0.1),
                            micro_batch_size=1, max_grad_norm=1.0)


class BroadcastPositions(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(10, 4)
        self.pos = nn.Embedding(6, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, tokens):
        positions = torch.arange(tokens.shape[1]).unsqueeze(0)  # (1, T): shared by the batch
        return self.head((self.tok(tokens) + self.pos(positions)).mean(1))


@pytest.mark.parametrize("seq_len", [6, 3])  # T == B (3 examples) is the case a size-based guess got wrong
@pytest.mark.parametrize("b", [1, 3])
def test_input_broadcast_over_the_batch_is_handled_exactly(seq_len, b):
    # Position ids of shape (1, T), as HuggingFace models make them: the engine expands the embedding's output
    # to the batch so each example gets its exact share of the position table's gradient.
    from dp_microclip.reference import naive_microbatch_grads

    torch.manual_seed(0)
    model = BroadcastPositions().double()
    reference = copy.deepcopy(model)
    tokens, y = torch.randint(0, 10, (3, seq_len)), torch.tensor([0, 1, 1])
    want = naive_microbatch_grads(reference, F.cross_entropy, tokens, y, micro_batch_size=b, max_grad_norm=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    _attach(model, micro_batch_size=b, max_grad_norm=0.05, optimizer=opt)
    F.cross_entropy(model(tokens), y).backward()
    opt.step()
    for name, p in model.named_parameters():
        assert float((p.grad - want[name]).norm() / want[name].norm()) < 1e-9, name


def test_submodule_called_directly_is_refused():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    _attach(model, micro_batch_size=1)
    with pytest.raises(BatchError, match="Call the model passed to attach"):
        model[0](torch.randn(2, 3))


@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("model_kind", ["bare", "decoder", "transformer"])
def test_cross_attention_is_exact(model_kind, b):
    # An unchanged nn.MultiheadAttention with query != key/value (cross-attention), alone and inside
    # nn.TransformerDecoder and nn.Transformer, against the naive loop.
    from dp_microclip.reference import naive_microbatch_grads

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            if model_kind == "bare":
                self.body = nn.MultiheadAttention(8, 2, batch_first=True)
            elif model_kind == "decoder":
                layer = nn.TransformerDecoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
                self.body = nn.TransformerDecoder(layer, 2)
            else:
                self.body = nn.Transformer(8, 2, 1, 1, 16, dropout=0.0, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):  # x: (B, 7, 8): 3 target steps, 4 memory steps
            tgt, memory = x[:, :3], x[:, 3:]
            if model_kind == "bare":
                out = self.body(tgt, memory, memory * 2)[0]
            elif model_kind == "decoder":
                out = self.body(tgt, memory)
            else:
                out = self.body(memory, tgt)
            return self.head(out.mean(1))

    torch.manual_seed(0)
    model = Cross().double()
    reference = copy.deepcopy(model)
    x, y = torch.randn(4, 7, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    want = naive_microbatch_grads(reference, F.cross_entropy, x, y, micro_batch_size=b, max_grad_norm=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    _attach(model, optimizer=opt, micro_batch_size=b, max_grad_norm=0.05, fallback="error")
    F.cross_entropy(model(x), y).backward()
    opt.step()
    for name, p in model.named_parameters():
        assert float((p.grad - want[name]).norm() / want[name].norm()) < 1e-9, name


def test_mha_bias_kv_outside_the_usage_route_is_refused_where_the_generic_path_is_not_allowed():
    # add_bias_kv takes the usage route (tests/zoo/test_unnamed_torch.py: exact); a call it cannot split (an
    # attention mask that is a parameter) goes generic, which fallback="error" refuses by name.
    class MaskParam(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, add_bias_kv=True, batch_first=True)
            self.mask = nn.Parameter(torch.zeros(3, 3))

        def forward(self, x):
            return self.attn(x, x, x, attn_mask=self.mask)[0]

    model = MaskParam()
    _attach(model, fallback="error")
    with pytest.raises(UnsupportedModuleError, match="usage route cannot take it"):
        model(torch.randn(2, 3, 4)).sum().backward()


def test_adaptive_zero_norm_warns():
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dp_microclip.attach(model, opt, micro_batch_size=1, max_grad_norm=1.0, clipping="adaptive")
    x = torch.randn(2, 3)
    x[0] = 0.0
    out = model(x)
    (out[1].sum() * 1.0).backward()  # example 0 has a zero gradient
    with pytest.warns(RuntimeWarning, match="rho is 0"):
        opt.step()
    assert torch.count_nonzero(model.weight.grad) == 0


class _Checkpointed(nn.Module):
    def __init__(self, reentrant: bool):
        super().__init__()
        self.reentrant = reentrant
        self.a, self.b, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        h = torch.relu(self.a(x))
        h = checkpoint(lambda t: torch.relu(self.b(t)), h, use_reentrant=self.reentrant)
        return self.head(h)


@pytest.mark.parametrize("b", [1, 2])
def test_non_reentrant_gradient_checkpointing_is_exact(b):
    from dp_microclip.reference import naive_microbatch_grads

    torch.manual_seed(0)
    model = _Checkpointed(reentrant=False).double()
    reference = copy.deepcopy(model)
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    want = naive_microbatch_grads(reference, F.cross_entropy, x, y, micro_batch_size=b, max_grad_norm=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    _attach(model, optimizer=opt, micro_batch_size=b, max_grad_norm=0.05)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    for name, p in model.named_parameters():
        assert float((p.grad - want[name]).norm() / want[name].norm()) < 1e-9, name


@pytest.mark.parametrize("verify_steps", [0, 1])
def test_reentrant_gradient_checkpointing_is_refused_with_the_fix(verify_steps):
    model = _Checkpointed(reentrant=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _attach(model, optimizer=opt, micro_batch_size=1, verify_steps=verify_steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "None of the inputs have requires_grad=True"
        F.cross_entropy(model(torch.randn(4, 6)), torch.tensor([0, 1, 2, 0])).backward()
    with pytest.raises(ConfigurationError, match="use_reentrant=True.*use_reentrant': False"):
        opt.step()


def test_flat_dp_keywords_are_gone():
    # DP is configured in one place, privacy=DP(...); the flat keywords of earlier drafts are not accepted.
    with pytest.raises(TypeError, match="noise_multiplier"):
        _attach(nn.Linear(3, 2), noise_multiplier=1.0, sample_rate=0.1)
