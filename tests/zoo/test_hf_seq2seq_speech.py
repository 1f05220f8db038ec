"""HF encoder-decoders and speech models: T5, Whisper (generation and audio classification), Wav2Vec2."""

from __future__ import annotations

import pytest
import torch

from dp_microclip.losses import per_example_mean_loss


from .data import CLASSES, PAD, VOCAB, cross_entropy, token_batch
from .harness import B, ZooCase, assert_matches, zoo_params

transformers = pytest.importorskip("transformers")

MELS = 4


def _t5(T=None):
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        pad_token_id=PAD, decoder_start_token_id=PAD, eos_token_id=1,
    ))


def _shift_right(labels, start=PAD):
    """Decoder inputs from labels, as HF's seq2seq models do (-100 -> pad)."""
    shifted = torch.full_like(labels, start)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == -100, PAD)


def _seq2seq_batch(B, T, dtype, g):
    ids, mask = token_batch(B, T, dtype, g)
    target, target_mask = token_batch(B, T, dtype, g)
    labels = target.masked_fill(target_mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": _shift_right(labels)}, labels


def _whisper_config(T, **extra):
    # The encoder's convs halve the frames: 2T input frames -> T encoder positions (max_source_positions).
    return transformers.WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=MELS, encoder_layers=1, encoder_attention_heads=2, decoder_layers=1,
        decoder_attention_heads=2, d_model=16, encoder_ffn_dim=32, decoder_ffn_dim=32, max_source_positions=T,
        max_target_positions=16, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=PAD,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, suppress_tokens=None, begin_suppress_tokens=None,
        mask_time_prob=0.0, mask_feature_prob=0.0, **extra,
    )


def _whisper(T):
    return transformers.WhisperForConditionalGeneration(_whisper_config(T))


def _whisper_cls(T):
    return transformers.WhisperForAudioClassification(
        _whisper_config(T, num_labels=CLASSES, classifier_proj_size=8, use_weighted_layer_sum=False)
    )


def _whisper_batch(B, T, dtype, g):
    feats = torch.randn(B, MELS, 2 * T, generator=g, dtype=dtype)
    target, target_mask = token_batch(B, T, dtype, g)
    labels = target.masked_fill(target_mask == 0, -100)
    return {"input_features": feats, "decoder_input_ids": _shift_right(labels, start=1)}, labels


def _audio_cls_batch(B, T, dtype, g):
    return {"input_features": torch.randn(B, MELS, 2 * T, generator=g, dtype=dtype)}, torch.randint(
        0, CLASSES, (B,), generator=g)


def _wav2vec2(T=None):
    return transformers.Wav2Vec2ForSequenceClassification(transformers.Wav2Vec2Config(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        conv_dim=(8, 8), conv_stride=(2, 2), conv_kernel=(3, 3), num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0, mask_feature_prob=0.0,
        num_labels=CLASSES, classifier_proj_size=8, use_weighted_layer_sum=False,
    ))


def _waveform_batch(B, T, dtype, g):
    # Two convs of kernel 3, stride 2: L samples -> ((L - 3) // 2 + 1 - 3) // 2 + 1 frames; L = 4T + 3 gives T.
    return {"input_values": torch.randn(B, 4 * T + 3, generator=g, dtype=dtype)}, torch.randint(
        0, CLASSES, (B,), generator=g)


def _logits(model, kw):
    return model(**kw).logits


def _seq2seq_loss(logits, labels):
    return per_example_mean_loss(logits, labels).mean()


CASES = {
    "t5": ZooCase(_t5, _seq2seq_batch, _logits, _seq2seq_loss),
    "whisper": ZooCase(_whisper, _whisper_batch, _logits, _seq2seq_loss),
    "whisper_cls": ZooCase(_whisper_cls, _audio_cls_batch, _logits, cross_entropy),
    "wav2vec2": ZooCase(_wav2vec2, _waveform_batch, _logits, cross_entropy),
}


def _freeze(*fragments):
    """The user-side fix the refusals name: freeze the tensors that have no batch dimension."""
    def setup(model):
        for name, p in model.named_parameters():
            if any(f in name for f in fragments):
                p.requires_grad_(False)
    return setup


CASES["t5_frozen_relative_bias"] = ZooCase(_t5, _seq2seq_batch, _logits, _seq2seq_loss,
                                           setup=_freeze("relative_attention_bias"))
CASES["wav2vec2_frozen_pos_conv"] = ZooCase(_wav2vec2, _waveform_batch, _logits, cross_entropy,
                                            setup=_freeze("pos_conv_embed.conv.parametrizations"))

EXPECTED: dict = {}

# T5's relative_attention_bias (nn.Embedding) is looked up with a (T, T) bucket matrix, the same for every
# example: its per-example gradient is read where the bias is added to each example's scores
# (dp_microclip/shared_outputs.py), so T5 is matched whole; t5_frozen_relative_bias stays as a case.
# Wav2Vec2's positional conv uses weight_norm (torch.nn.utils.parametrize): the conv rule's group gradients
# of the computed weight are chained back to its original tensors, so it is matched, not refused.
MATCHED = CASES


@pytest.mark.parametrize("name, b, T", zoo_params(MATCHED, EXPECTED, slow=("whisper", "whisper_cls", "wav2vec2_frozen_pos_conv")))
def test_matches_naive_loop(name, b, T):
    assert_matches(CASES[name], B=B, T=T, b=b)

