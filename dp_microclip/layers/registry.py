"""The layer-rule registry: how to get per-group gradients of a layer type.

A rule works on what the engine's hooks captured for one call of a layer: its
inputs and the gradient of the loss with respect to its output, both moved so
the batch is dimension 0. "Per-group gradient" always means the *sum* over the
group's rows of the captured (unscaled) per-row contributions; the engine
applies the loss-reduction scale and the group mean.

A rule has one required and four optional functions (a NamedTuple, no classes
to subclass):

* ``group_grads(layer, inputs, out_grad, groups) -> {name: (M, *param.shape)}``:
  materialised group gradients. Always exact; memory ``M x params``.
* ``group_sq_norms(layer, inputs, out_grad, groups) -> {name: (M,)}``: squared
  norms without materialising group gradients (book-keeping / ghost norms). A
  value may instead be :class:`Unsquared` (the norm itself) where the rule gets
  the norm with fewer kernels than its square (a row norm), or :class:`NormProduct`
  (the norm as a product of two row norms, formed by the engine with every other), or
  :class:`GramDot` (a squared norm as the sum of a product of two Gram matrices, likewise), or
  :class:`GroupGrads` (the materialised group gradients the rule built for the norm, reused for the sum).
* ``weighted_sum(layer, inputs, out_grad, row_weight) -> {name: param-shaped}``:
  ``sum_i w_i * grad_i`` with one weight per example (``row_weight[name]``, ``(B,)``),
  i.e. the clipped sum as one weighted matmul.
* ``group_grad_elements(layer, inputs, out_grad, groups) -> int``: how many
  elements ``group_grads`` would allocate for these shapes. ``grad_mode="auto"``
  checks it against its memory budget before it even times a route that builds
  group gradients, then times the routes that fit (see
  ``aggregate.choose_strategy``). Without it the rule always takes the ghost
  route under ``auto``.
* ``ghost_elements(layer, inputs, out_grad, groups) -> int``: how many elements
  ``group_sq_norms`` builds, for a rule whose ghost norms are not Gram matrices of
  rows (the conv rule's input-position Gram); without it the planner sizes the
  ghost route as a matrix product's.

The signature follows Opacus' grad samplers (``opacus/grad_sample/linear.py``:
``(layer, activations, backprops)``), extended from examples to groups.

Lookup (:func:`rule_for`) goes by what a module computes, not only its exact type:

1. a rule registered for the module's exact type;
2. else the rule of the nearest registered class in its MRO, but only when
   the subclass computes what that class computes: it does not override
   ``forward``, nor any other method the registered class defines on top of
   ``nn.Module`` (``_conv_forward`` of a convolution, say), nor ``__call__`` /
   ``__getattr__``. Overriding ``__init__``, ``reset_parameters`` or
   ``extra_repr`` is fine: they do not change the forward maths. A subclass
   that changes any of these gets no rule (the generic path) unless a rule is
   registered for it;
3. "registered" includes lazy rules (:func:`register_lazy_rule`), keyed by a
   class's ``(__module__, __qualname__)``, so that rules for third-party
   classes (Hugging Face ``transformers``, ``timm``) need no import of those
   libraries: a lazy rule matches only when a module of that class is met.

Results are cached per class (weakly, so classes made on the fly, as
``torch.nn.utils.parametrize`` does, can still be collected); any
registration clears the cache.
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable, Mapping
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from ..grouping import Groups

GradDict = dict[str, torch.Tensor]


class Unsquared(NamedTuple):
    """A group-gradient norm ``(M,)`` itself, not squared, in the dict ``group_sq_norms`` returns.

    Why: on a GPU every kernel counts. ``linalg.vector_norm`` gives a norm in one kernel and its square in
    two; the engine combines unsquared norms with one more ``vector_norm``, so a rule that has the norm
    itself (a bias gradient's norm, ``||a|| ||g||`` of a one-row Linear group) saves a kernel per parameter.
    """

    norm: torch.Tensor

    def squared(self) -> torch.Tensor:
        """The squared norm (for code that wants squares)."""
        return self.norm.square()


class NormProduct(NamedTuple):
    """A group-gradient norm ``(M,)`` given as the product ``left * right`` of two ``(M,)`` tensors, not formed.

    Why: ``||g a^T|| = ||a|| ||g||`` of a one-row Linear group is such a product; the engine forms every
    product of a pass with one ``torch._foreach_mul`` (one launch on a GPU) instead of one ``mul`` each.
    """

    left: torch.Tensor
    right: torch.Tensor

    @property
    def norm(self) -> torch.Tensor:
        """The norm itself (one ``mul``)."""
        return self.left * self.right

    def squared(self) -> torch.Tensor:
        """The squared norm (for code that wants squares)."""
        return self.norm.square()


class GramDot(NamedTuple):
    """A squared group-gradient norm ``(M,)`` given as the sum over each group's entries of ``left * right``
    (``right`` None: of ``left``), two ``(M, ...)`` tensors, not formed.

    Why: a Linear group's ``||G^T A||^2 = <A A^T, G G^T>`` and its bias's ``||sum of G's rows||^2`` (the sum of
    ``G G^T``'s entries) are such sums; the engine forms every product of a pass with one
    ``torch._foreach_mul`` and every sum with one reduction over their concatenation (whole-gradient
    clipping needs only the total), instead of a ``mul`` and a ``sum`` per parameter.
    """

    left: torch.Tensor
    right: "torch.Tensor | None" = None

    def squared(self) -> torch.Tensor:
        """The squared norm (a ``mul`` and a ``sum``)."""
        whole = self.left if self.right is None else self.left * self.right
        return whole.flatten(1).sum(1)

    @property
    def norm(self) -> torch.Tensor:
        """The norm itself (rounding can leave a sum slightly below zero: clamped at 0)."""
        return self.squared().clamp(min=0).sqrt()


class GroupGrads(NamedTuple):
    """A group-gradient norm given by the materialised group gradients ``(M, *param.shape)`` themselves.

    Why: a rule may build them to get the norm (a convolution whose Gram form would be larger); the engine
    then reuses them for the clipped sum (small ones join one block: one norm and one ``mv`` for all)
    instead of the rule's weighted sum recomputing them with another convolution.
    """

    grad: torch.Tensor

    @property
    def norm(self) -> torch.Tensor:
        """The norm itself (one reduction)."""
        return torch.linalg.vector_norm(self.grad.flatten(1), dim=1)

    def squared(self) -> torch.Tensor:
        """The squared norm (for code that wants squares)."""
        return self.norm.square()


#: The norm forms a ``group_sq_norms`` value may take besides a plain squared-norm tensor.
NORM_FORMS = (Unsquared, NormProduct, GramDot, GroupGrads)


def squared_norm(value: "torch.Tensor | Unsquared | NormProduct | GramDot | GroupGrads") -> torch.Tensor:
    """A ``group_sq_norms`` value as a squared norm, whichever form the rule returned."""
    return value.squared() if isinstance(value, NORM_FORMS) else value


class LayerRule(NamedTuple):
    """How to get per-group gradients (and optionally ghost norms) of one layer type; see the module docstring.

    A NamedTuple of plain functions so that a rule is data: it can be shared by
    several classes (a subclass, a third-party copy of a torch layer) without
    any class hierarchy. The first argument of every function is typed ``Any``: it is an instance of the
    class the rule is registered for (``nn.Linear`` for the Linear rule), which a plain NamedTuple cannot express.
    """

    group_grads: Callable[[Any, tuple, torch.Tensor, Groups], GradDict]
    group_sq_norms: Callable[[Any, tuple, torch.Tensor, Groups], GradDict] | None = None
    weighted_sum: Callable[[Any, tuple, torch.Tensor, GradDict], GradDict] | None = None
    group_grad_elements: Callable[[Any, tuple, torch.Tensor, Groups], int] | None = None
    #: ``(layer, inputs, out_grad, groups) -> int``: the most elements ``group_sq_norms`` builds for these
    #: shapes, where the planner's Gram estimate for a matrix product (``(M, N, N)`` matrices, N rows per
    #: group) does not describe the rule (a convolution's norms from input positions). None: that estimate.
    ghost_elements: Callable[[Any, tuple, torch.Tensor, Groups], int] | None = None
    #: Exact alternatives to ``group_grads`` (same numbers, different kernels); the engine's autotuner
    #: (``routes.py``) times them once per ``variant_key`` and uses the fastest. The rule knows its maths, not
    #: the timing.
    variants: Mapping[str, Callable[[Any, tuple, torch.Tensor, Groups], GradDict]] | None = None
    #: ``(layer, inputs, out_grad, groups) -> hashable``: the shape class variants are timed for; None: use
    #: ``group_grads``.
    variant_key: Callable[[Any, tuple, torch.Tensor, Groups], Hashable | None] | None = None
    #: ``(layer, args, kwargs) -> inputs``: the call's tensors in the form the rule reads, each with the batch
    #: (or a whole number of rows per example) along one dimension, so that the layout probe checks them by
    #: content like any input (EmbeddingBag: 1-D ids with offsets as padded ``(bags, L)`` ids). None: the
    #: positional arguments as given (a call with a tensor keyword argument is then refused).
    present: Callable[[Any, tuple, dict], tuple] | None = None
    #: ``(layer, inputs, out_grad) -> {name: (g,) or (g, a)} | None``: where each example's gradient of the
    #: parameter is its row of ``g`` (reshaped to the parameter) or the outer product ``g_i a_i^T`` of its rows
    #: of two captured ``(B, .)`` tensors (a Linear on ``(B, d)`` inputs: ``{"weight": (g, a), "bias": (g,)}``);
    #: None for shapes where that does not hold. On an accelerator the engine then copies such layers'
    #: tensors into one buffer (``fused.RowBuffer``) and forms their norms, masking, row weights and sums in a
    #: few launches for all of them; ``group_sq_norms`` must accept those tensors as strided row views.
    row_factors: Callable[[Any, tuple, torch.Tensor], "dict | None"] | None = None

    @property
    def has_ghost(self) -> bool:
        """Whether the rule can clip without materialising group gradients (norms and weighted sum)."""
        return self.group_sq_norms is not None and self.weighted_sum is not None


_RULES: dict[type, LayerRule] = {}
_LAZY: dict[tuple[str, str], LayerRule] = {}  # (module path, qualified class name) -> rule
_RESOLVED: "weakref.WeakKeyDictionary[type, LayerRule | None]" = weakref.WeakKeyDictionary()

# Methods a subclass may override and still compute what its registered base computes.
_HARMLESS_OVERRIDES = frozenset({
    "__init__", "__repr__", "extra_repr", "reset_parameters", "_reset_parameters",
    "__setstate__", "__getstate__", "__init_subclass__", "__class_getitem__",
})
# nn.Module methods on the call path of every forward: overriding one may change the output.
_CALL_PATH = frozenset({"forward", "__call__", "_call_impl", "_wrapped_call_impl", "__getattr__", "__getattribute__"})


def _class_key(cls: type) -> tuple[str, str]:
    return (cls.__module__, cls.__qualname__)


def register_rule(layer_type: type, rule: LayerRule, *, replace: bool = False) -> None:
    """Register ``rule`` for modules of type ``layer_type`` (and subclasses that compute the same).

    Subclasses that do not change the forward maths use the rule too (see
    :func:`rule_for`); register a rule for a subclass to give it its own.

    Args:
        layer_type: the module class.
        rule: the :class:`LayerRule`.
        replace: overwrite an existing rule for this class, exact or lazy
            (same module path and name), instead of raising.

    Raises:
        ValueError: if a rule is already registered for this class (or a lazy rule
            for its module path and name) and ``replace`` is False.
    """
    if not isinstance(layer_type, type):
        raise TypeError(f"register_rule needs a class, got {layer_type!r}; pass type(module) for an instance.")
    key = _class_key(layer_type)
    if (layer_type in _RULES or key in _LAZY) and not replace:
        raise ValueError(
            f"A rule for {layer_type.__module__}.{layer_type.__qualname__} is already registered. "
            "Pass replace=True to register_rule(...) to override it."
        )
    _LAZY.pop(key, None)  # the class's own rule replaces a lazy one for its name
    _RULES[layer_type] = rule
    _RESOLVED.clear()


def register_lazy_rule(module_path: str, class_name: str, rule: LayerRule, *, replace: bool = False) -> None:
    """Register ``rule`` for a class named by its module path and qualified name, without importing it.

    Why: rules for third-party layers (``transformers``, ``timm``) must not make
    those libraries a dependency, or slow down ``import dp_microclip`` by
    seconds. The rule applies when :func:`rule_for` meets a module whose class
    (or an unchanged subclass of it, as for :func:`register_rule`) has
    ``__module__ == module_path`` and ``__qualname__ == class_name``.

    Example:
        ``register_lazy_rule("transformers.pytorch_utils", "Conv1D", rule)``.

    Args:
        module_path: the class's ``__module__`` (where it is defined, not where
            it is re-exported: ``transformers.pytorch_utils``, not ``transformers``).
        class_name: the class's ``__qualname__``.
        rule: the :class:`LayerRule`.
        replace: overwrite an existing rule for this name (lazy, or registered
            for a class with this module path and name) instead of raising.

    Raises:
        ValueError: if a rule for this name is already registered and ``replace`` is False.
    """
    key = (module_path, class_name)
    concrete = [t for t in _RULES if _class_key(t) == key]
    if (key in _LAZY or concrete) and not replace:
        raise ValueError(
            f"A rule for {module_path}.{class_name} is already registered. "
            "Pass replace=True to register_lazy_rule(...) to override it."
        )
    for t in concrete:
        del _RULES[t]
    _LAZY[key] = rule
    _RESOLVED.clear()


def _registered(cls: type) -> LayerRule | None:
    rule = _RULES.get(cls)
    if rule is None and _LAZY:
        rule = _LAZY.get(_class_key(cls))
    return rule


def _compute_methods(base: type) -> set[str]:
    """Names of the callables ``base`` (and its bases below ``nn.Module``) define, plus the call path."""
    names = set(_CALL_PATH)
    for klass in base.__mro__:
        if klass is nn.Module or klass is object:
            continue
        names.update(n for n, v in vars(klass).items()
                     if callable(v) or isinstance(v, (staticmethod, classmethod, property)))
    return names - _HARMLESS_OVERRIDES


def computes_like(cls: type, base: type) -> bool:
    """Whether subclass ``cls`` runs ``base``'s forward unchanged.

    True when no class between ``cls`` and ``base`` in the MRO overrides
    ``forward``, ``__call__``, ``__getattr__`` or any method ``base`` defines
    (its forward may call them), other than ``__init__``, ``reset_parameters``,
    ``extra_repr`` and similar set-up methods. ``type(m).forward is
    base.forward`` is necessary but not enough: ``nn.Conv2d.forward`` calls
    ``self._conv_forward``, which weight-standardised convolutions override.
    """
    if cls is base:
        return True
    if getattr(cls, "forward", None) is not getattr(base, "forward", None):
        return False
    methods = _compute_methods(base)
    for klass in cls.__mro__:
        if klass is base:
            return True
        if methods.intersection(vars(klass)):
            return False
    return False  # base is not in cls's MRO


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule for this module, or None (the engine then uses the generic ``torch.func`` path).

    The exact type's rule (registered or lazy); else the rule of the nearest
    registered class in the MRO if the module's class computes what that class
    computes (:func:`computes_like`); else None. A subclass that overrides
    ``forward`` gets no rule: it may compute something else.
    """
    cls = type(module)
    try:
        return _RESOLVED[cls]
    except KeyError:
        pass
    found = None
    for klass in cls.__mro__:
        if klass is nn.Module:
            break
        rule = _registered(klass)
        if rule is not None:
            found = rule if computes_like(cls, klass) else None
            break
    _RESOLVED[cls] = found
    return found


def rule_for_type(layer_type: type) -> LayerRule | None:
    """The rule registered for exactly ``layer_type`` (concrete or lazy by name), or None; no MRO walk."""
    return _registered(layer_type)


def registered_types() -> list[type]:
    """Classes with a concrete rule (lazy rules not yet met are in :func:`registered_lazy_names`)."""
    return list(_RULES)


def registered_lazy_names() -> list[tuple[str, str]]:
    """``(module path, class name)`` of every lazy rule."""
    return list(_LAZY)
