"""L-BFGS, step for step as ``torch.optim.LBFGS``."""

from __future__ import annotations

import math
from typing import Any, Callable

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

from ._checkpointable import Checkpointable
from ._linesearch import strong_wolfe
from ._validate import LEARNING_RATE, at_least, check, scalar_value

# Why a step ended (``opt.state["status"]``); torch's break conditions, in its order.
CONVERGED_GRAD = "converged: max|grad| <= tolerance_grad"
CONVERGED_SLOPE = "converged: directional derivative > -tolerance_change"
CONVERGED_STEP = "converged: max|step| <= tolerance_change"
CONVERGED_LOSS = "converged: |loss change| < tolerance_change"
MAX_ITER = "stopped: max_iter iterations done"
MAX_EVAL = "stopped: max_eval evaluations done"
NON_FINITE = "failed: non-finite loss or gradient; parameters kept at the last finite point"
CONVERGED = (CONVERGED_GRAD, CONVERGED_SLOPE, CONVERGED_STEP, CONVERGED_LOSS)

CURVATURE_EPS = 1e-10  # torch keeps a pair (s, y) only when y.s exceeds this

_RULES = (
    LEARNING_RATE,
    at_least("max_iter", 1, "Invalid max_iter value: {value}"),
    at_least("max_eval", 1, "Invalid max_eval value: {value}"),
    at_least("tolerance_grad", 0.0, "Invalid tolerance_grad value: {value}"),
    at_least("tolerance_change", 0.0, "Invalid tolerance_change value: {value}"),
    at_least("history_size", 1, "Invalid history_size value: {value}"),
)


def lbfgs_direction(grad: mx.array, old_dirs: list[mx.array], old_stps: list[mx.array],
                    ro: list[float], H_diag: float) -> mx.array:
    """The quasi-Newton direction ``-H grad`` by the two-loop recursion.

    ``old_dirs`` holds the gradient changes y_i, ``old_stps`` the steps s_i (torch's names),
    ``ro`` the 1 / (y_i . s_i) and ``H_diag`` the initial inverse-Hessian scale y.s / y.y.
    """
    q = -grad
    alphas = []
    for y, s, rho in zip(reversed(old_dirs), reversed(old_stps), reversed(ro)):
        alpha = mx.inner(s, q) * rho
        q = q - alpha * y
        alphas.append(alpha)
    r = q * H_diag
    for y, s, rho, alpha in zip(old_dirs, old_stps, ro, reversed(alphas)):
        beta = mx.inner(y, r) * rho
        r = r + (alpha - beta) * s
    return r


class _NonFinite(Exception):
    """An evaluation returned a non-finite loss or gradient; the step ends there."""


def _ravel(tree: Any) -> tuple[mx.array, Callable[[mx.array], Any], Callable[[Any], mx.array]]:
    """Flatten a parameter tree into one vector.

    Returns the vector, ``unravel`` (vector -> tree, each leaf back in its own shape and
    dtype) and ``ravel_like`` (a gradient tree -> vector in the same order; a missing or
    ``None`` gradient counts as zeros, as torch treats ``p.grad is None``; a gradient for
    no parameter, or of another shape, raises ``ValueError``).
    """
    named = tree_flatten(tree)
    if not named:
        raise ValueError("LBFGS got an empty parameter tree")
    keys = [k for k, _ in named]
    leaves = [v for _, v in named]
    flat = mx.concatenate([p.reshape(-1) for p in leaves])
    offsets, total = [], 0
    for p in leaves[:-1]:
        total += p.size
        offsets.append(total)

    def unravel(vector: mx.array) -> Any:
        pieces = iter(mx.split(vector, offsets) if offsets else [vector])
        return tree_map(lambda p: next(pieces).reshape(p.shape).astype(p.dtype), tree)

    def ravel_like(grads: Any) -> mx.array:
        by_key = {k: g for k, g in tree_flatten(grads) if g is not None}
        shapes = dict(zip(keys, (p.shape for p in leaves)))
        for k, g in by_key.items():
            if k not in shapes:
                raise ValueError(f"the closure's gradient for {k!r} matches no parameter")
            if not isinstance(g, mx.array) or not mx.issubdtype(g.dtype, mx.floating):
                raise ValueError(f"the closure's gradient for {k!r} must be a floating-point "
                                 f"mx.array, got {getattr(g, 'dtype', type(g).__name__)}")
            if g.shape != shapes[k]:
                raise ValueError(f"the closure's gradient for {k!r} has shape {tuple(g.shape)}, "
                                 f"the parameter {tuple(shapes[k])}")
        return mx.concatenate([
            by_key[k].reshape(-1).astype(flat.dtype) if k in by_key else mx.zeros(p.size, flat.dtype)
            for k, p in zip(keys, leaves)
        ])

    return flat, unravel, ravel_like


def _finite_loss(loss: Any, grad: mx.array) -> float:
    """The loss as a float; raises ``_NonFinite`` if it or the gradient is not finite."""
    grad_finite = mx.all(mx.isfinite(grad))
    mx.eval(loss, grad, grad_finite)  # one synchronisation for all three
    loss = float(loss.item() if isinstance(loss, mx.array) else loss)
    if not (math.isfinite(loss) and grad_finite.item()):
        raise _NonFinite
    return loss


class LBFGS(Checkpointable):
    r"""Limited-memory BFGS, identical step for step to ``torch.optim.LBFGS``.

    Each :meth:`step` runs up to ``max_iter`` quasi-Newton iterations on a closure that
    returns the loss and its gradient. With g_k the gradient and the last m pairs
    s_i = x_{i+1} - x_i, y_i = g_{i+1} - g_i (kept only when y_i . s_i > 1e-10):

    .. math::

        d_k = -H_k g_k \quad\text{(two-loop recursion, } H_k^0 = \tfrac{s^\top y}{y^\top y} I),
        \qquad x_{k+1} = x_k + t_k d_k

    where t_k = lr, except the very first iteration's min(1, 1/||g_0||_1) lr, or, with
    ``line_search_fn="strong_wolfe"``, the step found by a strong-Wolfe line search
    (c1=1e-4, c2=0.9, cubic interpolation) started from that value. An iteration ends the
    step when max|g| <= tolerance_grad, g.d > -tolerance_change, max|t d| <= tolerance_change,
    |f_{k+1} - f_k| < tolerance_change, or max_iter / max_eval is reached (torch's rules).

    Args:
        learning_rate (float or mx.array scalar): torch's ``lr``. Default: ``1``.
        max_iter (int): iterations per :meth:`step`. Default: ``20``.
        max_eval (int or None): closure evaluations per :meth:`step`. Default ``None``
            means ``max_iter * 5 // 4``. As in torch, a strong-Wolfe line search may
            overrun it by one evaluation.
        tolerance_grad (float): first-order optimality tolerance. Default: ``1e-7``.
        tolerance_change (float): tolerance on loss and parameter changes. Default: ``1e-9``.
        history_size (int): number of (s, y) pairs kept. Default: ``100``.
        line_search_fn (str or None): ``None`` (fixed step) or ``"strong_wolfe"``.

    The parameters may be any tree of arrays (float32 or float64); they are flattened into
    one vector inside and each keeps its shape and dtype. ``opt.state`` holds torch's state
    (``d, t, old_dirs, old_stps, ro, H_diag, prev_flat_grad, prev_loss, func_evals,
    n_iter``) plus ``status``, why the last step ended (see ``CONVERGED``). The state is kept
    across :meth:`step` calls, as torch keeps it.

    Example:
        >>> import mlx.core as mx, mlx.nn as nn
        >>> from mlx_optim import LBFGS
        >>> model = nn.Linear(3, 1)
        >>> X, y = mx.random.normal((32, 3)), mx.random.normal((32, 1))
        >>> loss_and_grad = nn.value_and_grad(model, lambda m: nn.losses.mse_loss(m(X), y))
        >>> opt = LBFGS(line_search_fn="strong_wolfe")
        >>> loss = opt.step(model, lambda: loss_and_grad(model))
        >>> # or over a plain parameter tree:
        >>> f = lambda p: ((p["x"] - 3.0) ** 2).sum()
        >>> params, loss = LBFGS().step_tree({"x": mx.zeros(2)}, mx.value_and_grad(f))

    Differences from torch:
        * A closure returns ``(loss, grads)`` instead of calling ``backward()``.
        * A non-finite loss or gradient ends the step at the last finite point with
          ``state["status"] == NON_FINITE``; torch writes NaN into the parameters.
        * Line-search scalars (losses, slopes, step lengths) are Python floats, so float32
          parameters follow torch to float32 rounding rather than bit for bit.
        * No parameter groups (torch allows only one anyway); ``learning_rate`` and the
          other hyperparameters are plain attributes that may be changed between steps.

    References:
        Nocedal & Wright, *Numerical Optimization*, 2nd ed., Algorithms 7.4 (two-loop
        recursion) and 3.5/3.6 (strong-Wolfe search); Liu & Nocedal (1989), "On the limited
        memory BFGS method for large scale optimization"; M. Schmidt's minFunc.
    """

    def __init__(self, learning_rate: float | mx.array = 1, max_iter: int = 20,
                 max_eval: int | None = None, tolerance_grad: float = 1e-7,
                 tolerance_change: float = 1e-9, history_size: int = 100,
                 line_search_fn: str | None = None) -> None:
        if callable(learning_rate):
            raise TypeError("LBFGS takes a number or a scalar mx.array as learning_rate, "
                            "not a schedule")
        if isinstance(learning_rate, mx.array) and learning_rate.size != 1:
            raise ValueError(f"Tensor lr must be 1-element (learning_rate has shape {learning_rate.shape})")
        for name, value in (("max_iter", max_iter), ("max_eval", max_eval),
                            ("history_size", history_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"{name} must be an int, got {value!r}")
        if max_eval is None:
            max_eval = max_iter * 5 // 4
        check(_RULES, dict(learning_rate=learning_rate, max_iter=max_iter, max_eval=max_eval,
                           tolerance_grad=tolerance_grad, tolerance_change=tolerance_change,
                           history_size=history_size))
        if line_search_fn not in (None, "strong_wolfe"):
            raise ValueError(f"only 'strong_wolfe' is supported (line_search_fn={line_search_fn!r})")
        self.learning_rate = learning_rate
        self.max_iter = max_iter
        self.max_eval = max_eval
        self.tolerance_grad = tolerance_grad
        self.tolerance_change = tolerance_change
        self.history_size = history_size
        self.line_search_fn = line_search_fn
        self.state: dict[str, Any] = dict(
            func_evals=0, n_iter=0, d=None, t=None, old_dirs=[], old_stps=[], ro=[],
            H_diag=1.0, prev_flat_grad=None, prev_loss=None, status=None)

    def step(self, model: Any, closure: Callable[[], tuple[mx.array, Any]]) -> mx.array:
        """Run one torch ``step`` on ``model``'s trainable parameters; return the loss before it.

        ``closure()`` returns ``(loss, grads)`` at the model's current parameters, e.g.
        ``lambda: loss_and_grad(model, X, y)`` with ``loss_and_grad = nn.value_and_grad(model,
        loss_fn)``. The model holds the new parameters afterwards.
        """
        flat, unravel, ravel_like = _ravel(model.trainable_parameters())

        def evaluate(x: mx.array) -> tuple[mx.array, mx.array]:
            model.update(unravel(x))
            loss, grads = closure()
            return loss, ravel_like(grads)

        try:
            x, orig_loss, _ = self._run(flat, evaluate)
        except BaseException:
            model.update(unravel(flat))  # the model is left as it was, with the state
            raise
        model.update(unravel(x))
        mx.eval(model.parameters())
        return orig_loss

    def step_tree(self, params: Any, fun: Callable[[Any], tuple[mx.array, Any]]) -> tuple[Any, mx.array]:
        """Run one torch ``step`` on a parameter tree (or a single array).

        ``fun(params)`` returns ``(loss, grads)``, e.g. ``mx.value_and_grad(loss_fn)``.
        Returns the new parameters (same structure, shapes and dtypes) and the loss at the
        parameters passed in (what torch's ``step`` returns).
        """
        flat, unravel, ravel_like = _ravel(params)

        def evaluate(x: mx.array) -> tuple[mx.array, mx.array]:
            loss, grads = fun(unravel(x))
            return loss, ravel_like(grads)

        x, orig_loss, _ = self._run(flat, evaluate)
        return unravel(x), orig_loss

    def _run(self, x: mx.array, evaluate: Callable[[mx.array], tuple[Any, mx.array]]):
        """torch's ``LBFGS.step`` on a flat vector.

        Returns the new ``x``, the loss at the ``x`` passed in, and ``(loss, grad)`` at the
        new ``x`` (``None`` when the last fixed step was not evaluated, as in torch). If an
        evaluation raises (a closure's error, a malformed gradient), the state is put back.
        """
        saved = dict(self.state)  # its lists are replaced, never changed in place
        try:
            return self._iterate(x, evaluate)
        except BaseException:
            self.state.clear()
            self.state.update(saved)
            raise

    def _iterate(self, x: mx.array, evaluate: Callable[[mx.array], tuple[Any, mx.array]]):
        state = self.state
        lr = scalar_value("learning_rate", self.learning_rate)
        evals = 1  # this step's evaluations, counting the first one below

        def loss_and_grad(point: mx.array) -> tuple[float, mx.array]:
            nonlocal evals
            evals += 1
            state["func_evals"] += 1
            raw_loss, grad = evaluate(point)
            return _finite_loss(raw_loss, grad), grad

        # The first evaluation, whose raw loss the step returns.
        state["func_evals"] += 1
        orig_loss, flat_grad = evaluate(x)
        try:
            loss = _finite_loss(orig_loss, flat_grad)
        except _NonFinite:
            state["status"] = NON_FINITE
            return x, orig_loss, None
        if mx.abs(flat_grad).max().item() <= self.tolerance_grad:
            state["status"] = CONVERGED_GRAD
            return x, orig_loss, (loss, flat_grad)

        d, t = state["d"], state["t"]
        old_dirs, old_stps, ro = state["old_dirs"], state["old_stps"], state["ro"]
        H_diag, prev_flat_grad, prev_loss = state["H_diag"], state["prev_flat_grad"], state["prev_loss"]
        final = (loss, flat_grad)
        try:
            for n_iter in range(1, self.max_iter + 1):
                state["n_iter"] += 1
                first = state["n_iter"] == 1

                # Direction: steepest descent at first, then the two-loop recursion.
                if first:
                    d = -flat_grad
                    old_dirs, old_stps, ro, H_diag = [], [], [], 1.0
                else:
                    y = flat_grad - prev_flat_grad
                    s = d * t
                    ys = mx.inner(y, s).item()
                    if ys > CURVATURE_EPS:  # else the pair would break positive definiteness
                        if len(old_dirs) == self.history_size:
                            old_dirs, old_stps, ro = old_dirs[1:], old_stps[1:], ro[1:]
                        old_dirs, old_stps, ro = old_dirs + [y], old_stps + [s], ro + [1.0 / ys]
                        H_diag = ys / mx.inner(y, y).item()
                    d = lbfgs_direction(flat_grad, old_dirs, old_stps, ro, H_diag)
                prev_flat_grad, prev_loss = flat_grad, loss

                # Step length: the first step is scaled down by the gradient's 1-norm.
                t = min(1.0, 1.0 / mx.abs(flat_grad).sum().item()) * lr if first else lr
                gtd = mx.inner(flat_grad, d).item()
                if gtd > -self.tolerance_change:
                    status = CONVERGED_SLOPE
                    break

                if self.line_search_fn == "strong_wolfe":
                    start = x
                    loss, flat_grad, t = strong_wolfe(
                        lambda step: loss_and_grad(start + step * d), d, t, loss, flat_grad,
                        gtd, max_ls=self.max_eval - evals)  # torch passes no tolerance_change
                    x = start + t * d
                    final = (loss, flat_grad)
                else:
                    x_next = x + t * d
                    if n_iter != self.max_iter:  # torch skips the last, unused evaluation
                        loss, flat_grad = loss_and_grad(x_next)
                        final = (loss, flat_grad)
                    else:
                        final = None
                    x = x_next
                mx.eval(x, d)

                if n_iter == self.max_iter:
                    status = MAX_ITER
                    break
                if evals >= self.max_eval:
                    status = MAX_EVAL
                    break
                if mx.abs(flat_grad).max().item() <= self.tolerance_grad:
                    status = CONVERGED_GRAD
                    break
                if mx.abs(d * t).max().item() <= self.tolerance_change:
                    status = CONVERGED_STEP
                    break
                if abs(loss - prev_loss) < self.tolerance_change:
                    status = CONVERGED_LOSS
                    break
        except _NonFinite:
            status = NON_FINITE

        state.update(d=d, t=t, old_dirs=old_dirs, old_stps=old_stps, ro=ro, H_diag=H_diag,
                     prev_flat_grad=prev_flat_grad, prev_loss=prev_loss, status=status)
        return x, orig_loss, final
