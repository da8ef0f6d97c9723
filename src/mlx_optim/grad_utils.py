"""Gradient utilities: torch's clipping, gradient accumulation, skipping non-finite steps.

All work on gradient trees (dicts and lists of arrays, as ``nn.value_and_grad`` returns).

Example:
    >>> loss, grads = loss_and_grad(model, x, y)
    >>> grads, norm = clip_grad_norm(grads, max_norm=1.0)
    >>> opt.update(model, grads)
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

from ._base import Optimizer, _dotted, _leaves, _lookup, _rebuild_missing, _slots
from .sparse import RowSparseGrad


def _accumulation_dtype(dtype: mx.Dtype) -> mx.Dtype:
    # As torch: norms of low-precision gradients are accumulated in float32.
    return mx.float64 if dtype == mx.float64 else mx.float32


def _vector_norm(x: mx.array, norm_type: float) -> mx.array:
    """torch.linalg.vector_norm of ``x`` flattened."""
    x = mx.abs(x.reshape(-1))
    if norm_type == math.inf:
        return mx.max(x) if x.size else mx.array(0, x.dtype)
    if norm_type == -math.inf:
        return mx.min(x) if x.size else mx.array(math.inf, x.dtype)
    if norm_type == 0:
        return mx.sum(x != 0).astype(x.dtype)
    if norm_type == 1:
        return mx.sum(x)
    if norm_type == 2:
        return mx.sqrt(mx.sum(x * x))
    return mx.power(mx.sum(mx.power(x, norm_type)), 1.0 / norm_type)


def _rounded_norm(x: mx.array, norm_type: float, dtype: mx.Dtype) -> mx.array:
    """torch's vector_norm of ``x`` in ``dtype``: accumulated in float32 (float64 for float64),
    the result rounded to ``dtype`` (a bfloat16 gradient has a bfloat16 norm)."""
    norm = _vector_norm(x.astype(_accumulation_dtype(dtype)), norm_type)
    return norm.astype(dtype) if mx.issubdtype(dtype, mx.floating) else norm


def _check_leaves(grads: Any) -> list[tuple[str, Any]]:
    """(dotted path, gradient) of a gradient tree; anything but an array or a
    :class:`RowSparseGrad` raises (it would otherwise be dropped or fail later)."""
    named = tree_flatten(grads)
    for path, g in named:
        if not isinstance(g, (mx.array, RowSparseGrad)):
            raise TypeError(f"gradient for {path!r} must be an mx.array or a RowSparseGrad, "
                            f"got {type(g).__name__}")
    return named


def _coalesce(g: Any) -> Any:
    return g.coalesce() if isinstance(g, RowSparseGrad) else g


def _elements(g: Any) -> mx.array:
    """The elements whose norm is ``g``'s. A (coalesced) RowSparseGrad: its values, plus one
    zero standing for its untouched rows (it changes only a min: norm_type < 0)."""
    if not isinstance(g, RowSparseGrad):
        return g
    values = g.values.reshape(-1)
    if g.indices.size < g.num_rows and math.prod(g.values.shape[1:]) > 0:
        values = mx.concatenate([values, mx.zeros((1,), values.dtype)])
    return values


def _total_norm(arrays: list, norm_type: float) -> mx.array:
    """torch's total norm of ``arrays`` (RowSparseGrads coalesced): the norm of the
    per-array norms, each in its array's dtype; the total in their common dtype."""
    if not arrays:
        return mx.array(0.0)
    norms = [_rounded_norm(_elements(g), norm_type, g.dtype) for g in arrays]
    dtypes = {n.dtype for n in norms}  # torch.stack promotes: mixed floats -> float32/64
    dtype = dtypes.pop() if len(dtypes) == 1 else (mx.float64 if mx.float64 in dtypes else mx.float32)
    stacked = mx.stack([n.astype(_accumulation_dtype(dtype)) for n in norms])
    return _rounded_norm(stacked, norm_type, dtype)


def grad_norm(grads: Any, norm_type: float = 2.0) -> mx.array:
    """The total ``norm_type``-norm of all gradients, as torch's ``get_total_norm``: the norm
    of the per-array norms.

    As torch, each array's norm is accumulated in float32 (float64 for float64) and rounded
    to the array's dtype; the total is in the arrays' common dtype (bfloat16 gradients: a
    bfloat16 norm; mixed float dtypes: float32, or float64 if any is). A
    :class:`~mlx_optim.RowSparseGrad` counts as its dense gradient (repeated rows summed,
    which evaluates its indices: eager only).

    Args:
        grads: a tree of gradient arrays (or RowSparseGrads).
        norm_type: ``p`` of the p-norm; ``math.inf`` for the max-norm.

    Example:
        >>> grad_norm({"w": mx.array([3.0, 4.0])}).item()
        5.0
    """
    arrays = [_coalesce(g) for _, g in _check_leaves(grads)]
    return _total_norm(arrays, float(norm_type))


def clip_grad_norm(grads: Any, max_norm: float, norm_type: float = 2.0,
                   error_if_nonfinite: bool = False) -> tuple[Any, mx.array]:
    """Scale ``grads`` so their total norm is at most ``max_norm``: ``torch.nn.utils.clip_grad_norm_``.

    Every gradient is multiplied by ``min(max_norm / (total_norm + 1e-6), 1)``, computed as
    torch computes it: in ``total_norm``'s dtype (that of :func:`grad_norm`: bfloat16 for
    bfloat16 gradients), the division as ``reciprocal(total_norm + 1e-6) * max_norm``, the
    coefficient then rounded to each gradient's dtype.

    Args:
        grads: a tree of gradient arrays (not modified: a new tree is returned). A
            :class:`~mlx_optim.RowSparseGrad` counts as its dense gradient and comes back
            coalesced, its values scaled (evaluates its indices: eager only).
        max_norm: the largest total norm allowed.
        norm_type: ``p`` of the p-norm (``math.inf`` for the max-norm). Default: ``2.0``.
        error_if_nonfinite: raise ``RuntimeError`` (torch's message) if the total norm is NaN
            or infinite. This reads the norm's value, so it cannot run inside ``mx.compile``;
            leave it ``False`` in a compiled step (the default, compile-friendly).

    Returns:
        ``(clipped_grads, total_norm)``, the norm taken before clipping.

    Example:
        >>> grads, norm = clip_grad_norm({"w": mx.array([3.0, 4.0])}, max_norm=1.0)
        >>> norm.item(), grads["w"].tolist()  # ~[0.6, 0.8]
    """
    _check_leaves(grads)
    grads = tree_map(_coalesce, grads)
    total = _total_norm([g for _, g in tree_flatten(grads)], float(norm_type))
    if error_if_nonfinite and not math.isfinite(total.item()):
        raise RuntimeError(
            f"The total norm of order {float(norm_type)} for gradients from `parameters` is "
            "non-finite, so it cannot be clipped. To disable this error and scale the gradients "
            "by the non-finite norm anyway, set `error_if_nonfinite=False`")
    # torch's `max_norm / (total + 1e-6)` is `t.reciprocal() * max_norm` (Tensor.__rdiv__),
    # each op taken in float32 for a bfloat16/float16 norm (its scalars unrounded) and then
    # rounded to the norm's dtype; MLX would round the scalars to that dtype first.
    acc = _accumulation_dtype(total.dtype)
    shifted = (total.astype(acc) + 1e-6).astype(total.dtype)
    coef = (mx.reciprocal(shifted).astype(acc) * max_norm).astype(total.dtype)
    coef = mx.minimum(coef, 1.0)

    def scale(g: Any) -> Any:
        if isinstance(g, RowSparseGrad):
            return RowSparseGrad(g.indices, _times(g.values, coef), g.num_rows)
        return _times(g, coef)

    return tree_map(scale, grads), total


def _times(x: mx.array, coef: mx.array) -> mx.array:
    """``x * coef`` as torch's ``x.mul_(coef)`` with a 0-d ``coef``: the product taken in
    float32 (float64 for float64; ``coef`` not rounded to a low-precision ``x``'s dtype
    first), then rounded to ``x``'s dtype."""
    acc = _accumulation_dtype(x.dtype)
    if x.dtype == acc or coef.dtype == x.dtype:
        return x * coef.astype(x.dtype)
    return (x.astype(acc) * coef.astype(acc)).astype(x.dtype)


def clip_grad_value(grads: Any, clip_value: float) -> Any:
    """Clamp every gradient element to ``[-clip_value, clip_value]``: ``clip_grad_value_``.

    A :class:`~mlx_optim.RowSparseGrad` comes back coalesced with its values clamped (its
    untouched rows are zero, which the clamp keeps), so ``clip_value`` must then be >= 0.

    Example:
        >>> clip_grad_value({"w": mx.array([-3.0, 0.5])}, 1.0)["w"].tolist()
        [-1.0, 0.5]
    """
    clip_value = float(clip_value)
    for path, g in _check_leaves(grads):
        if isinstance(g, RowSparseGrad) and not clip_value >= 0:
            raise ValueError(f"clip_value {clip_value} would fill the untouched rows of the "
                             f"RowSparseGrad {path!r}; it must be >= 0 for row-sparse gradients")

    def clip(g: Any) -> Any:
        if isinstance(g, RowSparseGrad):
            g = g.coalesce()  # a repeated row is clamped as the sum dense clamping sees
            return RowSparseGrad(g.indices, mx.clip(g.values, -clip_value, clip_value), g.num_rows)
        return mx.clip(g, -clip_value, clip_value)

    return tree_map(clip, grads)


class GradientAccumulator:
    """Step ``optimizer`` once every ``steps`` micro-batches, with their mean gradient.

    For a mean-reduced loss, ``steps`` micro-batches of size B give the same update as one
    batch of size ``steps * B`` (up to float rounding of the sum). The optimizer's step
    counters and schedules advance once per optimizer step, not per micro-batch.
    Accumulation is Python-side bookkeeping (a counter), so call it eagerly; the
    optimizer's own step may still be compiled inside.

    Args:
        optimizer: one of ours (or any with ``apply_gradients``).
        steps: micro-batches per optimizer step (>= 1).

    Example:
        >>> acc = GradientAccumulator(opt, steps=4)
        >>> for x, y in micro_batches:
        ...     _, grads = loss_and_grad(model, x, y)
        ...     acc.update(model, grads)       # updates the model every 4th call
    """

    def __init__(self, optimizer: Any, steps: int):
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        self.optimizer, self.steps = optimizer, int(steps)
        self._sum: Any = None
        self.pending = 0  # micro-batches accumulated since the last optimizer step

    def reset(self) -> None:
        """Drop the gradients accumulated so far."""
        self._sum, self.pending = None, 0

    def apply_gradients(self, gradients: Any, parameters: Any) -> Any:
        """Accumulate ``gradients``; on every ``steps``-th call, step with their mean.

        Returns the updated parameters (structure of ``gradients``); between steps, the
        parameters as they are.
        """
        self._check(gradients, parameters)
        total = gradients if self._sum is None else tree_map(lambda a, b: a + b, self._sum, gradients)
        if self.pending + 1 < self.steps:
            current = tree_map(lambda _, keys: _lookup(parameters, keys), gradients,
                               _key_tree(gradients))
            self._sum, self.pending = total, self.pending + 1
            return current
        mean = tree_map(lambda s: s / self.steps, total)
        # Reset only once the step succeeded: a failed step keeps the micro-batches before
        # this call (and leaves this one out), so a corrected call can still complete it.
        new = self.optimizer.apply_gradients(mean, parameters)
        self.reset()
        return new

    def _check(self, gradients: Any, parameters: Any) -> None:
        """Raise before anything changes: each gradient a dense array shaped as its
        parameter and, after the first micro-batch, as the sum (shape and dtype), which
        names the same parameters (``+`` would broadcast or promote silently)."""
        sums = None if self._sum is None else {_dotted(k): s for k, s in _leaves(self._sum)}
        paths = set()
        for keys, g in _leaves(gradients):
            path = _dotted(keys)
            paths.add(path)
            if not isinstance(g, mx.array):
                raise TypeError(f"GradientAccumulator takes dense mx.array gradients ({path!r})")
            try:
                param = _lookup(parameters, keys)
            except KeyError:
                raise ValueError(f"gradient for unknown parameter {path!r}") from None
            if not isinstance(param, mx.array) or param.shape != g.shape:
                raise ValueError(f"gradient for {path!r} has shape {tuple(g.shape)}, the "
                                 f"parameter {_describe(param)}")
            s = None if sums is None else sums.get(path)
            if s is not None and (s.shape != g.shape or s.dtype != g.dtype):
                raise ValueError(f"gradient for {path!r} is {tuple(g.shape)} {g.dtype}, the "
                                 f"earlier micro-batches' {tuple(s.shape)} {s.dtype}")
        if sums is not None and paths != set(sums):
            raise ValueError("every micro-batch must give gradients for the same parameters "
                             f"(differing: {sorted(paths ^ set(sums))})")

    def update(self, model: Any, gradients: Any) -> None:
        """As ``optimizer.update``: accumulate, and update ``model`` on every ``steps``-th call."""
        stepping = self.pending + 1 == self.steps
        new = self.apply_gradients(gradients, model)
        if stepping:
            model.update(new)


def _describe(param: Any) -> str:
    if isinstance(param, mx.array):
        return f"has shape {tuple(param.shape)}"
    return "is not an array"


def _key_tree(tree: Any, prefix: tuple = ()) -> Any:
    """``tree``'s structure with each leaf replaced by its key path."""
    if isinstance(tree, dict):
        return {k: _key_tree(v, prefix + (k,)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_key_tree(v, prefix + (i,)) for i, v in enumerate(tree))
    return prefix


class SkipNonFinite:
    """Skip a step whose gradients hold NaN or infinity; count the skips.

    A skipped step leaves parameters and optimizer state exactly as they were, step
    counters and scheduled values included. The choice is made with ``mx.where`` on a
    scalar flag, never in Python, so the step compiles (trace once): compile over both
    states, ``mx.compile(step, inputs=[opt.state, guard.state], outputs=[...same])``.
    The price: every parameter and state array is selected once per step, and both the
    new and old values are computed.

    ``guard.state["skipped"]`` counts skipped steps (int32 array). Gradients must be dense
    arrays or :class:`~mlx_optim.RowSparseGrad`; LBFGS (closure-driven) is not supported.

    Args:
        optimizer: one of ours. For float16 training through float32 master weights,
            ``MasterWeights(SkipNonFinite(opt))``: a skipped step leaves the masters too.

    Example:
        >>> guard = SkipNonFinite(opt)
        >>> opt.init(model.trainable_parameters())
        >>> guard.update(model, grads)   # a NaN anywhere in grads: nothing changes
        >>> guard.state["skipped"].item()
    """

    def __init__(self, optimizer: Any):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"SkipNonFinite wraps one of mlx_optim's optimizers, got {type(optimizer).__name__}"
                "; with MasterWeights, wrap the optimizer first: MasterWeights(SkipNonFinite(opt))")
        self.optimizer = optimizer
        self.state = {"skipped": mx.array(0, dtype=mx.int32)}

    def init(self, parameters: Any) -> None:
        """The optimizer's ``init`` (so that ``MasterWeights(SkipNonFinite(opt))`` works)."""
        self.optimizer.init(parameters)

    def apply_gradients(self, gradients: Any, parameters: Any) -> Any:
        opt = self.optimizer
        # Validate as the optimizer will, before any state is created: a failed call
        # changes nothing. Groups are checked against the parameters, not the (possibly
        # partial) gradient tree, as the optimizer's own step does.
        pairs = opt._check_gradients(gradients, parameters)
        if not opt._initialized:
            opt.check_groups_select(parameters)
        with opt.transaction():  # the slots made below go too if the step raises
            return self._apply(pairs, gradients, parameters)

    def _apply(self, pairs: list, gradients: Any, parameters: Any) -> Any:
        opt = self.optimizer
        finite = mx.array(True)
        for _, g, _ in pairs:
            finite = finite & mx.all(mx.isfinite(g.values if isinstance(g, RowSparseGrad) else g))
        # Every slot exists before the snapshot, so each new state array has an old value.
        opt._init_slots(_rebuild_missing([(keys, param) for keys, _, param in pairs]))
        old = {k: v for k, v in _leaves(opt.state) if isinstance(v, mx.array)}
        old_params = [param for _, _, param in pairs]
        new_params = opt.apply_gradients(gradients, parameters)
        self._select(opt.state, old, finite)
        # Slots and step_classes share step arrays: restore the sharing after selecting.
        if opt._class_of is not None:
            classes = opt.state["step_classes"]
            for keys, slot in _slots(opt.state["param_state"]):
                classes[opt._class_of[_dotted(keys)]] = slot["step"]
            for keys, slot in _slots(opt.state["param_state"]):
                slot["step"] = classes[opt._class_of[_dotted(keys)]]
        self.state["skipped"] = self.state["skipped"] + (~finite).astype(mx.int32)
        kept = iter(mx.where(finite, new, old_p)
                    for (_, new), old_p in zip(_leaves(new_params), old_params))
        return tree_map(lambda _: next(kept), new_params)

    def _select(self, tree: Any, old: dict, finite: mx.array, prefix: tuple = ()) -> None:
        """In place: each array of ``tree`` becomes ``where(finite, new, old)``."""
        items = tree.items() if isinstance(tree, dict) else enumerate(tree)
        for key, value in list(items):
            path = prefix + (key,)
            if isinstance(value, mx.array):
                if path in old:
                    tree[key] = mx.where(finite, value, old[path]).astype(value.dtype)
            elif isinstance(value, (dict, list)):
                self._select(value, old, finite, path)

    def update(self, model: Any, gradients: Any) -> None:
        """As ``optimizer.update``, with the skip policy."""
        model.update(self.apply_gradients(gradients, model))
