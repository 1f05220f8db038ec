"""PLD backend ("pld"): Google's dp_accounting ``PLDAccountant``.

Privacy loss distributions (Koskela et al.; Doroshenko et al. 2022,
"Connect the Dots", arXiv:2207.04380) discretised with spacing
``value_discretization_interval`` and composed exactly; the pessimistic
estimate makes the result an upper bound. It is the field's reference and the
only backend here that analyses ``adjacency="replace_one"`` with Poisson
sampling: dp_accounting's ``NeighboringRelation.REPLACE_ONE`` compares
q N(-k C) + (1-q) N(0) with q N(+k C) + (1-q) N(0), one record's contribution
bound k C against the other's, which is the 2C (b = 1) / 4C (b > 1) distance of
the rule table in docs/accounting.md (see ``sensitivity.py``).

Cost: 0.1-5 s with ``value_discretization_interval=1e-4``; 1e-3 is about 10x
faster and within 0.4% (still an upper bound).

Needs the ``accounting`` extra: ``pip install "dp-microclip[accounting]"``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Sequence

from accounting.backends import Segment, begin, dp_accounting_event, import_dp_accounting


@dataclasses.dataclass(frozen=True)
class PldBackend:
    """dp_accounting's PLD accountant.

    Args:
        value_discretization_interval: grid spacing of the privacy loss;
            smaller is tighter and slower (1e-4: reference quality).

    Example:
        >>> PldBackend().epsilon([(1.1, 256 / 60000, 14062)], 1e-5)  # doctest: +ELLIPSIS
        2.38...
    """

    value_discretization_interval: float = 1e-4
    name: str = dataclasses.field(default="pld", init=False)
    adjacencies: ClassVar[tuple[str, ...]] = ("add_remove", "replace_one")

    def __post_init__(self) -> None:
        if not 0 < self.value_discretization_interval <= 0.1:
            raise ValueError(
                f"value_discretization_interval must be in (0, 0.1]. Found {self.value_discretization_interval!r}."
            )

    def epsilon(self, history: Sequence[Segment], delta: float, *, adjacency: str = "add_remove") -> float:
        """Epsilon at ``delta`` from dp_accounting's PLD.

        Raises:
            ImportError: dp_accounting is not installed (names the extra).
        """
        history, trivial = begin(self, history, delta, adjacency)
        if trivial is not None:
            return trivial
        dpa = import_dp_accounting()
        relation = (
            dpa.NeighboringRelation.ADD_OR_REMOVE_ONE
            if adjacency == "add_remove"
            else dpa.NeighboringRelation.REPLACE_ONE
        )
        # Reuse dp_accounting: compose the history's DpEvent in its PLD accountant.
        acc = dpa.pld.PLDAccountant(
            neighboring_relation=relation, value_discretization_interval=self.value_discretization_interval
        )
        acc.compose(dp_accounting_event(history))
        return float(acc.get_epsilon(delta))
