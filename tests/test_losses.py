"""dp_microclip.losses: per-example losses, by hand and against HuggingFace's own loss."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

import dp_microclip.losses
from dp_microclip.losses import causal_lm_per_example_loss, per_example_mean, per_example_mean_loss


def _by_hand(logits, labels, ignore_index=-100):
    """Loops: for each example, the mean of -log softmax(logits)[label] over its counted tokens."""
    out = []
    for i in range(labels.shape[0]):
        terms = []
        for t in range(labels.shape[1]):
            y = int(labels[i, t])
            if y == ignore_index:
                continue
            row = logits[i, t].double()
            terms.append(float(torch.logsumexp(row, 0) - row[y]))
        out.append(sum(terms) / len(terms) if terms else 0.0)
    return torch.tensor(out, dtype=torch.float64)


def _batch(seed=0, B=3, T=5, V=7):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[1, 3:] = -100  # a shorter example
    labels[2, 0] = -100  # a masked prompt token
    return logits, labels


def test_per_example_mean_loss_by_hand():
    logits, labels = _batch()
    got = per_example_mean_loss(logits, labels)
    assert got.shape == (3,)
    torch.testing.assert_close(got, _by_hand(logits, labels), rtol=1e-12, atol=1e-12)


def test_causal_shift_by_hand():
    logits, labels = _batch(1)
    got = causal_lm_per_example_loss(logits, labels)
    # Position t predicts label t + 1: drop the last logits and the first label, then as above.
    torch.testing.assert_close(got, _by_hand(logits[:, :-1], labels[:, 1:]), rtol=1e-12, atol=1e-12)


def test_examples_are_independent_of_each_other():
    """Example 0's loss does not change when another example gets shorter (unlike a batch-wide token mean)."""
    logits, labels = _batch(2)
    before = causal_lm_per_example_loss(logits, labels)
    shorter = labels.clone()
    shorter[2, 2:] = -100
    after = causal_lm_per_example_loss(logits, shorter)
    torch.testing.assert_close(after[:2], before[:2], rtol=0, atol=0)
    assert not torch.allclose(after[2], before[2])


def test_example_with_no_counted_token_is_zero_and_counts_in_the_mean():
    logits, labels = _batch(3)
    labels[0] = -100
    got = per_example_mean_loss(logits, labels)
    assert float(got[0]) == 0.0
    assert math.isclose(float(got.mean()), float(got[1:].sum()) / 3, rel_tol=1e-12)


def test_custom_ignore_index_and_label_smoothing():
    logits, labels = _batch(4)
    pad = labels.masked_fill(labels == -100, 0)
    mask = labels != -100
    got = per_example_mean_loss(logits, labels.masked_fill(~mask, 6), ignore_index=6)
    want = per_example_mean_loss(logits, pad.masked_fill(~mask, -100).masked_fill(pad == 6, -100))
    torch.testing.assert_close(got, want)
    smooth = per_example_mean_loss(logits, labels, label_smoothing=0.1)
    tokens = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 7), labels.reshape(-1), reduction="none", label_smoothing=0.1, ignore_index=-100
    ).reshape(labels.shape)
    torch.testing.assert_close(smooth, per_example_mean(tokens, mask))


def test_bf16_logits_are_upcast():
    logits, labels = _batch(5)
    got = causal_lm_per_example_loss(logits.bfloat16(), labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), causal_lm_per_example_loss(logits.bfloat16().double(), labels))


def test_shape_errors():
    logits, labels = _batch()
    with pytest.raises(ValueError, match="class dimension"):
        per_example_mean_loss(logits, labels[:, :-1])
    with pytest.raises(ValueError, match=r"\(B, T, V\)"):
        causal_lm_per_example_loss(logits[0], labels[0])


def test_gradient_of_mean_is_mean_of_per_example_gradients():
    """What the engine relies on: d(mean_i l_i)/d logits_i involves example i only, scaled by 1/B."""
    logits, labels = _batch(6)
    logits.requires_grad_(True)
    per_example_mean_loss(logits, labels).mean().backward()
    whole = logits.grad.clone()
    for i in range(3):
        one = logits[i:i + 1].detach().clone().requires_grad_(True)
        per_example_mean_loss(one, labels[i:i + 1]).mean().backward()
        torch.testing.assert_close(whole[i:i + 1], one.grad / 3)


def test_docstring_examples():
    result = doctest.testmod(dp_microclip.losses, verbose=False)
    assert result.failed == 0 and result.attempted > 0


# ------------------------------------------------------------------ against HuggingFace's loss
transformers = pytest.importorskip("transformers")


def _gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)).double()


def test_causal_lm_equals_hf_loss_when_lengths_are_equal():
    model = _gpt2()
    ids = torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    # HF's ForCausalLMLoss casts the logits to float32 (even in a float64 model): compare at that precision.
    torch.testing.assert_close(causal_lm_per_example_loss(out.logits, ids).mean(), out.loss.double(), rtol=1e-6, atol=1e-7)


def test_hf_loss_is_a_token_mean_that_weights_examples_by_length():
    """With ragged labels HF averages over all tokens of the batch: the coupling the docstring warns about."""
    model = _gpt2()
    ids = torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[1, 2:] = -100
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    per_example = causal_lm_per_example_loss(out.logits, labels)
    counts = (labels[:, 1:] != -100).sum(1).double()  # tokens counted per example after the shift: 5, 1, 5
    torch.testing.assert_close(out.loss.double(), (per_example * counts).sum() / counts.sum(), rtol=1e-6, atol=1e-7)
    assert abs(out.loss.item() - per_example.mean().item()) > 1e-3


def test_seq2seq_equals_hf_t5_loss_when_lengths_are_equal():
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
        dropout_rate=0.0, pad_token_id=0, decoder_start_token_id=0)).double()
    g = torch.Generator().manual_seed(2)
    ids, labels = torch.randint(1, 50, (3, 5), generator=g), torch.randint(1, 50, (3, 4), generator=g)
    out = model(input_ids=ids, labels=labels)  # T5 shifts the decoder inputs, not the labels
    torch.testing.assert_close(per_example_mean_loss(out.logits, labels).mean(), out.loss.double(), rtol=1e-6, atol=1e-7)
