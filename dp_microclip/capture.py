"""The capture sink: the one object the hooks talk to.

The hooks (``hooks.py``) only capture; everything they hand over goes through
the typed methods of :class:`CaptureSink`, which the engine creates and owns:

* ``active`` says whether the hooks should capture at all (not after
  ``detach()``, not while the engine replays a forward for its own checks);
* ``open_context`` / ``close_context`` bracket one forward pass of the attached
  model (the sink asks the engine's grouping for the batch's groups);
* ``emit`` takes one ``Record`` when a layer's output gradient arrives; the first
  record of a backward pass queues the end-of-backward callback, which hands the
  pass's records to the engine (``on_pass_end``);
* ``token`` / ``context_by_id`` name the forward pass to records completed in a
  compiled backward (``traced.py``);
* ``report`` keeps a problem found during backward, raised at the next step;
* ``warn_once`` warns once per key.

No other file reads or writes the engine's state: this sink is the seam.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator

import torch

from .errors import user_stacklevel
from .grouping import Groups
from .records import ForwardContext, Record
from .layout import Signature

#: How many forward passes a compiled backward may lag behind (``context_by_id``).
RECENT_CONTEXTS = 8

#: ``(batch_size, device, inputs) -> (groups, drawn_by_engine)``: the groups of a new batch, and whether
#: ``engine.data_loader`` drew it (``inputs``: the model's ``(args, kwargs)``, checked against the loader's rows).
GroupMaker = Callable[[int, torch.device, object], "tuple[Groups, bool]"]


class CaptureSink:
    """Receives what the hooks capture and hands each finished backward pass to ``on_pass_end``.

    Args:
        make_groups: the groups of a new batch (the engine's grouping plan and sampled-batch queue).
        on_pass_end: called at the end of every backward pass that captured records, with those records.
        watch: DP mode's ``privacy.StateWatch``: no captured forward may change the model's state.
        reduce: applied to each record as it arrives (lean mode's ``aggregate.EarlyReduction``); default: kept as is.
    """

    def __init__(self, make_groups: GroupMaker, on_pass_end: Callable[[list[Record]], None], watch=None,
                 reduce: Callable[[Record], Record] | None = None):
        self._reduce = reduce
        self._make_groups = make_groups
        self._watch = watch  # DP mode: privacy.StateWatch, told when each captured forward starts and ends
        self._on_pass_end = on_pass_end
        self.enabled = True
        self._replaying = False
        self._context: ForwardContext | None = None
        self._records: list[Record] = []
        self._callback_queued = False
        self._problems: list[str] = []
        self._warned: set[str] = set()
        self.last_groups: Groups | None = None
        # torch.compile (traced.py): the forward in progress as a CPU scalar (its context id), an input of the
        # traced graph; recent contexts by id, for the records that arrive in the compiled backward.
        self.token: torch.Tensor | None = None
        self._recent: dict[int, ForwardContext] = {}

    # ------------------------------------------------------------------ state the hooks read
    @property
    def active(self) -> bool:
        """Whether hooks capture now: attached, and not inside :meth:`replay`."""
        return self.enabled and not self._replaying

    @property
    def context(self) -> ForwardContext | None:
        """The forward pass in progress, if any."""
        return self._context

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Forward and backward passes inside capture nothing (the engine's own checks, diagnostics' probes)."""
        previous = self._replaying
        self._replaying = True
        try:
            yield
        finally:
            self._replaying = previous

    # ------------------------------------------------------------------ what the hooks hand over
    def open_context(self, batch_size: int, device: torch.device, signature: Signature | None,
                     inputs=None) -> None:
        """A forward pass of the attached model starts (``inputs``: its ``(args, kwargs)``): draw its groups."""
        groups, drawn = self._make_groups(batch_size, device, inputs)
        self._context = ForwardContext(batch_size, groups, drawn_by_engine=drawn, signature=signature)
        self.last_groups = groups
        self.token = torch.tensor(self._context.id)  # a host scalar: no device copy
        self._recent[self._context.id] = self._context
        if len(self._recent) > RECENT_CONTEXTS:
            del self._recent[next(iter(self._recent))]
        if self._watch is not None:
            self._watch.forward_started()

    def close_context(self) -> None:
        """The forward pass of the attached model ended (DP mode: refuse one that changed the model's state)."""
        opened, self._context = self._context, None
        self.token = None
        if opened is not None and self._watch is not None:
            self._watch.forward_ended()

    def context_by_id(self, ctx_id: int) -> ForwardContext | None:
        """One of the last ``RECENT_CONTEXTS`` forward passes, by id (records of a compiled backward)."""
        return self._recent.get(ctx_id)

    def emit(self, record: Record) -> None:
        """One layer call's output gradient arrived; the first of a pass queues the end-of-backward callback."""
        self._records.append(record if self._reduce is None else self._reduce(record))
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_pass)

    def report(self, problem: str) -> None:
        """A problem found during a pass (named, with its fix); the engine raises it at the step."""
        self._problems.append(problem)

    def take_problems(self) -> list[str]:
        """The problems reported since the last call, cleared."""
        problems, self._problems = self._problems, []
        return problems

    def warn_once(self, key: str, message: str, category: type[Warning] = UserWarning) -> None:
        """Warn with ``message`` the first time ``key`` is seen, pointing at the user's line (``user_stacklevel``)."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, category, stacklevel=user_stacklevel())

    def _finish_pass(self) -> None:
        records, self._records = self._records, []
        self._callback_queued = False
        if self.enabled and records:
            self._on_pass_end(records)
