"""Row-sparse gradients: torch's sparse COO gradient of ``nn.Embedding(sparse=True)``.

A :class:`RowSparseGrad` stands where a dense gradient would in a gradient tree; the
optimizers that accept one (:class:`~mlx_optim.SparseAdam`, :class:`~mlx_optim.Adagrad`)
update only the rows it names, at a cost that grows with those rows, not the table.
:func:`embedding_value_and_grad` produces them for a model's ``nn.Embedding`` layers.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten


class RowSparseGrad:
    """A gradient that is zero outside the rows ``indices`` of a ``(num_rows, ...)`` table.

    Row ``indices[i]`` of the gradient is ``values[i]``; a row named twice is the sum of its
    values (torch coalesces the same way). Every row named counts as touched, even if its
    values are zero, as in torch.

    Args:
        indices: integer row indices, shape ``(n,)`` (any shape is flattened).
        values: the rows, shape ``(n, *row_shape)``.
        num_rows: the table's first dimension.

    Example:
        >>> grad = RowSparseGrad(mx.array([3, 7, 3]), mx.ones((3, 16)), num_rows=1000)
        >>> grad.shape
        (1000, 16)
    """

    def __init__(self, indices: Any, values: mx.array, num_rows: int):
        if not isinstance(values, mx.array):
            raise TypeError(f"RowSparseGrad values must be an mx.array, got {type(values).__name__}")
        indices = mx.array(indices).reshape(-1)
        if not mx.issubdtype(indices.dtype, mx.integer):
            raise ValueError(f"RowSparseGrad indices must be integers, got {indices.dtype}")
        if values.ndim < 1 or values.shape[0] != indices.size:
            raise ValueError(f"RowSparseGrad has {indices.size} indices but values of shape "
                             f"{tuple(values.shape)}; values need one row per index")
        self.indices, self.values, self.num_rows = indices, values, int(num_rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_rows, *self.values.shape[1:])

    @property
    def dtype(self) -> mx.Dtype:
        return self.values.dtype

    def check_indices(self) -> None:
        """Raise ``ValueError`` if an index lies outside ``[0, num_rows)`` (evaluates them)."""
        if self.indices.size:
            low, high = mx.min(self.indices).item(), mx.max(self.indices).item()
            if low < 0 or high >= self.num_rows:
                raise ValueError(f"RowSparseGrad index out of range [0, {self.num_rows}): "
                                 f"{low if low < 0 else high}")

    def coalesce(self) -> "RowSparseGrad":
        """Unique, sorted indices; the values of a repeated index summed (eager)."""
        self.check_indices()
        if self.indices.size == 0:
            return self
        order = mx.argsort(self.indices)
        ids, values = self.indices[order], self.values[order]
        first = mx.concatenate([mx.array([True]), ids[1:] != ids[:-1]])
        if first.all().item():  # no index repeats
            return RowSparseGrad(ids, values, self.num_rows)
        row_of = mx.cumsum(first.astype(mx.int32)) - 1  # each sorted entry's unique row
        count = row_of[-1].item() + 1
        rows = mx.zeros((count,), ids.dtype).at[row_of].maximum(ids)  # ids >= 0, equal per row
        summed = mx.zeros((count, *values.shape[1:]), values.dtype).at[row_of].add(values)
        return RowSparseGrad(rows, summed, self.num_rows)

    def to_dense(self) -> mx.array:
        """The full gradient (duplicates summed)."""
        return mx.zeros(self.shape, self.values.dtype).at[self.indices].add(self.values)

    def __repr__(self) -> str:
        return f"RowSparseGrad(rows={self.indices.size}, shape={self.shape}, dtype={self.dtype})"


class _TappedEmbedding(nn.Embedding):
    """An nn.Embedding whose output carries a zero ``delta`` we differentiate against."""

    def __call__(self, x: mx.array) -> mx.array:
        # The tap stands for the rows at the ids given, so any other lookup (positions of
        # the same shape included) would receive a wrong gradient.
        if x is not self._row_ids:
            raise ValueError(f"embedding {self._row_path!r} looked up an array other than the "
                             "ids given to embedding_value_and_grad (e.g. positions); its "
                             f"gradient must be dense: pass dense=[{self._row_path!r}]")
        object.__setattr__(self, "_row_used", True)
        return mx.stop_gradient(self.weight)[x] + self._row_tap

    def as_linear(self, x: mx.array) -> mx.array:
        # A tied output layer: its weight gradient is dense, which the tap cannot carry.
        raise ValueError(f"embedding {self._row_path!r} is also used as a linear layer "
                         "(as_linear, tied weights), so its gradient is dense: pass "
                         f"dense=[{self._row_path!r}]")


def embedding_value_and_grad(model: nn.Module, loss_fn: Callable,
                             dense: Sequence[str] = ()) -> Callable:
    """``nn.value_and_grad`` with row-sparse gradients for the model's ``nn.Embedding`` layers.

    Returns ``fn(ids, *args, **kwargs) -> (loss, grads)`` calling
    ``loss_fn(ids, *args, **kwargs)``. Every ``nn.Embedding`` in ``model`` (except those
    named in ``dense``) must look up ``ids`` itself, the very array passed to ``loss_fn``;
    its weight's gradient is a :class:`RowSparseGrad` with one row per id (repeats summed
    by the optimizer), the gradient torch gives ``nn.Embedding(sparse=True)``. The other
    trainable parameters get dense gradients. An embedding the loss does not call gets no
    gradient at all (torch's ``grad`` stays ``None``, so its rows and step stay as they
    are). The backward pass never forms a table-sized gradient: it differentiates with
    respect to the looked-up rows.

    An embedding that looks up anything else (positions, a slice or a copy of ``ids``) or
    serves as a tied output layer (``as_linear``) raises ``ValueError``: name it in
    ``dense`` to give it an ordinary dense gradient.

    Args:
        model: the model whose trainable parameters are differentiated.
        loss_fn: ``loss_fn(ids, *args, **kwargs)``, a scalar.
        dense: module paths (as ``model.named_modules()`` names them, e.g. ``"pos"``) of
            embeddings to differentiate densely.

    Example:
        >>> model = nn.Sequential(nn.Embedding(100_000, 64), nn.Linear(64, 1))
        >>> loss_and_grad = embedding_value_and_grad(
        ...     model, lambda ids, y: nn.losses.mse_loss(model(ids).squeeze(-1), y))
        >>> loss, grads = loss_and_grad(ids, y)   # grads["layers"][0]["weight"]: RowSparseGrad
    """
    dense = [dense] if isinstance(dense, str) else list(dense)
    modules = dict(model.named_modules())
    for path in dense:
        if type(modules.get(path)) is not nn.Embedding:
            raise ValueError(f"dense names {path!r}, which is not an nn.Embedding of the model")

    def fn(ids, *args, **kwargs):
        ids = ids if isinstance(ids, mx.array) else mx.array(ids)
        found = [(path, m) for path, m in model.named_modules()
                 if type(m) is nn.Embedding and "weight" in m.trainable_parameters()
                 and path not in dense]
        weights = {f"{path}.weight" if path else "weight" for path, _ in found}
        # One tap per table: a table under two paths (shared) gets its gradient once.
        embeddings, seen = [], set()
        for path, m in found:
            if id(m) not in seen:
                seen.add(id(m))
                embeddings.append((path, m))
        dense_params = [(k, v) for k, v in tree_flatten(model.trainable_parameters())
                        if k not in weights]
        dense_params = tree_unflatten(dense_params) if dense_params else {}
        taps = [mx.zeros((*ids.shape, m.weight.shape[1]), m.weight.dtype) for _, m in embeddings]

        def inner(dense_params, taps):
            model.update(dense_params)
            for (_, m), tap in zip(embeddings, taps):
                object.__setattr__(m, "_row_tap", tap)  # attributes, not parameters
            return loss_fn(ids, *args, **kwargs)

        for path, m in embeddings:
            m.__class__ = _TappedEmbedding
            object.__setattr__(m, "_row_ids", ids)
            object.__setattr__(m, "_row_path", path)
            object.__setattr__(m, "_row_used", False)
        used = []
        try:
            loss, (dense_grads, tap_grads) = mx.value_and_grad(inner, argnums=(0, 1))(dense_params, taps)
        finally:
            for _, m in embeddings:
                m.__class__ = nn.Embedding
                used.append(m.__dict__.pop("_row_used", False))
                for name in ("_row_tap", "_row_ids", "_row_path"):
                    m.__dict__.pop(name, None)
        flat = tree_flatten(dense_grads)
        for (path, m), grad, called in zip(embeddings, tap_grads, used):
            if not called:
                continue  # no gradient, as torch's grad stays None
            name = f"{path}.weight" if path else "weight"
            flat.append((name, RowSparseGrad(ids, grad.reshape(-1, grad.shape[-1]), m.weight.shape[0])))
        return loss, tree_unflatten(flat) if flat else {}

    return fn
