"""What a sweep found, as tables, Markdown, JSON and plots; the paired statistics behind them.

:func:`dp_microclip.tools.sweep.sweep` returns a :class:`SweepResult`: the
learning rate (and ``C``) chosen per (method, b) on the validation split, and
the runs of that choice over every reporting seed. Seeds are paired, so each
method is compared with plain training seed by seed: a paired Student t
interval and p-value (:func:`paired_t`), with the number of comparisons in the
sweep and Holm-adjusted p-values (:func:`holm`). :meth:`SweepResult.best`
picks the clipping method and b on validation (tuning seeds), never on test.

Why t and not a bootstrap: the percentile bootstrap of the mean over 3-5 seeds
covers far less than its nominal 95% (about 83% at 5 seeds and 75% at 3 in
simulation), because resampling so few values cannot show variation they did
not happen to contain. The t interval is exact for normal differences and
close to nominal for the mildly skewed accuracy differences seen here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ConfigurationError

if TYPE_CHECKING:
    from .sweep import SweepSettings

__all__ = ["SweepResult", "paired_t", "holm", "paired_bootstrap"]


def paired_t(diffs: Sequence[float], confidence: float = 0.95) -> dict:
    """Student t interval and two-sided p-value (null: mean 0) for the mean of paired differences.

    Returns ``{"n", "mean", "low", "high", "p"}``; the interval is ``mean +- t_{n-1} * sd / sqrt(n)``
    (:func:`scipy.stats.ttest_rel` on the pairs gives the same). With fewer than two differences
    the interval and p are NaN; with all differences equal the interval is that value and p is 0
    (or 1 if it is 0).
    """
    from scipy import stats

    d = np.asarray(diffs, dtype=float)
    n = len(d)
    mean = float(d.mean()) if n else math.nan
    if n < 2:
        return {"n": n, "mean": mean, "low": math.nan, "high": math.nan, "p": math.nan}
    se = float(d.std(ddof=1)) / math.sqrt(n)
    if se == 0.0:
        return {"n": n, "mean": mean, "low": mean, "high": mean, "p": 1.0 if mean == 0 else 0.0}
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * se
    p = float(2 * stats.t.sf(abs(mean) / se, n - 1))
    return {"n": n, "mean": mean, "low": mean - half, "high": mean + half, "p": p}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of ``pvalues`` for the family of all of them (NaNs left out of the family).

    Controls the family-wise error rate like Bonferroni (``p * m``) and is never less powerful.
    """
    p = np.asarray(pvalues, dtype=float)
    out = np.full(len(p), math.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = len(valid)
    running = 0.0
    for rank, i in enumerate(valid[np.argsort(p[valid], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return [float(v) for v in out]


def paired_bootstrap(diffs: Sequence[float], draws: int, confidence: float, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of paired differences (resampling seeds).

    Not used by the sweep any more: with 3-5 seeds it covers well under its nominal level (see the
    module docstring). Kept for results that were computed with it (``experiments.dp_b``).
    """
    d = np.asarray(diffs, dtype=float)
    if len(d) < 2:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(draws, len(d)))].mean(1)
    alpha = (1 - confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


@dataclass
class SweepResult:
    """What :func:`sweep` found: the chosen settings per (method, b) and their runs over all seeds.

    Attributes:
        settings: the sweep's settings.
        selected: ``(method, b) -> {"lr", "max_grad_norm", "val_tune", "lr_at_grid_edge"}``.
        final: ``(method, b) -> [run row per seed]`` with the selected settings.
        tuning: every tuning run's row.
    """

    settings: SweepSettings
    selected: dict
    final: dict
    tuning: list = field(default_factory=list)

    def table(self) -> list[dict]:
        """One row per (method, b): chosen lr/C, test mean and std over the reporting seeds, and the
        paired difference to plain (mean, t interval, p-value, Holm-adjusted p over the sweep's
        ``comparisons``), with per-seed test values. Extra test sets count as comparisons too."""
        s = self.settings
        plain = {r["seed"]: r["test"] for r in self.final.get(("plain", None), [])}
        plain_extra = {r["seed"]: r.get("extra") or {} for r in self.final.get(("plain", None), [])}
        out: list[dict] = []
        family: list[tuple[dict, str]] = []  # (row, prefix) of every comparison with plain
        for (method, b), rows in self.final.items():
            test = np.array([r["test"] for r in rows])
            row = {"method": method, "b": b, **self.selected[(method, b)], "seeds": len(rows),
                   "test_mean": float(test.mean()), "test_std": float(test.std(ddof=1)) if len(test) > 1 else math.nan,
                   "val_mean": float(np.mean([r["val"] for r in rows])),
                   "test_per_seed": [r["test"] for r in rows], "diverged": sum(r["diverged"] for r in rows)}
            for name in rows[0].get("extra") or {}:
                values = np.array([r["extra"][name] for r in rows])
                row[f"test_{name}_mean"] = float(values.mean())
                row[f"test_{name}_std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
                if plain_extra and method != "plain":
                    t = paired_t([r["extra"][name] - plain_extra[r["seed"]][name] for r in rows
                                  if r["seed"] in plain_extra], s.confidence)
                    row[f"diff_{name}_vs_plain"] = t["mean"]
                    row[f"diff_{name}_ci"] = [t["low"], t["high"]]
                    row[f"diff_{name}_p"] = t["p"]
                    family.append((row, f"diff_{name}_"))
            if plain and method != "plain":
                t = paired_t([r["test"] - plain[r["seed"]] for r in rows if r["seed"] in plain], s.confidence)
                row["diff_vs_plain"] = t["mean"]
                row["diff_ci_low"], row["diff_ci_high"], row["p_value"] = t["low"], t["high"], t["p"]
                family.append((row, "diff_"))
            out.append(row)
        adjusted = holm([r["p_value" if pre == "diff_" else pre + "p"] for r, pre in family])
        for (r, pre), p in zip(family, adjusted):
            r["p_holm" if pre == "diff_" else pre + "p_holm"] = p
        for r in out:
            r["comparisons"] = len(family)
        return out

    def best(self) -> dict | None:
        """The clipping cell (method, b) with the best validation score on the tuning seeds, as its
        :meth:`table` row (None when the sweep has no clipping method).

        Chosen on validation, never on test: the tuning seeds are not reporting seeds, so the row's
        test difference and interval are not inflated by the choice (no winner's curse from picking
        the best of many test scores).
        """
        rows = [r for r in self.table() if r["method"] != "plain"]
        return max(rows, key=lambda r: r["val_tune"]) if rows else None

    def to_markdown(self) -> str:
        """The table as Markdown: test mean +- std over the reporting seeds; the paired difference to plain
        with its t interval, p-value and Holm-adjusted p; then the cell chosen on validation."""
        s = self.settings
        pct = round(100 * s.confidence)
        table = self.table()
        m = table[0]["comparisons"] if table else 0
        lines = [f"| method | b | lr | C | val (tuning seeds) | test mean +- std ({len(s.seeds)} seeds) | vs plain "
                 f"(paired, {pct}% t interval) | p | p Holm ({m} comparisons) |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for r in table:
            lr = f"{r['lr']:g}" + (" (grid edge)" if r["lr_at_grid_edge"] else "")
            c = "" if r["max_grad_norm"] is None or r["method"] == "normalize" else f"{r['max_grad_norm']:g}"
            diff = p = ph = ""
            if "diff_vs_plain" in r:
                diff = f"{r['diff_vs_plain']:+.4f} [{r['diff_ci_low']:+.4f}, {r['diff_ci_high']:+.4f}]"
                p, ph = f"{r['p_value']:.3g}", f"{r['p_holm']:.3g}"
            b = "-" if r["b"] is None else str(r["b"])
            note = f" ({r['diverged']} diverged)" if r["diverged"] else ""
            lines.append(f"| {r['method']} | {b} | {lr} | {c} | {r['val_tune']:.4f} | {r['test_mean']:.4f} +- "
                         f"{r['test_std']:.4f}{note} | {diff} | {p} | {ph} |")
        best = self.best()
        tuning = ", ".join(str(seed) for seed in s.tune_seeds)  # type: ignore[union-attr]
        if best is not None and "diff_vs_plain" in best:
            lines.append(f"\nChosen on validation (tuning seeds {tuning}, not the "
                         f"reporting seeds): {best['method']} b={best['b']}, {best['diff_vs_plain']:+.4f} "
                         f"[{best['diff_ci_low']:+.4f}, {best['diff_ci_high']:+.4f}] vs plain, p = "
                         f"{best['p_value']:.3g} (one pre-selected comparison), Holm over all {m}: "
                         f"{best['p_holm']:.3g}.")
        return "\n".join(lines)

    def to_json(self) -> dict:
        """Settings, table and every final run's row (curves included), JSON-ready."""
        settings = asdict(self.settings)
        return {"settings": settings, "table": self.table(),
                "runs": [r for rows in self.final.values() for r in rows]}

    def plot(self, directory, prefix: str) -> list[Path]:
        """Write ``{prefix}-vs-b.png`` (test metric against b, mean +- std) and ``{prefix}-curves.png``
        (validation metric per epoch, mean over seeds). Needs matplotlib (the ``demo`` extra)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as exc:
            raise ConfigurationError("Plots need matplotlib: pip install matplotlib (or the demo extra).") from exc
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        table = self.table()
        fig, ax = plt.subplots(figsize=(6, 4))
        bs = sorted({r["b"] for r in table if r["b"] is not None})
        for r in table:
            if r["method"] == "plain":
                ax.axhline(r["test_mean"], color="k", ls="--", label="plain")
                if bs and math.isfinite(r["test_std"]):
                    ax.axhspan(r["test_mean"] - r["test_std"], r["test_mean"] + r["test_std"], color="k", alpha=0.1)
        for method in [m for m in self.settings.methods if m != "plain"]:
            rows = sorted((r for r in table if r["method"] == method), key=lambda r: r["b"])
            if rows:
                ax.errorbar([r["b"] for r in rows], [r["test_mean"] for r in rows],
                            yerr=[0 if math.isnan(r["test_std"]) else r["test_std"] for r in rows],
                            marker="o", capsize=3, label=method)
        if bs:
            ax.set_xscale("log", base=2)
            ax.set_xticks(bs)
            ax.set_xticklabels([str(b) for b in bs])
        ax.set_xlabel("micro-batch size b")
        ax.set_ylabel(f"test metric (mean +- std, {len(self.settings.seeds)} seeds)")
        ax.set_title(self.settings.name)
        ax.legend(fontsize=8)
        fig.tight_layout()
        vs_b = directory / f"{prefix}-vs-b.png"
        fig.savefig(vs_b, dpi=110)
        plt.close(fig)

        methods = [m for m in self.settings.methods if m != "plain"] or ["plain"]
        fig, axes = plt.subplots(1, len(methods), figsize=(4 * len(methods), 3.2), squeeze=False, sharey=True)
        plain_rows = self.final.get(("plain", None))
        for ax, method in zip(axes[0], methods):
            for (m, b), rows in self.final.items():
                if m == method and m != "plain":
                    ax.plot(_mean_curve(rows), label=f"b={b}")
            if plain_rows:  # drawn last, on top: at b = B some methods coincide with plain
                ax.plot(_mean_curve(plain_rows), "k--", label="plain", zorder=5)
            ax.set_title(method)
            ax.set_xlabel("epoch")
            ax.legend(fontsize=7)
        axes[0][0].set_ylabel("validation metric (mean over seeds)")
        fig.tight_layout()
        curves = directory / f"{prefix}-curves.png"
        fig.savefig(curves, dpi=110)
        plt.close(fig)
        return [vs_b, curves]

    def save(self, directory, prefix: str, plots: bool = True) -> list[Path]:
        """Write ``{prefix}.md``, ``{prefix}.json`` and (``plots=True``) the two plots under ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        md, js = directory / f"{prefix}.md", directory / f"{prefix}.json"
        md.write_text(f"# {self.settings.name}\n\n{self.to_markdown()}\n")
        js.write_text(json.dumps(self.to_json(), indent=1, default=str))
        return [md, js] + (self.plot(directory, prefix) if plots else [])


def _mean_curve(rows: list[dict]) -> list[float]:
    length = min(len(r["val_curve"]) for r in rows)
    return [float(np.mean([r["val_curve"][i] for r in rows])) for i in range(length)]
