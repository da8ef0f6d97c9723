"""``minimize``: L-BFGS for scientific computing, in the shape of ``scipy.optimize.minimize``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import mlx.core as mx
from mlx.utils import tree_map_with_path

from .lbfgs import CONVERGED, LBFGS, _ravel


@dataclass(frozen=True)
class OptimizeResult:
    """What :func:`minimize` found, named as scipy names it (``grad`` is scipy's ``jac``)."""

    x: Any  # x0's structure; each leaf an mx.array of that leaf's shape and dtype (as converted)
    fun: float
    grad: Any  # same structure as x
    nit: int
    nfev: int
    success: bool
    message: str


def minimize(fun: Callable[[Any], mx.array], x0: Any, *, max_iter: int = 15000,
             max_eval: int | None = None, tolerance_grad: float = 1e-7,
             tolerance_change: float = 1e-11, history_size: int = 20,
             line_search_fn: str | None = "strong_wolfe") -> OptimizeResult:
    """Minimise ``fun(x)`` over an array or a tree of arrays with L-BFGS.

    Gradients come from ``mx.value_and_grad(fun)``; ``fun`` returns a scalar array.
    The iteration is :class:`LBFGS`'s (torch's algorithm) run as one step with a large
    budget. The defaults are for deterministic float64 problems rather than training:

    * ``line_search_fn="strong_wolfe"``: a fixed step of 1 diverges on stiff problems.
    * ``tolerance_change=1e-11`` (torch 1e-9): stop once an iteration changes the loss or
      the parameters by less than that. scipy's L-BFGS-B stops at a relative loss change of
      2.2e-9; 1e-11 ends at least as low on the benchmark problems, and still stops a slow
      crawl along a flat valley, where 1e-12 ran to the evaluation budget (MLP problem).
    * ``tolerance_grad=1e-7`` (torch's; scipy 1e-5): max |gradient| at the optimum.
    * ``history_size=20`` (torch 100, scipy 10): with 10 the MLP problem took 3x the
      evaluations; 100 made each Rosenbrock-100 iteration 3x slower for 5% fewer.
    * ``max_iter=15000`` as scipy; ``max_eval`` as torch, ``max_iter * 5 // 4``.

    Args:
        fun: the objective; called with a tree shaped like ``x0``.
        x0: starting point: an ``mx.array`` or a tree (dicts, lists, tuples) of them (use
            float64 on the CPU for scientific accuracy; the dtype is kept). A leaf that is
            not an ``mx.array`` (a number, a numpy array) is converted with ``mx.array``,
            except that a float64 array stays float64 (``mx.array`` would make it float32);
            a Python float becomes float32, MLX's default. A list is a tree node, not a
            vector: pass ``mx.array([...])`` for one. Leaves must be floating point (an
            integer or bool leaf raises ``TypeError``).
        max_iter, max_eval, tolerance_grad, tolerance_change, history_size,
        line_search_fn: as in :class:`LBFGS`.

    Returns:
        :class:`OptimizeResult` with ``x``, ``fun``, ``grad``, ``nit`` (iterations),
        ``nfev`` (evaluations of ``fun`` and its gradient), ``success`` and ``message``.

    Example:
        >>> import mlx.core as mx
        >>> from mlx_optim import minimize
        >>> rosen = lambda x: (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()
        >>> result = minimize(rosen, mx.array([-1.2, 1.0], dtype=mx.float64))
        >>> result.success, round(result.fun, 8)
        (True, 0.0)
    """
    value_and_grad = mx.value_and_grad(fun)
    opt = LBFGS(learning_rate=1.0, max_iter=max_iter, max_eval=max_eval,
                tolerance_grad=tolerance_grad, tolerance_change=tolerance_change,
                history_size=history_size, line_search_fn=line_search_fn)
    flat, unravel, ravel_like = _ravel(_as_arrays(x0))

    def evaluate(x: mx.array) -> tuple[mx.array, mx.array]:
        loss, grads = value_and_grad(unravel(x))
        return loss, ravel_like(grads)

    x, first_loss, final = opt._run(flat, evaluate)
    nfev = opt.state["func_evals"]
    status = opt.state["status"]
    if final is None and opt.state["n_iter"] == 0:  # x0 itself is not finite
        final = (float(first_loss.item()), mx.full(flat.shape, mx.nan, flat.dtype))
    elif final is None:  # torch does not evaluate the last fixed step's point
        loss, grad = evaluate(x)
        final, nfev = (loss.item(), grad), nfev + 1
    loss, grad = final
    return OptimizeResult(x=unravel(x), fun=float(loss), grad=unravel(grad),
                          nit=opt.state["n_iter"], nfev=nfev,
                          success=status in CONVERGED, message=status)


def _as_arrays(x0: Any) -> Any:
    """``x0`` with each leaf an ``mx.array``; ``TypeError`` naming a leaf that cannot be one
    or is not floating point (the gradient of an integer point is undefined)."""

    def convert(path: str, leaf: Any) -> mx.array:
        where = f"x0 leaf {path!r}" if path else "x0"
        if not isinstance(leaf, mx.array):
            # mx.array turns numpy's (and torch's) float64 into float32: keep the precision.
            wide = str(getattr(leaf, "dtype", "")).endswith("float64")
            try:
                leaf = mx.array(leaf, dtype=mx.float64) if wide else mx.array(leaf)
            except (TypeError, ValueError):
                raise TypeError(f"{where} must be an array (or a number), got "
                                f"{type(leaf).__name__}") from None
        if not mx.issubdtype(leaf.dtype, mx.floating):
            raise TypeError(f"{where} must be floating point, got {leaf.dtype}; pass floats, "
                            "e.g. mx.array(x, dtype=mx.float64)")
        return leaf

    return tree_map_with_path(convert, x0)
