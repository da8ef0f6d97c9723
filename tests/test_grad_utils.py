"""Gradient utilities: torch's clipping, accumulation == the large batch, skipping non-finite steps."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

import mlx_optim
from mlx_optim.grad_utils import (GradientAccumulator, SkipNonFinite, clip_grad_norm,
                                  clip_grad_value, grad_norm)
from mlx_optim.parity.cases import BY_NAME
from mlx_optim.parity.harness import Problem

SHAPES = ((4, 3), (5,), (2, 3, 2))


def _grads(scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    arrays = [(rng.standard_normal(s) * scale).astype(np.float32) for s in SHAPES]
    tree = {"a": mx.array(arrays[0]), "blocks": [{"w": mx.array(arrays[1])}, {"w": mx.array(arrays[2])}]}
    return tree, arrays


def _torch_clip(arrays, fn, *args, **kwargs):
    params = [torch.zeros(a.shape, requires_grad=True) for a in arrays]
    for p, a in zip(params, arrays):
        p.grad = torch.tensor(a)
    out = fn(params, *args, **kwargs)
    return [p.grad.numpy() for p in params], out


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0, 0.5])
@pytest.mark.parametrize("max_norm", [0.5, 1e3])  # clipping, and a coefficient clamped to 1
def test_clip_grad_norm_equals_torch(norm_type, max_norm):
    tree, arrays = _grads()
    clipped, total = clip_grad_norm(tree, max_norm, norm_type)
    expected, expected_total = _torch_clip(arrays, torch.nn.utils.clip_grad_norm_, max_norm, norm_type)
    np.testing.assert_allclose(total.item(), expected_total.item(), rtol=2e-6)
    for (path, g), e in zip(tree_flatten(clipped), expected):
        assert g.dtype == mx.float32
        np.testing.assert_allclose(np.array(g), e, rtol=2e-6, atol=1e-7, err_msg=path)
    if max_norm == 1e3:  # clamped coefficient: unchanged gradients
        for (_, g), a in zip(tree_flatten(clipped), arrays):
            np.testing.assert_array_equal(np.array(g), a)


def test_clip_grad_norm_nonfinite():
    tree, arrays = _grads()
    tree["a"] = mx.where(mx.arange(12).reshape(4, 3) == 5, mx.array(math.inf), tree["a"])
    arrays[0] = np.array(tree["a"])
    with pytest.raises(RuntimeError, match="non-finite, so it cannot be clipped"):
        clip_grad_norm(tree, 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="non-finite, so it cannot be clipped"):
        _torch_clip(arrays, torch.nn.utils.clip_grad_norm_, 1.0, error_if_nonfinite=True)
    _, total = clip_grad_norm(tree, 1.0)  # torch's default: no error, inf norm returned
    assert total.item() == math.inf


def test_clip_grad_norm_compiles():
    tree, _ = _grads(scale=3.0)
    compiled = mx.compile(lambda t: clip_grad_norm(t, 1.0))
    for (_, a), (_, b) in zip(tree_flatten(compiled(tree)), tree_flatten(clip_grad_norm(tree, 1.0))):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-6)
    assert grad_norm(compiled(tree)[0]).item() == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("clip_value", [0.3, 5.0])
def test_clip_grad_value_equals_torch(clip_value):
    tree, arrays = _grads()
    expected, _ = _torch_clip(arrays, torch.nn.utils.clip_grad_value_, clip_value)
    for (path, g), e in zip(tree_flatten(clip_grad_value(tree, clip_value)), expected):
        np.testing.assert_array_equal(np.array(g), e, err_msg=path)


# --------------------------------------------------------------------------- accumulation
def _model_and_data(seed=0):
    mx.random.seed(seed)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    rng = np.random.default_rng(seed)
    x = mx.array(rng.standard_normal((12, 3)).astype(np.float32))
    y = mx.array(rng.standard_normal((12, 2)).astype(np.float32))
    return model, x, y


@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_accumulating_micro_batches_equals_the_large_batch(name):
    k = 3
    kwargs = {"learning_rate": 0.05, **({"momentum": 0.9} if name == "SGD" else {})}
    schedule = lambda: mlx_optim.StepLR(kwargs["learning_rate"], step_size=2, gamma=0.5)  # noqa: E731
    big_model, x, y = _model_and_data()
    small_model, _, _ = _model_and_data()
    big_opt = BY_NAME[name].ours(**{**kwargs, "learning_rate": schedule()})
    small_opt = BY_NAME[name].ours(**{**kwargs, "learning_rate": schedule()})
    loss = lambda m, x, y: nn.losses.mse_loss(m(x), y)  # noqa: E731  mean-reduced
    big_grad = nn.value_and_grad(big_model, loss)
    small_grad = nn.value_and_grad(small_model, loss)
    acc = GradientAccumulator(small_opt, steps=k)
    for _ in range(4):  # 4 optimizer steps: the schedule halves the rate after 2
        big_opt.update(big_model, big_grad(big_model, x, y)[1])
        for j in range(k):
            acc.update(small_model, small_grad(small_model, x[4 * j:4 * j + 4], y[4 * j:4 * j + 4])[1])
            assert acc.pending == (j + 1) % k
        mx.eval(big_model.parameters(), small_model.parameters())
    assert small_opt.state["step"].item() == big_opt.state["step"].item() == 4
    assert small_opt.learning_rate.item() == pytest.approx(0.05 * 0.5)  # at step 3
    for (path, a), (_, b) in zip(tree_flatten(small_model.parameters()), tree_flatten(big_model.parameters())):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-6, err_msg=path)
    # Between optimizer steps the model does not move.
    before = [np.array(v) for _, v in tree_flatten(small_model.parameters())]
    acc.update(small_model, small_grad(small_model, x[:4], y[:4])[1])
    assert all(np.array_equal(np.array(v), b) for (_, v), b in zip(tree_flatten(small_model.parameters()), before))


def test_accumulator_rejects_bad_steps():
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        GradientAccumulator(mlx_optim.SGD(), steps=0)


# ------------------------------------------------------------------------------ skipping
def _state_arrays(opt):
    return [(p, np.array(v)) for p, v in tree_flatten(opt.state)]


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("name", ["Adam", "NAdam", "ASGD"])
def test_skip_non_finite_leaves_everything_and_counts(name, compiled):
    case = BY_NAME[name]
    problem = Problem(case.shapes)
    opt = case.ours(learning_rate=mlx_optim.StepLR(0.01, step_size=1, gamma=0.9))
    guard = SkipNonFinite(opt)
    params = problem.mlx_params(mx.float32)
    opt.init(params)
    poison = mx.array(1.0)

    def step(params, poison):
        grads = problem.mlx_grads(params)
        grads["blocks"][0]["kernel"] = grads["blocks"][0]["kernel"] * poison
        return guard.apply_gradients(grads, params)

    if compiled:
        state = [opt.state, guard.state]
        step = mx.compile(step, inputs=state, outputs=state)
    reference = case.ours(learning_rate=mlx_optim.StepLR(0.01, step_size=1, gamma=0.9))
    ref_params = problem.mlx_params(mx.float32)
    for i in range(6):
        bad = i in (2, 3)
        before_params = [np.array(v) for _, v in tree_flatten(params)]
        before_state = _state_arrays(opt)
        params = step(params, mx.array(math.nan if bad else 1.0) if i != 3 else mx.array(math.inf))
        mx.eval(params, opt.state, guard.state)
        if bad:
            assert all(np.array_equal(np.array(v), b) for (_, v), b in zip(tree_flatten(params), before_params))
            after = _state_arrays(opt)
            assert [p for p, _ in after] == [p for p, _ in before_state]
            for (path, a), (_, b) in zip(after, before_state):
                assert np.array_equal(a, b), path
        else:
            ref_params = reference.apply_gradients(problem.mlx_grads(ref_params), ref_params)
            mx.eval(ref_params, reference.state)
    assert guard.state["skipped"].item() == 2
    assert opt.state["step"].item() == reference.state["step"].item() == 4
    for (path, a), (_, b) in zip(tree_flatten(params), tree_flatten(ref_params)):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-6, atol=1e-7, err_msg=path)
