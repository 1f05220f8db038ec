"""DPTrainer: an unchanged ``transformers.Trainer`` run equals the same steps written as a plain loop with the engine.

Tiny GPT-2 and BERT models built from configs (no download), in float64, dropout off; both runs get the
same initial weights and the same engine seed, so the engine's Poisson loader draws the same batches
(and, in DP mode, the same noise). The Trainer uses ``optim="sgd"`` at a constant learning rate, the
loop ``torch.optim.SGD`` at the same rate.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, TrainingArguments, default_data_collator,
)

import dp_microclip  # noqa: E402
from dp_microclip.errors import ConfigurationError, PrivacyError  # noqa: E402
from dp_microclip.integrations.hf_trainer import DPTrainer  # noqa: E402
from dp_microclip.losses import causal_lm_per_example_loss, sequence_classification_per_example_loss  # noqa: E402
from .helpers import OwnLossDP

# Seeded DP engines warn (on purpose here), HF deprecations; tiny float64 models run ~10x faster on one thread.
pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("one_thread")]

N, T, VOCAB, LR, STEPS = 32, 10, 100, 0.1, 3




class Records(torch.utils.data.Dataset):
    """A list of dicts of tensors, one per record."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def text_rows(with_class_labels: bool):
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(N):
        length = int(torch.randint(3, T + 1, (1,), generator=g))
        mask = (torch.arange(T) < length).long()                            # right padding
        ids = torch.randint(1, VOCAB, (T,), generator=g).masked_fill(mask == 0, 0)
        labels = torch.randint(0, 3, (), generator=g) if with_class_labels else ids.masked_fill(mask == 0, -100)
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return Records(rows)


def gpt2():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).double()


def bert():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).double()


def training_args(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=8, learning_rate=LR,
                  optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, logging_steps=1, report_to="none",
                  save_strategy="no", use_cpu=True, disable_tqdm=True, dataloader_pin_memory=False)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def run_trainer(model, dataset, tmp_path, attach_kwargs, args=None, trainer_class=None, **trainer_kwargs):
    trainer = (trainer_class or DPTrainer)(model=model, args=args or training_args(tmp_path), train_dataset=dataset,
                        attach_kwargs=attach_kwargs, **trainer_kwargs)
    trainer.privacy_callback.verbose = False
    trainer.train()
    return trainer


def run_loop(model, dataset, attach_kwargs, loss_fn, *, steps=STEPS, batch_size=8, collate=default_data_collator,
             lr_at=lambda step: LR):
    """The plain loop: ONE forward and backward per sampled logical batch (no physical chunks), one step each.

    Returns the engine and the epsilon after every step (DP mode)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    engine = dp_microclip.attach(model, optimizer, **attach_kwargs)
    loader = engine.data_loader(dataset, None if engine.sample_rate else batch_size, collate_fn=collate,
                                collate_keeps_order=True)
    epsilons = []
    for step, batch in zip(range(steps), loader):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        optimizer.zero_grad()
        labels = batch.pop("labels")
        loss_fn(model(**batch).logits, labels).mean().backward()
        optimizer.step()
        epsilons.append(engine.epsilon())
    return engine, epsilons


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def update_difference(a, b, start):
    """|theta_a - theta_b| / |theta_b - theta_0|: how far two runs' updates differ, relative to the update."""
    return ((flat(a) - flat(b)).norm() / (flat(b) - flat(start)).norm()).item()


def max_relative_difference(a, b):
    return max(((p - q).norm() / q.norm()).item() for p, q in zip(a.parameters(), b.parameters()))


class ForwardSizes:
    """Rows of every training forward pass of a model (to see the physical chunks)."""

    def __init__(self, model):
        self.sizes = []
        model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            self.sizes.append(kwargs["input_ids"].shape[0])


DP_SETTINGS = dict(micro_batch_size=1, max_grad_norm=0.5, seed=7, grad_mode="bookkeeping",
                   privacy=OwnLossDP(noise_multiplier=1.0, sample_rate=0.25, delta=1e-3, accountant="rdp"))
DP_B2 = {**DP_SETTINGS, "micro_batch_size": 2}
NOISE_FREE = dict(micro_batch_size=2, max_grad_norm=0.5, seed=7, grad_mode="bookkeeping")

# (settings, chunk = per_device_train_batch_size, noise on): the logical batch is 8 expected examples
# (q N = 0.25 x 32 in DP mode, logical_batch_size=8 noise-free), processed in chunks of `chunk`.
CASES = {"noise-free b=2, chunks of 4": (NOISE_FREE, 4, False), "DP b=1, chunks of 3": (DP_SETTINGS, 3, True),
         "DP b=1 noise off, chunks of 3": (DP_SETTINGS, 3, False), "DP b=2, chunks of 4": (DP_B2, 4, True),
         "DP b=1, chunk 64 > logical batch": (DP_SETTINGS, 64, True)}


@pytest.mark.parametrize("case", list(CASES))
def test_gpt2_trainer_in_physical_chunks_equals_the_plain_loop(tmp_path, case):
    """Chunks of per_device_train_batch_size; the loop takes each sampled logical batch in one pass."""
    settings, chunk, noise = CASES[case]
    model = gpt2()
    twin, start = copy.deepcopy(model), copy.deepcopy(model)
    sizes = ForwardSizes(model)
    # A linear schedule: if the Trainer counted chunks as steps, its learning rates would differ from the loop's.
    args = training_args(tmp_path, per_device_train_batch_size=chunk, lr_scheduler_type="linear")
    trainer = DPTrainer(model=model, args=args, train_dataset=text_rows(False), attach_kwargs=settings,
                        logical_batch_size=None if "privacy" in settings else 8)
    trainer.privacy_callback.verbose = False
    trainer.create_optimizer()
    assert trainer.engine is not None
    trainer.engine.noise = noise if trainer.engine.dp else False
    trainer.train()
    optimizer = torch.optim.SGD(twin.parameters(), lr=LR)
    engine = dp_microclip.attach(twin, optimizer, **settings)
    engine.noise = trainer.engine.noise
    loader = engine.data_loader(text_rows(False), None if engine.dp else 8, collate_fn=default_data_collator,
                                collate_keeps_order=True)
    for step, batch in zip(range(STEPS), loader):
        optimizer.param_groups[0]["lr"] = LR * (STEPS - step) / STEPS      # HF's linear decay, no warm-up
        optimizer.zero_grad()
        labels = batch.pop("labels")
        causal_lm_per_example_loss(twin(**batch).logits, labels).mean().backward()
        optimizer.step()
    assert trainer.state.global_step == trainer.engine.steps_taken == engine.steps_taken == STEPS
    assert trainer.lr_scheduler.last_epoch == STEPS                 # the schedule stepped once per logical batch
    if chunk < 8:
        assert len(sizes.sizes) > STEPS                            # more forward passes than steps: chunks
    if settings["micro_batch_size"] == 1:
        assert max(sizes.sizes) <= chunk
    assert max_relative_difference(model, start) > 1e-3             # it trained
    assert update_difference(model, twin, start) < 1e-10
    assert trainer.engine.epsilon() == engine.epsilon()             # one ledger step per logical batch
    assert trainer.args.max_grad_norm == 0.0                        # the Trainer's clipping is off
    assert not any("grad_norm" in entry for entry in trainer.state.log_history)


@pytest.mark.parametrize("case", ["noise-free b=2, chunks of 4", "DP b=1, chunks of 3"])
def test_bert_classification_trainer_in_physical_chunks_equals_the_plain_loop(tmp_path, case):
    settings, chunk, _ = CASES[case]
    model = bert()
    twin, start = copy.deepcopy(model), copy.deepcopy(model)
    trainer = run_trainer(model, text_rows(True), tmp_path, settings,
                          args=training_args(tmp_path, per_device_train_batch_size=chunk),
                          logical_batch_size=None if "privacy" in settings else 8)
    run_loop(twin, text_rows(True), settings, sequence_classification_per_example_loss)
    assert trainer.state.global_step == STEPS
    assert update_difference(model, twin, start) < 1e-10


def test_an_epoch_is_round_one_over_q_logical_steps(tmp_path):
    """num_train_epochs=2 without max_steps: 2 x round(1/q) = 8 logical steps, however many chunks they took."""
    model = gpt2()
    sizes = ForwardSizes(model)
    trainer = run_trainer(model, text_rows(False), tmp_path, DP_SETTINGS,
                          args=training_args(tmp_path, max_steps=-1, num_train_epochs=2, per_device_train_batch_size=3,
                                             logging_steps=4))
    assert trainer.state.global_step == trainer.engine.steps_taken == 8
    assert len(sizes.sizes) > 8
    assert trainer.state.epoch == pytest.approx(2.0)


def test_noise_free_gradient_accumulation_equals_the_plain_loop(tmp_path):
    """Two Poisson batches per step, each in chunks: each chunk backpropagates its plain mean loss."""
    model = gpt2()
    twin, start = copy.deepcopy(model), copy.deepcopy(model)
    trainer = DPTrainer(model=model, args=training_args(tmp_path, gradient_accumulation_steps=2,
                                                        per_device_train_batch_size=6),
                        train_dataset=text_rows(False), attach_kwargs=NOISE_FREE, logical_batch_size=8)
    trainer.privacy_callback.verbose = False
    trainer.train()
    optimizer = torch.optim.SGD(twin.parameters(), lr=LR)
    engine = dp_microclip.attach(twin, optimizer, **NOISE_FREE)
    loader = engine.data_loader(text_rows(False), 8, collate_fn=default_data_collator, collate_keeps_order=True)
    passes = 0
    while passes < 2 * STEPS:
        for batch in loader:                         # one epoch: 4 batches, 2 steps
            labels = batch.pop("labels")
            causal_lm_per_example_loss(twin(**batch).logits, labels).mean().backward()
            passes += 1
            if passes % 2 == 0:
                optimizer.step()
                optimizer.zero_grad()
            if passes == 2 * STEPS:
                break
    assert engine.steps_taken == trainer.engine.steps_taken == trainer.state.global_step == STEPS
    assert update_difference(model, twin, start) < 1e-10
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == STEPS and all(3 < loss < 6 for loss in logged)   # a mean loss (ln 100 = 4.6), not a sum


def test_epsilon_in_the_logs_equals_the_engines_after_each_logical_step(tmp_path):
    trainer = run_trainer(gpt2(), text_rows(False), tmp_path, DP_SETTINGS,
                          args=training_args(tmp_path, per_device_train_batch_size=3))
    _, epsilons = run_loop(gpt2(), text_rows(False), DP_SETTINGS, causal_lm_per_example_loss)
    assert trainer.engine is not None
    logged = [entry["epsilon"] for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in trainer.state.log_history if "loss" in entry] == list(range(1, STEPS + 1))
    assert logged == pytest.approx(epsilons, rel=1e-12) and logged == sorted(logged) and logged[0] > 0
    assert logged[-1] == pytest.approx(trainer.engine.epsilon(), rel=1e-12)
    final = trainer.state.log_history[-1]
    assert final["epsilon"] == trainer.engine.epsilon()
    assert final["privacy_statement"] == trainer.privacy_callback.statement == trainer.engine.privacy_statement()


def test_the_privacy_statement_is_printed_at_the_end(tmp_path, capsys):
    trainer = DPTrainer(model=gpt2(), args=training_args(tmp_path, max_steps=1), train_dataset=text_rows(False),
                        attach_kwargs=DP_SETTINGS)
    trainer.train()
    assert trainer.engine is not None and trainer.engine.privacy_statement() in capsys.readouterr().out


def sorting_collator(samples):
    """A user's collator that sorts rows by length, longest first (as for packed sequences)."""
    return default_data_collator(sorted(samples, key=lambda s: -int(s["attention_mask"].sum())))


def test_a_sorting_collator_at_b1_trains_correctly(tmp_path):
    """b = 1: every example is its own micro-batch, so the order of the rows in a chunk changes nothing."""
    model = gpt2()
    twin, start = copy.deepcopy(model), copy.deepcopy(model)
    run_trainer(model, text_rows(False), tmp_path, DP_SETTINGS, data_collator=sorting_collator,
                args=training_args(tmp_path, per_device_train_batch_size=3))
    run_loop(twin, text_rows(False), DP_SETTINGS, causal_lm_per_example_loss)
    assert update_difference(model, twin, start) < 1e-10


def test_a_sorting_collator_at_b2_is_refused_in_dp_mode(tmp_path):
    """b > 1: a micro-batch is a pair of rows, so a collator that sorts would regroup records by the others' lengths."""
    with pytest.raises(PrivacyError, match="collate_keeps_order=True"):                  # not declared
        run_trainer(gpt2(), text_rows(False), tmp_path, DP_B2, data_collator=sorting_collator)
    with pytest.raises(PrivacyError, match="another order than its samples"):            # declared, but it sorts
        run_trainer(gpt2(), text_rows(False), tmp_path, DP_B2, data_collator=sorting_collator,
                    collate_keeps_order=True)


def test_an_order_keeping_custom_collator_passes_the_check(tmp_path):
    trainer = run_trainer(gpt2(), text_rows(False), tmp_path, DP_B2, collate_keeps_order=True,
                          data_collator=lambda samples: default_data_collator(samples))
    assert trainer.state.global_step == STEPS


def test_a_custom_train_sampler_or_loader_is_refused_in_dp_mode(tmp_path):
    class WithSampler(DPTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    with pytest.raises(ConfigurationError, match="_get_train_sampler would be ignored"):
        WithSampler(model=gpt2(), args=training_args(tmp_path), train_dataset=text_rows(False),
                    attach_kwargs=DP_SETTINGS)

    class WithLoader(DPTrainer):
        def get_train_dataloader(self):
            return torch.utils.data.DataLoader(self.train_dataset, batch_size=8, collate_fn=default_data_collator)

    with pytest.raises(PrivacyError, match="not a LogicalBatch"):
        run_trainer(gpt2(), text_rows(False), tmp_path, DP_SETTINGS, trainer_class=WithLoader)


def test_gradient_accumulation_is_refused_in_dp_mode(tmp_path):
    trainer = DPTrainer(model=gpt2(), args=training_args(tmp_path, gradient_accumulation_steps=2),
                        train_dataset=text_rows(False), attach_kwargs=DP_SETTINGS)
    with pytest.raises(PrivacyError, match="gradient_accumulation_steps=1.*raise DP\\(sample_rate"):
        trainer.train()


def test_a_logical_batch_that_disagrees_with_the_sample_rate_is_refused(tmp_path):
    with pytest.raises(ConfigurationError, match="logical_batch_size=16 disagrees.*logical_batch_size=8"):
        run_trainer(gpt2(), text_rows(False), tmp_path, DP_SETTINGS, logical_batch_size=16)
    trainer = run_trainer(gpt2(), text_rows(False), tmp_path, DP_SETTINGS, logical_batch_size=8)   # agrees: fine
    assert trainer.state.global_step == STEPS
    for bad in (0, 2.5, True):
        with pytest.raises(ConfigurationError, match="logical_batch_size must be an int >= 1"):
            DPTrainer(model=gpt2(), args=training_args(tmp_path), train_dataset=text_rows(False),
                      attach_kwargs=DP_SETTINGS, logical_batch_size=bad)


def test_resume_and_auto_batch_size_are_refused_with_the_reason(tmp_path):
    trainer = DPTrainer(model=gpt2(), args=training_args(tmp_path), train_dataset=text_rows(False),
                        attach_kwargs=DP_SETTINGS)
    with pytest.raises(ConfigurationError, match="ledger"):
        trainer.train(resume_from_checkpoint=True)
    with pytest.raises(ConfigurationError, match="auto_find_batch_size"):
        DPTrainer(model=gpt2(), args=training_args(tmp_path, auto_find_batch_size=True),
                  train_dataset=text_rows(False), attach_kwargs=DP_SETTINGS)


def test_data_loader_workers_keep_the_logical_batches(tmp_path):
    """Two worker processes prefetch chunks; the chunk counts live in the main process, so steps stay logical."""
    model = gpt2()
    twin, start = copy.deepcopy(model), copy.deepcopy(model)
    trainer = run_trainer(model, text_rows(False), tmp_path, DP_SETTINGS,
                          args=training_args(tmp_path, per_device_train_batch_size=3, dataloader_num_workers=2))
    run_loop(twin, text_rows(False), DP_SETTINGS, causal_lm_per_example_loss)
    assert trainer.state.global_step == STEPS
    assert update_difference(model, twin, start) < 1e-10


def test_evaluation_during_training_changes_nothing(tmp_path):
    """eval_strategy="steps": forward passes under no_grad are no training step and draw no batch."""
    model = gpt2()
    twin, start = copy.deepcopy(model), copy.deepcopy(model)
    trainer = run_trainer(model, text_rows(False), tmp_path, DP_SETTINGS, eval_dataset=text_rows(False),
                          args=training_args(tmp_path, per_device_train_batch_size=3, eval_strategy="steps",
                                             eval_steps=1, per_device_eval_batch_size=16))
    run_loop(twin, text_rows(False), DP_SETTINGS, causal_lm_per_example_loss)
    assert len([entry for entry in trainer.state.log_history if "eval_loss" in entry]) == STEPS
    assert trainer.state.global_step == STEPS
    assert update_difference(model, twin, start) < 1e-10


def test_user_level_dp_equals_the_plain_loop(tmp_path):
    """DP(privacy_unit="user"): 8 users of 4 records each, at most k = 2 per sampled user, chunks of 4 rows."""
    users = [i % 8 for i in range(N)]
    settings = dict(micro_batch_size=2, max_grad_norm=0.5, seed=7, grad_mode="bookkeeping",
                    privacy=OwnLossDP(noise_multiplier=1.0, sample_rate=0.5, delta=1e-3, accountant="rdp",
                                            privacy_unit="user", max_examples_per_user=2))
    model = gpt2()
    twin, start = copy.deepcopy(model), copy.deepcopy(model)
    trainer = run_trainer(model, text_rows(False), tmp_path, settings, user_ids=users,
                          args=training_args(tmp_path, per_device_train_batch_size=4))
    optimizer = torch.optim.SGD(twin.parameters(), lr=LR)
    engine = dp_microclip.attach(twin, optimizer, **settings)
    loader = engine.data_loader(text_rows(False), user_ids=users, collate_fn=default_data_collator,
                                collate_keeps_order=True)
    while engine.steps_taken < STEPS:                 # an epoch is round(1/q) = 2 steps: 3 steps cross into the next
        for batch in loader:
            if engine.steps_taken == STEPS:
                break
            optimizer.zero_grad()
            labels = batch.pop("labels")
            causal_lm_per_example_loss(twin(**batch).logits, labels).mean().backward()
            optimizer.step()
    assert trainer.state.global_step == trainer.engine.steps_taken == engine.steps_taken == STEPS
    assert update_difference(model, twin, start) < 1e-10
    assert trainer.engine.epsilon() == engine.epsilon()
    with pytest.raises(ConfigurationError, match="Leave logical_batch_size out"):
        run_trainer(gpt2(), text_rows(False), tmp_path, settings, user_ids=users, logical_batch_size=8)


def test_the_models_labels_loss_is_refused_in_dp_mode_with_the_fix(tmp_path):
    with pytest.raises(PrivacyError, match="per_example_loss='auto'"):
        run_trainer(gpt2(), text_rows(False), tmp_path, DP_SETTINGS, per_example_loss=None)


def test_noise_free_may_train_on_the_models_loss(tmp_path):
    trainer = run_trainer(gpt2(), text_rows(False), tmp_path, NOISE_FREE, per_example_loss=None)
    assert trainer.engine is not None and trainer.engine.steps_taken == STEPS


def test_compute_loss_func_and_unknown_models_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ConfigurationError, match="per_example_loss=fn"):
        DPTrainer(model=gpt2(), args=training_args(tmp_path), train_dataset=text_rows(False),
                  attach_kwargs=DP_SETTINGS, compute_loss_func=lambda outputs, labels, num_items_in_batch=None: 0)
    with pytest.raises(ConfigurationError, match="per_example_loss=fn"):
        DPTrainer(model=gpt2().transformer, args=training_args(tmp_path), train_dataset=text_rows(False),
                  attach_kwargs=DP_SETTINGS)


@pytest.mark.parametrize("problem_type", ["single_label_classification", "multi_label_classification", "regression"])
def test_classification_losses_average_to_hfs_loss(problem_type):
    torch.manual_seed(0)
    num_labels = 1 if problem_type == "regression" else 3
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, num_labels=num_labels, problem_type=problem_type)
    model = BertForSequenceClassification(config).eval()
    ids = torch.randint(0, VOCAB, (5, 7))
    labels = {"single_label_classification": torch.randint(0, 3, (5,)),
              "multi_label_classification": torch.randint(0, 2, (5, 3)).float(),
              "regression": torch.randn(5)}[problem_type]
    out = model(input_ids=ids, labels=labels)
    mine = sequence_classification_per_example_loss(out.logits, labels, problem_type=problem_type)
    assert mine.shape == (5,)
    assert mine.mean().item() == pytest.approx(out.loss.item(), rel=1e-6)


def test_import_dp_microclip_does_not_import_transformers():
    code = ("import sys, dp_microclip, dp_microclip.integrations; "
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_empty_poisson_batches_make_noise_only_steps(tmp_path):
    """q N = 0.03: the batches are empty; HF models cannot run on zero rows, so DPTrainer skips the forward."""
    settings = {**DP_SETTINGS, "privacy": OwnLossDP(noise_multiplier=1.0, sample_rate=0.001, delta=1e-3,
                                                          accountant="rdp")}
    model = gpt2()
    start = copy.deepcopy(model)
    trainer = DPTrainer(model=model, args=training_args(tmp_path, max_steps=2), train_dataset=text_rows(False),
                        attach_kwargs=settings)
    trainer.privacy_callback.verbose = False
    trainer.train()
    assert trainer.engine is not None and trainer.engine.steps_taken == 2
    assert max_relative_difference(model, start) > 1e-3            # the noise moved every tensor
    assert 0 < trainer.engine.epsilon() < float("inf")
