"""HF encoders with sequence-classification heads: BERT, DistilBERT, RoBERTa, ViT (+ RoBERTa with gradient checkpointing)."""

from __future__ import annotations

import pytest
import torch

from .data import CLASSES, VOCAB, cross_entropy, seq_cls_batch
from .harness import B, ZooCase, assert_matches, zoo_params

transformers = pytest.importorskip("transformers")


def _bert(T=None):
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0, num_labels=CLASSES, pad_token_id=0,
    ))


def _distilbert(T=None):
    return transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=16,
        dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0, num_labels=CLASSES, pad_token_id=0,
    ))


def _roberta(T=None):
    return transformers.RobertaForSequenceClassification(transformers.RobertaConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=20, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0, num_labels=CLASSES, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    ))


def _vit(T):
    # ViT's sequence is the patches + [CLS]: T tokens are T - 1 patches of 2x2 in a 2 x 2(T-1) image.
    return transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=(2, 2 * (T - 1)), patch_size=2, num_channels=3, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        num_labels=CLASSES,
    ))


def _hf_logits(model, kw):
    return model(**kw).logits


def _roberta_batch(B, T, dtype, g):
    inputs, y = seq_cls_batch(B, T, dtype, g)
    inputs["input_ids"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, 1)  # RoBERTa's pad id
    return inputs, y


def _vit_batch(B, T, dtype, g):
    pixels = torch.randn(B, 3, 2, 2 * (T - 1), generator=g, dtype=dtype)
    return {"pixel_values": pixels}, torch.randint(0, CLASSES, (B,), generator=g)


def _enable_checkpointing(model):
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name is deprecated)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


CASES = {
    "bert": ZooCase(_bert, seq_cls_batch, _hf_logits, cross_entropy),
    "distilbert": ZooCase(_distilbert, seq_cls_batch, _hf_logits, cross_entropy),
    "roberta": ZooCase(_roberta, _roberta_batch, _hf_logits, cross_entropy),
    "vit": ZooCase(_vit, _vit_batch, _hf_logits, cross_entropy),
    # RoBERTa (not BERT) so that gradient checkpointing is the only cause of failure.
    "roberta_checkpointing": ZooCase(
        _roberta, _roberta_batch, _hf_logits, cross_entropy,
        setup=lambda m: _enable_checkpointing(m),
    ),
}


def _bert_with_positions(model, kw):
    """Position ids passed by the user, expanded to (B, T) (the workaround before commit 37463ac)."""
    batch, length = kw["input_ids"].shape
    return model(**kw, position_ids=torch.arange(length).expand(batch, length)).logits


CASES["bert_explicit_positions"] = ZooCase(_bert, seq_cls_batch, _bert_with_positions, cross_entropy)

@pytest.mark.parametrize("name, b, T", zoo_params(CASES, slow=("distilbert", "bert_explicit_positions", "roberta_checkpointing")))
def test_matches_naive_loop(name, b, T):
    assert_matches(CASES[name], B=B, T=T, b=b)
