"""``minimize``: L-BFGS for scientific computing, in the shape of ``scipy.optimize.minimize``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

from .lbfgs import CONVERGED, LBFGS, _ravel


@dataclass(frozen=True)
class OptimizeResult:
    """What :func:`minimize` found, named as scipy names it (``grad`` is scipy's ``jac``)."""

    x: Any  # same structure, shapes and dtypes as x0
    fun: float
    grad: Any  # same structure as x
    nit: int
    nfev: int
    success: bool
    message: str


def minimize(fun: Callable[[Any], mx.array], x0: Any, *, max_iter: int = 15000,
             max_eval: int | None = None, tolerance_grad: float = 1e-5,
             tolerance_change: float = 1e-9, history_size: int = 10,
             line_search_fn: str | None = "strong_wolfe", compile: bool = False) -> OptimizeResult:
    """Minimise ``fun(x)`` over an array or a tree of arrays with L-BFGS.

    Gradients come from ``mx.value_and_grad(fun)``; ``fun`` returns a scalar array.
    The iteration is :class:`LBFGS`'s (torch's algorithm) run as one step with a large
    budget. Defaults follow scipy's L-BFGS-B where torch's are tuned for training:
    a strong-Wolfe line search (a fixed step of 1 can diverge on stiff problems),
    ``history_size=10``, ``max_iter=15000``, ``max_eval=max_iter * 5 // 4``.

    Args:
        fun: the objective; called with a tree shaped like ``x0``.
        x0: starting point: an ``mx.array`` or a tree of them (use float64 on the CPU for
            scientific accuracy; the dtype is kept).
        max_iter, max_eval, tolerance_grad, tolerance_change, history_size,
        line_search_fn: as in :class:`LBFGS`.
        compile: wrap ``value_and_grad(fun)`` in ``mx.compile`` (``fun`` must be pure).

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
    if compile:
        value_and_grad = mx.compile(value_and_grad)
    opt = LBFGS(learning_rate=1.0, max_iter=max_iter, max_eval=max_eval,
                tolerance_grad=tolerance_grad, tolerance_change=tolerance_change,
                history_size=history_size, line_search_fn=line_search_fn)
    flat, unravel, ravel_like = _ravel(x0)

    def evaluate(x: mx.array) -> tuple[mx.array, mx.array]:
        loss, grads = value_and_grad(unravel(x))
        return loss, ravel_like(grads)

    x, _, final = opt._run(flat, evaluate)
    nfev = opt.state["func_evals"]
    if final is None:  # a fixed step's last point is not evaluated by the iteration itself
        loss, grad = evaluate(x)
        final, nfev = (loss.item(), grad), nfev + 1
    loss, grad = final
    status = opt.state["status"]
    return OptimizeResult(x=unravel(x), fun=float(loss), grad=unravel(grad),
                          nit=opt.state["n_iter"], nfev=nfev,
                          success=status in CONVERGED, message=status)
