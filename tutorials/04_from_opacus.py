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
# # 04 Coming from Opacus
#
# **What this shows.** The same model trained with Opacus' `PrivacyEngine().make_private(...)`
# (Poisson sampling) and with dp-microclip at `micro_batch_size=1`:
#
# 1. the code side by side;
# 2. the same clipped update on the same batch, noise off (the largest difference is printed);
# 3. the same epsilon for the same `z`, `q` and number of steps (`engine.epsilon()` against
#    Opacus' accountant);
# 4. what changes at `b > 1`, which Opacus does not have: the sensitivity doubles, so the
#    epsilon is Opacus' epsilon at `z / 2`, and the update clips groups instead of examples.
#
# | Opacus | dp-microclip |
# |---|---|
# | `model, opt, loader = PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=z, max_grad_norm=C)` | `engine = dp_microclip.attach(model, opt, micro_batch_size=1, max_grad_norm=C, privacy=DP(noise_multiplier=z, delta=delta, sample_rate=q))`; `loader = engine.data_loader(dataset)` |
# | the model is wrapped (`GradSampleModule`), the optimizer replaced (`DPOptimizer`) | model and optimizer stay the same objects; `engine.detach()` removes everything |
# | `make_private_with_epsilon(target_epsilon=..., epochs=...)` | `DP(target_epsilon=..., epochs=...)`; the budget is enforced by default |
# | `privacy_engine.get_epsilon(delta)` | `engine.epsilon()`, `engine.privacy_statement()` |
# | `BatchMemoryManager` (a memory chunk) | `micro_batch_size` is the *clipping unit* (TF Privacy's micro-batch) |
# | `F.cross_entropy(model(x), y).backward()` | `engine.loss(F.cross_entropy, model(x), y, reduction="none").backward()`: one loss per example, reduced by the engine, checked in DP mode that no example's loss depends on another (a class-weighted mean or an in-batch contrastive loss would) |
#
# Data: scikit-learn's bundled digits (no download), 1400 training images. About 20 s on 2 CPU cores.

# %%
import copy
import warnings

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.accountants import PRVAccountant, RDPAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dp_microclip
from tutorials.data import digits

warnings.filterwarnings("ignore", module="opacus")
warnings.filterwarnings("ignore", message="Full backward hook")   # from Opacus' hooks on the first layer
torch.set_num_threads(1)
torch.manual_seed(0)                            # data and initialisation only; no seed goes to either engine
full, test_set, _ = digits(seed=0)
x, y = full.tensors
train_set = TensorDataset(x[:1400].double(), y[:1400])
N, BATCH = len(train_set), 140
Q = BATCH / N                                   # 0.1: Opacus' Poisson loader uses q = 1 / len(loader)
Z, C, DELTA = 1.1, 1.0, 1e-5


def make_model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).double()


# %% [markdown]
# ## The same clipped update on the same batch (noise off)
#
# Both start from the same weights. Opacus gets `noise_multiplier=0`; the engine is in DP mode with
# noise switched off (`engine.noise = False`: epsilon becomes infinite, which is the point of the
# toggle: a check, not a run to report). One Poisson batch from Opacus' loader goes through both
# (`sampling="poisson"` declares that this loader, not `engine.data_loader`, samples each record with
# rate `q`); with plain SGD at `lr = 1` the parameter change is minus the gradient each computed. Both
# divide the clipped sum by the expected batch size `q N = 140`.

# %%
model_opacus = make_model()
model_engine = copy.deepcopy(model_opacus)
start = [p.detach().clone() for p in model_engine.parameters()]

opt_opacus = torch.optim.SGD(model_opacus.parameters(), lr=1.0)
privacy_engine = PrivacyEngine(accountant="prv")
model_opacus, opt_opacus, loader_opacus = privacy_engine.make_private(
    module=model_opacus, optimizer=opt_opacus, data_loader=DataLoader(train_set, batch_size=BATCH),
    noise_multiplier=0.0, max_grad_norm=C, poisson_sampling=True,
)

opt_engine = torch.optim.SGD(model_engine.parameters(), lr=1.0)
engine = dp_microclip.attach(model_engine, opt_engine, micro_batch_size=1, max_grad_norm=C,
                             privacy=dp_microclip.DP(noise_multiplier=Z, delta=DELTA, sample_rate=Q,
                                                     expected_batch_size=Q * N, sampling="poisson"))
engine.noise = False

xb, yb = next(iter(loader_opacus))              # one Poisson batch
print(f"batch of {len(yb)} examples (expected {BATCH})")
opt_opacus.zero_grad()
F.cross_entropy(model_opacus(xb), yb).backward()
opt_opacus.step()
opt_engine.zero_grad()
engine.loss(F.cross_entropy, model_engine(xb), yb, reduction="none").backward()
opt_engine.step()

update_opacus = [p0 - p.detach() for p0, p in zip(start, model_opacus.parameters())]
update_engine = [p0 - p.detach() for p0, p in zip(start, model_engine.parameters())]
diff = max((a - b).abs().max().item() for a, b in zip(update_opacus, update_engine))
norm = torch.cat([u.flatten() for u in update_engine]).norm().item()
print(f"clipped update norm {norm:.6f}; max |Opacus - dp-microclip| = {diff:.1e} (float64)")
engine.detach()

# %% [markdown]
# The two updates side by side: every coordinate of the engine's update against Opacus' (left; on the
# diagonal when they agree), and the norm of each parameter's update in both (right).

# %%
NAMES = [name for name, _ in model_engine.named_parameters()]


def flat(update):
    return torch.cat([u.flatten() for u in update]).numpy()


def compare(ax_scatter, ax_bars, update, label):
    a, b = flat(update_opacus), flat(update)
    ax_scatter.scatter(a, b, s=4, alpha=0.5)
    lim = max(abs(a).max(), abs(b).max()) * 1.05
    ax_scatter.plot([-lim, lim], [-lim, lim], color="black", linewidth=0.8, linestyle="--")
    ax_scatter.set_xlabel("Opacus update, per coordinate")
    ax_scatter.set_ylabel(f"{label} update")
    positions = torch.arange(len(NAMES)).numpy()
    ax_bars.bar(positions - 0.2, [u.norm().item() for u in update_opacus], width=0.4, label="Opacus")
    ax_bars.bar(positions + 0.2, [u.norm().item() for u in update], width=0.4, label=label)
    ax_bars.set_xticks(positions)
    ax_bars.set_xticklabels(NAMES, fontsize="small")
    ax_bars.set_ylabel("update norm, per parameter")
    ax_bars.legend(fontsize="small")


fig, (ax_scatter, ax_bars) = plt.subplots(1, 2, figsize=(9, 3.2))
compare(ax_scatter, ax_bars, update_engine, "dp-microclip b=1")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## The same epsilon for the same z, q and steps
#
# Both train 50 steps with `z = 1.1` at `q = 0.1` from their own Poisson loaders. dp-microclip's
# default accountant is Opacus' PRV accountant, so at `b = 1` the numbers agree (to the PRV accountant's
# numerical tolerance: the two calls discretise with slightly different error settings); the RDP
# accountants agree to the printed digits.

# %%
STEPS = 50


def train_steps(model, opt, loader, steps, loss_of):
    done = 0
    while done < steps:
        for xb, yb in loader:
            opt.zero_grad()
            loss_of(model(xb), yb).backward()
            opt.step()
            done += 1
            if done == steps:
                break


torch.manual_seed(1)
model_opacus = make_model()
privacy_engine = PrivacyEngine(accountant="prv")
model_opacus, opt_opacus, loader_opacus = privacy_engine.make_private(
    module=model_opacus, optimizer=torch.optim.SGD(model_opacus.parameters(), lr=0.5),
    data_loader=DataLoader(train_set, batch_size=BATCH), noise_multiplier=Z, max_grad_norm=C, poisson_sampling=True,
)
train_steps(model_opacus, opt_opacus, loader_opacus, STEPS, F.cross_entropy)

torch.manual_seed(1)
model_engine = make_model()
opt_engine = torch.optim.SGD(model_engine.parameters(), lr=0.5)
engine = dp_microclip.attach(model_engine, opt_engine, micro_batch_size=1, max_grad_norm=C,
                             privacy=dp_microclip.DP(noise_multiplier=Z, delta=DELTA, sample_rate=Q))
train_steps(model_engine, opt_engine, engine.data_loader(train_set), STEPS,
            lambda out, y: engine.loss(F.cross_entropy, out, y, reduction="none"))

rdp = RDPAccountant()
rdp.history = [(Z, Q, STEPS)]
print(f"after {STEPS} steps at z={Z}, q={Q}, delta={DELTA}:")
print(f"  Opacus PrivacyEngine (PRV):    epsilon = {privacy_engine.get_epsilon(DELTA):.4f}")
print(f"  dp-microclip b=1 (PRV):        epsilon = {engine.epsilon():.4f}")
print(f"  Opacus RDPAccountant:          epsilon = {rdp.get_epsilon(DELTA):.4f}")
print(f"  dp-microclip b=1 (RDP):        epsilon = {engine.epsilon(accountant='rdp'):.4f}")
engine.detach()

# %% [markdown]
# ## What changes at b > 1
#
# With `micro_batch_size=b > 1` each record is drawn into one of `M = round(q N / b)` groups; the
# engine clips each group's *mean* gradient. Adding or removing one record can move its group's
# clipped gradient from one vector of norm `C` to another, so the sensitivity is `2C`: the accountant
# sees `z / 2`. Same `z`, `q`, steps, at `b = 4`:

# %%
torch.manual_seed(1)
model_b4 = make_model()
opt_b4 = torch.optim.SGD(model_b4.parameters(), lr=0.5)
engine_b4 = dp_microclip.attach(model_b4, opt_b4, micro_batch_size=4, max_grad_norm=C,
                                privacy=dp_microclip.DP(noise_multiplier=Z, delta=DELTA, sample_rate=Q))
train_steps(model_b4, opt_b4, engine_b4.data_loader(train_set), STEPS,
            lambda out, y: engine_b4.loss(F.cross_entropy, out, y, reduction="none"))
half = PRVAccountant()
half.history = [(Z / 2, Q, STEPS)]
print(f"dp-microclip b=4, z={Z}:          epsilon = {engine_b4.epsilon():.4f}")
print(f"Opacus PRV accountant at z/2={Z / 2}: epsilon = {half.get_epsilon(DELTA):.4f}")
print(f"(b=1 at z={Z}:                    epsilon = {privacy_engine.get_epsilon(DELTA):.4f})")
engine_b4.detach()

# %% [markdown]
# And the update is no longer Opacus' per-example one: on the batch from the first section, with
# noise off, groups of 4 are clipped as one unit (fewer, longer clipped terms), so the update differs:

# %%
model_b4 = make_model()
model_b4.load_state_dict({k: v for k, v in zip(model_b4.state_dict(), start)})
opt_b4 = torch.optim.SGD(model_b4.parameters(), lr=1.0)
engine_b4 = dp_microclip.attach(model_b4, opt_b4, micro_batch_size=4, max_grad_norm=C,
                                privacy=dp_microclip.DP(noise_multiplier=Z, delta=DELTA, sample_rate=Q,
                                                        expected_batch_size=Q * N, sampling="poisson"))
engine_b4.noise = False
opt_b4.zero_grad()
engine_b4.loss(F.cross_entropy, model_b4(xb), yb, reduction="none").backward()
opt_b4.step()
update_b4 = [p0 - p.detach() for p0, p in zip(start, model_b4.parameters())]
diff4 = max((a - b).abs().max().item() for a, b in zip(update_opacus, update_b4))
norm4 = torch.cat([u.flatten() for u in update_b4]).norm().item()
print(f"b=4 clipped update norm {norm4:.6f} (b=1: {norm:.6f}); max |Opacus - dp-microclip b=4| = {diff4:.1e}")
engine_b4.detach()

fig, (ax_scatter, ax_bars) = plt.subplots(1, 2, figsize=(9, 3.2))
compare(ax_scatter, ax_bars, update_b4, "dp-microclip b=4")
fig.tight_layout()
plt.show()

# %% [markdown]
# **Summary.** At `b = 1` dp-microclip computes Opacus' clipped update and Opacus' epsilon, without
# wrapping the model or replacing the optimizer. `b > 1` is a different mechanism: under DP it costs
# a factor 2 in effective noise (and leaves about `B / b` clipped terms), so keep `b = 1` for DP and use
# `b > 1` noise-free or to save memory (tutorial 02).
