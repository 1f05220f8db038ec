# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 08 The HuggingFace Trainer: `DPTrainer`, noise-free and DP, against Opacus by hand
#
# **What this shows.** `dp_microclip.integrations.hf_trainer.DPTrainer` runs an unchanged
# `transformers.Trainer` loop through the engine: the Trainer's own optimizer, schedule, logging
# and `TrainingArguments`, with
#
# * one **Poisson-sampled logical batch per optimizer step** (64 examples expected here), processed in
#   physical chunks of `per_device_train_batch_size` (16) examples: the Trainer's `global_step`,
#   learning-rate schedule, logs and epochs count logical steps, the noise is drawn once per step;
# * a mean of **per-example** losses (padding and `-100` labels count per example, never HF's
#   batch-wide token mean);
# * **epsilon in the Trainer's logs** and a privacy statement printed when training ends.
#
# Then the same DP run written by hand with Opacus (`make_private` + `BatchMemoryManager`), with
# its code length and wall time measured here. Offline: a tiny GPT-2 built from a config (random
# weights, no download) on a synthetic "language" (each sequence counts upward from a random token,
# random lengths, right padding). About a minute on 2 CPU cores.

# %%
import inspect
import tempfile
import time
import warnings

warnings.filterwarnings("ignore")          # tqdm without ipywidgets, transformers / Opacus notices, seeded engines
import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments, default_data_collator
from transformers.utils import logging as hf_logging

import dp_microclip
from dp_microclip.integrations.hf_trainer import DPTrainer
from dp_microclip.losses import causal_lm_per_example_loss

hf_logging.set_verbosity_error()
torch.set_num_threads(1)

VOCAB, T, N, HELD = 48, 16, 512, 256
LOGICAL, CHUNK, EPOCHS, LR, DELTA = 64, 16, 2, 3e-3, 1e-5


def make_rows(n, seed):
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    ids = (start + torch.arange(T)) % VOCAB                      # counting: token t+1 = token t + 1
    lengths = torch.randint(6, T + 1, (n,), generator=g)
    mask = (torch.arange(T) < lengths[:, None]).long()            # right padding
    ids = ids.masked_fill(mask == 0, 0)
    return [{"input_ids": i, "attention_mask": m, "labels": i.masked_fill(m == 0, -100)} for i, m in zip(ids, mask)]


class Rows(Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


train_set, held = Rows(make_rows(N, 0)), default_data_collator(make_rows(HELD, 1))
config = GPT2Config(vocab_size=VOCAB, n_positions=T, n_embd=64, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)


def fresh_model(record_rows=None):
    """The same initial weights for every run; ``record_rows``: a list that gets each training forward's rows."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    if record_rows is not None:
        model.register_forward_pre_hook(lambda module, args, kwargs: record_rows.append(kwargs["input_ids"].shape[0])
                                        if module.training else None, with_kwargs=True)
    return model


def held_out_loss(model) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=held["input_ids"], attention_mask=held["attention_mask"]).logits
        loss = causal_lm_per_example_loss(logits, held["labels"]).mean().item()
    model.train()
    return loss


def arguments(**overrides):
    kwargs = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=CHUNK, num_train_epochs=EPOCHS,
                  learning_rate=LR, optim="adamw_torch", weight_decay=0.0, lr_scheduler_type="linear",
                  logging_steps=4, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True)
    return TrainingArguments(**{**kwargs, **overrides})


print(f"tiny GPT-2: {sum(p.numel() for p in fresh_model().parameters()):,} parameters; "
      f"held-out loss before training {held_out_loss(fresh_model()):.3f} (uniform guessing: "
      f"{torch.log(torch.tensor(float(VOCAB))):.3f})")

# %% [markdown]
# ## Noise-free: clipping only
#
# Without `privacy`, the engine clips each micro-batch (here each example, `micro_batch_size=1`)
# and adds no noise. `logical_batch_size=64` sets the expected Poisson batch of a step; each is
# processed in chunks of `per_device_train_batch_size=16`. An epoch is `round(1/q) = N / 64 = 8`
# steps.

# %%
model = fresh_model()
trainer = DPTrainer(model=model, args=arguments(), train_dataset=train_set, data_collator=default_data_collator,
                    logical_batch_size=LOGICAL, attach_kwargs=dict(micro_batch_size=1, max_grad_norm=1.0))
trainer.train()
print(f"global_step = {trainer.state.global_step} logical steps; held-out loss {held_out_loss(model):.3f}")

# %% [markdown]
# ## DP: the same run with noise and a privacy ledger
#
# `privacy=DP(...)` turns on the noise (`z = 1`) and the accounting. The sample rate `q = 64 / 512`
# fixes the logical batch; `per_device_train_batch_size` is only the physical chunk, so memory is
# that of 16 examples whatever `q` is. The RDP accountant is chosen so that the epsilon compares with
# Opacus' below. Every log line carries `epsilon`; the statement is printed when `train()` ends.

# %%
forward_rows = []


def dp_trainer_run():
    model = fresh_model(forward_rows)
    trainer = DPTrainer(
        model=model, args=arguments(), train_dataset=train_set, data_collator=default_data_collator,
        attach_kwargs=dict(micro_batch_size=1, max_grad_norm=1.0,
                           privacy=dp_microclip.DP(noise_multiplier=1.0, sample_rate=LOGICAL / N, delta=DELTA,
                                                   accountant="rdp")),
    )
    trainer.train()
    return model, trainer


start = time.perf_counter()
dp_model, trainer = dp_trainer_run()
dp_trainer_seconds = time.perf_counter() - start
print(f"\nglobal_step = {trainer.state.global_step}, from {len(forward_rows)} forward passes of at most "
      f"{max(forward_rows)} rows; held-out loss {held_out_loss(dp_model):.3f}")
print("epsilon in log_history:", [(e["step"], round(e["epsilon"], 3)) for e in trainer.state.log_history
                                  if "loss" in e])
print(f"engine.epsilon() = {trainer.engine.epsilon():.3f}")

# %% [markdown]
# ## The same DP run by hand with Opacus
#
# The same model, data, optimizer (AdamW, linear decay), `z`, `C`, `q`, chunk size and number of
# logical steps, with Opacus 1.6: `make_private` wraps the model (`GradSampleModule`), the
# optimizer (`DPOptimizer`) and the loader (Poisson sampling), and `BatchMemoryManager` splits each
# sampled batch into physical chunks, skipping the optimizer step until the logical batch is done.
# What the hand-written loop must get right:
#
# * the per-example loss (HF's `labels=` loss averages over every token of the batch);
# * `position_ids` of shape `(B, T)`: GPT-2 builds `(1, T)` itself, and Opacus' per-sample gradient
#   of the position embedding then has one row instead of `B` (`stack expects each tensor to be equal
#   size`);
# * the schedule, logging and step count advance only when the optimizer really stepped
#   (`optimizer._is_last_step_skipped`, a private flag);
# * epsilon is asked for by hand.

# %%
from opacus import PrivacyEngine  # noqa: E402
from opacus.utils.batch_memory_manager import BatchMemoryManager  # noqa: E402
from transformers import get_linear_schedule_with_warmup  # noqa: E402


opacus_rows = []


def opacus_by_hand():
    model = fresh_model(opacus_rows)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    loader = torch.utils.data.DataLoader(train_set, batch_size=LOGICAL, collate_fn=default_data_collator)
    privacy_engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = privacy_engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
        poisson_sampling=True)
    steps = EPOCHS * len(loader)
    schedule = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=steps)
    step, logs = 0, []
    for _ in range(EPOCHS):
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=CHUNK, optimizer=optimizer) as chunks:
            for batch in chunks:
                optimizer.zero_grad()
                positions = torch.arange(T).expand(len(batch["input_ids"]), T)
                outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                position_ids=positions)
                loss = causal_lm_per_example_loss(outputs.logits, batch["labels"]).mean()
                loss.backward()
                optimizer.step()
                if not optimizer._is_last_step_skipped:
                    schedule.step()
                    step += 1
                    if step % 4 == 0:
                        logs.append({"step": step, "loss": loss.item(), "epsilon": privacy_engine.get_epsilon(DELTA)})
    return model, privacy_engine, logs


start = time.perf_counter()
opacus_model, privacy_engine, opacus_logs = opacus_by_hand()
opacus_seconds = time.perf_counter() - start
print(f"Opacus: {opacus_logs[-1]['step']} logical steps, from {len(opacus_rows)} forward passes of at most "
      f"{max(opacus_rows)} rows; held-out loss {held_out_loss(opacus_model):.3f}; "
      f"epsilon = {privacy_engine.get_epsilon(DELTA):.3f}")
print("epsilon in its logs:", [(e["step"], round(e["epsilon"], 3)) for e in opacus_logs])

# %% [markdown]
# ## Side by side
#
# Lines of code (non-blank, non-comment) of the two DP functions above, and their wall time on this
# machine (one thread, a shared CPU: timings move by tens of percent from run to run; both include
# building the model). The held-out loss after 16 noisy steps is not a comparison of the libraries:
# they draw different noise and Poisson batches.

# %%
def code_lines(function) -> int:
    return sum(1 for line in inspect.getsource(function).splitlines()
               if line.strip() and not line.strip().startswith("#"))


print(f"{'':28s}{'lines':>7s}{'wall time':>12s}{'epsilon':>10s}")
print(f"{'DPTrainer (dp_microclip)':28s}{code_lines(dp_trainer_run):7d}{dp_trainer_seconds:11.1f}s"
      f"{trainer.engine.epsilon():10.3f}")
print(f"{'Opacus by hand':28s}{code_lines(opacus_by_hand):7d}{opacus_seconds:11.1f}s"
      f"{privacy_engine.get_epsilon(DELTA):10.3f}")

# %% [markdown]
# The DP run with `DPTrainer` is the `DPTrainer(...)` call and `train()`; the schedule, logging,
# epsilon and the statement come with it. The two epsilons are RDP bounds for the same
# Poisson-subsampled Gaussian mechanism (`q = 0.125`, `z = 1`, 16 steps, the same accountant); they
# agree. Time is of the same order: on this tiny model both are dominated by the per-chunk forward and
# backward passes and the Trainer's or the loop's own overhead.
#
# **dp-transformers** (Microsoft's library, not installed here) takes a third route: it also
# subclasses the `Trainer`, but builds on Opacus, so the model the Trainer sees is Opacus'
# per-sample-gradient wrapper and the optimizer Opacus' DP optimizer; a Trainer callback steps the
# privacy accountant and can stop training at a chosen epsilon; its sampler draws Poisson batches,
# optionally of authors rather than examples (each author's records together), and it asks for
# the physical batch size as a separate training argument. The loss is the model's own. `DPTrainer`
# instead leaves model and optimizer unchanged (hooks only), clips micro-batches from captured
# activations without storing per-example gradients, refuses the batch-wide `labels=` loss in DP
# mode, and reports epsilon in every log (docs/trainer.md has the full comparison).
