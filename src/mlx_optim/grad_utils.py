"""Gradient utilities: torch's clipping, gradient accumulation, skipping non-finite steps.

All work on gradient trees (dicts and lists of arrays, as ``nn.value_and_grad`` returns).

Example:
    >>> loss, grads = loss_and_grad(model, x, y)
    >>> grads, norm = clip_grad_norm(grads, max_norm=1.0)
    >>> opt.update(model, grads)
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

from ._base import _leaves, _lookup, _rebuild_missing, _slots, _dotted
from .sparse import RowSparseGrad


def _norm_dtype(arrays: list[mx.array]) -> mx.Dtype:
    # Norms of low-precision gradients are accumulated in float32 (as torch's CPU kernels).
    return mx.float64 if any(a.dtype == mx.float64 for a in arrays) else mx.float32


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


def grad_norm(grads: Any, norm_type: float = 2.0) -> mx.array:
    """The total ``norm_type``-norm of all gradients, as torch: the norm of the per-array norms.

    Args:
        grads: a tree of gradient arrays.
        norm_type: ``p`` of the p-norm; ``math.inf`` for the max-norm.

    Example:
        >>> grad_norm({"w": mx.array([3.0, 4.0])}).item()
        5.0
    """
    arrays = [g for _, g in tree_flatten(grads)]
    if not arrays:
        return mx.array(0.0)
    dtype = _norm_dtype(arrays)
    norms = mx.stack([_vector_norm(g.astype(dtype), float(norm_type)) for g in arrays])
    return _vector_norm(norms, float(norm_type))


def clip_grad_norm(grads: Any, max_norm: float, norm_type: float = 2.0,
                   error_if_nonfinite: bool = False) -> tuple[Any, mx.array]:
    """Scale ``grads`` so their total norm is at most ``max_norm``: ``torch.nn.utils.clip_grad_norm_``.

    Every gradient is multiplied by ``min(max_norm / (total_norm + 1e-6), 1)``.

    Args:
        grads: a tree of gradient arrays (not modified: a new tree is returned).
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
    total = grad_norm(grads, norm_type)
    if error_if_nonfinite and not math.isfinite(total.item()):
        raise RuntimeError(
            f"The total norm of order {float(norm_type)} for gradients from `parameters` is "
            "non-finite, so it cannot be clipped. To disable this error and scale the gradients "
            "by the non-finite norm anyway, set `error_if_nonfinite=False`")
    coef = mx.minimum(max_norm / (total + 1e-6), 1.0)
    return tree_map(lambda g: g * coef.astype(g.dtype), grads), total


def clip_grad_value(grads: Any, clip_value: float) -> Any:
    """Clamp every gradient element to ``[-clip_value, clip_value]``: ``clip_grad_value_``.

    Example:
        >>> clip_grad_value({"w": mx.array([-3.0, 0.5])}, 1.0)["w"].tolist()
        [-1.0, 0.5]
    """
    clip_value = float(clip_value)
    return tree_map(lambda g: mx.clip(g, -clip_value, clip_value), grads)


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
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        self.optimizer, self.steps = optimizer, steps
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
        for path, g in tree_flatten(gradients):
            if not isinstance(g, mx.array):
                raise TypeError(f"GradientAccumulator takes dense mx.array gradients ({path!r})")
        if self._sum is None:
            self._sum = gradients
        else:
            if [p for p, _ in tree_flatten(self._sum)] != [p for p, _ in tree_flatten(gradients)]:
                raise ValueError("every micro-batch must give gradients for the same parameters")
            self._sum = tree_map(lambda a, b: a + b, self._sum, gradients)
        self.pending += 1
        if self.pending < self.steps:
            return tree_map(lambda _, keys: _lookup(parameters, keys), gradients,
                            _key_tree(gradients))
        mean = tree_map(lambda s: s / self.steps, self._sum)
        self.reset()
        return self.optimizer.apply_gradients(mean, parameters)

    def update(self, model: Any, gradients: Any) -> None:
        """As ``optimizer.update``: accumulate, and update ``model`` on every ``steps``-th call."""
        stepping = self.pending + 1 == self.steps
        new = self.apply_gradients(gradients, model)
        if stepping:
            model.update(new)


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
        optimizer: one of ours.

    Example:
        >>> guard = SkipNonFinite(opt)
        >>> opt.init(model.trainable_parameters())
        >>> guard.update(model, grads)   # a NaN anywhere in grads: nothing changes
        >>> guard.state["skipped"].item()
    """

    def __init__(self, optimizer: Any):
        self.optimizer = optimizer
        self.state = {"skipped": mx.array(0, dtype=mx.int32)}

    def apply_gradients(self, gradients: Any, parameters: Any) -> Any:
        opt = self.optimizer
        values = [g.values if isinstance(g, RowSparseGrad) else g for _, g in _leaves(gradients)]
        finite = mx.array(True)
        for g in values:
            finite = finite & mx.all(mx.isfinite(g))
        # Every slot exists before the snapshot, so each new state array has an old value.
        wanted = [(keys, _lookup(parameters, keys)) for keys, _ in _leaves(gradients)]
        opt.init(_rebuild_missing(wanted))
        old = {k: v for k, v in _leaves(opt.state) if isinstance(v, mx.array)}
        old_params = [p for _, p in wanted]
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
