"""The two canary runs of the one-run audit: build the canaries, train with the engine, score them.

:func:`dp_microclip.tools.audit.run_audit` calls one of them and turns the
scores into a bound with :mod:`accounting.audit`. Each returns
``(scores, inclusion, engine, dataset_size, noise_ratio)``: one score per
canary (higher = "looks included"), the canaries' inclusion coins, the
attached engine (for its claimed epsilon), the number of records trained on,
and (gradient canaries only, else None) the measured noise relative to ``z C``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from ..settings import DP

if TYPE_CHECKING:
    from .audit import AuditConfig

__all__ = ["gradient_canary_run", "input_canary_run"]


def _coins(config: AuditConfig):
    import torch

    gen = torch.Generator().manual_seed(config.seed * 7919 + 17)
    inclusion = torch.rand(config.num_canaries, generator=gen, dtype=torch.float64) < 0.5
    return inclusion.numpy(), gen


def _attach(config: AuditConfig, model, optimizer):
    from ..attach import attach

    engine = attach(model, optimizer, micro_batch_size=config.micro_batch_size, max_grad_norm=config.max_grad_norm,
                    privacy=DP(noise_multiplier=config.noise_multiplier, sample_rate=config.sample_rate,
                               delta=config.delta, accountant=config.accountant), seed=config.seed)
    if not config.noise:
        engine.noise = False
    return engine


def _train(config: AuditConfig, engine, model, optimizer, dataset, after_step=None) -> None:
    """``steps`` DP-SGD steps on Poisson batches from ``engine.data_loader``; empty batches still step."""
    import torch.nn.functional as F

    step = 0
    while step < config.steps:
        for x, y in engine.data_loader(dataset):
            optimizer.zero_grad(set_to_none=True)
            # Per-example losses through engine.loss: checked for coupling, reduced by the engine (an empty batch
            # gives a zero loss, and the step adds noise only).
            engine.loss(F.cross_entropy, model(x), y, reduction="none").backward()
            optimizer.step()
            if after_step is not None:
                after_step(step)
            step += 1
            if step == config.steps:
                return


def _filler_task(config: AuditConfig, gen, dim: int, classes: int):
    """A small linearly separable Gaussian task: the 'real' data around the canaries."""
    import torch

    n = config.num_fillers
    x = torch.randn(n, dim, generator=gen)
    w = torch.randn(dim, classes, generator=gen)
    y = (x @ w).argmax(dim=1)
    return x, y


def gradient_canary_run(config: AuditConfig) -> tuple:
    """White-box gradient canaries on ``nn.Linear(d0 + m, 2, bias=False)``.

    Canary ``i`` is ``s * e_{d0+i}`` with label 0 (``s = canary_scale * C``), so
    its loss gradient is ``s * p_1 * (-1, +1)`` in column ``d0 + i`` and zero
    elsewhere: a fixed unit direction ``u_i`` that no other record touches. After
    each ``optimizer.step()`` the adversary reads ``p.grad`` (the engine's
    ``(clipped sum + noise) / M``) and projects ``M * p.grad`` on every ``u_i``:
    ``x_t,i ~ N(0, (zC)^2)`` plus ``C`` (about) when canary ``i`` was sampled.
    """
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from ..grouping import public_groups

    torch.manual_seed(config.seed)
    inclusion, gen = _coins(config)
    m, d0, c = config.num_canaries, 16, config.max_grad_norm
    fx, fy = _filler_task(config, gen, d0, 2)
    included = np.flatnonzero(inclusion)
    cx = torch.zeros(len(included), d0 + m)
    cx[torch.arange(len(included)), d0 + torch.as_tensor(included, dtype=torch.long)] = config.canary_scale * c
    x = torch.cat([torch.cat([fx, torch.zeros(len(fx), m)], dim=1), cx])
    y = torch.cat([fy, torch.zeros(len(included), dtype=torch.long)])
    dataset = TensorDataset(x, y)
    n = len(dataset)

    model = nn.Linear(d0 + m, 2, bias=False)
    with torch.no_grad():
        model.weight[:, d0:] = 0.0  # canary columns start at p = (1/2, 1/2): gradient norm 0.71 * s
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate)
    engine = _attach(config, model, optimizer)
    groups = public_groups(config.sample_rate * n, config.micro_batch_size)  # the public M the engine divides by
    u = torch.tensor([-1.0, 1.0]) / math.sqrt(2.0)
    projections = torch.zeros(config.steps, m, dtype=torch.float64)

    def record(step: int) -> None:
        if model.weight.grad is None:  # noise off and an empty batch: the engine leaves no gradient (all zero)
            return
        g = model.weight.grad[:, d0:]  # (2, m): canary columns of the noisy clipped average
        projections[step] = (u @ g).double() * groups

    _train(config, engine, model, optimizer, dataset, after_step=record)
    sigma = config.noise_multiplier * c
    excluded = torch.as_tensor(~inclusion)
    noise_ratio = float(projections[:, excluded].std()) / sigma if excluded.any() else math.nan
    if config.noise and config.score == "llr":
        # log[(1 - q) + q exp((C x - C^2 / 2) / sigma^2)]: the likelihood ratio of "sampled with probability q,
        # shifted by C" against "not there", summed over steps (Neyman-Pearson for independent steps).
        a = (c * projections - 0.5 * c * c) / sigma**2
        q = config.sample_rate
        llr = torch.logaddexp(torch.full_like(a, math.log1p(-q)) if q < 1 else torch.full_like(a, -math.inf),
                              a + math.log(q))
        scores = llr.sum(dim=0)
    else:
        scores = projections.sum(dim=0)
    return scores.numpy(), inclusion, engine, n, noise_ratio


def input_canary_run(config: AuditConfig) -> tuple:
    """Black-box input canaries: a small MLP on a Gaussian task; canaries are random inputs with random labels.

    Only the final model is used: score = minus the cross-entropy of the final
    model on the canary with its (wrong) label, so memorised canaries score high.
    """
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import TensorDataset

    torch.manual_seed(config.seed)
    inclusion, gen = _coins(config)
    dim, classes, m = 32, 10, config.num_canaries
    fx, fy = _filler_task(config, gen, dim, classes)
    canary_x = torch.randn(m, dim, generator=gen) * 2.0  # off the data's scale: easier to memorise
    canary_y = torch.randint(0, classes, (m,), generator=gen)
    included = torch.as_tensor(np.flatnonzero(inclusion), dtype=torch.long)
    dataset = TensorDataset(torch.cat([fx, canary_x[included]]), torch.cat([fy, canary_y[included]]))
    model = nn.Sequential(nn.Linear(dim, 128), nn.ReLU(), nn.Linear(128, classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate)
    engine = _attach(config, model, optimizer)
    _train(config, engine, model, optimizer, dataset)
    with torch.no_grad():
        scores = -F.cross_entropy(model(canary_x), canary_y, reduction="none")
    return scores.double().numpy(), inclusion, engine, len(dataset), None
