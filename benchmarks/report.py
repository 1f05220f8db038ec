"""Result rows, markdown tables, JSON dumps and plots (matplotlib, Agg backend)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from .measure import Timing
from .methods import CHECK_TOLERANCE, MethodSpec

KIND_ORDER = {"plain": 0, "engine": 1, "opacus": 2, "naive": 3}
MODE_ORDER = {"auto": 0, "bookkeeping": 1, "materialize": 2, "func": 3, "hooks": 4, "ghost": 5}
#: The issue's targets: (model family) -> max ratio to plain at b=1 and b=8.
TARGET_RATIO = {"mlp": 1.25, "cnn": 1.25, "transformer": 1.4, "transformer_seqfirst": 1.4}
TARGET_SPEEDUP_OVER_GHOST = 2.0


@dataclass
class Row:
    spec: MethodSpec
    status: str = "ok"  # "ok" | "wrong" (gradient differs from the naive loop) | "failed" (refused/crashed)
    reason: str = ""
    timing: Timing | None = None
    check_err: float | None = None
    check_param: str = ""
    clipped: float | None = None  # fraction of micro-batches whose norm exceeded C in the check step
    strategies: str = ""
    note: str = ""
    mem_mb: float | None = None
    mem_note: str = ""

    def sort_key(self):
        s = self.spec
        return (KIND_ORDER[s.kind], MODE_ORDER.get(s.mode or "", 9), s.b or 0)

    def to_json(self) -> dict:
        t = self.timing
        return {
            "method": self.spec.label, "kind": self.spec.kind, "mode": self.spec.mode, "b": self.spec.b,
            "status": self.status, "reason": self.reason,
            "ms": None if t is None else t.ms, "ratios": None if t is None else t.ratios,
            "median_ms": None if t is None else _num(t.median_ms), "ratio": None if t is None else _num(t.ratio),
            "check_rel_err": _num(self.check_err), "check_param": self.check_param, "clipped": self.clipped,
            "strategies": self.strategies, "note": self.note, "extra_peak_mb": _num(self.mem_mb),
            "mem_note": self.mem_note,
        }


def _num(x):
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return None if x is None or math.isnan(x) else str(x)
    return x


def fmt_ratio(x: float | None) -> str:
    return "—" if x is None or math.isnan(x) else f"{x:.2f}x"


def fmt_err(row: Row) -> str:
    if row.spec.kind == "plain":
        return "— (no clipping)"
    if row.spec.kind == "naive":
        return "reference"
    if row.check_err is None:
        return "—"
    mark = "ok" if row.check_err < CHECK_TOLERANCE else f"**WRONG** ({row.check_param})"
    return f"{row.check_err:.1e} {mark}"


def _b_text(row: Row, batch: int) -> str:
    if row.spec.b is None:
        return "—"
    return f"{row.spec.b} (=B)" if row.spec.b == batch else str(row.spec.b)


def main_table(rows: list[Row], batch: int) -> str:
    plain = next((r for r in rows if r.spec.kind == "plain"), None)
    plain_mem = plain.mem_mb if plain is not None else None
    head = ("| method | b | ms/step | ratio to plain | ratio IQR | n | peak MB over setup | extra peak MB vs plain "
            "| grad vs naive loop (worst rel. err) | path / note |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in sorted(rows, key=Row.sort_key):
        t = row.timing
        if row.status == "ok" and t is not None and t.ms:
            ms, ratio = f"{t.median_ms:.1f}", fmt_ratio(t.ratio)
            lo, hi = t.ratio_iqr
            iqr, n = f"{lo:.2f}–{hi:.2f}", str(len(t.ms))
        else:
            ms, ratio, iqr, n = "—", "not timed", "—", "0"
        mem = "—" if row.mem_mb is None else f"{row.mem_mb:.0f}"
        if row.mem_mb is not None and plain_mem is not None:
            extra = "0 (floor)" if row.spec.kind == "plain" else f"{row.mem_mb - plain_mem:+.0f}"
        else:
            extra = "—" if not row.mem_note or row.mem_mb is not None else _cell(row.mem_note, 40)
        notes = []
        if row.status == "failed":
            notes.append(f"**failed**: {row.reason}")
        elif row.status == "wrong":
            notes.append("**not timed: gradient differs from the naive loop**")
        if row.strategies:
            notes.append(row.strategies)
        if row.clipped is not None:
            notes.append(f"{row.clipped:.0%} of micro-batches clipped")
        if row.note:
            notes.append(row.note)
        if row.mem_note and row.mem_mb is None and row.status == "ok":
            notes.append(f"memory: {row.mem_note}")
        lines.append(
            f"| {row.spec.label} | {_b_text(row, batch)} | {ms} | {ratio} | {iqr} | {n} | {mem} | {extra} | "
            f"{fmt_err(row)} | {_cell('; '.join(notes), 400)} |"
        )
    return "\n".join(lines)


def _cell(text: str, limit: int) -> str:
    text = " ".join(text.replace("|", "/").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _find(rows, kind, mode=None, b=None) -> Row | None:
    for r in rows:
        if r.spec.kind == kind and (mode is None or r.spec.mode == mode) and (b is None or r.spec.b == b):
            return r
    return None


def _timed_ratio(row: Row | None) -> float | None:
    if row is None or row.status != "ok" or row.timing is None or not row.timing.ratios:
        return None
    return row.timing.ratio


def targets_section(model: str, rows: list[Row]) -> str:
    limit = TARGET_RATIO.get(model)
    if limit is None:
        return ""
    out = [f"Targets (issue): engine at b=1 and b=8 at most {limit:.2f}x plain; at b=1 at least "
           f"{TARGET_SPEEDUP_OVER_GHOST:.0f}x faster than Opacus ghost.", ""]
    for b in (1, 8):
        for mode in ("auto", "bookkeeping"):
            ratio = _timed_ratio(_find(rows, "engine", mode, b))
            if ratio is None:
                out.append(f"- engine {mode}, b={b}: not timed")
                continue
            verdict = "met" if ratio <= limit else f"missed by {ratio - limit:.2f}x"
            out.append(f"- engine {mode}, b={b}: {ratio:.2f}x plain (target {limit:.2f}x): {verdict}")
    ghost = _timed_ratio(_find(rows, "opacus", "ghost", 1))
    auto1 = _timed_ratio(_find(rows, "engine", "auto", 1))
    if ghost is not None and auto1 is not None:
        speedup = ghost / auto1
        verdict = "met" if speedup >= TARGET_SPEEDUP_OVER_GHOST else "missed"
        out.append(f"- Opacus ghost / engine auto at b=1: {ghost:.2f}x / {auto1:.2f}x = {speedup:.2f}x faster "
                   f"(target {TARGET_SPEEDUP_OVER_GHOST:.0f}x): {verdict}")
    else:
        out.append("- Opacus ghost vs engine auto at b=1: not both timed")
    return "\n".join(out)


def write_json(path, payload) -> None:
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=1, default=str)


def plot_ratios(path, model: str, rows: list[Row], batch: int, title: str) -> bool:
    """Ratio to plain vs b, one line per engine grad_mode, markers for the naive loop and Opacus."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    styles = {"auto": "o-", "bookkeeping": "s--", "materialize": "^:", "func": "d-."}
    for mode, style in styles.items():
        pts = sorted((r.spec.b, _timed_ratio(r)) for r in rows
                     if r.spec.kind == "engine" and r.spec.mode == mode and _timed_ratio(r) is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"dp_microclip {mode}")
    pts = sorted((r.spec.b, _timed_ratio(r)) for r in rows if r.spec.kind == "naive" and _timed_ratio(r))
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "kx-", ms=9, label="naive loop")
    for mode, marker in (("ghost", "P"), ("hooks", "*")):
        ratio = _timed_ratio(_find(rows, "opacus", mode, 1))
        if ratio is not None:
            ax.plot([1], [ratio], marker, ms=12, linestyle="none", label=f"Opacus {mode} (b=1)")
    ax.axhline(1.0, color="grey", lw=1)
    limit = TARGET_RATIO.get(model)
    if limit:
        ax.axhline(limit, color="green", lw=1, ls="--", label=f"target {limit:.2f}x (b=1, 8)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(f"micro-batch size b (B={batch})")
    ax.set_ylabel("step time / plain step (median of paired ratios)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
