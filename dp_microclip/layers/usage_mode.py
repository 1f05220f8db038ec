"""Which functions a module's own parameters flow into during its forward: the usage route's observer.

``UsageMode`` is a ``TorchFunctionMode`` the engine enters only while one
module without a rule runs its forward. It follows the module's DIRECT
parameters through every torch function they reach:

* inspection (``.shape``, ``.dtype``, ``.size()``) passes through;
* shape-only transforms (``.T``, ``transpose``, ``permute``, ``reshape``,
  ``view``, ``unsqueeze``, ``squeeze``, ``flatten``, ``contiguous``, basic
  slicing, dtype casts, a product with a number) and broadcasts (``expand``)
  give a tracked tensor with its ``Chain`` (``functional.py``);
* the recognised uses (a linear map ``x @ W``, ``F.linear``, ``addmm``, or
  ``W @ x`` with the parameter on the left; a convolution; an embedding lookup;
  a broadcast element-wise product, sum or difference with another tensor,
  ``addcmul`` (a shift and a scale in one call); a concatenation) are handed to
  ``on_use``, which returns the call's output
  (the engine hooks it to capture the output gradient) or raises
  :class:`NotRecognised`;
* anything else (another function, a tracked tensor in an unexpected
  argument, a use with gradients disabled inside the forward) is recorded in
  ``problem``, and the engine keeps the generic ``torch.func`` path for the
  module. Nothing is guessed.

``touched`` names the parameters handed to any torch function (metadata reads aside): one never touched
is not used by this forward (Dinov2's ``mask_token`` without ``bool_masked_pos``); autograd never reaches it.

The mode only reads: every function runs as the module wrote it.
"""

from __future__ import annotations

import inspect
import numbers
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .functional import BroadcastUse, Chain, ConvUse, EmbeddingUse, LinearUse, Step

T = torch.Tensor


def _funcs(*names: str, owner=T) -> list:
    attrs = [getattr(owner, name) for name in names if hasattr(owner, name)]
    return [a.__get__ if hasattr(a, "__get__") and not callable(a) else a for a in attrs]


def _getters(*names: str) -> list:
    return [getattr(T, n).__get__ for n in names if hasattr(T, n)]


_INSPECT = set(_getters("shape", "dtype", "device", "ndim", "requires_grad", "is_cuda", "layout", "is_leaf",
                        "grad_fn", "is_sparse", "is_quantized", "is_meta", "names")) | set(
    _funcs("size", "dim", "numel", "nelement", "is_floating_point", "is_complex", "element_size",
           "is_contiguous", "stride", "storage_offset", "get_device", "__len__", "data_ptr", "__format__",
           "__repr__", "__hash__"))
_ISOMETRIC = set(_getters("T", "mT")) | set(_funcs("t", "transpose", "permute", "reshape", "view", "unsqueeze",
                                                   "squeeze", "flatten", "contiguous", "view_as", "reshape_as",
                                                   "swapaxes", "movedim")) | {
    torch.t, torch.transpose, torch.permute, torch.reshape, torch.unsqueeze, torch.squeeze, torch.flatten,
    torch.swapaxes, torch.movedim}
#: Inspections that expose the memory (a kernel reads it through the pointer, unseen): a touch, needing a use.
_READS_MEMORY = set(_funcs("data_ptr"))
_CASTS = set(_funcs("to", "float", "double", "half", "bfloat16", "type_as"))
_EXPAND = set(_funcs("expand", "expand_as", "broadcast_to")) | {torch.broadcast_to}
_GETITEM = set(_funcs("__getitem__"))
_LINEAR = {F.linear}
_MATMUL = set(_funcs("matmul", "__matmul__", "mm")) | {torch.matmul, torch.mm}
_ADDMM = set(_funcs("addmm")) | {torch.addmm}
_EMBEDDING = {F.embedding}
_CONV = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_MUL = set(_funcs("mul", "__mul__", "__rmul__", "multiply")) | {torch.mul, torch.multiply}
_MUL_INPLACE = set(_funcs("mul_", "__imul__"))
_ADD = set(_funcs("add", "__add__", "__radd__")) | {torch.add}
_ADD_INPLACE = set(_funcs("add_", "__iadd__"))
_SUB = set(_funcs("sub", "__sub__", "subtract")) | {torch.sub, torch.subtract}
_SUB_INPLACE = set(_funcs("sub_", "__isub__"))
_RSUB = set(_funcs("__rsub__"))
_DIV = set(_funcs("div", "__truediv__")) | {torch.div}
_ADDCMUL = set(_funcs("addcmul")) | {torch.addcmul}
_ADDCMUL_INPLACE = set(_funcs("addcmul_"))
_CAT = {torch.cat, torch.concat, torch.concatenate}
_NORMS = {F.layer_norm: ("input", "normalized_shape", "weight", "bias", "eps"),
          F.group_norm: ("input", "num_groups", "weight", "bias", "eps")}
_ATTENTION = F.multi_head_attention_forward
_ATTENTION_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


class NotRecognised(Exception):
    """A call the usage route cannot take exactly (the reason is the message); the module goes generic."""


class Use(NamedTuple):
    """One recognised call, handed to ``on_use``.

    ``layer`` is the rule's ``LinearUse`` / ``EmbeddingUse`` / ``BroadcastUse`` (its ``aligned`` shape is filled
    in by the engine once the output's batch dimension is known: here it holds the transformed tensor right-
    aligned to the output in the module's own layout); ``activations`` the tensors whose batch dimension the
    layout must find (the linear input, the ids); ``coefficient`` the other operand of a product;
    ``select`` ``(dim, start, length)`` of a concatenation's slice; ``inplace``: the output is the activation
    modified in place; ``transposed``: the linear map acts on columns (``W @ x``), so the rule sees
    ``x.mT`` as its activation (``activations`` holds it already) and the output's ``.mT`` as its output.
    """

    kind: str  # "linear" | "conv" | "embedding" | "broadcast"
    layer: object
    activations: tuple
    coefficient: torch.Tensor | None = None
    select: tuple | None = None
    inplace: bool = False
    transposed: bool = False


class Tracked(NamedTuple):
    """A tensor derived from a parameter: its chain, and whether it was broadcast (``expand``) after it."""

    chain: Chain
    value: torch.Tensor  # the chain's result before any broadcast
    expanded: bool = False


def _basic_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return all(i is None or i is Ellipsis or isinstance(i, (int, slice)) and not isinstance(i, bool)
               for i in items)


class UsageMode(TorchFunctionMode):
    """Follows ``params`` (local name -> parameter) through one forward of their module (module docstring).

    Args:
        params: the module's own trainable parameters.
        on_use: ``(Use, output) -> output``: the engine's capture of one recognised call.
        probing: the engine's layout probe (a forward without gradients) is running: record, do not refuse.
    """

    def __init__(self, params: dict, on_use: Callable[[Use, torch.Tensor], torch.Tensor], probing: bool = False):
        super().__init__()
        self.on_use = on_use
        self.probing = probing
        self.tracked: dict[int, Tracked] = {id(p): Tracked(Chain(n, p), p) for n, p in params.items()}
        self._keep: list = []  # derived tensors stay alive while tracked (their ids must not be reused)
        self.used: set[str] = set()  # parameters with at least one recognised use
        self.touched: set[str] = set()  # parameters handed to any torch function (metadata reads aside)
        self.problem: str | None = None

    def is_tracked(self, x) -> bool:
        """Whether ``x`` is one of the parameters or a tensor derived from one."""
        return torch.is_tensor(x) and id(x) in self.tracked

    def _track(self, out, chain: Chain, expanded: bool = False, value=None):
        if torch.is_tensor(out):
            self.tracked[id(out)] = Tracked(chain, out if value is None else value, expanded)
            self._keep.append(out)
        return out

    def _hits(self, args, kwargs) -> list:
        hits = []
        for x in (*args, *kwargs.values()):
            if torch.is_tensor(x):
                if id(x) in self.tracked:
                    hits.append(x)
            elif isinstance(x, (list, tuple)):
                hits.extend(y for y in x if torch.is_tensor(y) and id(y) in self.tracked)
        return hits

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        hits = self._hits(args, kwargs)
        if hits and (func not in _INSPECT or func in _READS_MEMORY):  # noted even after a problem
            self.touched.update(self.tracked[id(h)].chain.name for h in hits)
        if self.problem is not None or not hits or func in _INSPECT:
            return func(*args, **kwargs)
        name = getattr(func, "__name__", repr(func))
        try:
            if not torch.is_grad_enabled() and not self.probing:
                raise NotRecognised("with gradients disabled inside the forward (a custom autograd Function?)")
            return self._dispatch(func, args, kwargs)
        except NotRecognised as why:
            self.problem = f"{name}: {why}" if str(why) else f"{name}, which the usage route does not recognise"
            return func(*args, **kwargs)

    # -------------------------------------------------------------------------------- dispatch
    def _dispatch(self, func, args, kwargs):
        if func in _ISOMETRIC or func in _CASTS or func in _GETITEM and len(args) == 2 and _basic_index(args[1]):
            return self._transform(func, args, kwargs)
        if func in _EXPAND:
            return self._expand(func, args, kwargs)
        if func in _GETITEM:
            return self._lookup(func, args, kwargs)
        if func in _LINEAR:
            return self._linear(func, args, kwargs)
        if func in _MATMUL or func in _ADDMM:
            return self._matmul(func, args, kwargs)
        if func in _EMBEDDING:
            return self._embedding(func, args, kwargs)
        if func in _CONV:
            return self._conv(func, args, kwargs)
        if func in _MUL or func in _DIV:
            if func in _MUL and self._scalar_other(args, kwargs):
                return self._transform(func, args, kwargs, isometric=False)
            if func in _DIV and self._scalar_other(args, kwargs) and self.is_tracked(args[0]):
                return self._transform(func, args, kwargs, isometric=False)
            if func in _MUL:
                return self._elementwise(func, args, kwargs, product=True)
        if func in _MUL_INPLACE:
            return self._elementwise(func, args, kwargs, product=True, inplace=True)
        if func in _ADD or func in _SUB or func in _RSUB:
            sign = -1.0 if func in _RSUB else 1.0
            return self._elementwise(func, args, kwargs, product=False, first_sign=sign,
                                     second_sign=-1.0 if func in _SUB else 1.0)
        if func in _ADD_INPLACE or func in _SUB_INPLACE:
            return self._elementwise(func, args, kwargs, product=False, inplace=True,
                                     second_sign=-1.0 if func in _SUB_INPLACE else 1.0)
        if func in _ADDCMUL or func in _ADDCMUL_INPLACE:
            return self._addcmul(func, args, kwargs, inplace=func in _ADDCMUL_INPLACE)
        if func in _CAT:
            return self._cat(func, args, kwargs)
        if func in _NORMS:
            return self._norm(func, args, kwargs)
        if func is _ATTENTION:
            return self._attention(func, args, kwargs)
        raise NotRecognised("")

    def _only(self, x) -> Tracked:
        """The tracked entry of ``x``, which must not have been broadcast."""
        entry = self.tracked[id(x)]
        if entry.expanded:
            raise NotRecognised("a broadcast (expanded) parameter used other than in an element-wise op or a cat")
        return entry

    def _transform(self, func, args, kwargs, isometric: bool = True):
        if not args or not self.is_tracked(args[0]) or len(self._hits(args, kwargs)) != 1:
            raise NotRecognised("a parameter in a transform's other argument")
        if any(torch.is_tensor(a) for a in (*args[1:], *kwargs.values())) and func not in _CASTS:
            raise NotRecognised("a transform with tensor arguments")
        entry = self._only(args[0])
        cast = func in _CASTS
        if cast and func is T.type_as:
            args = (args[0], args[1].dtype)
            func = T.to
        if cast and any(torch.is_tensor(a) for a in (*args[1:], *kwargs.values())):
            raise NotRecognised("a cast to another tensor's type with tensor arguments")
        out = func(*args, **kwargs)
        step = Step(func, (None, *args[1:]), dict(kwargs), 0, cast)
        return self._track(out, entry.chain.then(step, isometric))

    def _scalar_other(self, args, kwargs) -> bool:
        return len(args) == 2 and not kwargs and isinstance(args[1], numbers.Number) and self.is_tracked(args[0])

    def _expand(self, func, args, kwargs):
        if not self.is_tracked(args[0]) or len(self._hits(args, kwargs)) != 1:
            raise NotRecognised("a parameter as the target shape of a broadcast")
        entry = self._only(args[0])
        return self._track(func(*args, **kwargs), entry.chain, expanded=True, value=entry.value)

    # ---------------------------------------------------------------------------- linear maps
    def _linear(self, func, args, kwargs):
        bound = dict(zip(("input", "weight", "bias"), args), **kwargs)
        x, w, b = bound.get("input"), bound.get("weight"), bound.get("bias")
        if self.is_tracked(x) or not (self.is_tracked(w) or self.is_tracked(b)):
            raise NotRecognised("a parameter as the input of a linear map")
        use = LinearUse(self._only(w).chain if self.is_tracked(w) else None,
                        self._only(b).chain if self.is_tracked(b) else None)
        return self._use(Use("linear", use, (x,)), func(*args, **kwargs))

    def _matmul(self, func, args, kwargs):
        if kwargs:
            raise NotRecognised("keyword arguments")
        bias = None
        if func in _ADDMM:
            if len(args) != 3:
                raise NotRecognised("scaled addmm")
            bias, x, w = args
        else:
            x, w = args
        if bias is None and self.is_tracked(x) and not self.is_tracked(w) and torch.is_tensor(w):
            return self._left_matmul(func, weight=x, x=w)  # args are (W, x) here
        if self.is_tracked(x) or not torch.is_tensor(w) or w.dim() != 2 or x.dim() < 2:
            raise NotRecognised("a parameter as the left factor (only x @ W with a 2-D W is a linear map)")
        if not self.is_tracked(w) and not self.is_tracked(bias):
            raise NotRecognised("")
        weight = None
        if self.is_tracked(w):
            entry = self._only(w)
            weight = entry.chain.then(Step(T.t, (None,), {}, 0), True)  # x @ W is the linear map of W^T
        use = LinearUse(weight, self._only(bias).chain if self.is_tracked(bias) else None)
        if bias is not None and (bias.dim() != 1 or bias.shape[0] != w.shape[1]):
            raise NotRecognised("an addmm bias that is not one row")
        return self._use(Use("linear", use, (x,)), func(*args, **kwargs))

    def _conv(self, func, args, kwargs):
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        bound = dict(zip(names, args), **kwargs)
        x, w, b = bound.get("input"), bound.get("weight"), bound.get("bias")
        nd = _CONV[func]
        if self.is_tracked(x) or not torch.is_tensor(x) or x.dim() != nd + 2:
            raise NotRecognised("a parameter as a convolution's input, or an input without a batch dimension")

        def spatial(value, default):
            value = default if value is None else value
            return value if isinstance(value, str) else tuple(value) if isinstance(value, (list, tuple)) \
                else (value,) * nd

        use = ConvUse(self._only(w).chain if self.is_tracked(w) else None,
                      self._only(b).chain if self.is_tracked(b) else None,
                      w.detach(), None if b is None else b.detach(), spatial(bound.get("stride"), 1),
                      spatial(bound.get("padding"), 0), spatial(bound.get("dilation"), 1), int(bound.get("groups", 1)))
        return self._use(Use("conv", use, (x,)), func(*args, **kwargs))

    def _norm(self, func, args, kwargs):
        """``F.layer_norm`` / ``F.group_norm`` with the module's own affine parameters: the normalisation has none,
        so it runs as torch wrote it, and the affine part is a broadcast scale and shift that this mode sees again
        (``weight`` over the normalised trailing shape for layer_norm, over channels for group_norm)."""
        bound = dict(zip(_NORMS[func], args), **kwargs)
        x, w, b = bound["input"], bound.get("weight"), bound.get("bias")
        if self.is_tracked(x) or not torch.is_tensor(x):
            raise NotRecognised("a parameter normalised by layer_norm / group_norm")
        plain = func(x, bound[_NORMS[func][1]], None, None, bound.get("eps", 1e-5))
        if func is F.group_norm and x.dim() < 2:
            raise NotRecognised("group_norm of an input without channels")
        trailing = (1,) * (x.dim() - 2) if func is F.group_norm else ()
        with self:  # the affine part: uses of the parameters this mode recognises
            out = plain
            if w is not None:
                out = out * (w.reshape(-1, *trailing) if trailing else w)
            if b is not None:
                out = out + (b.reshape(-1, *trailing) if trailing else b)
        return out

    def _attention(self, func, args, kwargs):
        """torch's attention call split into what it computes with the parameters, each call seen by this mode
        again: the q/k/v projections (rows of ``in_proj_weight`` or the separate ``q/k/v_proj_weight``; slices
        of ``in_proj_bias``), the learned key/value bias concatenated to the keys and values (its masks padded
        by one column, as torch does), then torch's own call with identity projections and no parameter (so
        masks, dropout and the returned weights are the module's), and the output projection."""
        a = _ATTENTION_SIGNATURE.bind(*args, **kwargs)
        a.apply_defaults()
        arg = dict(a.arguments)
        q, k, v, e = arg["query"], arg["key"], arg["value"], arg["embed_dim_to_check"]
        out_weight, out_bias = arg["out_proj_weight"], arg["out_proj_bias"]
        if any(self.is_tracked(t) for t in (q, k, v, arg["attn_mask"], arg["key_padding_mask"])) \
                or arg["static_k"] is not None or arg["static_v"] is not None or q.dim() != 3 \
                or (arg["bias_k"] is None) != (arg["bias_v"] is None):
            raise NotRecognised("static keys/values, unbatched input, or a parameter as the attention's input")
        with self:  # the calls below are this mode's calls again
            b = arg["in_proj_bias"]
            biases = (None,) * 3 if b is None else (b[:e], b[e:2 * e], b[2 * e:])
            w = arg["in_proj_weight"]
            weights = (arg["q_proj_weight"], arg["k_proj_weight"], arg["v_proj_weight"]) \
                if arg["use_separate_proj_weight"] else (w[:e], w[e:2 * e], w[2 * e:])
            q, k, v = (F.linear(x, wx, bx) for x, wx, bx in zip((q, k, v), weights, biases))  # (T|S, B, E)
            attn_mask, pad_mask = arg["attn_mask"], arg["key_padding_mask"]
            if arg["bias_k"] is not None:
                k = torch.cat([k, arg["bias_k"].expand(1, k.shape[1], e)])
                v = torch.cat([v, arg["bias_v"].expand(1, v.shape[1], e)])
                attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
                pad_mask = None if pad_mask is None else F.pad(pad_mask, (0, 1))
            eye = torch.eye(e, dtype=q.dtype, device=q.device)
            arg.update(query=q, key=k, value=v, in_proj_weight=None, in_proj_bias=None, bias_k=None, bias_v=None,
                       out_proj_weight=eye, out_proj_bias=None, use_separate_proj_weight=True, q_proj_weight=eye,
                       k_proj_weight=eye, v_proj_weight=eye, attn_mask=attn_mask, key_padding_mask=pad_mask)
            attn, attn_weights = func(**arg)  # no parameter reaches it: it runs as torch wrote it
            return F.linear(attn, out_weight, out_bias), attn_weights

    def _left_matmul(self, func, weight, x):
        """``W @ x`` with a 2-D parameter ``W`` (d_out, d_in) and ``x`` (..., d_in, n): the linear map of the
        columns, ``(W @ x).mT == F.linear(x.mT, W)``; the rule sees ``x.mT`` and the output's ``.mT``."""
        if weight.dim() != 2 or x.dim() < 2:
            raise NotRecognised("a parameter on the left of a matmul that is not a 2-D W times a matrix x")
        use = LinearUse(self._only(weight).chain, None)
        return self._use(Use("linear", use, (x.mT,), transposed=True), func(weight, x))

    # ------------------------------------------------------------------------------ lookups
    def _embedding(self, func, args, kwargs):
        names = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
        bound = dict(zip(names, args), **kwargs)
        ids, w = bound.get("input"), bound.get("weight")
        if self.is_tracked(ids) or not self.is_tracked(w) or w.dim() != 2:
            raise NotRecognised("a parameter in an embedding's ids")
        if bound.get("max_norm") is not None or bound.get("scale_grad_by_freq") or bound.get("sparse"):
            raise NotRecognised("max_norm, scale_grad_by_freq or sparse (they change the gradient)")
        padding = bound.get("padding_idx")
        if padding is not None and padding < 0:
            padding += w.shape[0]
        entry = self._only(w)
        use = EmbeddingUse(entry.chain, entry.value.detach(), padding)
        return self._use(Use("embedding", use, (ids,)), func(*args, **kwargs))

    def _lookup(self, func, args, kwargs):
        table, index = args[0], args[1] if len(args) > 1 else None
        if not (self.is_tracked(table) and torch.is_tensor(index) and not self.is_tracked(index)
                and index.dtype in (torch.int64, torch.int32) and table.dim() == 2 and not kwargs):
            raise NotRecognised("indexing that is neither basic slicing nor a row lookup by one integer tensor")
        entry = self._only(table)
        use = EmbeddingUse(entry.chain, entry.value.detach(), None)
        return self._use(Use("embedding", use, (index,)), func(*args, **kwargs))

    # ------------------------------------------------------------------------ broadcast ops
    def _elementwise(self, func, args, kwargs, product: bool, inplace: bool = False,
                     first_sign: float = 1.0, second_sign: float = 1.0):
        if kwargs or len(args) != 2 or not all(torch.is_tensor(a) for a in args):
            raise NotRecognised("an element-wise op with a number, alpha or out=")
        first, second = args
        if self.is_tracked(first) and self.is_tracked(second):
            raise NotRecognised("two parameters combined with each other")
        if inplace and self.is_tracked(first):
            raise NotRecognised("a parameter modified in place")
        if self.is_tracked(first):
            param, other, sign = first, second, first_sign
        else:
            param, other, sign = second, first, second_sign
        entry = self.tracked[id(param)]
        if inplace:
            if other._base is not None:
                raise NotRecognised("an in-place op on a view")
            coefficient = other.detach().clone() if product else None
        else:
            coefficient = other if product else None
        use = BroadcastUse(entry.chain, tuple(entry.value.shape), tuple(entry.value.shape), sign)
        out = func(*args, **kwargs)
        return self._use(Use("broadcast", use, (), coefficient, None, inplace), out)

    def _addcmul(self, func, args, kwargs, inplace: bool):
        """``input + value * tensor1 * tensor2``: a parameter as ``input`` is a shift, as a factor a scale (by
        ``value`` times the other factor); both may be in one call (an affine ``addcmul(beta, alpha, x)``)."""
        bound = dict(zip(("input", "tensor1", "tensor2", "value"), args), **kwargs)
        if set(bound) - {"input", "tensor1", "tensor2", "value"}:
            raise NotRecognised("out=")
        base, first, second = bound.get("input"), bound.get("tensor1"), bound.get("tensor2")
        value = bound.get("value", 1)
        if not (isinstance(base, T) and isinstance(first, T) and isinstance(second, T)) or not isinstance(
                value, (int, float)):
            raise NotRecognised("a non-tensor operand or a tensor value")
        if self.is_tracked(first) and self.is_tracked(second):
            raise NotRecognised("two parameters multiplied with each other")
        if inplace and self.is_tracked(base):
            raise NotRecognised("a parameter modified in place")
        if inplace and base._base is not None:
            raise NotRecognised("an in-place op on a view")
        uses: list[tuple[BroadcastUse, torch.Tensor | None]] = []
        if self.is_tracked(base):
            entry = self.tracked[id(base)]
            uses.append((BroadcastUse(entry.chain, tuple(entry.value.shape), tuple(entry.value.shape)), None))
        for param, other in ((first, second), (second, first)):
            if self.is_tracked(param):
                entry = self.tracked[id(param)]
                coefficient = other.detach()
                if value != 1:
                    coefficient = coefficient * value
                elif inplace:  # its own copy: the activation changes in place
                    coefficient = coefficient.clone()
                uses.append((BroadcastUse(entry.chain, tuple(entry.value.shape), tuple(entry.value.shape)),
                             coefficient))
        out = func(*args, **kwargs)
        for layer, factor in uses:
            out = self._use(Use("broadcast", layer, (), factor, None, inplace), out)
        return out

    def _cat(self, func, args, kwargs):
        tensors = args[0] if args else kwargs.get("tensors")
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
            raise NotRecognised("")
        out = func(*args, **kwargs)
        dim = dim % out.dim()
        start = 0
        for t in tensors:
            length = t.shape[dim] if t.dim() else 0
            if self.is_tracked(t):
                entry = self.tracked[id(t)]
                use = BroadcastUse(entry.chain, tuple(entry.value.shape), tuple(entry.value.shape))
                out = self._use(Use("broadcast", use, (), None, (dim, start, length)), out)
            start += length
        return out

    def _use(self, use: Use, out):
        """Hand one recognised call to the engine; the call has run, so a refusal now keeps its output."""
        try:
            if not torch.is_tensor(out):
                raise NotRecognised("an output that is not one tensor")
            replaced = self.on_use(use, out)
        except NotRecognised as why:
            self.problem = str(why)
            return out
        for chain in chains_of(use.layer):
            self.used.add(chain.name)
        return replaced


def chains_of(layer) -> list[Chain]:
    """The chains (parameters) one recognised use's layer reads."""
    if isinstance(layer, LinearUse):
        return [c for c in (layer.weight, layer.bias) if c is not None]
    if isinstance(layer, ConvUse):
        return [c for c in (layer.weight_chain, layer.bias_chain) if c is not None]
    return [layer.chain]
