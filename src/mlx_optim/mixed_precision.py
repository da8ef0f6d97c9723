"""Mixed precision: float32 master weights and float32 optimizer state for low-precision models.

Without it, a bfloat16 parameter is updated in float32 and rounded once per step (as torch
does), and its optimizer state is bfloat16 too: updates smaller than half a bf16 ulp of
the weight are lost every step. :class:`MasterWeights` keeps a float32 copy of each
parameter; the optimizer updates that copy (so its state is float32), and the model gets
the copy rounded to its own dtype.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx.utils import tree_map

from ._base import _dotted, _leaves, _lookup, _rebuild
from .grad_utils import _check_leaves
from .sparse import RowSparseGrad


def _cast(g: Any, dtype: mx.Dtype) -> Any:
    if isinstance(g, RowSparseGrad):
        return RowSparseGrad(g.indices, g.values.astype(dtype), g.num_rows)
    return g.astype(dtype)


class MasterWeights:
    """Train low-precision parameters through float32 master weights.

    Args:
        optimizer: one of ours; its state is created from the float32 masters.
        dtype: the master (and state) dtype. Default: ``mx.float32``.

    ``state["master"]`` mirrors the parameters given to :meth:`init`, as arrays, so a
    step compiles: ``mx.compile(step, inputs=[opt.state, mp.state], outputs=[...same])``.
    To checkpoint, save ``mp.state["master"]`` (e.g. ``mx.save_safetensors``) with the
    optimizer (``opt.save``).

    Example:
        >>> model.set_dtype(mx.bfloat16)
        >>> opt = mlx_optim.AdamW(learning_rate=1e-3)
        >>> mp = MasterWeights(opt)
        >>> mp.init(model.trainable_parameters())
        >>> mp.update(model, grads)          # grads in bf16 or float32
    """

    def __init__(self, optimizer: Any, dtype: mx.Dtype = mx.float32):
        self.optimizer, self.dtype = optimizer, dtype
        self.state: dict = {"master": {}}

    def init(self, parameters: Any) -> None:
        """Create masters (copies in ``dtype``) and optimizer state for ``parameters``."""
        self.state["master"] = tree_map(lambda p: p.astype(self.dtype), parameters)
        self.optimizer.init(self.state["master"])

    def apply_gradients(self, gradients: Any, parameters: Any) -> Any:
        """Update the masters with ``gradients`` (cast to ``dtype``); return the parameters
        (structure of ``gradients``) as the new masters rounded to each parameter's dtype.

        A :class:`~mlx_optim.RowSparseGrad` (for an optimizer that takes one) has its values
        cast and updates its master's rows."""
        if not self.state["master"]:
            raise ValueError("call MasterWeights.init(parameters) before the first step")
        _check_leaves(gradients)  # and the dtypes looked up first: a failed call changes
        dtypes = []               # neither masters nor state
        for keys, _ in _leaves(gradients):
            try:
                dtypes.append(_lookup(parameters, keys).dtype)
            except (KeyError, AttributeError):
                raise ValueError(f"gradient for {_dotted(keys)!r}, which is not a parameter "
                                 "array") from None
        grads = _rebuild(gradients, iter(_cast(g, self.dtype) for _, g in _leaves(gradients)))
        new_masters = self.optimizer.apply_gradients(grads, self.state["master"])
        for keys, value in _leaves(new_masters):
            node = self.state["master"]
            for key in keys[:-1]:
                node = node[key]
            node[keys[-1]] = value
        return _rebuild(gradients, iter(m.astype(d) for (_, m), d in zip(_leaves(new_masters), dtypes)))

    def update(self, model: Any, gradients: Any) -> None:
        """As ``optimizer.update``: step the masters and write them, rounded, into ``model``."""
        model.update(self.apply_gradients(gradients, model.trainable_parameters()))
