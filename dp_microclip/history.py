"""The DP history of trained parameters in this process, keyed by the parameters, not the module object.

A new DP engine must refuse an epsilon that would leave out DP steps its model's
parameters already took under an earlier engine. The module object is the wrong
key: ``Wrapper(m)``, ``nn.Sequential(*m)``, ``copy.deepcopy(m)`` and a fresh model
loaded with ``m``'s state dict all carry the trained values under another object.
The history therefore has two keys:

* the parameter objects themselves (weakly held): wrapping or re-assembling a
  model keeps them;
* a fingerprint of the values: the shape and a few elements at fixed positions
  (``FINGERPRINT_ELEMENTS``), gathered after every DP step from the largest managed
  parameters (``TRACKED``), never a hash of whole tensors. A copy or a loaded state
  dict has bit-equal values, so it matches.

Cost per DP step: one ``cat`` per device of a few evenly strided elements of each tracked parameter (views,
no index tensor; nothing else), kept on the parameters' device and converted to Python numbers only every
``FLUSH_EVERY`` steps or at a lookup (no device synchronisation per step).
Not seen: values changed before the copy by a cast (``model.half()``) or any
other transformation; parameters of more than ``MAX_FINGERPRINTS`` steps back.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from collections import OrderedDict

import torch

FINGERPRINT_ELEMENTS = 4
TRACKED = 4
FLUSH_EVERY = 64
MAX_FINGERPRINTS = 1 << 17


def _sample(t: torch.Tensor) -> torch.Tensor:
    """A view of at most ``FINGERPRINT_ELEMENTS`` elements of ``t`` at evenly strided flat positions (the first
    included): a slice, so that gathering several parameters' samples is one ``cat``, with no index tensor."""
    flat = t.reshape(-1)  # a view for a contiguous parameter
    k = min(FINGERPRINT_ELEMENTS, flat.numel())
    stride = max(1, (flat.numel() - 1) // max(1, k - 1))
    return flat[: stride * (k - 1) + 1: stride]


def _local(p: torch.Tensor) -> torch.Tensor:
    """This process's values of ``p``: its shard for a ``DTensor`` (FSDP2), else ``p`` itself."""
    return p.to_local() if hasattr(p, "to_local") else p


def fingerprint(p: torch.Tensor) -> tuple:
    """The shape of ``p`` and its values (this process's shard, under FSDP2) at a few fixed positions."""
    with torch.no_grad():
        t = _local(p.detach())
        values = _sample(t).double().tolist()
    return (tuple(p.shape), *values)


class ParameterHistory:
    """How many DP steps parameters (by object or by value) took under engines of this process."""

    def __init__(self):
        self._by_param: dict = {}  # id(Parameter) -> (weak reference, [steps] cell); tensors are no dict keys
        self._by_value: OrderedDict = OrderedDict()  # fingerprint -> steps
        self._pending: list = []  # (steps, shapes, device values, untrained)

    def tracker(self, managed: list[torch.nn.Parameter]) -> "StepTracker":
        """A recorder for one engine's managed parameters."""
        return StepTracker(self, managed)

    def steps_of(self, params) -> int:
        """The most DP steps any of ``params`` took (by object or by value); 0 if none."""
        self._flush()
        found = 0
        for p in params:
            entry = self._by_param.get(id(p))
            if entry is not None and entry[0]() is p:
                found = max(found, entry[1][0])
            if p.numel():
                found = max(found, self._by_value.get(fingerprint(p), 0))
        return found

    def link(self, params, cell: list) -> None:
        """``params`` hold the values of ``cell[0]`` DP steps from now on (the cell follows the engine's count)."""
        for p in params:
            self._by_param[id(p)] = (weakref.ref(p, self._forget(id(p))), cell)

    def _forget(self, pid: int) -> Callable[[object], None]:
        def forget(_ref: object) -> None:
            self._by_param.pop(pid, None)

        return forget

    def add_values(self, steps: int, shapes: list, values: list, untrained: set) -> None:
        """Gathered values (tensors on their devices, joined in the order of ``shapes``) of parameters with
        ``shapes`` after ``steps`` steps; a fingerprint in ``untrained`` (the values at attach) is not evidence
        of training and is skipped."""
        self._pending.append((steps, shapes, values, untrained))
        if len(self._pending) >= FLUSH_EVERY:
            self._flush()

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        for steps, shapes, values, untrained in pending:
            # One cat of the step's gathered values (mixed float dtypes promote exactly), read once.
            flat = torch.cat(values).tolist()
            at = 0
            for shape, k in shapes:
                key = (shape, *flat[at:at + k])
                at += k
                if key in untrained:
                    continue
                self._by_value[key] = max(steps, self._by_value.get(key, 0))
                self._by_value.move_to_end(key)
        while len(self._by_value) > MAX_FINGERPRINTS:
            self._by_value.popitem(last=False)


class StepTracker:
    """Records one engine's managed parameters in the history after each of its DP steps."""

    def __init__(self, history: ParameterHistory, managed: list[torch.nn.Parameter]):
        self._history = history
        self._managed = managed
        self._cell = [0]
        largest = sorted((p for p in managed if p.numel()), key=lambda p: -p.numel())[:TRACKED]
        by_device: dict = {}
        for p in largest:
            by_device.setdefault(p.device, []).append(p)
        self._tracked = list(by_device.values())  # one list per device: one cat each
        self._untrained = {fingerprint(p) for p in largest}  # values at attach: not evidence of training
        self._shapes = [(tuple(p.shape), _sample(_local(p.detach())).numel()) for ps in self._tracked for p in ps]

    def record(self, steps: int) -> None:
        """The managed parameters now hold the values of ``steps`` DP steps (ledger total)."""
        if self._cell[0] == 0:
            self._history.link(self._managed, self._cell)
        self._cell[0] = steps
        if self._tracked:
            with torch.no_grad():
                # One cat per device a step (slices of the parameters: mixed float dtypes promote exactly); read
                # at the flush (every FLUSH_EVERY steps or at a lookup).
                values = [torch.cat([_sample(_local(p.detach())) for p in ps]) for ps in self._tracked]
            self._history.add_values(steps, self._shapes, values, self._untrained)


#: The one history of this process.
HISTORY = ParameterHistory()
