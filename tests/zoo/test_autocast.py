"""bf16 autocast: the engine under ``torch.autocast("cpu", torch.bfloat16)`` against the float32 naive loop.

Tolerance. bf16 keeps 8 significant bits (unit roundoff 2^-9 ~ 2e-3), so autocast itself moves every
gradient: the naive loop run under the same autocast differs from the float32 loop by 5e-3 to 1.5e-2 per
parameter on these models (a few parameters up to 1.5e-1). That is the floor: a correct engine sees the
same bf16 activations and can be no closer to float32 than that. It computes its own products, norms and
clip factors in another order, so it does not match the autocast loop bit for bit. Per parameter:

    err(engine vs float32 loop) <= 2 * err(autocast loop vs float32 loop) + 2e-3

Measured at commit 37463ac: the engine's error is 0.96x to 1.51x the floor of the same parameter, over
every case here. 2x leaves room for rounding order; 2e-3 (one bf16 unit roundoff) covers parameters whose
floor is tiny. It is tight on purpose: a wrong grouping can be off by only a few 1e-2 (at commit 656a789
BERT at b=1, T == B was 2.4e-2 off in float64), which a looser "3x + 2e-2" would have let through.

BERT, GPT-2 and an LSTM as asked; RoBERTa, LLaMA and nn.TransformerEncoder (sequence-first) as well.
"""

from __future__ import annotations

import pytest


from .harness import B, compare_autocast, zoo_params

transformers = pytest.importorskip("transformers")

from . import test_hf_decoders, test_hf_encoders, test_torch_modules  # noqa: E402

CASES = {
    "bert": test_hf_encoders.CASES["bert"],
    "roberta": test_hf_encoders.CASES["roberta"],
    "gpt2": test_hf_decoders.CASES["gpt2"],
    "llama": test_hf_decoders.CASES["llama"],
    "lstm": test_torch_modules.CASES["lstm"],
    "encoder_seq_first": test_torch_modules.CASES["encoder_seq_first"],
}

EXPECTED: dict = {}


@pytest.mark.parametrize("name, b, T", zoo_params(CASES, EXPECTED, slow=("gpt2", "roberta", "llama", "encoder_seq_first")))
def test_bf16_autocast_within_bf16_floor(name, b, T):
    errors, floor = compare_autocast(CASES[name], B=B, T=T, b=b)
    bad = {n: (e, floor[n]) for n, e in errors.items() if e > 2 * floor[n] + 2e-3}
    assert not bad, "beyond 2 x bf16 floor + 2e-3: " + ", ".join(
        f"{n}: {e:.1e} (floor {f:.1e})" for n, (e, f) in sorted(bad.items(), key=lambda kv: -kv[1][0])[:6])
