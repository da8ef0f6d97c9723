"""Closed-loop runs of our optimizers and torch's on the same problem, for the tests.

The gradient of every parameter is ``scale * (p - target) + 0.1 * p**3``, computed from
the current parameters at each step with the same arithmetic in both frameworks (no
transcendental functions: mlx's float64 ``sin`` is only float32-accurate).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import torch
from mlx.utils import tree_flatten, tree_map

from .cases import ours_kwargs

DTYPES = {"float32": (mx.float32, torch.float32), "float64": (mx.float64, torch.float64)}


class Problem:
    def __init__(self, shapes, seed=0):
        rng = np.random.default_rng(seed)
        self.init = [rng.standard_normal(s) for s in shapes]
        self.target = [rng.standard_normal(s) for s in shapes]
        self.scale = [rng.uniform(0.5, 2.0, s) for s in shapes]

    # -- mlx -------------------------------------------------------------------------
    def tree(self, arrays):
        """A nested tree (dict, list) so that path handling is exercised."""
        first, *rest = arrays
        return {"layer": {"weight": first}, "blocks": [{"kernel": a} for a in rest]}

    def mlx_params(self, dtype):
        return self.tree([mx.array(a, dtype=dtype) for a in self.init])

    def mlx_grads(self, params):
        dtype = tree_flatten(params)[0][1].dtype
        consts = self.tree([(mx.array(t, dtype=dtype), mx.array(s, dtype=dtype))
                            for t, s in zip(self.target, self.scale)])
        return tree_map(lambda p, c: c[1] * (p - c[0]) + 0.1 * p * p * p, params, consts,
                        is_leaf=lambda x: isinstance(x, tuple))

    # -- torch -----------------------------------------------------------------------
    def torch_params(self, dtype):
        return [torch.tensor(a, dtype=dtype, requires_grad=True) for a in self.init]

    def set_torch_grads(self, params):
        with torch.no_grad():
            for p, t, s in zip(params, self.target, self.scale):
                t = torch.tensor(t, dtype=p.dtype)
                s = torch.tensor(s, dtype=p.dtype)
                p.grad = s * (p - t) + 0.1 * p * p * p


def run_ours(case, config, dtype_name, steps=12, compiled=False, problem=None, on_step=None):
    """(parameters, optimizer) after ``steps`` closed-loop steps."""
    problem = problem or Problem(case.shapes)
    dtype = DTYPES[dtype_name][0]
    params = problem.mlx_params(dtype)
    opt = case.ours(**ours_kwargs(config.kwargs))
    opt.init(params)

    def step(params):
        return opt.apply_gradients(problem.mlx_grads(params), params)

    if compiled:
        state = [opt.state]
        step = mx.compile(step, inputs=state, outputs=state)
    for i in range(steps):
        if on_step:
            on_step(i, opt)
        params = step(params)
        mx.eval(params, opt.state)
    return params, opt


def run_torch(case, config, dtype_name, steps=12, problem=None):
    problem = problem or Problem(case.shapes)
    params = problem.torch_params(DTYPES[dtype_name][1])
    opt = case.torch_cls(params, **config.kwargs)
    for _ in range(steps):
        problem.set_torch_grads(params)
        opt.step()
    return params, opt


def assert_close(actual, expected, tol, what):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(float(np.abs(expected).max()) if expected.size else 0.0, 1e-30)
    err = float(np.abs(actual - expected).max()) if expected.size else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} x scale {scale:.3g}"


def compare_with_torch(params, opt, torch_params, torch_opt, tol):
    """Parameters and every state array torch keeps must match."""
    ours = [a for _, a in tree_flatten(params)]
    slots = [s for _, s in flatten_slots(opt.state["param_state"])]
    assert len(ours) == len(torch_params) == len(slots)
    for i, (a, p) in enumerate(zip(ours, torch_params)):
        assert_close(a, p.detach().numpy(), tol, f"param {i}")
        for key, value in torch_opt.state[p].items():
            if value is None:
                continue
            assert key in slots[i], f"state {key!r} missing from ours: {sorted(slots[i])}"
            expected = value.detach().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            assert_close(slots[i][key], expected, tol, f"param {i} state {key}")


def flatten_slots(tree, prefix=""):
    from mlx_optim._base import is_slot

    if is_slot(tree):
        return [(prefix, tree)]
    out = []
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for k, v in items:
        out += flatten_slots(v, f"{prefix}.{k}" if prefix else str(k))
    return out
