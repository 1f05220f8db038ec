"""No zoo model takes the slow generic torch.func path except where docs/models.md lists the module and why.

The generic path is exact but replays a module per micro-batch; a new appearance (a rule lost to a
subclass that overrides forward, a library update) should be noticed, documented or given a rule.
"""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch

import dp_microclip

from .harness import build_model

pytest.importorskip("transformers")

# Listed in docs/models.md ("Modules on the generic path"), with the reason.
DOCUMENTED = {
    "WhisperPositionalEmbedding": "an Embedding subclass whose forward indexes its weight directly",
}
MODULES = ("test_hf_encoders", "test_hf_decoders", "test_hf_seq2seq_speech", "test_peft", "test_torch_modules")


def _cases():
    for module_name in MODULES:
        try:
            module = importlib.import_module(f"tests.zoo.{module_name}")
        except pytest.skip.Exception:
            continue
        for name, case in getattr(module, "CASES", {}).items():
            yield pytest.param(case, id=f"{module_name}.{name}")


@pytest.mark.slow
@pytest.mark.parametrize("case", list(_cases()))
def test_generic_path_only_where_documented(case):
    model = build_model(case, 4, torch.float64)
    if case.setup is not None:
        case.setup(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = dp_microclip.attach(model, torch.optim.SGD(model.parameters(), lr=0.0), micro_batch_size=1,
                                     max_grad_norm=1.0)
    generic = {type(u.module).__name__ for u in engine._units if u.kind == "generic"}
    engine.detach()
    undocumented = generic - set(DOCUMENTED)
    assert not undocumented, f"modules on the generic path without a documented reason: {sorted(undocumented)}"
