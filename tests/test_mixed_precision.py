"""Master weights: bf16 parameters trained through float32 masters and float32 state."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

import mlx_optim
from mlx_optim.mixed_precision import MasterWeights
from mlx_optim.parity.harness import Problem

SHAPES = ((4, 3), (3,), (2, 5))


def _grads(problem, params):
    # The gradient the bf16 model gives, computed in float32 from the rounded weights.
    return problem.mlx_grads(tree_map(lambda p: p.astype(mx.float32), params))


@pytest.mark.parametrize("compiled", [False, True])
def test_bf16_params_follow_a_float32_run_on_rounded_weights(compiled):
    problem = Problem(SHAPES)
    params = problem.mlx_params(mx.float32)
    params = tree_map(lambda p: p.astype(mx.bfloat16), params)
    opt = mlx_optim.Adam(learning_rate=1e-3)
    mp = MasterWeights(opt)
    mp.init(params)

    def step(params):
        return mp.apply_gradients(_grads(problem, params), params)

    if compiled:
        state = [opt.state, mp.state]
        step = mx.compile(step, inputs=state, outputs=state)

    # Reference: float32 weights, gradients taken at their bf16 rounding.
    reference = mlx_optim.Adam(learning_rate=1e-3)
    master = tree_map(lambda p: p.astype(mx.float32), params)
    for _ in range(8):
        params = step(params)
        mx.eval(params, opt.state, mp.state)
        rounded = tree_map(lambda p: p.astype(mx.bfloat16), master)
        master = reference.apply_gradients(_grads(problem, rounded), master)
        mx.eval(master, reference.state)
    slot = opt.state["param_state"]["layer"]["weight"]
    assert slot["exp_avg"].dtype == slot["exp_avg_sq"].dtype == mx.float32
    for (path, p), (_, m), (_, r) in zip(tree_flatten(params), tree_flatten(mp.state["master"]),
                                         tree_flatten(master)):
        assert p.dtype == mx.bfloat16 and m.dtype == mx.float32
        np.testing.assert_allclose(np.array(m), np.array(r), rtol=1e-6, atol=1e-7, err_msg=path)
        assert np.array_equal(np.array(p.astype(mx.float32)), np.array(m.astype(mx.bfloat16).astype(mx.float32)))
    # The masters moved by less than a bf16 ulp in places: the point of keeping them.
    start = problem.mlx_params(mx.float32)["layer"]["weight"].astype(mx.bfloat16).astype(mx.float32)
    moved = np.array(mp.state["master"]["layer"]["weight"]) - np.array(start)
    assert np.all(np.abs(moved) > 0)


def test_step_before_init_raises():
    mp = MasterWeights(mlx_optim.SGD())
    with pytest.raises(ValueError, match="init"):
        mp.apply_gradients({"w": mx.zeros(2)}, {"w": mx.zeros(2, mx.bfloat16)})


def test_master_weights_track_float32_torch_far_closer_than_plain_bf16():
    """bf16 parameters: float32 state + master weights stay near a float32 torch run;
    plain bf16 (bf16 state, bf16 weights) drifts, as small updates round away."""
    import torch

    problem = Problem(SHAPES, seed=3)
    steps, lr = 60, 1e-3
    tparams = problem.torch_params(torch.float32)
    topt = torch.optim.Adam(tparams, lr=lr)
    for _ in range(steps):
        problem.set_torch_grads(tparams)
        topt.step()
    expected = np.concatenate([p.detach().numpy().ravel() for p in tparams])

    def distance(params):
        ours = np.concatenate([np.array(p.astype(mx.float32)).ravel() for _, p in tree_flatten(params)])
        return float(np.abs(ours - expected).max())

    plain = tree_map(lambda p: p.astype(mx.bfloat16), problem.mlx_params(mx.float32))
    opt = mlx_optim.Adam(learning_rate=lr)
    for _ in range(steps):
        plain = opt.apply_gradients(problem.mlx_grads(plain), plain)
    mixed = tree_map(lambda p: p.astype(mx.bfloat16), problem.mlx_params(mx.float32))
    mp = MasterWeights(mlx_optim.Adam(learning_rate=lr))
    mp.init(mixed)
    for _ in range(steps):
        mixed = mp.apply_gradients(_grads(problem, mixed), mixed)
    mx.eval(plain, mixed)
    plain_distance, mixed_distance = distance(plain), distance(mp.state["master"])
    print(f"max distance to float32 torch: plain bf16 {plain_distance:.2e}, "
          f"master weights {mixed_distance:.2e}")
    assert mixed_distance < plain_distance / 5


@pytest.mark.parametrize("name", ["Adam", "SGD", "RMSprop", "Adafactor"])
def test_float32_state_for_bf16_parameters(name):
    """``state_dtype``: bf16 weights keep their dtype, their moments are float32
    (bfloat16 without the option, as in torch)."""
    kwargs = {"SGD": {"momentum": 0.9}}.get(name, {})
    problem = Problem(SHAPES, seed=5)
    runs = {}
    for state_dtype in (None, mx.float32):
        params = tree_map(lambda p: p.astype(mx.bfloat16), problem.mlx_params(mx.float32))
        opt = getattr(mlx_optim, name)(learning_rate=1e-2, **kwargs)
        opt.state_dtype = state_dtype
        opt.init(params)
        for _ in range(20):
            params = opt.apply_gradients(_grads(problem, params), params)
        mx.eval(params, opt.state)
        runs[state_dtype] = (params, opt)
    params, opt = runs[mx.float32]
    assert all(p.dtype == mx.bfloat16 for _, p in tree_flatten(params))
    slot = opt.state["param_state"]["layer"]["weight"]
    moments = {k: v for k, v in slot.items() if k != "step" and v.ndim}
    assert moments and all(v.dtype == mx.float32 for v in moments.values())
    plain = runs[None][1].state["param_state"]["layer"]["weight"]
    assert all(plain[k].dtype == mx.bfloat16 for k in moments)


def test_row_sparse_gradients_update_their_master_rows():
    # A bf16 embedding table with a RowSparseGrad (embedding_value_and_grad's): the float32
    # master moves exactly as a float32 table given the float32 gradient would.
    rng = np.random.default_rng(0)
    table = mx.array(rng.standard_normal((6, 3)).astype(np.float32)).astype(mx.bfloat16)
    values = mx.array(rng.standard_normal((3, 3)).astype(np.float32)).astype(mx.bfloat16)
    grad = mlx_optim.RowSparseGrad(mx.array([4, 1, 4]), values, 6)
    mp = MasterWeights(mlx_optim.SparseAdam(learning_rate=0.1))
    mp.init({"emb": table})
    reference = mlx_optim.SparseAdam(learning_rate=0.1)
    master = {"emb": table.astype(mx.float32)}
    params = {"emb": table}
    for _ in range(2):
        params = mp.apply_gradients({"emb": grad}, params)
        master = reference.apply_gradients(
            {"emb": mlx_optim.RowSparseGrad(grad.indices, values.astype(mx.float32), 6)}, master)
    assert params["emb"].dtype == mx.bfloat16
    np.testing.assert_array_equal(np.array(mp.state["master"]["emb"]), np.array(master["emb"]))
    np.testing.assert_array_equal(np.array(params["emb"].astype(mx.float32)),
                                  np.array(master["emb"].astype(mx.bfloat16).astype(mx.float32)))
    moved = np.abs(np.array(params["emb"].astype(mx.float32)) - np.array(table.astype(mx.float32))).sum(1)
    assert (moved[[1, 4]] > 0).all() and (moved[[0, 2, 3, 5]] == 0).all()  # the named rows only


def test_failed_step_changes_neither_masters_nor_state():
    params = {"w": mx.ones(2, mx.bfloat16)}
    opt = mlx_optim.Adam(learning_rate=0.1)
    mp = MasterWeights(opt)
    mp.init(params)
    before = [np.array(v) for _, v in tree_flatten([opt.state, mp.state])]
    # The masters hold "w" and "extra", the parameters given only "w".
    mp.state["master"]["extra"] = mx.zeros(1)
    with pytest.raises(ValueError, match="'extra'"):
        mp.apply_gradients({"w": mx.ones(2), "extra": mx.ones(1)}, params)
    del mp.state["master"]["extra"]
    with pytest.raises(TypeError, match="'w' must be an mx.array"):
        mp.apply_gradients({"w": "x"}, params)
    after = [np.array(v) for _, v in tree_flatten([opt.state, mp.state])]
    assert len(after) == len(before) and all(np.array_equal(a, b) for a, b in zip(after, before))


def test_master_weights_over_skip_non_finite_skips_the_masters_too():
    # float16 training: float32 masters, and a step whose gradients overflowed is skipped.
    import math

    import mlx.nn as nn

    def make():
        model = nn.Linear(4, 2)
        model.set_dtype(mx.float16)
        return model

    mx.random.seed(3)
    model = make()
    reference_model = make()
    reference_model.update(model.parameters())
    guard = mlx_optim.SkipNonFinite(mlx_optim.Adam(learning_rate=1e-2))
    mp = mlx_optim.MasterWeights(guard)
    mp.init(model.trainable_parameters())
    reference = mlx_optim.MasterWeights(mlx_optim.Adam(learning_rate=1e-2))
    reference.init(reference_model.trainable_parameters())
    good = {"weight": mx.full((2, 4), 0.5, mx.float16), "bias": mx.ones(2, mx.float16)}
    bad = {"weight": mx.full((2, 4), math.inf, mx.float16), "bias": mx.ones(2, mx.float16)}
    for grads in (good, bad, good, bad):
        mp.update(model, grads)
        if grads is good:
            reference.update(reference_model, grads)
    assert guard.state["skipped"].item() == 2
    for (k, a), (_, b) in zip(tree_flatten(mp.state), tree_flatten(reference.state)):
        np.testing.assert_array_equal(np.array(a), np.array(b), err_msg=k)
    for (k, a), (_, b) in zip(tree_flatten(guard.optimizer.state), tree_flatten(reference.optimizer.state)):
        np.testing.assert_array_equal(np.array(a), np.array(b), err_msg=k)
    for (k, a), (_, b) in zip(tree_flatten(model.parameters()), tree_flatten(reference_model.parameters())):
        np.testing.assert_array_equal(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32)), err_msg=k)
    with pytest.raises(TypeError, match=r"wrap the optimizer first: MasterWeights\(SkipNonFinite\(opt\)\)"):
        mlx_optim.SkipNonFinite(mp)
