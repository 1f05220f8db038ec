"""The first steps' check: the engine's per-example sums against autograd's own gradient.

For the first ``verify_steps`` steps (``attach`` default 1) the parameters keep
``requires_grad``, so autograd computes each one's ordinary gradient beside the
engine. The sum over examples of the per-example gradients the engine captured
at a parameter's module must equal it. A difference means part of the loss
reaches the parameter outside its module's hooked call: a direct read such as
``h @ emb.weight.T`` or ``F.linear(x, self.proj.weight)``, or a penalty term
added to the loss. That part would be missing from the clipped gradient, so the
step raises instead of training silently without it.
"""

from __future__ import annotations

import math

import torch

from torch import nn

from .aggregate import unclipped_sums
from .step import GradPlacement
from .tensors import LOW_PRECISION as _LOW


def compare_with_autograd(records: list, autograd_grads: dict, names: dict, replay_guard) -> list[str]:
    """One message per parameter whose autograd gradient differs from the engine's unclipped sum.

    Args:
        records: one backward pass's records.
        autograd_grads: ``id(param) -> autograd's gradient`` of the same pass.
        names: ``id(param) -> name`` for the messages.
        replay_guard: the engine's context manager that silences its hooks during replays.
    """
    mine = unclipped_sums(records, replay_guard)
    low_precision = any(
        torch.is_tensor(x) and x.dtype in _LOW for r in records for x in (*r.inputs, r.out_grad))
    # A parameter whose true gradient is ~0 (the bias before a BatchNorm) compares rounding noise with rounding
    # noise: differences are measured against the larger of its own gradient and 1e-4 of the whole model's.
    total = math.sqrt(sum(float(g.double().pow(2).sum()) for g in autograd_grads.values()))
    problems = []
    for pid, theirs in autograd_grads.items():
        ours = mine.get(pid)
        diff = float(theirs.double().norm() if ours is None else (ours.double() - theirs.double()).norm())
        scale = max(float(theirs.double().norm()), 1e-4 * total, 1e-30)
        tolerance = 3e-2 if low_precision or theirs.dtype in _LOW else 1e-3  # bf16 rounds at ~4e-3
        if diff > tolerance * scale and diff > 1e-12:
            problems.append(
                f"parameter {names.get(pid, '?')!r}: autograd's gradient differs from the sum of the per-example "
                f"gradients the engine captured at its module (relative difference {diff / scale:.3g}). Part of "
                "the loss uses this parameter outside its module's forward call: a direct read such as "
                "h @ emb.weight.T or F.linear(x, self.proj.weight), or a penalty term added to the loss. "
                "That part would be dropped from the clipped gradient. Call the module instead of reading its "
                "parameter (or tie the weight to a module that is called), or, where that code cannot be "
                "changed (a library's model), freeze the parameter (requires_grad=False) before attach(); use "
                "the optimizer's weight_decay for L2 penalties. (The check runs on the first "
                "attach(..., verify_steps=...) steps.)"
            )
    return problems


class FirstStepCheck:
    """Keeps autograd's own gradient of each managed parameter for the first ``steps`` steps.

    While it runs, the parameters keep ``requires_grad`` and a tensor hook adds each
    backward pass's gradient to a private buffer (``take()`` hands it over at the end
    of the pass). After ``steps`` steps, :meth:`finish` removes the hooks and switches
    the parameters' ``requires_grad`` off: from then on autograd computes no weight
    gradient the engine would throw away.

    With ``private=True`` (DP mode) autograd's raw gradient never reaches ``p.grad``: the
    tensor hook hands autograd zeros to accumulate (``p.grad`` keeps the engine's last noised
    gradient exactly), and a post-accumulate hook sets ``p.grad`` back to ``None`` where it was
    ``None`` before the pass. SAM, a manual ``p -= lr * p.grad`` or another optimizer therefore
    see no raw gradient on the first steps either.
    """

    def __init__(self, managed: list[nn.Parameter], steps: int, is_enabled, private: bool = False,
                 placement: GradPlacement | None = None):
        self._managed = managed
        self.steps_left = int(steps)
        self._is_enabled = is_enabled
        self._private = private
        self._grads: dict[int, torch.Tensor] = {}
        self._had_no_grad: set[int] = set()
        self._handles: list = []
        if self.steps_left > 0:
            for p in managed:
                leaf = p if placement is None else placement.leaf(p)  # FSDP2: the unsharded parameter
                self._handles.append(leaf.register_hook(self._hook(p)))
                if private:
                    self._handles.append(leaf.register_post_accumulate_grad_hook(self._restore(p)))
        else:
            self.finish()

    @property
    def running(self) -> bool:
        """Whether this step is still checked."""
        return self.steps_left > 0

    def _hook(self, p: nn.Parameter):
        pid = id(p)

        def hook(grad: torch.Tensor):
            if self._is_enabled():
                previous = self._grads.get(pid)
                self._grads[pid] = grad.detach().clone() if previous is None else previous + grad
            if not self._private:
                return None
            if p.grad is None:
                self._had_no_grad.add(pid)
            return torch.zeros_like(grad)  # accumulates nothing: the raw gradient stays private

        return hook

    def _restore(self, p: nn.Parameter):
        pid = id(p)

        def restore(leaf: torch.Tensor) -> None:
            # ``leaf`` is p itself, or the tensor that stands for it in the graph (FSDP2: with no gradient
            # there, FSDP reduce-scatters nothing into p.grad).
            if pid in self._had_no_grad:
                self._had_no_grad.discard(pid)
                leaf.grad = None

        return restore

    def take(self) -> dict[int, torch.Tensor]:
        """Autograd's gradients of the pass that just ended, cleared."""
        grads, self._grads = self._grads, {}
        return grads

    def step_done(self) -> None:
        """Count one checked step; after the last, :meth:`finish`."""
        if self.steps_left > 0:
            self.steps_left -= 1
            if self.steps_left == 0:
                self.finish()

    def finish(self) -> None:
        """Remove the hooks and switch ``requires_grad`` off on the managed parameters."""
        self.remove()
        for p in self._managed:
            p.requires_grad_(False)

    def remove(self) -> None:
        """Remove the hooks (``detach``) without touching any flag."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._grads.clear()
