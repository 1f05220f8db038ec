"""Not a test: the zoo table of docs/models.md, generated from the zoo modules' ``CASES``.

    python -m tests.zoo.table                      # every tests/zoo/test_*.py module
    python -m tests.zoo.table test_unnamed_torch   # some modules only

A module's cases are its ``CASES`` and every other upper-case module-level dict of ``ZooCase`` (``REFUSED``,
variants), shown as ``TABLE.case``. Each case runs one engine step against the naive micro-batch loop (float64, B=4, T in {4, 6}, b in
{1, 2, B}), exactly as the zoo tests do, and the table shows its WORST outcome over those runs:
WRONG (the gradient differs from the naive loop) < error (an unexpected exception) < refused (a
dp_microclip error naming the cause) < generic path (exact, but a module replayed with torch.func)
< exact. A case another module already lists (the autocast module reuses other modules' cases) is
shown once. Modules whose libraries are missing (transformers, peft) are listed as skipped, and so are
cases whose library imports only when the case builds its model (timm's, ``timm_stub.timm_class``).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import pathlib
import time
import warnings
from dataclasses import dataclass

import pytest
import torch

from dp_microclip import errors as dp_errors

from .harness import B, T_EQ, T_NE, TOL, ZooCase, build_model, engine, errors_by_param, naive

_RANK = {"WRONG": 0, "error": 1, "refused": 2, "generic path": 3, "exact": 4}
_REFUSALS = tuple(v for v in vars(dp_errors).values() if isinstance(v, type) and issubclass(v, Exception)
                  and v.__module__ == dp_errors.__name__)


@dataclass
class Outcome:
    kind: str  # a key of _RANK
    detail: str = ""
    b: int = 0
    T: int = 0

    def cell(self) -> str:
        where = f" (b={self.b}, T={self.T})" if self.kind != "exact" else ""
        text = f"{self.kind}: {self.detail}" if self.detail else self.kind
        return (text + where).replace("|", "\\|").replace("\n", " ")


def _short(message: str, limit: int = 160) -> str:
    first = message.split(". ")[0].strip()
    return first if len(first) <= limit else first[: limit - 3] + "..."


def run_once(case, *, b: int, T: int) -> Outcome:
    """One engine step of ``case`` against the naive loop: its outcome."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # generic-path notices, library deprecations
        try:
            model = build_model(case, T, torch.float64)
            pristine = copy.deepcopy(model)
            inputs, targets = case.batch(B, T, torch.float64, torch.Generator().manual_seed(B * 100 + T))
            got, eng = engine(case, model, inputs, targets, b=b)
        except _REFUSALS as err:
            return Outcome("refused", _short(str(err)), b, T)
        except Exception as err:  # noqa: BLE001 - the table reports whatever happens
            return Outcome("error", f"{type(err).__name__}: {_short(str(err))}", b, T)
        want = naive(case, pristine, inputs, targets, b=b)
    if set(got) != set(want):
        return Outcome("WRONG", f"parameters with a gradient differ: {sorted(set(got) ^ set(want))[:3]}", b, T)
    errors = errors_by_param(got, want)
    worst = max(errors, key=errors.get)
    if errors[worst] >= TOL:
        return Outcome("WRONG", f"rel. error {errors[worst]:.1e} at {worst}", b, T)
    generic = sorted({type(model.get_submodule(name)).__name__ for name, route in eng.last_strategies.items()
                      if route == "func"})
    if generic:
        return Outcome("generic path", ", ".join(generic), b, T)
    return Outcome("exact")


def worst_outcome(case) -> Outcome:
    """The worst outcome of ``case`` over T in {T == B, T != B} and b in {1, 2, B}."""
    worst = None
    for T in (T_EQ, T_NE):
        for b in (1, 2, B):
            outcome = run_once(case, b=b, T=T)
            if worst is None or _RANK[outcome.kind] < _RANK[worst.kind]:
                worst = outcome
    assert worst is not None
    return worst


def zoo_cases(module) -> list[tuple[str, ZooCase]]:
    """Every case of a zoo module: ``CASES`` first, then the cases of its other module-level tables
    (``REFUSED``, variants), named ``TABLE.case``."""
    found = [(n, c) for n, c in getattr(module, "CASES", {}).items() if isinstance(c, ZooCase)]
    for table, cases in vars(module).items():
        if table != "CASES" and table.isupper() and isinstance(cases, dict) and cases \
                and all(isinstance(c, ZooCase) for c in cases.values()):
            found += [(f"{table}.{n}", c) for n, c in cases.items()]
    return found


def zoo_modules() -> list[str]:
    """Every ``tests/zoo/test_*.py`` module, by name."""
    return sorted(p.stem for p in pathlib.Path(__file__).parent.glob("test_*.py"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("modules", nargs="*", help="zoo module names (default: every one with CASES)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seen: set[int] = set()
    counts = {k: 0 for k in _RANK}
    lines = ["| module | case | worst outcome over b in {1, 2, B}, T == B and T != B |", "|---|---|---|"]
    start = time.time()
    for name in args.modules or zoo_modules():
        try:
            module = importlib.import_module(f"tests.zoo.{name}")
        except pytest.skip.Exception as skip:
            lines.append(f"| {name} | (skipped) | {skip} |")
            continue
        for case_name, case in zoo_cases(module):
            if id(case) in seen:
                continue
            seen.add(id(case))
            try:
                outcome = worst_outcome(case)
            except pytest.skip.Exception as skip:  # its library is missing (timm, a transformers model)
                lines.append(f"| {name} | {case_name} | (skipped) {skip} |")
                continue
            counts[outcome.kind] += 1
            lines.append(f"| {name} | {case_name} | {outcome.cell()} |")
    print("\n".join(lines))
    print()
    print(", ".join(f"{k}: {v}" for k, v in counts.items()) + f" ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
