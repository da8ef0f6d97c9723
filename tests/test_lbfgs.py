"""LBFGS and minimize: parity with torch.optim.LBFGS, termination rules, minimize vs scipy.

The problems below are also the benchmark's (benchmarks/lbfgs.py imports them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlx_optim import lbfgs as lbfgs_module
from mlx_optim.lbfgs import LBFGS
from mlx_optim.minimize import minimize


# --------------------------------------------------------------------------- problems

@dataclass
class Problem:
    """``loss(xp, params, data)`` is written once for both ``xp=mx`` and ``xp=torch``."""

    name: str
    init: Any  # tree of float64 numpy arrays
    data: dict[str, np.ndarray]
    loss: Callable[[Any, Any, dict], Any]

    def mlx(self, dtype=mx.float64):
        """(params tree, loss(params)) in MLX."""
        data = {k: mx.array(v, dtype=dtype) for k, v in self.data.items()}
        params = tree_map(lambda v: mx.array(v, dtype=dtype), self.init)
        return params, lambda p: self.loss(mx, p, data)

    def torch(self):
        """(list of leaf tensors in our flattening order, closure-ready loss())."""
        named = tree_flatten(self.init)
        tensors = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for _, v in named]
        data = {k: torch.from_numpy(v) for k, v in self.data.items()}
        return tensors, lambda: self.loss(torch, tree_unflatten(list(zip([k for k, _ in named], tensors))), data)


def _rosenbrock(xp, x, data):
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def _logistic(xp, p, data):
    margin = -data["y"] * (data["X"] @ p["w"] + p["b"])
    # e ** m, not exp(m): MLX's float64 exp on the CPU is only float32-accurate (~6e-7).
    return xp.log1p(math.e ** margin).mean() + 0.5e-2 * (p["w"] ** 2).sum()


def _mlp_forward(xp, p, h):
    layers = [layer for layer in p["layers"] if layer]
    for i, layer in enumerate(layers):
        h = h @ layer["weight"].T + layer["bias"]
        if i < len(layers) - 1:
            h = xp.tanh(h)
    return h


def _mlp(xp, p, data):
    return ((_mlp_forward(xp, p, data["X"]) - data["Y"]) ** 2).mean()


def _make_problems() -> list[Problem]:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 10))
    y = np.sign(X @ rng.normal(size=10) + 0.5 * rng.normal(size=200))
    sizes = (1, 16, 16, 1)
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers += [{"weight": rng.normal(size=(fan_out, fan_in)) / math.sqrt(fan_in),
                    "bias": 0.1 * rng.normal(size=fan_out)}, {}]
    grid = np.linspace(-3, 3, 64)[:, None]
    return [
        Problem("rosenbrock-2", np.array([-1.2, 1.0]), {}, _rosenbrock),
        Problem("rosenbrock-100", np.tile([-1.2, 1.0], 50), {}, _rosenbrock),
        Problem("logistic", {"w": np.zeros(10), "b": np.zeros(())}, {"X": X, "y": y}, _logistic),
        # the tree of nn.Sequential(Linear, Tanh, Linear, Tanh, Linear)
        Problem("mlp", {"layers": layers[:-1]}, {"X": grid, "Y": np.sin(grid)}, _mlp),
    ]


PROBLEMS = _make_problems()


@pytest.fixture(autouse=True)
def _torch_one_thread():
    # torch's thread pool fights the other test processes on these 2-core machines
    # (an MLP step went from 2 ms to 40 ms); restore the setting afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- parity

def _torch_db_configs() -> list[tuple[str, dict]]:
    from torch.testing._internal.common_optimizers import optim_db

    info = next(o for o in optim_db if o.optim_cls is torch.optim.LBFGS)
    return [(i.desc, i.kwargs) for i in info.optim_inputs_func(device="cpu")]


CONFIGS = _torch_db_configs() + [
    ("history_size < iterations", {"history_size": 5}),
    ("history_size < iterations, strong_wolfe", {"history_size": 5, "line_search_fn": "strong_wolfe"}),
]
STEPS = 3  # step() calls compared, 20 iterations each by default
STATE_KEYS = ("d", "t", "old_dirs", "old_stps", "ro", "H_diag", "prev_flat_grad", "prev_loss")


def _ours_kwargs(kwargs: dict) -> dict:
    """torch's LBFGS kwargs in our names; a Tensor lr becomes an mx.array of the same float32."""
    ours = {("learning_rate" if k == "lr" else k): v for k, v in kwargs.items()}
    if isinstance(ours.get("learning_rate"), torch.Tensor):
        ours["learning_rate"] = mx.array(ours["learning_rate"].item(), dtype=mx.float32)
    return ours


def _flat(value) -> np.ndarray:
    if isinstance(value, list):
        return np.concatenate([_flat(v) for v in value]) if value else np.zeros(0)
    if isinstance(value, torch.Tensor):  # copy: torch updates prev_flat_grad in place
        return value.detach().double().numpy().ravel().copy()
    if isinstance(value, mx.array):
        return np.array(value).ravel()
    return np.array([float(value)])


def _snapshot(params: list, state: dict) -> dict:
    snap = {key: _flat(state[key]) for key in STATE_KEYS}
    snap.update(params=_flat(list(params)), counts=(state["n_iter"], state["func_evals"]))
    return snap


def _torch_trajectory(problem: Problem, kwargs: dict, nudge: float = 0.0) -> list[dict]:
    """Snapshots after each step() call; ``nudge`` moves the start by one rounding error."""
    tensors, loss = problem.torch()
    with torch.no_grad():
        for t in tensors:
            t.add_(nudge * t.abs().clamp(min=1))
    opt = torch.optim.LBFGS(tensors, **kwargs)

    def closure():
        opt.zero_grad()
        value = loss()
        value.backward()
        return value

    snaps = []
    for _ in range(STEPS):
        opt.step(closure)
        snaps.append(_snapshot(tensors, opt.state[tensors[0]]))
    return snaps


def _mlp_model(params) -> nn.Module:
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    model.set_dtype(mx.float64)
    model.update(params)
    return model


def _our_trajectory(problem: Problem, kwargs: dict) -> list[dict]:
    """The MLP goes through the nn.Module API, the other problems through step_tree."""
    opt = LBFGS(**_ours_kwargs(kwargs))
    params, loss = problem.mlx()
    snaps = []
    if problem.name == "mlp":
        model = _mlp_model(params)
        X, Y = (mx.array(problem.data[k], dtype=mx.float64) for k in ("X", "Y"))
        loss_and_grad = nn.value_and_grad(model, lambda m: ((m(X) - Y) ** 2).mean())
        for _ in range(STEPS):
            opt.step(model, lambda: loss_and_grad(model))
            snaps.append(_snapshot([v for _, v in tree_flatten(model.trainable_parameters())], opt.state))
    else:
        loss_and_grad = mx.value_and_grad(loss)
        for _ in range(STEPS):
            params, _ = opt.step_tree(params, loss_and_grad)
            snaps.append(_snapshot([v for _, v in tree_flatten(params)], opt.state))
    return snaps


def _relative_error(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)) if b.size else 0.0


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.name)
@pytest.mark.parametrize("desc,kwargs", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_parity_with_torch(problem, desc, kwargs):
    """Parameters and every state entry equal torch's after each of 3 step() calls.

    Tolerance: 1e-8 relative, except where torch itself is that sensitive to rounding.
    Torch's dot products sum in another order than MLX's, so the runs differ by one
    rounding error at the start; on chaotic trajectories (a fixed step of 1 on Rosenbrock)
    that grows about 1000x per 20 iterations in torch against itself too. There the bound
    is 100x the distance between torch and torch started one rounding error away.
    """
    ours, theirs = _our_trajectory(problem, kwargs), _torch_trajectory(problem, kwargs)
    nudged = None
    for step, (mine, ref) in enumerate(zip(ours, theirs)):
        assert mine["counts"] == ref["counts"], f"step {step}: (n_iter, func_evals)"
        for key in ("params",) + STATE_KEYS:
            error = _relative_error(mine[key], ref[key])
            if error <= 1e-8:
                continue
            nudged = nudged or _torch_trajectory(problem, kwargs, nudge=2.0 ** -52)
            sensitivity = _relative_error(nudged[step][key], ref[key])
            assert error <= 100 * sensitivity, f"step {step} {key}: {error:.1e} vs torch's own {sensitivity:.1e}"


def test_parity_float32_keeps_dtype():
    """float32 parameters stay float32 and reach the float64 run's loss to float32 accuracy."""
    problem = PROBLEMS[2]  # logistic: {"w": (10,), "b": ()}
    results = {}
    for dtype in (mx.float32, mx.float64):
        params, loss = problem.mlx(dtype)
        params, _ = LBFGS(line_search_fn="strong_wolfe").step_tree(params, mx.value_and_grad(loss))
        assert all(v.dtype == dtype for _, v in tree_flatten(params))
        results[dtype] = params
    assert results[mx.float32]["b"].shape == ()
    _, loss = problem.mlx(mx.float64)
    as_float64 = tree_map(lambda v: v.astype(mx.float64), results[mx.float32])
    np.testing.assert_allclose(loss(as_float64).item(), loss(results[mx.float64]).item(), rtol=1e-6)
    np.testing.assert_allclose(np.array(as_float64["w"]), np.array(results[mx.float64]["w"]), atol=1e-3)


# --------------------------------------------------------------------------- termination

def _run_both(fun, x0: list[float], **kwargs):
    """One step() of ours and of torch on f(x) written for both; returns (x, state, torch's)."""
    opt = LBFGS(**_ours_kwargs(kwargs))
    x, _ = opt.step_tree(mx.array(x0, dtype=mx.float64), mx.value_and_grad(fun))
    p = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
    torch_opt = torch.optim.LBFGS([p], **kwargs)

    def closure():
        torch_opt.zero_grad()
        value = fun(p)
        value.backward()
        return value

    torch_opt.step(closure)
    state = torch_opt.state[p]
    np.testing.assert_allclose(np.array(x), p.detach().numpy(), rtol=1e-12)
    assert (opt.state["n_iter"], opt.state["func_evals"]) == (state.get("n_iter", 0), state["func_evals"])
    return np.array(x), opt.state, state


def rosen(x):
    return _rosenbrock(None, x, None)


def test_stops_at_start_when_gradient_below_tolerance_grad():
    x, state, _ = _run_both(rosen, [1.0, 1.0])  # the minimum: gradient exactly 0
    assert state["status"] == lbfgs_module.CONVERGED_GRAD
    assert (state["n_iter"], state["func_evals"], state["d"]) == (0, 1, None)
    np.testing.assert_array_equal(x, [1.0, 1.0])


def test_stops_on_directional_derivative_above_minus_tolerance_change():
    # g.d = -|g|^2 ~ -5.4e4 on the first iteration: above -1e6, so no move at all
    x, state, _ = _run_both(rosen, [-1.2, 1.0], tolerance_change=1e6)
    assert state["status"] == lbfgs_module.CONVERGED_SLOPE
    assert (state["n_iter"], state["func_evals"]) == (1, 1)
    np.testing.assert_array_equal(x, [-1.2, 1.0])


def test_stops_on_tiny_step_tolerance_change():
    # the first step moves by max|t d| = 215.6 / 303.6 = 0.71 <= 1.0, while g.d ~ -5.4e4 < -1.0
    x, state, _ = _run_both(rosen, [-1.2, 1.0], tolerance_change=1.0)
    assert state["status"] == lbfgs_module.CONVERGED_STEP
    assert (state["n_iter"], state["func_evals"]) == (1, 2)
    np.testing.assert_allclose(np.abs(x - [-1.2, 1.0]).max(), 215.6 / 303.6, rtol=1e-12)


def test_stops_on_tiny_loss_change_tolerance_change():
    # f = 0.1 (x - 1)^2 from 0: t = 1, x -> 0.2, f: 0.1 -> 0.064 (change 0.036);
    # g.d = -0.04 < -0.038 and max|t d| = 0.2 > 0.038, so only the loss rule can stop it
    fun = lambda x: (0.1 * (x - 1) ** 2).sum()
    x, state, _ = _run_both(fun, [0.0], tolerance_change=0.038)
    assert state["status"] == lbfgs_module.CONVERGED_LOSS
    assert (state["n_iter"], state["func_evals"]) == (1, 2)
    np.testing.assert_allclose(x, [0.2], rtol=1e-12)


def test_stops_at_max_iter_without_evaluating_the_last_fixed_step():
    x, state, _ = _run_both(rosen, [-1.2, 1.0], max_iter=7)
    assert state["status"] == lbfgs_module.MAX_ITER
    assert (state["n_iter"], state["func_evals"]) == (7, 7)


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_max_eval_is_respected(line_search_fn):
    """Fixed step: exactly max_eval evaluations. Strong Wolfe: torch's line-search budget,
    ``max_eval - evaluations so far`` iterations after its first evaluation, may overrun by one."""
    x0 = np.tile([-1.2, 1.0], 50).tolist()
    for max_eval in (3, 6, 11):
        _, state, _ = _run_both(rosen, x0, max_iter=50, max_eval=max_eval, line_search_fn=line_search_fn)
        assert state["status"] == lbfgs_module.MAX_EVAL
        if line_search_fn is None:
            assert state["func_evals"] == max_eval
        else:
            assert max_eval <= state["func_evals"] <= max_eval + 1


def test_curvature_skip_keeps_history_empty_when_ys_below_1e_10():
    # f = x + 2.5e-11 x^2: y.s = 5e-11 * s^2 = 5e-11 > 0 but <= 1e-10, so no pair is kept
    fun = lambda x: (x + 2.5e-11 * x ** 2).sum()
    x, state, torch_state = _run_both(fun, [0.0], max_iter=4)
    assert state["old_dirs"] == [] and state["ro"] == [] and state["H_diag"] == 1.0
    assert torch_state["old_dirs"] == [] and torch_state["H_diag"] == 1
    # ...while a pair with y.s = 1e-9 is kept
    fun = lambda x: (x + 5e-10 * x ** 2).sum()
    x, state, torch_state = _run_both(fun, [0.0], max_iter=4)
    assert len(state["old_dirs"]) == len(torch_state["old_dirs"]) == 1
    np.testing.assert_allclose(state["ro"], [float(r) for r in torch_state["ro"]], rtol=1e-12)


def test_state_carries_across_steps_like_one_long_step():
    """Two step() calls of 10 iterations equal one of 20 (torch's state semantics)."""
    params, loss = PROBLEMS[1].mlx()
    loss_and_grad = mx.value_and_grad(loss)
    opt = LBFGS(max_iter=10, max_eval=100, line_search_fn="strong_wolfe")
    x = params
    for _ in range(2):
        x, _ = opt.step_tree(x, loss_and_grad)
    once = LBFGS(max_iter=20, max_eval=100, line_search_fn="strong_wolfe")
    y, _ = once.step_tree(params, loss_and_grad)
    # the second step call re-evaluates its start, so one evaluation more
    assert once.state["func_evals"] + 1 == opt.state["func_evals"]
    np.testing.assert_allclose(np.array(x), np.array(y), rtol=1e-12)


# --------------------------------------------------------------------------- non-finite

def _nan_beyond(limit: float):
    # slope -1 everywhere; NaN once x > limit (sqrt of a negative number)
    return lambda x: (-x + 0 * mx.sqrt(limit - x)).sum()


def test_nan_loss_keeps_last_finite_parameters():
    # fixed step 1: x = 0, 1, 2, ..., 5 are finite; 6 is NaN -> stay at 5
    opt = LBFGS(max_iter=20)
    x, loss = opt.step_tree(mx.array([0.0], dtype=mx.float64), mx.value_and_grad(_nan_beyond(5.5)))
    assert opt.state["status"] == lbfgs_module.NON_FINITE
    assert x.tolist() == [5.0] and loss.item() == 0.0
    assert (opt.state["n_iter"], opt.state["func_evals"]) == (6, 7)


def test_nan_in_line_search_leaves_parameters_untouched():
    # first trial t = min(1, 1/|g|_1) * lr = 8 lands at x = 8 > 5.5
    opt = LBFGS(learning_rate=8.0, line_search_fn="strong_wolfe")
    x, _ = opt.step_tree(mx.array([0.0], dtype=mx.float64), mx.value_and_grad(_nan_beyond(5.5)))
    assert opt.state["status"] == lbfgs_module.NON_FINITE
    assert x.tolist() == [0.0] and opt.state["func_evals"] == 2


def test_nan_at_start_returns_it_and_touches_nothing():
    model = nn.Linear(2, 1)
    before = tree_map(lambda v: np.array(v), model.parameters())
    opt = LBFGS()
    loss = opt.step(model, lambda: (mx.array(float("nan")), tree_map(mx.zeros_like, model.trainable_parameters())))
    assert math.isnan(loss.item()) and opt.state["status"] == lbfgs_module.NON_FINITE
    assert opt.state["n_iter"] == 0 and opt.state["d"] is None
    for (_, a), (_, b) in zip(tree_flatten(before), tree_flatten(model.parameters())):
        np.testing.assert_array_equal(a, np.array(b))


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs,error,match", [
    ({"learning_rate": -1.0}, ValueError, r"Invalid learning rate: -1.0 \(learning_rate must be >= 0.0\)"),
    ({"learning_rate": mx.array([1e-3, 1e-3])}, ValueError, "Tensor lr must be 1-element"),
    ({"line_search_fn": "armijo"}, ValueError, "only 'strong_wolfe' is supported.*'armijo'"),
    ({"max_iter": 0}, ValueError, "Invalid max_iter value: 0"),
    ({"max_eval": 0}, ValueError, "Invalid max_eval value: 0"),
    ({"history_size": 0}, ValueError, "Invalid history_size value: 0"),
    ({"tolerance_grad": -1e-7}, ValueError, "Invalid tolerance_grad value: -1e-07"),
    ({"tolerance_change": float("nan")}, ValueError, "Invalid tolerance_change value: nan"),
    ({"max_iter": 2.5}, TypeError, "max_iter must be an int"),
    ({"learning_rate": lambda step: 0.1}, TypeError, "not a schedule"),
])
def test_invalid_hyperparameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        LBFGS(**kwargs)


# --------------------------------------------------------------------------- minimize

def _scipy_minimize(problem: Problem):
    import scipy.optimize

    params, loss = problem.mlx()
    named = tree_flatten(params)
    sizes = np.cumsum([v.size for _, v in named])[:-1]
    loss_and_grad = mx.value_and_grad(loss)

    def fun(z):
        pieces = np.split(z, sizes)
        tree = tree_unflatten([(k, mx.array(p.reshape(v.shape), dtype=mx.float64))
                               for (k, v), p in zip(named, pieces)])
        value, grads = loss_and_grad(tree)
        return value.item(), np.concatenate([np.array(g).ravel() for _, g in tree_flatten(grads)])

    return scipy.optimize.minimize(fun, np.concatenate([np.array(v).ravel() for _, v in named]),
                                   jac=True, method="L-BFGS-B")


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.name)
def test_minimize_matches_scipy_lbfgsb(problem):
    """Within 1.5x scipy's evaluations, to a loss at least as low (up to scipy's own ftol)."""
    reference = _scipy_minimize(problem)
    params, loss = problem.mlx()
    result = minimize(loss, params)
    assert result.success, result.message
    assert result.nfev <= 1.5 * reference.nfev, (result.nfev, reference.nfev)
    assert result.fun <= reference.fun + 2.2e-9 * max(1.0, abs(reference.fun)), (result.fun, reference.fun)
    # the result is what it says: x has x0's structure, fun and grad are at x
    value, grads = mx.value_and_grad(loss)(result.x)
    assert tree_map(lambda v: (v.shape, v.dtype), result.x) == tree_map(lambda v: (v.shape, v.dtype), params)
    assert value.item() == result.fun
    for (_, g), (_, h) in zip(tree_flatten(grads), tree_flatten(result.grad)):
        np.testing.assert_array_equal(np.array(g), np.array(h))


def test_minimize_reports_failure():
    result = minimize(_nan_beyond(5.5), mx.array([0.0], dtype=mx.float64), line_search_fn=None)
    assert not result.success and result.message == lbfgs_module.NON_FINITE
    assert result.x.tolist() == [5.0] and result.fun == -5.0 and result.nfev == 7
    result = minimize(rosen, mx.array([-1.2, 1.0], dtype=mx.float64), max_iter=5, max_eval=100)
    assert not result.success and result.message == lbfgs_module.MAX_ITER and result.nit == 5


@pytest.mark.parametrize("fun", [lambda x: x.abs().sum(), lambda x: -x.sum()], ids=["l1", "linear"])
def test_strong_wolfe_on_linear_pieces_equals_torch(fun):
    # Two probes on one linear piece make the cubic's denominator 0: torch divides tensors
    # (inf, clipped by the bounds, or nan), where Python floats would raise.
    _run_both(fun, [5.0, -7.0], line_search_fn="strong_wolfe", max_iter=5)


def test_runtime_needs_no_numpy():
    # The runtime dependency is mlx alone (numpy comes with the test extra only).
    import subprocess
    import sys

    code = ("import sys; sys.modules['numpy'] = None\n"
            "import mlx.core as mx, mlx_optim\n"
            "g = mlx_optim.RowSparseGrad(mx.array([3, 1, 3]), mx.ones((3, 2)), 5).coalesce()\n"
            "assert g.indices.tolist() == [1, 3] and g.values.tolist() == [[1.0, 1.0], [2.0, 2.0]]\n"
            "assert mlx_optim.minimize(lambda v: mx.abs(v).sum(), mx.array([5.0, -7.0])).success\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_minimize_converts_array_like_x0():
    # numpy arrays, numpy and Python numbers are converted; a numpy float64 stays float64
    # (mx.array alone would make it float32); a list is a tree node.
    quadratic = lambda v: mx.sum((v - 3.0) ** 2)  # noqa: E731
    for x0, dtype in [(np.array([-1.2, 1.0]), mx.float64), (np.array([1.0], np.float32), mx.float32),
                      (np.float64(2.0), mx.float64), (1.5, mx.float32)]:
        result = minimize(quadratic, x0)
        assert result.success and result.x.dtype == dtype and result.grad.dtype == dtype
        assert result.x.shape == np.shape(x0)
        np.testing.assert_allclose(np.array(result.x), np.full(np.shape(x0), 3.0), rtol=1e-6)
    result = minimize(lambda v: (v[0][0] - 3.0) ** 2 + (v[0][1] + 1.0) ** 2, [[1.0, 2.0]])
    assert isinstance(result.x, list) and isinstance(result.x[0], list)
    assert [x.item() for x in result.x[0]] == pytest.approx([3.0, -1.0])


@pytest.mark.parametrize("x0, match", [
    (mx.array([0, 0]), "x0 must be floating point, got mlx.core.int32"),
    (np.array([1, 2]), "x0 must be floating point, got mlx.core.int64"),
    ({"a": mx.ones(2), "b": 1}, "x0 leaf 'b' must be floating point"),
    ({"a": "x"}, "x0 leaf 'a' must be an array"),
])
def test_minimize_rejects_non_floating_x0(x0, match):
    with pytest.raises(TypeError, match=match):
        minimize(lambda v: mx.sum(v), x0)


@pytest.mark.parametrize("args", [  # torch divides 3 (f1 - f2) by (x1 - x2): so must we
    (-0.17, -2.4, -0.39, 0.67, 2.48, 2.8),
    (1.31, -0.97, 0.72, -2.75, -2.02, 2.89),
    (-3.0, -1.91, 0.04, -1.47, -2.61, 2.16),
])
def test_cubic_interpolate_rounds_as_torch(args):
    from torch.optim.lbfgs import _cubic_interpolate

    from mlx_optim._linesearch import cubic_interpolate

    x1, f1, g1, x2, f2, g2 = args
    expected = _cubic_interpolate(x1, torch.tensor(f1, dtype=torch.float64), torch.tensor(g1, dtype=torch.float64),
                                  x2, torch.tensor(f2, dtype=torch.float64), torch.tensor(g2, dtype=torch.float64))
    assert cubic_interpolate(x1, f1, g1, x2, f2, g2) == float(expected)


def test_a_malformed_closure_gradient_raises_and_changes_nothing():
    model = nn.Linear(3, 1)
    x = mx.random.normal((8, 3), key=mx.random.key(1))
    y = mx.random.normal((8, 1), key=mx.random.key(2))
    loss_and_grad = nn.value_and_grad(model, lambda m: nn.losses.mse_loss(m(x), y))
    opt = LBFGS(max_iter=5, learning_rate=0.1)
    opt.step(model, lambda: loss_and_grad(model))
    state = {k: (list(v) if isinstance(v, list) else v) for k, v in opt.state.items()}
    params = [np.array(v) for _, v in tree_flatten(model.parameters())]
    calls = {"n": 0}

    def bad_after_two():  # the line search or a later iteration gets a bad gradient
        calls["n"] += 1
        loss, grads = loss_and_grad(model)
        if calls["n"] > 2:
            grads = {**grads, "weight": mx.zeros((2, 3))}
        return loss, grads

    with pytest.raises(ValueError, match=r"closure's gradient for 'weight' has shape \(2, 3\)"):
        opt.step(model, bad_after_two)
    with pytest.raises(ValueError, match="gradient for 'extra' matches no parameter"):
        opt.step(model, lambda: (loss_and_grad(model)[0], {**loss_and_grad(model)[1], "extra": mx.ones(2)}))
    assert opt.state.keys() == state.keys()
    for key, value in state.items():
        assert opt.state[key] is value or opt.state[key] == value, key
    for (k, a), b in zip(tree_flatten(model.parameters()), params):
        np.testing.assert_array_equal(np.array(a), b, err_msg=k)


def test_a_none_gradient_counts_as_zeros_as_torch_does():
    params = {"a": mx.array([1.0, -2.0]), "b": mx.array([0.5])}

    def with_none(p):
        loss, grads = mx.value_and_grad(lambda q: mx.sum(q["a"] ** 2))(p)
        return loss, {"a": grads["a"], "b": None}

    def without(p):
        loss, grads = mx.value_and_grad(lambda q: mx.sum(q["a"] ** 2))(p)
        return loss, {"a": grads["a"]}

    ours, _ = LBFGS(max_iter=4).step_tree(params, with_none)
    reference, _ = LBFGS(max_iter=4).step_tree(params, without)
    for key in params:
        np.testing.assert_array_equal(np.array(ours[key]), np.array(reference[key]))
