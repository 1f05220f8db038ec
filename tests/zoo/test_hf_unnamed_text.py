"""HF text families no rule names: encoders, decoders and encoder-decoders, each exact against the naive loop.

Built from tiny configs (no download), float64, B = 4, T == B and T != B, b in {1, 2, B}. What each family
brings that the named families (BERT, GPT-2, LLaMA, T5, ...) do not:

* ALBERT: one layer's weights shared by every layer, a factorised embedding (vocab -> 8 -> hidden);
* DeBERTa-v2: relative position embeddings (a LayerNorm'ed table) projected by the query and key maps, folded
  with the heads into the batch (``.repeat(B, 1, 1)``) and multiplied with the queries and keys;
* MPNet: a relative attention bias looked up with a (T, T) bucket matrix and expanded to the batch by the model;
* ConvBERT: a depthwise separable convolution and span-based dynamic kernels inside the attention;
* ELECTRA: a factorised embedding projected up to the hidden size;
* OPT: learned positions with an offset of 2, computed from the attention mask;
* BLOOM: ALiBi (no position table), fused query-key-value;
* GPT-Neo: alternating global and local attention;
* Falcon: parallel attention and MLP, multi-query attention, its own ``FalconLinear``;
* BART: encoder-decoder with learned positions offset by 2, tied embeddings;
* Marian: encoder-decoder with fixed sinusoidal positions, scaled embeddings.

DeBERTa-v2 reads its relative table as a parameter outside its module (``rel_embeddings.weight``, normalised by a
LayerNorm whose output is the same for every example): exact, its per-example gradient being the LayerNorm's
input gradient of each example's output gradient (``dp_microclip/layers/batch_free.py``, ``Direct``).
"""

from __future__ import annotations

import pytest

from dp_microclip.losses import causal_lm_per_example_loss, per_example_mean_loss

from .data import CLASSES, PAD, VOCAB, cross_entropy, lm_batch, seq_cls_batch, token_batch
from .harness import B, ZooCase, assert_matches, zoo_params

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster on a shared machine

DROP = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


# ---------------------------------------------------------------------------------------- encoders
def _albert(T=None):
    return transformers.AlbertForSequenceClassification(transformers.AlbertConfig(
        vocab_size=VOCAB, embedding_size=8, hidden_size=16, num_hidden_layers=2, num_hidden_groups=1,
        num_attention_heads=2, intermediate_size=32, max_position_embeddings=16, classifier_dropout_prob=0.0,
        num_labels=CLASSES, pad_token_id=PAD, **DROP,
    ))


def _deberta_v2(T=None):
    return transformers.DebertaV2ForSequenceClassification(transformers.DebertaV2Config(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, relative_attention=True, position_buckets=4, max_relative_positions=-1,
        pos_att_type=["p2c", "c2p"], position_biased_input=False, norm_rel_ebd="layer_norm", share_att_key=True,
        pooler_hidden_size=16, pooler_dropout=0.0, num_labels=CLASSES, pad_token_id=PAD, **DROP,
    ))


def _mpnet(T=None):
    return transformers.MPNetForSequenceClassification(transformers.MPNetConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=20, relative_attention_num_buckets=32, num_labels=CLASSES, pad_token_id=1, **DROP,
    ))


def _convbert(T=None):
    return transformers.ConvBertForSequenceClassification(transformers.ConvBertConfig(
        vocab_size=VOCAB, embedding_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, head_ratio=2, conv_kernel_size=3, num_groups=1, max_position_embeddings=16,
        classifier_dropout=0.0, num_labels=CLASSES, pad_token_id=PAD, **DROP,
    ))


def _electra(T=None):
    return transformers.ElectraForSequenceClassification(transformers.ElectraConfig(
        vocab_size=VOCAB, embedding_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, classifier_dropout=0.0, num_labels=CLASSES,
        pad_token_id=PAD, **DROP,
    ))


def _mpnet_batch(B, T, dtype, g):
    inputs, y = seq_cls_batch(B, T, dtype, g)
    inputs["input_ids"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, 1)  # MPNet's pad id
    return inputs, y


# ---------------------------------------------------------------------------------------- decoders
def _opt(T=None):
    return transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
        max_position_embeddings=16, word_embed_proj_dim=16, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, layerdrop=0.0, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
    ))


def _bloom(T=None):
    return transformers.BloomForCausalLM(transformers.BloomConfig(
        vocab_size=VOCAB, hidden_size=16, n_layer=2, n_head=2, hidden_dropout=0.0, attention_dropout=0.0,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
    ))


def _gpt_neo(T=None):
    return transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(
        vocab_size=VOCAB, max_position_embeddings=16, hidden_size=16, num_layers=2, num_heads=2,
        attention_types=[[["global", "local"], 1]], window_size=3, intermediate_size=32, embed_dropout=0.0,
        attention_dropout=0.0, resid_dropout=0.0, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
    ))


def _falcon(T=None):
    return transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, multi_query=True,
        new_decoder_architecture=False, parallel_attn=True, alibi=False, bias=False, hidden_dropout=0.0,
        attention_dropout=0.0, max_position_embeddings=16, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
    ))


# ----------------------------------------------------------------------------------- encoder-decoders
_SEQ2SEQ = dict(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=16,
                dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, encoder_layerdrop=0.0,
                decoder_layerdrop=0.0, pad_token_id=PAD, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)


def _bart(T=None):
    return transformers.BartForConditionalGeneration(transformers.BartConfig(**_SEQ2SEQ))


def _marian(T=None):
    return transformers.MarianMTModel(transformers.MarianConfig(**_SEQ2SEQ, scale_embedding=True))


def _shift_right(labels, start=1):
    shifted = labels.new_full(labels.shape, start)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == -100, PAD)


def _seq2seq_batch(B, T, dtype, g):
    ids, mask = token_batch(B, T, dtype, g)
    target, target_mask = token_batch(B, T, dtype, g)
    labels = target.masked_fill(target_mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": _shift_right(labels)}, labels


# ---------------------------------------------------------------------------------------- the calls
def _logits(model, kw):
    return model(**kw).logits


def _lm_logits(model, kw):
    return model(**kw, use_cache=False).logits


def _lm_loss(logits, labels):
    return causal_lm_per_example_loss(logits, labels).mean()


def _seq2seq_loss(logits, labels):
    return per_example_mean_loss(logits, labels).mean()


CASES = {
    "albert": ZooCase(_albert, seq_cls_batch, _logits, cross_entropy),
    "deberta_v2": ZooCase(_deberta_v2, seq_cls_batch, _logits, cross_entropy),
    "mpnet": ZooCase(_mpnet, _mpnet_batch, _logits, cross_entropy),
    "convbert": ZooCase(_convbert, seq_cls_batch, _logits, cross_entropy),
    "electra": ZooCase(_electra, seq_cls_batch, _logits, cross_entropy),
    "opt": ZooCase(_opt, lm_batch, _lm_logits, _lm_loss),
    "bloom": ZooCase(_bloom, lm_batch, _lm_logits, _lm_loss),
    "gpt_neo": ZooCase(_gpt_neo, lm_batch, _lm_logits, _lm_loss),
    "falcon": ZooCase(_falcon, lm_batch, _lm_logits, _lm_loss),
    "bart": ZooCase(_bart, _seq2seq_batch, _logits, _seq2seq_loss),
    "marian": ZooCase(_marian, _seq2seq_batch, _logits, _seq2seq_loss),
}


@pytest.mark.parametrize("name, b, T", zoo_params(CASES))
def test_matches_naive_loop(name, b, T):
    assert_matches(CASES[name], B=B, T=T, b=b)
