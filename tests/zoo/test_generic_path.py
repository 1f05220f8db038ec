"""No zoo model takes the slow generic torch.func path except where docs/models.md lists the module and why.

The generic path is exact but replays a module per micro-batch; a new appearance (a rule lost to a
subclass that overrides forward, a library update) should be noticed, documented or given a rule.
"""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch

from dp_microclip import BatchError, UnsupportedModuleError

from .harness import build_model, engine

pytest.importorskip("transformers")

# Listed in docs/models.md ("Modules on the generic path"), with the reason. Whisper's decoder positions (an
# Embedding subclass indexing its weight) take the usage route, and so does Dinov2Embeddings, whose mask_token
# the forward does not touch without bool_masked_pos (no record for it; its .grad stays as autograd leaves it).
DOCUMENTED: dict[str, str] = {}
MODULES = ("test_hf_encoders", "test_hf_decoders", "test_hf_seq2seq_speech", "test_peft", "test_torch_modules",
           "test_usage_route", "test_unnamed_torch", "test_hf_unnamed_text", "test_hf_unnamed_speech",
           "test_unnamed_vision")


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
    # Whether a module without a rule takes the usage route or the generic one is known once it has run:
    # one step, then the route each record took.
    model = build_model(case, 4, torch.float64)
    inputs, targets = case.batch(4, 4, torch.float64, torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _, eng = engine(case, model, inputs, targets, b=1)
        except (BatchError, UnsupportedModuleError):
            return  # refused by design (the zoo tests the message): nothing runs, on any path
    generic = {type(model.get_submodule(name)).__name__ for name, route in eng.last_strategies.items()
               if route == "func"}
    undocumented = generic - set(DOCUMENTED)
    assert not undocumented, f"modules on the generic path without a documented reason: {sorted(undocumented)}"
