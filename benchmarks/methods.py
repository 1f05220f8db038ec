"""The methods a benchmark compares, each as a runner that owns its model copy and does one training step.

A training step is always the user's loop body: ``opt.zero_grad()``, forward,
loss, ``loss.backward()`` (plus whatever the method adds), clipping, and
``opt.step()`` (SGD). Methods:

* ``plain``: plain PyTorch, no clipping (the floor every ratio is taken against).
* ``engine``: ``dp_microclip.attach(..., micro_batch_size=b, grad_mode=...)``.
* ``opacus``: Opacus ``make_private`` with ``grad_sample_mode="hooks"`` or ``"ghost"``,
  noise multiplier 0 (per-example clipping, b = 1). On the transformer it runs on
  the model after ``ModuleValidator.fix`` (Opacus refuses nn.MultiheadAttention).
  Opacus is only called, never copied.
* ``naive``: ``dp_microclip.reference.naive_microbatch_grads`` (one backward per
  micro-batch), its result written to ``p.grad``, then ``optimizer.step()``.

Every clipping method is checked once against the naive loop on its own model
(:func:`check_against_reference`) before it is timed.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

import dp_microclip
from dp_microclip.reference import naive_microbatch_grads

from .models import LM_MODELS, PerExampleCrossEntropy, Workload, loss_fn

LR = 1e-3
#: The per-parameter relative error above which a method is called wrong and not timed.
CHECK_TOLERANCE = 1e-4


@dataclass(frozen=True)
class MethodSpec:
    kind: str  # "plain" | "engine" | "opacus" | "naive"
    b: int | None = None  # micro-batch size (None for plain)
    mode: str | None = None  # engine grad_mode, or Opacus grad_sample_mode

    @property
    def label(self) -> str:
        if self.kind == "plain":
            return "plain PyTorch"
        if self.kind == "engine":
            return f"dp_microclip {self.mode}"
        if self.kind == "opacus":
            return f"Opacus {self.mode}"
        return "naive loop"

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.mode or '-'}:b={self.b or '-'}"


class SetupError(RuntimeError):
    """A method could not be set up on this model (the reason goes into the table)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """A method bound to its own model copy and optimizer. ``step()`` is one training step."""

    spec: MethodSpec
    model: nn.Module  # the model whose parameters are trained (names match the reference)
    note: str = ""

    def __init__(self, spec: MethodSpec, work: Workload, max_grad_norm: float):
        self.spec = spec
        self.work = work
        self.max_grad_norm = max_grad_norm
        self.x, self.y = work.inputs, work.targets

    def step(self) -> None:
        raise NotImplementedError

    def grads(self) -> dict[str, torch.Tensor | None]:
        """``{name: p.grad}`` after the last step (None where a trainable parameter got no gradient).

        The trainable set is taken before any method touched the model (the engine
        switches ``requires_grad`` off on the parameters it computes itself).
        """
        params = dict(self.model.named_parameters())
        return {n: (None if params[n].grad is None else params[n].grad.detach().clone()) for n in self.trainable}

    def reference_model(self) -> nn.Module:
        """A fresh model with the same function and weights as this runner's before its first step."""
        return self.work.fresh_model()

    def release(self) -> None:
        """Drop gradients outside the clock (after the check step, in the memory child, and under
        ``--timing isolated``). The default timing never calls it: the next step's ``zero_grad()`` frees them."""

    def strategies(self) -> str:
        return ""

    def close(self) -> None:
        pass


class PlainRunner(Runner):
    def __init__(self, spec, work, max_grad_norm):
        super().__init__(spec, work, max_grad_norm)
        self.model = work.fresh_model()
        self.trainable = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR)

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss_fn(self.model(self.x), self.y).backward()
        self.opt.step()

    def release(self) -> None:
        self.opt.zero_grad(set_to_none=True)


class EngineRunner(PlainRunner):
    """The same step as plain PyTorch: the engine only adds hooks."""

    def __init__(self, spec, work, max_grad_norm):
        super().__init__(spec, work, max_grad_norm)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.engine = dp_microclip.attach(
                    self.model, self.opt, micro_batch_size=spec.b, max_grad_norm=max_grad_norm,
                    clipping="fixed", grad_mode=spec.mode,
                )
        except Exception as err:  # the engine refusing a config is a result, not a crash
            raise SetupError(f"attach() raised {type(err).__name__}: {err}") from err

    def strategies(self) -> str:
        used = getattr(self.engine, "last_strategies", None) or {}
        counts: dict[str, int] = {}
        for value in used.values():
            counts[str(value)] = counts.get(str(value), 0) + 1
        return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))

    def fraction_clipped(self) -> float | None:
        norms = getattr(self.engine, "last_group_norms", None)
        if norms is None or norms.numel() == 0:
            return None
        return float((norms > self.max_grad_norm).float().mean())

    def close(self) -> None:
        self.engine.detach()


class NaiveRunner(PlainRunner):
    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        grads = naive_microbatch_grads(
            self.model, loss_fn, self.x, self.y, micro_batch_size=self.spec.b, max_grad_norm=self.max_grad_norm
        )
        for name, p in self.model.named_parameters():
            if name in grads:
                p.grad = grads[name]
        self.opt.step()


class OpacusRunner(Runner):
    """Opacus ``make_private`` with noise 0 and no Poisson sampling: per-example clipping of this batch."""

    def __init__(self, spec, work, max_grad_norm):
        super().__init__(spec, work, max_grad_norm)
        try:
            from opacus import PrivacyEngine
            from opacus.validators import ModuleValidator
        except ImportError as err:
            raise SetupError(f"Opacus is not installed ({err})") from err
        original = work.fresh_model()
        model = original
        notes = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                if ModuleValidator.validate(model, strict=False):
                    model = ModuleValidator.fix(copy.deepcopy(model)).to(work.device).train()
                    notes.append("after ModuleValidator.fix")
                    diff = _max_output_difference(original, model, self.x)
                    if diff > 1e-4:
                        notes.append(f"the fixed model's output differs from the original by up to {diff:.2g}")
                problems = ModuleValidator.validate(model, strict=False)
                if problems:
                    raise SetupError(f"ModuleValidator still reports {problems[0]}")
                self._fixed_state = copy.deepcopy(model.state_dict())
                self._fixed_template = copy.deepcopy(model)
                self.model = model
                self.trainable = [n for n, p in model.named_parameters() if p.requires_grad]
                opt = torch.optim.SGD(model.parameters(), lr=LR)
                loader = torch.utils.data.DataLoader(
                    torch.utils.data.TensorDataset(self.x.cpu(), self.y.cpu()), batch_size=work.batch_size
                )
                # Language models: a criterion with one loss per example (Opacus' ghost mode needs (B,)).
                criterion = PerExampleCrossEntropy() if work.model in LM_MODELS else nn.CrossEntropyLoss()
                out = PrivacyEngine(accountant="rdp").make_private(
                    module=model, optimizer=opt, data_loader=loader, noise_multiplier=0.0,
                    max_grad_norm=max_grad_norm, poisson_sampling=False, grad_sample_mode=spec.mode,
                    criterion=criterion, loss_reduction="mean", batch_first=True,
                )
            except SetupError:
                raise
            except Exception as err:
                raise SetupError(f"make_private raised {type(err).__name__}: {_short(err)}") from err
        self.wrapped, self.opt = out[0], out[1]
        self.criterion = out[2] if len(out) == 4 else criterion
        self.note = "; ".join(notes)

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus' full-backward-hook warnings on every step
            loss = self.criterion(self.wrapped(self.x), self.y)
            loss.backward()
        self.opt.step()

    def reference_model(self) -> nn.Module:
        model = copy.deepcopy(self._fixed_template)
        model.load_state_dict(self._fixed_state)
        return model.to(self.work.device).train()

    def release(self) -> None:
        self.opt.zero_grad(set_to_none=True)  # also drops Opacus' per-sample gradients

    def close(self) -> None:
        self.release()
        remove = getattr(self.wrapped, "_close", None)
        if callable(remove):
            remove()


def _short(err: Exception, limit: int = 160) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@torch.no_grad()
def _max_output_difference(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    return float((a(x) - b(x)).abs().max())


RUNNERS = {"plain": PlainRunner, "engine": EngineRunner, "naive": NaiveRunner, "opacus": OpacusRunner}


def make_runner(spec: MethodSpec, work: Workload, max_grad_norm: float) -> Runner:
    """Build the runner; raises :class:`SetupError` with the reason if the method refuses the model."""
    try:
        return RUNNERS[spec.kind](spec, work, max_grad_norm)
    except SetupError:
        raise
    except Exception as err:
        raise SetupError(f"{type(err).__name__}: {_short(err)}") from err


# ---------------------------------------------------------------------------- checking
class ReferenceCache:
    """Naive-loop gradients per (model function, b), computed once on a fresh copy at the initial weights."""

    def __init__(self, work: Workload, max_grad_norm: float):
        self.work = work
        self.max_grad_norm = max_grad_norm
        self._cache: dict[tuple, dict[str, torch.Tensor]] = {}

    def get(self, runner: Runner, b: int) -> dict[str, torch.Tensor]:
        key = (type(runner) is OpacusRunner, b)
        if key not in self._cache:
            model = runner.reference_model()
            self._cache[key] = naive_microbatch_grads(
                model, loss_fn, self.work.inputs, self.work.targets, micro_batch_size=b,
                max_grad_norm=self.max_grad_norm,
            )
        return self._cache[key]


def relative_error(got: torch.Tensor | None, want: torch.Tensor, floor: float = 1e-30) -> float:
    """||got - want|| / max(||want||, floor) of a whole tensor; inf if the parameter got no gradient."""
    if got is None:
        return float("inf")
    return float((got.double() - want.double()).norm() / max(float(want.double().norm()), floor))


def check_against_reference(runner: Runner, cache: ReferenceCache) -> tuple[float, str, float, str]:
    """Do the runner's first step and compare its gradient with the naive loop's, parameter by parameter.

    The error of parameter p is ||got_p - want_p|| / max(||want_p||, ||want|| sqrt(n_p / n)):
    relative to the parameter's own gradient, but never to less than the share of
    the whole gradient's norm a parameter of its size would have on average.
    Without that floor, a parameter whose exact gradient is zero is judged by
    rounding noise alone: the key bias of attention (softmax ignores a shift
    shared by all keys), which Opacus' DPMultiheadAttention keeps as its own
    tensor, shows a "relative error" of about 1 in float32 for every method.

    Returns (worst floored error, its parameter, worst raw relative error, its
    parameter). The runner's model must be at its initial weights.
    """
    b = runner.spec.b or 1
    want = cache.get(runner, b)
    runner.step()
    got = runner.grads()
    missing = set(got) - set(want)
    if missing:  # a parameter the reference does not know: cannot be checked, so it is wrong
        name = sorted(missing)[0]
        return float("inf"), name, float("inf"), name
    total = math.sqrt(sum(float(w.double().pow(2).sum()) for w in want.values()))
    numel = sum(w.numel() for w in want.values())
    worst = (-1.0, "")
    worst_raw = (-1.0, "")
    for name, ref in want.items():
        raw = relative_error(got.get(name), ref)
        floored = relative_error(got.get(name), ref, total * math.sqrt(ref.numel() / numel))
        worst = max(worst, (floored, name))
        worst_raw = max(worst_raw, (raw, name))
    return worst[0], worst[1], worst_raw[0], worst_raw[1]
