"""HF causal LMs with the per-example causal-LM loss (dp_microclip.losses): GPT-2, LLaMA, Mistral."""

from __future__ import annotations

import pytest
import torch

from dp_microclip.losses import causal_lm_per_example_loss

from .data import VOCAB, lm_batch
from .harness import B, ZooCase, assert_matches, zoo_params

transformers = pytest.importorskip("transformers")


def _gpt2(T=None):
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, summary_first_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ))


def _llama(T=None):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16, attention_dropout=0.0, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    ))


def _llama_tied(T=None):
    # Input embedding and LM head share one parameter (GPT-2 does this too, but fails earlier on wpe).
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=16, attention_dropout=0.0, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ))


def _mistral(T=None):
    return transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16, attention_dropout=0.0, sliding_window=None,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ))


def lm_logits(model, kw):
    return model(**kw, use_cache=False).logits


def lm_loss(logits, labels):
    return causal_lm_per_example_loss(logits, labels).mean()


CASES = {
    "gpt2": ZooCase(_gpt2, lm_batch, lm_logits, lm_loss),
    "llama": ZooCase(_llama, lm_batch, lm_logits, lm_loss),
    "llama_tied": ZooCase(_llama_tied, lm_batch, lm_logits, lm_loss),
    "mistral": ZooCase(_mistral, lm_batch, lm_logits, lm_loss),
}


def _lm_logits_with_positions(model, kw):
    """Position ids passed by the user, expanded to (B, T) (the workaround before commit 37463ac)."""
    batch, length = kw["input_ids"].shape
    return model(**kw, position_ids=torch.arange(length).expand(batch, length), use_cache=False).logits


CASES["gpt2_explicit_positions"] = ZooCase(_gpt2, lm_batch, _lm_logits_with_positions, lm_loss)

@pytest.mark.parametrize("name, b, T", zoo_params(CASES, slow=("mistral", "llama_tied", "gpt2_explicit_positions")))
def test_matches_naive_loop(name, b, T):
    assert_matches(CASES[name], B=B, T=T, b=b)
