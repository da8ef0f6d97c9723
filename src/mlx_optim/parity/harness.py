"""Closed-loop runs of our optimizers and torch's on the same problem, for the tests.

The gradient of every parameter is ``scale * (p - target) + 0.1 * p**3``, computed from
the current parameters at each step with the same arithmetic in both frameworks (no
transcendental functions: mlx's float64 ``sin`` is only float32-accurate).

For a case whose ``grad_kind`` is ``"row-sparse"`` the gradient keeps only some rows at
each step (:meth:`Problem.touched_rows`; once, no row at all). torch gets them as a sparse
COO gradient with the first row listed twice (two halves, summed when torch coalesces);
ours as the equivalent :class:`~mlx_optim.RowSparseGrad` when eager, and as the dense
gradient with zero rows when compiled (the row-sparse path is eager only).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import torch
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .._base import array_hyperparameters
from .cases import ours_kwargs

DTYPES = {"float32": (mx.float32, torch.float32), "float64": (mx.float64, torch.float64)}


class Problem:
    def __init__(self, shapes, seed=0):
        rng = np.random.default_rng(seed)
        self.shapes = shapes
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

    def touched_rows(self, step):
        """Per parameter, the rows a row-sparse gradient keeps at ``step``."""
        return [np.array([r for r in range(shape[0]) if (r + step + i) % 3 and (i, step) != (0, 4)],
                         dtype=np.int64)
                for i, shape in enumerate(self.shapes)]

    def mlx_row_sparse(self, grads, rows):
        """The gradients as RowSparseGrads of ``rows``, the first row given in two halves."""
        from mlx_optim import RowSparseGrad

        flat = tree_flatten(grads)
        out = []
        for (path, g), r in zip(flat, rows):
            listed = np.concatenate([r[:1], r])
            values = g[mx.array(listed)] if listed.size else mx.zeros((0, *g.shape[1:]), g.dtype)
            if listed.size:
                values = mx.concatenate([values[:2] * 0.5, values[2:]])
            out.append((path, RowSparseGrad(mx.array(listed), values, g.shape[0])))
        return tree_unflatten(out)

    def mlx_masked(self, grads, masks):
        """The dense gradients with the rows outside ``masks`` zeroed (compiles)."""
        flat = tree_flatten(grads)
        return tree_unflatten([(path, mx.where(m, g, 0)) for (path, g), m in zip(flat, masks)])

    def row_masks(self, rows, dtype):
        masks = []
        for shape, r in zip(self.shapes, rows):
            mask = np.zeros((shape[0],) + (1,) * (len(shape) - 1), dtype=bool)
            mask[r] = True
            masks.append(mx.array(mask))
        return masks

    # -- torch -----------------------------------------------------------------------
    def torch_params(self, dtype):
        return [torch.tensor(a, dtype=dtype, requires_grad=True) for a in self.init]

    def set_torch_grads(self, params):
        with torch.no_grad():
            for p, t, s in zip(params, self.target, self.scale):
                t = torch.tensor(t, dtype=p.dtype)
                s = torch.tensor(s, dtype=p.dtype)
                p.grad = s * (p - t) + 0.1 * p * p * p

    def torch_row_sparse(self, params, rows):
        """Each ``p.grad`` as an uncoalesced sparse COO gradient of ``rows``."""
        for p, r in zip(params, rows):
            listed = torch.tensor(np.concatenate([r[:1], r]), dtype=torch.int64)
            values = p.grad[listed]
            if listed.numel():
                values = torch.cat([values[:2] * 0.5, values[2:]])
            p.grad = torch.sparse_coo_tensor(listed[None], values, p.shape, check_invariants=True)


def run_ours(case, config, dtype_name, steps=12, compiled=False, problem=None, on_step=None,
             constants=False):
    """(parameters, optimizer) after ``steps`` closed-loop steps; with ``constants``, every
    numeric hyperparameter is one of the optimizer's constants."""
    problem = problem or Problem(case.shapes)
    dtype = DTYPES[dtype_name][0]
    params = problem.mlx_params(dtype)
    opt = case.ours(**ours_kwargs(config.kwargs))
    if constants:
        opt = case.ours(**ours_kwargs(config.kwargs), constants=array_hyperparameters(opt))
    opt.init(params)

    sparse = case.grad_kind == "row-sparse"

    def step(params, rows=None):
        grads = problem.mlx_grads(params)
        if sparse:
            grads = problem.mlx_masked(grads, rows) if compiled else problem.mlx_row_sparse(grads, rows)
        return opt.apply_gradients(grads, params)

    if compiled:
        state = [opt.state]
        step = mx.compile(step, inputs=state, outputs=state)
    for i in range(steps):
        if on_step:
            on_step(i, opt)
        rows = problem.touched_rows(i) if sparse else None
        if sparse and compiled:
            rows = problem.row_masks(rows, dtype)
        params = step(params, rows) if sparse else step(params)
        mx.eval(params, opt.state)
    return params, opt


def continue_ours(case, opt, params, problem, start, stop):
    """The closed loop's eager steps ``start`` .. ``stop - 1`` on an existing optimizer
    (row-sparse gradients where the case has them), e.g. after a checkpoint or an import."""
    for i in range(start, stop):
        grads = problem.mlx_grads(params)
        if case.grad_kind == "row-sparse":
            grads = problem.mlx_row_sparse(grads, problem.touched_rows(i))
        params = opt.apply_gradients(grads, params)
        mx.eval(params, opt.state)
    return params


def run_torch(case, config, dtype_name, steps=12, problem=None):
    problem = problem or Problem(case.shapes)
    params = problem.torch_params(DTYPES[dtype_name][1])
    opt = case.torch_cls(params, **config.kwargs)
    for i in range(steps):
        problem.set_torch_grads(params)
        if case.grad_kind == "row-sparse":
            problem.torch_row_sparse(params, problem.touched_rows(i))
        opt.step()
    return params, opt


def scaled_error(actual, expected, what) -> tuple[float, float]:
    """(max |actual - expected|, the scale it is judged against: max |expected|)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(float(np.abs(expected).max()) if expected.size else 0.0, 1e-30)
    err = float(np.abs(actual - expected).max()) if expected.size else 0.0
    return err, scale


def assert_close(actual, expected, tol, what):
    err, scale = scaled_error(actual, expected, what)
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} x scale {scale:.3g}"


def torch_pairs(params, opt, torch_params, torch_opt):
    """(what, ours, torch's) for every parameter and every state array torch keeps."""
    ours = [a for _, a in tree_flatten(params)]
    slots = [s for _, s in flatten_slots(opt.state["param_state"])]
    assert len(ours) == len(torch_params) == len(slots)
    for i, (a, p) in enumerate(zip(ours, torch_params)):
        yield f"param {i}", a, p.detach().numpy()
        for key, value in torch_opt.state[p].items():
            if value is None:
                continue
            assert key in slots[i], f"state {key!r} missing from ours: {sorted(slots[i])}"
            expected = value.detach().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            yield f"param {i} state {key}", slots[i][key], expected


def compare_with_torch(params, opt, torch_params, torch_opt, tol):
    """Parameters and every state array torch keeps must match."""
    for what, actual, expected in torch_pairs(params, opt, torch_params, torch_opt):
        assert_close(actual, expected, tol, what)


def flatten_slots(tree):
    """(dotted path, slot) of every parameter's state, in the parameters' order."""
    from mlx_optim._base import _dotted, _slots

    return [(_dotted(keys), slot) for keys, slot in _slots(tree)]
