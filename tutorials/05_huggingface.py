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
# # 05 HuggingFace models: DP fine-tuning of an unchanged GPT-2, and LoRA
#
# **What this shows.** `attach` on a HuggingFace `GPT2LMHeadModel` as it comes (tied embeddings,
# HF's `Conv1D` layers, `(1, T)` position ids), trained with DP-SGD at `micro_batch_size=1` and a
# per-example causal-LM loss from `dp_microclip.losses`, then the same with LoRA adapters from
# `peft` (frozen base model; only the adapters are clipped, noised and trained).
#
# Offline: the model is built from a tiny `GPT2Config` (random weights: no download), and the data
# is a synthetic "language" (each sequence counts upward from a random token, with random lengths
# and padding), so the fine-tuning has something learnable. About 30 s on 2 CPU cores.
#
# **The loss.** HuggingFace's `model(..., labels=...).loss` averages over every token of the
# *batch*, which weighs each example by its length relative to the others: one example's
# gradient then depends on the other examples, and the DP analysis does not hold.
# `causal_lm_per_example_loss(logits, labels)` returns one loss per example (its own token mean);
# backprop its `.mean()`. The loss curves of both runs are plotted at the end.

# %%
import time
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")      # tqdm in a notebook without ipywidgets
import matplotlib.pyplot as plt
import torch
from torch.utils.data import TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel

import dp_microclip
from dp_microclip.losses import causal_lm_per_example_loss

warnings.filterwarnings("ignore", category=FutureWarning)          # transformers/peft deprecation notices
torch.set_num_threads(1)
torch.manual_seed(0)                       # data and initialisation only; the engines get no seed

VOCAB, T, N = 48, 16, 512


def make_data(n):
    start = torch.randint(0, VOCAB, (n, 1))
    ids = (start + torch.arange(T)) % VOCAB                     # counting: token t+1 = token t + 1
    lengths = torch.randint(6, T + 1, (n,))
    mask = (torch.arange(T) < lengths[:, None]).long()           # right padding
    return ids.masked_fill(mask == 0, 0), mask


train_set = TensorDataset(*make_data(N))
held_ids, held_mask = make_data(256)


def eval_loss(model) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=held_ids, attention_mask=held_mask).logits
        loss = causal_lm_per_example_loss(logits, held_ids.masked_fill(held_mask == 0, -100)).mean().item()
    model.train()
    return loss


def fine_tune(model, opt, engine, epochs):
    """Train; returns the training loss of each step and the held-out loss after each epoch (and before)."""
    loader = engine.data_loader(train_set)
    train_curve, held_curve = [], [eval_loss(model)]
    for _ in range(epochs):
        for ids, mask in loader:
            opt.zero_grad()
            logits = model(input_ids=ids, attention_mask=mask).logits          # (B, T, V)
            labels = ids.masked_fill(mask == 0, -100)                           # padding does not count
            loss = engine.loss(causal_lm_per_example_loss, logits, labels)      # mean of per-example losses,
            loss.backward()                                                     # checked per example in DP mode
            opt.step()
            train_curve.append(loss.item())
        held_curve.append(eval_loss(model))
    return train_curve, held_curve


config = GPT2Config(vocab_size=VOCAB, n_positions=T, n_embd=64, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
print(f"tiny GPT-2: {sum(p.numel() for p in GPT2LMHeadModel(config).parameters()):,} parameters")

# %% [markdown]
# ## DP fine-tuning of the whole model
#
# Expected batch 64 of 512 sequences (`q = 0.125`), 8 epochs (64 steps), target epsilon 8 at
# `delta = 1e-5`.

# %%
Q, EPOCHS, DELTA = 64 / N, 8, 1e-5
model = GPT2LMHeadModel(config)            # unchanged: no wrapper, no module swap
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
engine = dp_microclip.attach(model, opt, micro_batch_size=1, max_grad_norm=1.0,
                             privacy=dp_microclip.DP(target_epsilon=8.0, delta=DELTA, sample_rate=Q, epochs=EPOCHS))
print(f"calibrated z = {engine.noise_multiplier:.3f}")
start = time.perf_counter()
curves = {"full fine-tuning": fine_tune(model, opt, engine, EPOCHS)}
held = curves["full fine-tuning"][1]
print(f"{engine.steps_taken} DP steps in {time.perf_counter() - start:.0f} s")
print(f"held-out per-token loss: {held[0]:.3f} -> {held[-1]:.3f}  (uniform guessing: {torch.log(torch.tensor(float(VOCAB))):.3f})")
print(f"epsilon = {engine.epsilon():.3f} at delta = {DELTA}")
engine.detach()

# %% [markdown]
# ## LoRA with peft
#
# `get_peft_model` freezes the base model and adds low-rank adapters to the attention projection
# (`c_attn`, a HF `Conv1D`, hence `fan_in_fan_out=True`). Attach **after** freezing: the engine
# clips exactly the parameters that train, and refuses a step if the optimizer holds one it does not
# clip. Fewer trainable coordinates also means less total noise.

# %%
try:
    from peft import LoraConfig, get_peft_model
except ImportError:
    print("peft is not installed (pip install peft): skipping the LoRA part")
    get_peft_model = None

if get_peft_model is not None:
    torch.manual_seed(0)
    base = GPT2LMHeadModel(config)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                                            lora_dropout=0.0))
    model.print_trainable_parameters()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    engine = dp_microclip.attach(model, opt, micro_batch_size=1, max_grad_norm=1.0,
                                 privacy=dp_microclip.DP(target_epsilon=8.0, delta=DELTA, sample_rate=Q, epochs=EPOCHS))
    start = time.perf_counter()
    curves["LoRA (r=4)"] = fine_tune(model, opt, engine, EPOCHS)
    held = curves["LoRA (r=4)"][1]
    print(f"LoRA: {engine.steps_taken} DP steps in {time.perf_counter() - start:.0f} s; "
          f"held-out loss {held[0]:.3f} -> {held[-1]:.3f}; epsilon = {engine.epsilon():.3f}")
    engine.detach()

# %% [markdown]
# ## The loss curves
#
# The training loss of each DP step (the batch's mean per-example loss, before the noise) and the
# held-out loss after each epoch.

# %%
fig, ax = plt.subplots(figsize=(6, 3.2))
for (label, (train_curve, held_curve)), color in zip(curves.items(), ("C0", "C1")):
    steps_per_epoch = len(train_curve) / EPOCHS
    ax.plot(range(1, len(train_curve) + 1), train_curve, color=color, alpha=0.5, label=f"{label}: training batches")
    ax.plot([e * steps_per_epoch for e in range(EPOCHS + 1)], held_curve, "o-", color=color,
            label=f"{label}: held-out")
ax.axhline(torch.log(torch.tensor(float(VOCAB))).item(), color="gray", linestyle="--", linewidth=1,
           label="uniform guessing")
ax.set_xlabel("DP step")
ax.set_ylabel("per-token loss")
ax.legend(fontsize="small")
fig.tight_layout()
plt.show()

# %% [markdown]
# The base model here is random, so LoRA on it learns less than full fine-tuning; with a real
# pretrained checkpoint (`GPT2LMHeadModel.from_pretrained(...)`) the code is the same. For other
# architectures see `docs/models.md` (BERT, RoBERTa, LLaMA, Mistral, T5, Whisper, ...), and
# `per_example_mean_loss` for models whose labels need no shift.
