"""HF speech families no rule names: Data2VecAudio, SEW and Speech2Text, each exact against the naive loop.

Built from tiny configs (no download), float64, B = 4, T == B and T != B frames, b in {1, 2, B}:

* Data2VecAudio: a positional embedding of several convolutions with LayerNorms without affine parameters;
* SEW: the sequence squeezed by a strided pooling and upsampled by a Linear before the head;
* Speech2Text: a convolutional subsampler over filter-bank frames (GLU), sinusoidal positions, a decoder.
"""

from __future__ import annotations

import pytest
import torch

from dp_microclip.losses import per_example_mean_loss

from .data import CLASSES, PAD, VOCAB, cross_entropy, token_batch
from .harness import B, ZooCase, assert_matches, zoo_params

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster on a shared machine

FEATS = 4
_AUDIO = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
              conv_dim=(8, 8), conv_stride=(2, 2), conv_kernel=(3, 3), num_conv_pos_embeddings=4,
              num_conv_pos_embedding_groups=2, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
              feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0, mask_feature_prob=0.0,
              num_labels=CLASSES, classifier_proj_size=8, use_weighted_layer_sum=False)


def _data2vec_audio(T=None):
    config = dict(_AUDIO, num_conv_pos_embeddings=2, conv_pos_kernel_size=3)  # 2 positional convs of kernel 3
    return transformers.Data2VecAudioForSequenceClassification(transformers.Data2VecAudioConfig(**config))


def _sew(T=None):
    return transformers.SEWForSequenceClassification(transformers.SEWConfig(**_AUDIO, squeeze_factor=2))


def _waveform_batch(B, T, dtype, g):
    # Two convs of kernel 3, stride 2: L samples -> ((L - 3) // 2 + 1 - 3) // 2 + 1 frames; L = 4T + 3 gives T.
    return {"input_values": torch.randn(B, 4 * T + 3, generator=g, dtype=dtype)}, torch.randint(
        0, CLASSES, (B,), generator=g)


def _speech2text(T=None):
    return transformers.Speech2TextForConditionalGeneration(transformers.Speech2TextConfig(
        vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, input_feat_per_channel=FEATS,
        input_channels=1, num_conv_layers=2, conv_channels=8, conv_kernel_sizes=(3, 3), max_source_positions=32,
        max_target_positions=16, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        encoder_layerdrop=0.0, decoder_layerdrop=0.0, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1,
    ))


def _shift_right(labels, start=1):
    shifted = labels.new_full(labels.shape, start)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == -100, PAD)


def _speech2text_batch(B, T, dtype, g):
    # Two stride-2 convs: 4T frames -> T encoder positions; ragged frame masks.
    frames = 4 * T
    feats = torch.randn(B, frames, FEATS, generator=g, dtype=dtype)
    n = torch.tensor([frames - 4 * (i % 2) for i in range(B)])
    mask = (torch.arange(frames)[None, :] < n[:, None]).long()
    target, target_mask = token_batch(B, T, dtype, g)
    labels = target.masked_fill(target_mask == 0, -100)
    return {"input_features": feats, "attention_mask": mask, "decoder_input_ids": _shift_right(labels)}, labels


def _logits(model, kw):
    return model(**kw).logits


def _seq2seq_loss(logits, labels):
    return per_example_mean_loss(logits, labels).mean()


CASES = {
    "data2vec_audio": ZooCase(_data2vec_audio, _waveform_batch, _logits, cross_entropy),
    "sew": ZooCase(_sew, _waveform_batch, _logits, cross_entropy),
    "speech2text": ZooCase(_speech2text, _speech2text_batch, _logits, _seq2seq_loss),
}


@pytest.mark.parametrize("name, b, T", zoo_params(CASES))
def test_matches_naive_loop(name, b, T):
    assert_matches(CASES[name], B=B, T=T, b=b)
