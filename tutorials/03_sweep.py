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
# # 03 Finding the sweet spot on your own model: `dp_microclip.tools.sweep`
#
# **What this shows.** Whether noise-free micro-batch clipping helps on *your* model and data, and
# at which micro-batch size `b`, is an empirical question, and comparing methods at one shared
# learning rate measures the learning rate, not the method. `dp_microclip.tools.sweep.sweep` tunes the
# learning rate (and `C` for fixed clipping) separately for every (method, b) on a validation split
# with *tuning seeds*, reruns the chosen setting over separate *reporting seeds* (same
# initialisation, batch order, split and label noise for every method at a seed), and reports the
# test accuracy with a paired Student t interval, p-value and Holm-adjusted p-value against plain
# training. The method and b to use are chosen on validation too (`result.best()`), never on test.
#
# Here: a model defined in this notebook (a stand-in for yours) on scikit-learn's bundled digits
# (no download) with 20% flipped labels, at **tiny settings** (10 epochs, 4 learning rates per
# method, 1 tuning seed, 3 reporting seeds) so that it runs in well under a minute on 2 CPU cores. The
# numbers are therefore rough; a real sweep uses the defaults (`SweepSettings()`: 20 epochs, 2 tuning
# seeds, 10 reporting seeds) or more, and `store=` to resume an interrupted sweep.

# %%
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from dp_microclip.tools.sweep import SweepSettings, digits_splits, sweep

torch.set_num_threads(1)

# Your data: (x, y) pairs or TensorDatasets, split into train / validation / test; here a function of the
# seed, so that every seed draws its own split and its own flipped labels (one fixed split would make
# every seed share one test sample, and the intervals would leave that sampling error out).
def data(seed):
    return digits_splits(label_noise=0.2, seed=seed)[:3]


train, val, test = data(0)
print(f"train {len(train[0])}, validation {len(val[0])}, test {len(test[0])} (seed 0)")


# Your model: any function returning a fresh nn.Module (the sweep seeds torch before each call).
def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 10))


# %%
settings = SweepSettings(
    methods=("plain", "fixed", "adaptive"),
    micro_batch_sizes=(1, 8, 32),
    seeds=(0, 1, 2),          # reporting seeds
    tune_seeds=(1000,),       # tuning seeds: never reported
    learning_rates={"plain": (0.003, 0.01, 0.03, 0.1), "fixed": (0.003, 0.01, 0.03, 0.1),
                    "adaptive": (0.1, 0.3, 1.0, 3.0)},
    max_grad_norms=(1.0,),
    batch_size=32,
    epochs=10,
    name="my-model-on-digits",
)
start = time.perf_counter()
result = sweep(make_model, data, None, None, settings, progress=False)
print(f"{sum(len(r) for r in result.final.values()) + len(result.tuning)} runs in {time.perf_counter() - start:.0f} s\n")
print(result.to_markdown())

# %% [markdown]
# Read the table as: the learning rate (and `C`) chosen on validation for each (method, b) and its
# validation score on the tuning seeds; the test accuracy over the reporting seeds; and the paired
# difference to plain training with its t interval, its p-value, and its p-value Holm-adjusted for
# every comparison the sweep made (a sweep of many cells finds a "significant" one by chance).
# "(grid edge)" means the best learning rate was at the end of its grid: widen the grid before
# trusting that row. Pick the method and b on validation (below), not as the best test row: the
# best of many test scores is biased upwards. At these tiny settings (3 seeds) the intervals are wide.

# %%
best = result.best()  # the clipping cell with the best validation score on the tuning seeds
plain = next(r for r in result.table() if r["method"] == "plain")
print(f"plain: test {plain['test_mean']:.4f}; clipping chosen on validation: {best['method']} b={best['b']} "
      f"lr={best['lr']:g}: test {best['test_mean']:.4f} ({best['diff_vs_plain']:+.4f} "
      f"[{best['diff_ci_low']:+.4f}, {best['diff_ci_high']:+.4f}] vs plain, p = {best['p_value']:.2g})")

# %%
from IPython.display import Image, display

out = Path(tempfile.mkdtemp())
paths = result.plot(out, "sweep")           # test accuracy against b, and validation curves
for path in paths:
    print(path.name)
    display(Image(filename=str(path)))

# %% [markdown]
# The same from the shell on the digits, with the full settings:
# `dp-microclip sweep --label-noise 0.2 --out sweep-results` (markdown, JSON and both plots).
