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
# # 02 DP training: an epsilon you can report
#
# **What this shows.** DP-SGD with `privacy=dp_microclip.DP(target_epsilon=..., ...)` on
# scikit-learn's bundled digits (no download):
#
# 1. `attach` calibrates the noise multiplier `z` for the target; `micro_batch_size=1` (per-example
#    clipping) is the DP default.
# 2. `engine.data_loader(dataset)` draws Poisson batches (their size varies).
# 3. `engine.epsilon()` and `engine.privacy_statement()` report what ran.
# 4. `engine.noise` switches noise off (epsilon becomes infinite) and on.
# 5. A checkpoint with `engine.state_dict(include_rng_state=True)` resumes bit for bit, and why it must stay secret.
# 6. Accuracy against the micro-batch size `b` at a fixed epsilon: why `b = 1` is the DP default and
#    when `b > 1` is worth it.
#
# `torch.manual_seed` fixes the data split and the initialisation only. The engines get **no seed**:
# their noise and sampling come from the operating system, as they must in a real DP run (anyone who
# knows the seed can regenerate the noise). So the accuracies below change a little from run to run;
# the epsilons do not. About 40 s on 2 CPU cores.

# %%
import io
import time

import torch
import torch.nn.functional as F
from torch import nn

import dp_microclip
from tutorials.data import digits

torch.set_num_threads(1)
torch.manual_seed(0)                      # data and initialisation only, never the engine
train_set, test_set, _ = digits(seed=0)   # 1437 training, 360 test images, clean labels
N = len(train_set)
EXPECTED_BATCH = 256
Q = EXPECTED_BATCH / N                    # sample rate: each record joins each batch with probability q
EPOCHS = 30
DELTA = 1e-5                              # below 1/N
print(f"N = {N}, q = {Q:.4f}, {EPOCHS} epochs = {EPOCHS * round(1 / Q)} steps")


def make_model() -> nn.Module:
    # Small models fare better under DP: the noise is added to every coordinate.
    # (No BatchNorm: DP mode refuses it, use GroupNorm/LayerNorm.)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def accuracy(model) -> float:
    x, y = test_set.tensors
    with torch.no_grad():                  # evaluation without gradients: not a training batch
        return (model(x).argmax(1) == y).float().mean().item()


def step(engine, x, y) -> None:
    engine.optimizer.zero_grad()
    # engine.loss: one loss per example in (reduction="none"), their mean out; in DP mode it checks on the
    # first batch that each example's loss depends on that example only (what epsilon assumes)
    engine.loss(F.cross_entropy, engine.model(x), y, reduction="none").backward()
    engine.optimizer.step()                    # clip per micro-batch, add noise, update


# %% [markdown]
# ## 1-3. Train to a target epsilon, with the engine's Poisson loader

# %%
model = make_model()
optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.5)
engine = dp_microclip.attach(
    model, optimizer, micro_batch_size=1, max_grad_norm=1.0,
    privacy=dp_microclip.DP(target_epsilon=8.0, delta=DELTA, sample_rate=Q, epochs=EPOCHS),
)
Z1 = engine.noise_multiplier
print(f"calibrated noise multiplier z = {Z1:.3f}")

loader = engine.data_loader(train_set)     # Poisson sampling; one epoch = round(1/q) batches
sizes = []
start = time.perf_counter()
for epoch in range(EPOCHS):
    for x, y in loader:
        sizes.append(len(y))
        step(engine, x, y)
print(f"trained in {time.perf_counter() - start:.1f} s; batch sizes of the first 12 steps: {sizes[:12]} "
      f"(expected {EXPECTED_BATCH})")
print(f"test accuracy: {accuracy(model):.4f}")
print(f"epsilon = {engine.epsilon():.3f} at delta = {DELTA}   (RDP, a looser bound: {engine.epsilon(accountant='rdp'):.3f})\n")
print(engine.privacy_statement())

# %% [markdown]
# The budget is enforced: the plan (30 epochs) reaches epsilon 8, and a step past it is refused
# *before* it happens.

# %%
x, y = next(iter(loader))
try:
    step(engine, x, y)
except dp_microclip.PrivacyError as err:
    print(f"PrivacyError: {err}")
engine.detach()

# %% [markdown]
# ## 4. The noise toggle
#
# `engine.noise = False` trains without noise (useful to check that the model learns at all); one
# such step makes epsilon infinite for the whole run, and the statement names the step. With a
# `target_epsilon` (budget enforced) such a step is refused, so here the engine is given `z` directly.

# %%
torch.manual_seed(0)
model = make_model()
optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.5)
engine = dp_microclip.attach(model, optimizer, micro_batch_size=1, max_grad_norm=1.0,
                             privacy=dp_microclip.DP(noise_multiplier=1.5, delta=DELTA, sample_rate=Q))
for i, (x, y) in enumerate(engine.data_loader(train_set)):
    engine.noise = i != 2                  # step 3 without noise
    step(engine, x, y)
print("epsilon after a noise-free step:", engine.epsilon())
print("\n".join(line for line in engine.privacy_statement().splitlines() if "noise" in line.lower()))
engine.detach()

# %% [markdown]
# ## 5. Checkpoint and resume
#
# Save the model's, the optimizer's and the engine's state dicts. `engine.state_dict()` holds the
# privacy ledger (so the resumed run reports the right epsilon); with `include_rng_state=True` it also
# holds the states of the engine's noise, grouping and sampling generators, so the run resumes **bit
# for bit**, even in the middle of an epoch.
#
# **That checkpoint must stay as secret as the training data.** The generator states predict every
# future noise draw and Poisson coin: whoever has them can subtract the noise from later updates and
# knows which records each later batch holds, and the guarantee is gone for those steps. Keep it with
# the data, or save `engine.state_dict()` without the RNG state (the ledger and epsilon still continue
# exactly; the randomness after the restart is fresh).
#
# Bit-for-bit equality also needs a fixed gradient route (`grad_mode="bookkeeping"` or
# `"materialize"`): `"auto"` picks routes by timing, which can differ between processes at float
# rounding.

# %%
PLAN = dict(noise_multiplier=1.5, delta=DELTA, sample_rate=Q)


def attach(model, optimizer):
    return dp_microclip.attach(model, optimizer, micro_batch_size=1, max_grad_norm=1.0,
                               grad_mode="bookkeeping", privacy=dp_microclip.DP(**PLAN))


def batches(loader):
    while True:                            # epoch after epoch
        yield from loader


torch.manual_seed(0)
model = make_model()
optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.5)
engine = attach(model, optimizer)
stream = batches(engine.data_loader(train_set))
for _ in range(10):                        # 10 steps: the middle of the second epoch (6 steps per epoch)
    step(engine, *next(stream))

buffer = io.BytesIO()                      # a file in real life, stored as carefully as the data
torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "engine": engine.state_dict(include_rng_state=True)}, buffer)

for _ in range(10):                        # the uninterrupted run continues
    step(engine, *next(stream))
uninterrupted = [p.detach().clone() for p in model.parameters()]
eps_uninterrupted = engine.epsilon()
engine.detach()

# "restart": a fresh process would rebuild everything from the checkpoint
buffer.seek(0)
checkpoint = torch.load(buffer)
model = make_model()
optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.5)
model.load_state_dict(checkpoint["model"])
optimizer.load_state_dict(checkpoint["optimizer"])
engine = attach(model, optimizer)          # the same arguments as before
engine.load_state_dict(checkpoint["engine"])
stream = batches(engine.data_loader(train_set))   # continues the epoch where it stopped
for _ in range(10):
    step(engine, *next(stream))
difference = max((p - q).abs().max().item() for p, q in zip(model.parameters(), uninterrupted))
print(f"uninterrupted 20 steps: epsilon {eps_uninterrupted:.4f}")
print(f"10 + checkpoint + 10:   epsilon {engine.epsilon():.4f}, max parameter difference {difference:.1e}")
engine.detach()

# %% [markdown]
# ## 6. Why `b = 1` under DP: accuracy against `b` at a fixed epsilon
#
# With micro-batches of `b > 1` examples, adding or removing one record can move its micro-batch's
# clipped gradient from one vector of norm `C` to another: the sensitivity is `2C`, not `C`, so the
# accountant sees `z / 2` and calibration doubles `z`. And the clipped sum has only about `B / b` terms
# of norm at most `C`, against noise of the same size. So at a fixed epsilon the signal-to-noise
# ratio, roughly `(B / b) / z`, falls about `2b`-fold. Same target epsilon, same plan, same model and
# learning rate, three values of `b` (three initialisations each):

# %%
# Calibrated once per sensitivity: Z1 for b = 1 (section 1), and 2 * Z1 for b > 1, which the accountant
# sees as Z1: the same epsilon (printed below). attach(target_epsilon=...) finds these values too.


def dp_run(b: int, init_seed: int, report_epsilon: bool) -> tuple[float, float, float | None]:
    torch.manual_seed(init_seed)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.5)
    z = Z1 if b == 1 else 2 * Z1
    engine = dp_microclip.attach(model, optimizer, micro_batch_size=b, max_grad_norm=1.0,
                                 privacy=dp_microclip.DP(noise_multiplier=z, delta=DELTA, sample_rate=Q))
    loader = engine.data_loader(train_set)
    for _ in range(EPOCHS):
        for x, y in loader:
            step(engine, x, y)
    out = z, accuracy(model), engine.epsilon() if report_epsilon else None
    engine.detach()
    return out


B_VALUES = (1, 2, 8)
results = {}
start = time.perf_counter()
for b in B_VALUES:
    results[b] = [dp_run(b, s, report_epsilon=s == 0) for s in range(3)]
print(f"({time.perf_counter() - start:.0f} s)")
print(f"{'b':>3} {'z':>7} {'epsilon':>8} {'SNR vs b=1':>11} {'test accuracy (3 inits)':>26}")
for b in B_VALUES:
    z, _, eps = results[b][0]
    accs = [a for _, a, _ in results[b]]
    snr = ((1 / b) / z) / (1 / Z1)        # (B/b)/z, relative to b = 1
    print(f"{b:>3} {z:>7.3f} {eps:>8.3f} {snr:>11.3f} {sum(accs) / 3:>10.4f}  {[round(a, 3) for a in accs]}")

# %%
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(4.5, 3))
ax.plot(B_VALUES, [sum(a for _, a, _ in results[b]) / 3 for b in B_VALUES], "o-")
for b in B_VALUES:
    ax.scatter([b] * 3, [a for _, a, _ in results[b]], color="gray", s=10)
ax.set_xscale("log", base=2)
ax.set_xticks(B_VALUES)
ax.set_xticklabels([str(b) for b in B_VALUES])
ax.set_xlabel("micro-batch size b")
ax.set_ylabel("test accuracy")
ax.set_title("DP-SGD on digits, epsilon = 8, delta = 1e-5")
fig.tight_layout()
plt.show()

# %% [markdown]
# **When `b > 1` is worth it.**
#
# * *Noise-free* training (tutorial 01): no sensitivity, no noise; `b` then trades how finely
#   draggers are muted against how much of the gradient is kept.
# * *Memory*: the engine's cost grows with the number of micro-batches; for a large model where
#   `b = 1` does not fit, `b > 1` lets you train at all, at the price above in accuracy at the same epsilon.
#   Prefer spending memory on a larger expected batch at `b = 1` when you can.
#
# Otherwise, for DP, keep the default `micro_batch_size=1`.
