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
# # 07 User-level DP: protect a person, not one of their examples
#
# **What this shows.** When one person contributes many examples (their messages, their packages),
# example-level epsilon says little: group privacy over `n` examples multiplies it (roughly) by `n`,
# and for a heavy user it becomes meaningless. Micro-batch clipping is the mechanism user-level DP
# needs: make each sampled user's examples ONE micro-batch, clip it to `C`, and adding or removing a
# user moves the clipped sum by at most `C`.
#
# 1. `DP(privacy_unit="user", max_examples_per_user=k)` and `engine.data_loader(dataset, user_ids=...)`:
#    users are Poisson-sampled at rate `q`; each sampled user gives at most `k` of their examples.
# 2. The epsilon protects one user; compare with example-level DP plus group privacy.
# 3. The privacy statement says what is protected and what is treated as public.
#
# Synthetic data (a heavy-tailed number of examples per user), a few seconds on a CPU. The engine
# gets no seed: its noise and sampling come from the operating system, as in a real DP run.

# %%
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import accounting
import dp_microclip

torch.manual_seed(0)
num_users, features, classes = 400, 10, 3
# Heavy tail: most users have a few examples, a few users have dozens.
per_user = torch.clamp((torch.rand(num_users) ** -1.5).long(), 1, 60)
user_ids = torch.repeat_interleave(torch.arange(num_users), per_user)
centres = torch.randn(classes, features)
labels = torch.randint(0, classes, (len(user_ids),))
x = centres[labels] + 1.5 * torch.randn(len(user_ids), features)
train_set = TensorDataset(x, labels)
print(f"{len(user_ids)} examples from {num_users} users; the largest user has {int(per_user.max())} examples")

# %% [markdown]
# ## Training with users as the privacy unit
#
# `micro_batch_size` must equal `k`: a micro-batch is one user's (at most `k`) examples. The expected
# number of users per step, `round(q U)`, is the public divisor of the noisy sum.

# %%
K, Q, STEPS = 8, 0.1, 60
model = nn.Sequential(nn.Linear(features, 32), nn.Tanh(), nn.Linear(32, classes))
optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
engine = dp_microclip.attach(
    model, optimizer, micro_batch_size=K, max_grad_norm=1.0,
    privacy=dp_microclip.DP(noise_multiplier=1.0, sample_rate=Q, delta=1e-5, accountant="rdp",
                            privacy_unit="user", max_examples_per_user=K),
)
steps = 0
while steps < STEPS:
    for xb, yb in engine.data_loader(train_set, user_ids=user_ids):
        optimizer.zero_grad()
        engine.loss(F.cross_entropy, model(xb), yb, reduction="none").backward()   # per-example losses, checked
        optimizer.step()
        steps += 1
        if steps == STEPS:
            break
with torch.no_grad():
    accuracy = (model(x).argmax(1) == labels).float().mean().item()
print(f"{STEPS} steps, training accuracy {accuracy:.3f}, user-level epsilon {engine.epsilon():.2f} at delta 1e-5")

# %% [markdown]
# ## What example-level DP would have to claim for a user
#
# The same noise and sampling rate as example-level DP-SGD, turned into a guarantee for a user with
# `n` examples by the standard group-privacy bound (an `(eps', delta')` mechanism is
# `(n eps', n e^((n-1) eps') delta')` for groups of `n`), grows quickly with `n`. The numbers below are
# optimistic for example-level DP (the exponent uses `eps'` at `delta = 1e-5`, smaller than at the
# `delta'` actually needed), and still far above the user-level epsilon, which does not depend on
# how many examples a user has (at most `k` are used per step).

# %%
ledger = accounting.Ledger()
ledger.record(accounting.Mechanism(sample_rate=Q, noise_multiplier=1.0), steps=STEPS)
example_eps = ledger.epsilon(1e-5, accountant="rdp")
print(f"example-level epsilon for one example: {example_eps:.2f}")
for n in (2, 5, 10):
    group = ledger.epsilon(1e-5 / (n * 2.718281828 ** ((n - 1) * example_eps)), accountant="rdp") * n
    print(f"  a user with {n:2d} examples, by group privacy: at least about {group:.1f}")
print(f"user-level epsilon (any user, at most {K} examples used per step): {engine.epsilon():.2f}")

# %% [markdown]
# ## The statement

# %%
print(engine.privacy_statement())
