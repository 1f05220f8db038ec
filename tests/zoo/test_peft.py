"""peft LoRA adapters on a frozen HF base: BERT (sequence classification) and GPT-2 (causal LM)."""

from __future__ import annotations

import pytest

from .data import cross_entropy, lm_batch, seq_cls_batch
from .harness import B, ZooCase, assert_matches, zoo_params
from .test_hf_decoders import _gpt2, lm_logits, lm_loss
from .test_hf_encoders import _bert, _hf_logits

peft = pytest.importorskip("peft")


def _lora_bert(T=None):
    config = peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, lora_dropout=0.0,
                             target_modules=["query", "value"])
    return peft.get_peft_model(_bert(), config)  # trainable: LoRA A/B and the classifier (modules_to_save)


def _lora_gpt2(T=None):
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, lora_dropout=0.0,
                             target_modules=["c_attn"], fan_in_fan_out=True)  # GPT-2's Conv1D stores W^T
    return peft.get_peft_model(_gpt2(), config)


# LoRA's B starts at zero, so the adapter gradients are small: a smaller bound keeps every micro-batch clipped.
CASES = {
    "lora_bert": ZooCase(_lora_bert, seq_cls_batch, _hf_logits, cross_entropy, C=0.005),
    "lora_gpt2": ZooCase(_lora_gpt2, lm_batch, lm_logits, lm_loss, C=0.005),
}


@pytest.mark.parametrize("name, b, T", zoo_params(CASES))
def test_matches_naive_loop(name, b, T):
    assert_matches(CASES[name], B=B, T=T, b=b)
