"""Fair comparisons of noise-free micro-batch clipping against plain training.

Comparing methods at one shared learning rate measures the learning rate, not
the method: clipping changes the size of every update, so each method needs
its own step size. :func:`sweep` therefore tunes the learning rate (and the
bound ``C`` of fixed clipping) separately for every (method, b) on a held-out
validation split, never on the test set, with *tuning seeds*, then reruns the
chosen setting over separate *reporting seeds* (10 by default). Plain SGD gets
a learning-rate grid as fine as the largest (lr, C) grid of the clipping
methods. Seeds are paired: seed ``s`` gives every method the same
initialisation, batch order and (with ``data`` given as a function of the
seed) the same split and label noise, so differences between methods are
measured seed by seed: a paired t interval and p-value against plain training,
with Holm-adjusted p-values over the sweep's comparisons.

Use it on your own model and data::

    from dp_microclip.tools.sweep import SweepSettings, sweep
    result = sweep(make_model, train_set, val_set, test_set, SweepSettings(micro_batch_sizes=(1, 8, 32)),
                   store="runs.jsonl")    # resumable: finished runs are read back, not redone
    print(result.to_markdown()); result.save("results/", "mytask")   # md, json, two png plots

or from the shell on scikit-learn's digits: ``dp-microclip sweep --label-noise 0.2``.

:func:`sweep` returns a :class:`~dp_microclip.tools.sweep_report.SweepResult`
(tables, Markdown, JSON and plots: :mod:`dp_microclip.tools.sweep_report`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigurationError
from .digits import digits_mlp, digits_splits
from .sweep_report import SweepResult

__all__ = ["METHODS", "TUNE_SEED_BASE", "SweepSettings", "RunConfig", "sweep", "train_run", "accuracy",
           "digits_splits", "digits_mlp", "main"]

#: The methods a sweep compares. ``plain`` trains without the engine.
METHODS = ("plain", "fixed", "adaptive", "normalize")

#: Learning-rate grids per method used when ``SweepSettings.learning_rates`` is left at its default. Adaptive
#: clipping scales every micro-batch gradient down to the smallest norm, so its updates are shorter and it
#: needs larger steps; normalize with C=1 gives updates of norm about 1.
DEFAULT_LRS: Mapping[str, tuple[float, ...]] = {
    "plain": (0.01, 0.03, 0.1, 0.3),
    "fixed": (0.01, 0.03, 0.1, 0.3),
    "adaptive": (0.03, 0.1, 0.3, 1.0),
    "normalize": (0.01, 0.03, 0.1, 0.3),
}

#: The learning-rate schedules a sweep offers (``SweepSettings.lr_schedule``).
LR_SCHEDULES = ("constant", "cosine")

#: Where tuning seeds start when ``SweepSettings.tune_seeds`` is a count: far from the reporting seeds 0, 1, ...
TUNE_SEED_BASE = 1000


@dataclass(frozen=True)
class SweepSettings:
    """What a sweep trains: methods x micro-batch sizes x seeds, and the grids tuned per (method, b).

    Frozen so that the run keys written to the store always describe what ran.

    Attributes:
        methods: any of ``"plain"``, ``"fixed"``, ``"adaptive"``, ``"normalize"``.
        micro_batch_sizes: the ``b`` values; each must divide ``batch_size`` (contiguous groups).
        seeds: the reporting seeds, paired; seed ``s`` fixes the initialisation and the batch order of
            every method (and the data, when the sweep's data is a function of the seed).
        tune_seeds: the seeds averaged to pick the learning rate (and C) on the validation split, and
            the method and b (:meth:`SweepResult.best`); disjoint from ``seeds``, so that no reported
            number was used to choose. A count ``n`` means ``TUNE_SEED_BASE + 0 .. n-1``.
        learning_rates: one grid for every method, or a mapping ``method -> grid``
            (methods left out use :data:`DEFAULT_LRS`). ``None``: :data:`DEFAULT_LRS`.
        match_plain_grid: give plain SGD as many learning rates as the largest (lr, C) grid among the
            clipping methods (log-spaced over plain's own range), so that neither side is tuned more finely.
        max_grad_norms: the grid of ``C`` for ``fixed`` (``normalize`` uses ``C = 1``: its ``C``
            only rescales the step, which the learning rate already tunes; ``adaptive`` has no ``C``).
        batch_size: examples per step (the last incomplete batch of an epoch is dropped).
        epochs: passes over the training set.
        momentum: SGD momentum.
        weight_decay: SGD weight decay (applied by the optimizer, outside clipping).
        gamma: the ``gamma`` of ``normalize``.
        lr_schedule: ``"constant"`` or ``"cosine"`` (the rate decays to 0 over the run's steps, a common
            schedule; every method gets the same one, so comparisons stay paired).
        grad_mode: the engine's. ``"bookkeeping"``: one fixed route, so reruns are bit-identical (``"auto"`` picks
            among exact routes, whose float sums differ, by timing them: a rerun under other load could differ).
        confidence: the interval's coverage.
        name: the task name stored with each run, so that one store can hold several tasks.
    """

    methods: tuple[str, ...] = METHODS
    micro_batch_sizes: tuple[int, ...] = (1, 8, 32)
    seeds: tuple[int, ...] = tuple(range(10))
    tune_seeds: tuple[int, ...] | int = (TUNE_SEED_BASE, TUNE_SEED_BASE + 1)
    learning_rates: tuple[float, ...] | Mapping[str, tuple[float, ...]] | None = None
    match_plain_grid: bool = True
    max_grad_norms: tuple[float, ...] = (0.3, 1.0)
    batch_size: int = 64
    epochs: int = 20
    momentum: float = 0.9
    weight_decay: float = 0.0
    gamma: float = 0.01
    lr_schedule: str = "constant"
    grad_mode: str = "bookkeeping"
    confidence: float = 0.95
    name: str = "task"

    def __post_init__(self):
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ConfigurationError(f"methods={self.methods!r}: choose from {METHODS}.")
        if isinstance(self.tune_seeds, int):
            object.__setattr__(self, "tune_seeds", tuple(range(TUNE_SEED_BASE, TUNE_SEED_BASE + self.tune_seeds)))
        object.__setattr__(self, "seeds", tuple(self.seeds))
        tune = tuple(self.tune_seeds)
        object.__setattr__(self, "tune_seeds", tune)
        if not self.seeds or not tune:
            raise ConfigurationError(f"seeds={self.seeds!r}, tune_seeds={tune!r}: give at least one of each.")
        if set(tune) & set(self.seeds):
            raise ConfigurationError(
                f"tune_seeds {sorted(set(tune) & set(self.seeds))} are also reporting seeds: choosing and reporting "
                "on the same seeds inflates the result; give disjoint tune_seeds (e.g. a count: 1000, 1001, ...).")
        if len(set(self.seeds)) != len(self.seeds) or len(set(tune)) != len(tune):
            raise ConfigurationError(f"seeds={self.seeds!r} or tune_seeds={tune!r} repeats a seed; give distinct ones.")
        for b in self.micro_batch_sizes:
            if not isinstance(b, int) or b < 1 or self.batch_size % b:
                raise ConfigurationError(
                    f"micro_batch_size {b!r} does not divide batch_size={self.batch_size}: contiguous micro-batches "
                    "need b | batch_size. Pick b among the divisors of the batch size.")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigurationError(f"lr_schedule={self.lr_schedule!r}: choose from {LR_SCHEDULES}.")
        if any(m != "plain" for m in self.methods) and not self.micro_batch_sizes:
            raise ConfigurationError("micro_batch_sizes is empty: give at least one b for the clipping methods.")
        if not self.max_grad_norms or any(c <= 0 for c in self.max_grad_norms):
            raise ConfigurationError(f"max_grad_norms={self.max_grad_norms!r}: give bounds > 0.")
        for m in self.methods:
            if not self.lrs(m) or any(lr <= 0 for lr in self.lrs(m)):
                raise ConfigurationError(f"learning rates for {m!r}: {self.lrs(m)!r}; give values > 0.")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigurationError("epochs and batch_size must be >= 1.")
        if not 0 < self.confidence < 1:
            raise ConfigurationError(f"confidence={self.confidence}: give a value in (0, 1), e.g. 0.95.")

    def lrs(self, method: str) -> tuple[float, ...]:
        """The learning-rate grid of ``method`` (plain's refined to match the clipping grids: ``match_plain_grid``)."""
        if self.learning_rates is None:
            given = tuple(DEFAULT_LRS[method])
        elif isinstance(self.learning_rates, Mapping):
            given = tuple(self.learning_rates.get(method, DEFAULT_LRS[method]))
        else:
            given = tuple(self.learning_rates)
        if method != "plain" or not self.match_plain_grid or len(set(given)) < 2 or min(given) <= 0:
            return given
        target = max((len(self.grid(m)) for m in self.methods if m != "plain"), default=0)
        if target <= len(given):
            return given
        return tuple(float(f"{v:.3g}") for v in np.geomspace(min(given), max(given), target))

    def grid(self, method: str) -> list[tuple[float, float | None]]:
        """``(lr, C)`` pairs tuned for ``method`` (``C`` is None where the method has no bound to tune)."""
        bounds: tuple = self.max_grad_norms if method == "fixed" else ((1.0,) if method == "normalize" else (None,))
        return [(lr, c) for lr in self.lrs(method) for c in bounds]

    def cells(self) -> list[tuple[str, int | None]]:
        """Every (method, b) compared; plain has one cell with ``b = None`` (it has no micro-batches)."""
        out: list[tuple[str, int | None]] = []
        for m in self.methods:
            out += [(m, None)] if m == "plain" else [(m, b) for b in self.micro_batch_sizes]
        return out


@dataclass(frozen=True)
class RunConfig:
    """One training run: a method, its micro-batch size, learning rate, bound and seed.

    Attributes:
        method: one of :data:`METHODS`.
        micro_batch_size: ``b`` (None for plain).
        lr: the learning rate.
        max_grad_norm: ``C`` (None for plain and adaptive).
        seed: initialisation and batch-order seed.
    """

    method: str
    micro_batch_size: int | None
    lr: float
    max_grad_norm: float | None
    seed: int

    def key(self, settings: SweepSettings) -> str:
        """A stable string naming this run under ``settings`` (the store's key)."""
        shared = {k: getattr(settings, k) for k in ("name", "batch_size", "epochs", "momentum", "weight_decay")}
        shared.update({"grad_mode": settings.grad_mode} if self.method != "plain" else {})
        shared.update({"gamma": settings.gamma} if self.method == "normalize" else {})
        # Runs stored before schedules existed were constant-rate: their keys stay valid.
        shared.update({"lr_schedule": settings.lr_schedule} if settings.lr_schedule != "constant" else {})
        return json.dumps({**shared, **asdict(self)}, sort_keys=True)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)`` in eval mode (the default metric; higher is better)."""
    was = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            correct += int((model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum())
    model.train(was)
    return correct / max(len(x), 1)


def _tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of a dataset: a TensorDataset's tensors, an ``(x, y)`` pair, or every item stacked."""
    if isinstance(dataset, (tuple, list)) and len(dataset) == 2 and all(torch.is_tensor(t) for t in dataset):
        return dataset[0], dataset[1]
    if hasattr(dataset, "tensors") and len(dataset.tensors) == 2:
        return dataset.tensors
    try:
        items = [dataset[i] for i in range(len(dataset))]
        return torch.stack([torch.as_tensor(a) for a, _ in items]), torch.stack([torch.as_tensor(b) for _, b in items])
    except Exception as exc:  # noqa: BLE001 - re-raised with the fix
        raise ConfigurationError(
            "sweep() needs datasets of (input, target) pairs that fit in memory: a TensorDataset, an (x, y) pair of "
            f"tensors, or a map-style dataset whose items are (x, y). Stacking failed: {exc}") from exc


def train_run(make_model: Callable[[], nn.Module], data, config: RunConfig, settings: SweepSettings,
              loss_fn: Callable = F.cross_entropy, metric: Callable = accuracy,
              extra: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict:
    """Train one run and return its row: validation and test metric, per-epoch curves, time.

    Args:
        make_model: builds a fresh model; called right after ``torch.manual_seed(config.seed)``,
            so the initialisation is paired across methods.
        data: ``((x_train, y_train), (x_val, y_val), (x_test, y_test))`` tensors.
        config: what to run.
        settings: batch size, epochs, optimizer.
        loss_fn: the mean loss ``loss_fn(output, target)``.
        metric: ``metric(model, x, y) -> float``, higher is better.
        extra: more test sets ``name -> (x, y)`` (e.g. one per domain), scored with ``metric`` at the end.

    The model of the last epoch is evaluated. A non-finite loss stops the run (``diverged``).
    """
    from .. import attach

    (x_tr, y_tr), (x_val, y_val), (x_te, y_te) = data
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    engine = None
    if config.method != "plain":
        if config.micro_batch_size is None:
            raise ConfigurationError(f"RunConfig(method={config.method!r}) needs a micro_batch_size (None: plain).")
        engine = attach(model, optimizer, micro_batch_size=config.micro_batch_size,
                        max_grad_norm=config.max_grad_norm or 1.0, clipping=config.method,
                        normalize_gamma=settings.gamma, grouping="contiguous", grad_mode=settings.grad_mode)
    order = torch.Generator().manual_seed(config.seed)
    n, bs = len(x_tr), settings.batch_size
    if n < bs:
        raise ConfigurationError(f"The training set has {n} examples, fewer than batch_size={bs}. Lower batch_size.")
    scheduler = None
    if settings.lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs * (n // bs))
    val_curve, loss_curve, diverged = [], [], False
    for _ in range(settings.epochs):
        perm = torch.randperm(n, generator=order)
        total, steps = 0.0, 0
        for i in range(0, n - bs + 1, bs):
            idx = perm[i:i + bs]
            optimizer.zero_grad()
            loss = loss_fn(model(x_tr[idx]), y_tr[idx])
            if not torch.isfinite(loss):
                diverged = True
                break
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total += float(loss.detach())
            steps += 1
        loss_curve.append(total / max(steps, 1) if not diverged else math.nan)
        val_curve.append(metric(model, x_val, y_val))
        if diverged:
            break
    if engine is not None:
        engine.detach()
    row = asdict(config)
    row.update(val=val_curve[-1], test=metric(model, x_te, y_te), val_curve=val_curve, train_loss=loss_curve,
               diverged=diverged, seconds=round(time.perf_counter() - start, 3), name=settings.name,
               extra={k: metric(model, x, y) for k, (x, y) in (extra or {}).items()})
    return row


class _Store:
    """Finished runs in a JSON-lines file (one run per line, appended and flushed as each finishes)."""

    def __init__(self, path):
        self.path = None if path is None else Path(path)
        self.rows: dict[str, dict] = {}
        if self.path is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut off by an interrupted write: that run is redone
                    self.rows[row["key"]] = row

    def get(self, key: str) -> dict | None:
        return self.rows.get(key)

    def add(self, key: str, row: dict) -> None:
        row = {**row, "key": key}
        self.rows[key] = row
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())


def _progress(total: int, enabled: bool, desc: str):
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(total=total, desc=desc, leave=False)
        except ImportError:
            pass

    class _Silent:
        update = set_postfix_str = close = staticmethod(lambda *a, **k: None)

    return _Silent()


def sweep(make_model: Callable[[], nn.Module], train_set, val_set, test_set,
          settings: SweepSettings = SweepSettings(), *, loss_fn: Callable = F.cross_entropy,
          metric: Callable = accuracy, store: str | os.PathLike | None = None,
          progress: bool = True, extra_test_sets: Mapping | None = None) -> "SweepResult":
    """Tune each (method, b) on ``val_set``, rerun the choice over paired seeds, report on ``test_set``.

    For every cell (method, b) each ``(lr, C)`` of :meth:`SweepSettings.grid` trains with the
    ``tune_seeds``; the pair with the best mean validation metric is kept (diverged runs lose)
    and trained with every reporting seed. The test metric is recorded for every run but never
    read by any selection (:meth:`SweepResult.best` picks the method and b on validation too).

    Args:
        make_model: a function returning a fresh ``nn.Module`` (called after seeding).
        train_set, val_set, test_set: ``(x, y)`` data: TensorDatasets, ``(x, y)`` tensor pairs,
            or map-style datasets of ``(x, y)`` items that fit in memory. Or ``train_set`` is a
            function ``seed -> (train, val, test)`` and ``val_set`` and ``test_set`` are None: every
            seed then draws its own split (and label noise), shared by all methods at that seed, so
            the intervals include the variation of the split and of the test sample.
        settings: the :class:`SweepSettings`.
        loss_fn: the mean training loss.
        metric: ``metric(model, x, y) -> float``, higher is better (default :func:`accuracy`).
        store: a JSON-lines file of finished runs: read first (those runs are not redone), appended to.
            A run is keyed by ``settings.name`` and its own settings, not by the data: give the
            sweep a new ``name`` (or a new store) when the data or the model change.
        progress: show a tqdm progress bar (if tqdm is installed).
        extra_test_sets: ``name -> dataset`` also scored at the end of every run (e.g. one test set
            per domain); the table gets ``test_<name>`` mean and std. Runs in a store keep the
            extra sets they were trained with: use a new ``settings.name`` when you change data.

    Returns:
        a :class:`SweepResult`.
    """
    per_seed: dict[int, tuple] = {}
    if callable(train_set):
        if val_set is not None or test_set is not None:
            raise ConfigurationError("With train_set a function seed -> (train, val, test), pass val_set=None and "
                                     "test_set=None.")

        def data_for(seed: int) -> tuple:
            if seed not in per_seed:
                per_seed[seed] = tuple(_tensors(part) for part in train_set(seed))
            return per_seed[seed]
    else:
        fixed = (_tensors(train_set), _tensors(val_set), _tensors(test_set))

        def data_for(seed: int) -> tuple:
            return fixed
    extra = {k: _tensors(v) for k, v in (extra_test_sets or {}).items()}
    runs = _Store(store)
    cells = settings.cells()
    tune = tuple(settings.tune_seeds)  # type: ignore[arg-type]
    planned = sum(len(settings.grid(m)) * len(tune) + len(settings.seeds) for m, _ in cells)
    bar = _progress(planned, progress, settings.name)

    def run(config: RunConfig) -> dict:
        key = config.key(settings)
        row = runs.get(key)
        if row is None:
            bar.set_postfix_str(f"{config.method} b={config.micro_batch_size} lr={config.lr} seed={config.seed}")
            row = train_run(make_model, data_for(config.seed), config, settings, loss_fn, metric, extra)
            runs.add(key, row)
        bar.update(1)
        return row

    selected: dict[tuple[str, int | None], dict] = {}
    final: dict[tuple[str, int | None], list[dict]] = {}
    tuning: list[dict] = []
    try:
        for method, b in cells:
            scores = []
            for lr, c in settings.grid(method):
                rows = [run(RunConfig(method, b, lr, c, s)) for s in tune]
                tuning += rows
                ok = not any(r["diverged"] for r in rows)
                scores.append((float(np.mean([r["val"] for r in rows])) if ok else -math.inf, lr, c))
            best = max(scores, key=lambda t: t[0])  # first of equals: the smallest lr
            lrs = settings.lrs(method)
            selected[(method, b)] = {"lr": best[1], "max_grad_norm": best[2], "val_tune": best[0],
                                     "lr_at_grid_edge": len(lrs) > 1 and best[1] in (min(lrs), max(lrs))}
            final[(method, b)] = [run(RunConfig(method, b, best[1], best[2], s)) for s in settings.seeds]
    finally:
        bar.close()
    return SweepResult(settings, selected, final, tuning)


def main(argv: Sequence[str] | None = None) -> int:
    """``dp-microclip sweep``: tune and compare the methods on scikit-learn's digits; write md/json/png."""
    p = argparse.ArgumentParser(prog="dp-microclip sweep", description=(
        "Compare plain training with noise-free micro-batch clipping on scikit-learn's digits, each method with "
        "its own learning rate (and C) tuned on a validation split, over paired seeds."))
    p.add_argument("--label-noise", type=float, default=0.2,
                   help="fraction of training labels flipped, the draggers (default %(default)s)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="methods to compare (default: all, %(default)s)")
    p.add_argument("--micro-batch-sizes", "-b", nargs="+", type=int, default=[1, 8, 32],
                   help="micro-batch sizes b of the clipping methods (default %(default)s)")
    p.add_argument("--seeds", nargs="+", type=int, default=list(range(10)),
                   help="paired reporting seeds; each draws its own split and label noise (default %(default)s)")
    p.add_argument("--tune-seeds", nargs="+", type=int, default=[TUNE_SEED_BASE, TUNE_SEED_BASE + 1],
                   help="seeds that pick the learning rate, C, method and b; disjoint from --seeds "
                        "(default %(default)s)")
    p.add_argument("--lrs", nargs="+", type=float, default=None, help="one grid for all methods (default: per method)")
    p.add_argument("--max-grad-norms", nargs="+", type=float, default=[0.3, 1.0],
                   help="clipping bounds C tried while tuning (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size B (default %(default)s)")
    p.add_argument("--epochs", type=int, default=20, help="training epochs per run (default %(default)s)")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant",
                   help="learning-rate schedule of every method (default %(default)s)")
    p.add_argument("--out", default="sweep-results",
                   help="directory for the md, json, png and the run store (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on standard error")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    settings = SweepSettings(
        methods=tuple(args.methods), micro_batch_sizes=tuple(args.micro_batch_sizes), seeds=tuple(args.seeds),
        tune_seeds=tuple(args.tune_seeds), learning_rates=None if args.lrs is None else tuple(args.lrs),
        max_grad_norms=tuple(args.max_grad_norms), batch_size=args.batch_size, epochs=args.epochs,
        lr_schedule=args.lr_schedule, name=f"digits-mlp-noise{args.label_noise:g}-split-per-seed")
    out = Path(args.out)
    result = sweep(digits_mlp, lambda seed: digits_splits(args.label_noise, seed)[:3], None, None, settings,
                   store=out / "runs.jsonl", progress=not args.no_progress)
    paths = result.save(out, settings.name)
    print(result.to_markdown())
    print("wrote " + ", ".join(str(x) for x in paths))
    return 0
