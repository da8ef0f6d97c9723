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
    for bad in (0, 2.0, True, np.int64(0)):
        with pytest.raises(ValueError, match="steps must be an int >= 1"):
            GradientAccumulator(mlx_optim.SGD(), steps=bad)
    assert GradientAccumulator(mlx_optim.SGD(), steps=np.int64(3)).steps == 3


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


# ------------------------------------------------------------------ low precision, row-sparse
def _torch_clip_typed(arrays, dtypes, max_norm, norm_type):
    params = [torch.zeros(a.shape, dtype=d, requires_grad=True) for a, d in zip(arrays, dtypes)]
    for p, a in zip(params, arrays):
        p.grad = torch.tensor(a).to(p.dtype)
    total = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
    return [p.grad for p in params], total


_TORCH_DTYPE = {mx.bfloat16: torch.bfloat16, mx.float16: torch.float16, mx.float32: torch.float32}


@pytest.mark.parametrize("dtypes", [(mx.bfloat16,) * 3, (mx.float16,) * 3,
                                    (mx.bfloat16, mx.float32, mx.float16)])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 0.0, 3.0])
def test_clip_grad_norm_of_low_precision_gradients_equals_torch_bitwise(dtypes, norm_type):
    # torch rounds each array's norm, and the total, to the gradients' dtype (bfloat16:
    # 12.5, not the float32 12.53), and divides as reciprocal * max_norm.
    # max_norm 0.3 is not a bfloat16 number: torch multiplies by it unrounded.
    for seed, max_norm in zip(range(4), (1.0, 0.3, 1.0, 0.3)):
        tree, arrays = _grads(scale=3.0, seed=seed)
        tree = {"a": tree["a"].astype(dtypes[0]), "blocks": [{"w": tree["blocks"][0]["w"].astype(dtypes[1])},
                                                            {"w": tree["blocks"][1]["w"].astype(dtypes[2])}]}
        clipped, total = clip_grad_norm(tree, max_norm, norm_type)
        expected, expected_total = _torch_clip_typed(arrays, [_TORCH_DTYPE[d] for d in dtypes], max_norm, norm_type)
        assert str(total.dtype).split(".")[-1] == str(expected_total.dtype).split(".")[-1]
        assert total.item() == expected_total.item()
        assert grad_norm(tree, norm_type).item() == expected_total.item()
        for (path, g), e in zip(tree_flatten(clipped), expected):
            assert g.dtype == tree_flatten(tree)[[p for p, _ in tree_flatten(tree)].index(path)][1].dtype
            np.testing.assert_array_equal(np.array(g.astype(mx.float32)), e.float().numpy(), err_msg=path)
    assert grad_norm({"w": mx.array([3.0, 4.0], mx.bfloat16)}).dtype == mx.bfloat16


def _row_sparse():
    # Row 2 named twice (summed: [4, -1]), row 0 once; rows 1, 3, 4 untouched (zero).
    return mlx_optim.RowSparseGrad(mx.array([2, 0, 2]), mx.array([[3.0, -2.0], [0.5, 6.0], [1.0, 1.0]]), 5)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, -math.inf, 0.0, 0.5, -1.0])
def test_clip_grad_norm_takes_row_sparse_gradients_as_their_dense_gradient(norm_type):
    sparse, dense_b = _row_sparse(), np.array([2.0, -7.0], np.float32)
    clipped, total = clip_grad_norm({"e": sparse, "b": mx.array(dense_b)}, 1.0, norm_type)
    expected, expected_total = _torch_clip([np.array(sparse.to_dense()), dense_b],
                                           torch.nn.utils.clip_grad_norm_, 1.0, norm_type)
    np.testing.assert_allclose(total.item(), expected_total.item(), rtol=1e-6)
    assert isinstance(clipped["e"], mlx_optim.RowSparseGrad)
    assert clipped["e"].indices.tolist() == [0, 2]  # coalesced
    np.testing.assert_allclose(np.array(clipped["e"].to_dense()), expected[0], rtol=1e-6)
    np.testing.assert_allclose(np.array(clipped["b"]), expected[1], rtol=1e-6)
    assert grad_norm({"e": sparse, "b": mx.array(dense_b)}, norm_type).item() == total.item()


def test_clip_grad_value_clamps_a_row_sparse_gradient_as_its_dense_gradient():
    sparse = _row_sparse()
    clipped = clip_grad_value({"e": sparse}, 3.5)["e"]
    expected, _ = _torch_clip([np.array(sparse.to_dense())], torch.nn.utils.clip_grad_value_, 3.5)
    assert isinstance(clipped, mlx_optim.RowSparseGrad) and clipped.indices.tolist() == [0, 2]
    np.testing.assert_array_equal(np.array(clipped.to_dense()), expected[0])  # row 2: [3.5, -1]
    with pytest.raises(ValueError, match="'e'.*>= 0"):  # would fill the untouched rows
        clip_grad_value({"e": sparse}, -1.0)
    with pytest.raises(TypeError, match="'w' must be an mx.array"):
        clip_grad_norm({"w": "x"}, 1.0)


# --------------------------------------------------------------- accumulation failures
class _FailsOnce:
    """An optimizer whose first step raises (as a step with a bad group or parameter does)."""

    def __init__(self, optimizer):
        self.optimizer, self.failed = optimizer, False

    def apply_gradients(self, gradients, parameters):
        if not self.failed:
            self.failed = True
            raise ValueError("step failed")
        return self.optimizer.apply_gradients(gradients, parameters)


def test_accumulator_keeps_the_micro_batches_when_the_step_fails():
    params = {"w": mx.array([1.0, 2.0])}
    acc = GradientAccumulator(_FailsOnce(mlx_optim.SGD(learning_rate=0.5)), steps=2)
    acc.apply_gradients({"w": mx.array([2.0, 4.0])}, params)
    with pytest.raises(ValueError, match="step failed"):
        acc.apply_gradients({"w": mx.array([6.0, 8.0])}, params)
    assert acc.pending == 1  # the failed call added nothing, lost nothing
    assert acc._sum["w"].tolist() == [2.0, 4.0]
    new = acc.apply_gradients({"w": mx.array([6.0, 8.0])}, params)  # mean [4, 6]
    assert new["w"].tolist() == [1.0 - 0.5 * 4.0, 2.0 - 0.5 * 6.0]
    assert acc.pending == 0 and acc._sum is None


def test_accumulator_rejects_mismatched_micro_batches_and_changes_nothing():
    params = {"w": mx.zeros((4,)), "b": mx.zeros((2,))}
    acc = GradientAccumulator(mlx_optim.SGD(learning_rate=1.0), steps=3)
    with pytest.raises(ValueError, match=r"'w' has shape \(1,\), the parameter has shape \(4,\)"):
        acc.apply_gradients({"w": mx.ones((1,)), "b": mx.ones((2,))}, params)  # would broadcast
    assert acc.pending == 0 and acc._sum is None
    acc.apply_gradients({"w": mx.ones((4,)), "b": mx.ones((2,))}, params)
    bad = [({"w": mx.ones((4,), mx.float16), "b": mx.ones((2,))}, r"'w' is \(4,\) mlx.core.float16"),
           ({"w": mx.ones((4,))}, "same parameters"),
           ({"w": mx.ones((4,)), "b": mx.ones((2,)), "c": mx.ones((1,))}, "unknown parameter 'c'")]
    for grads, match in bad:
        with pytest.raises(ValueError, match=match):
            acc.apply_gradients(grads, params)
        assert acc.pending == 1 and acc._sum["w"].tolist() == [1.0] * 4
    acc.apply_gradients({"w": mx.full((4,), 2.0), "b": mx.ones((2,))}, params)
    new = acc.apply_gradients({"w": mx.full((4,), 3.0), "b": mx.ones((2,))}, params)
    assert new["w"].tolist() == [-2.0] * 4 and new["b"].tolist() == [-1.0] * 2


# ------------------------------------------------------------------- skipping failures
def test_failed_skip_non_finite_call_changes_no_state():
    model, _, _ = _model_and_data()
    opt = mlx_optim.Adam()
    guard = SkipNonFinite(opt)
    before = _state_arrays(opt)
    with pytest.raises(ValueError, match=r"'layers.0.weight' has shape \(3, 3\)"):
        guard.update(model, {"layers": [{"weight": mx.zeros((3, 3))}]})
    assert not opt._initialized
    after = _state_arrays(opt)
    assert [p for p, _ in after] == [p for p, _ in before]  # no slot was created
    assert guard.state["skipped"].item() == 0


def test_skip_non_finite_checks_groups_against_the_parameters_not_the_gradients():
    params = {"a": mx.ones((3,)), "b": mx.ones((3,))}
    plain = mlx_optim.SGD(0.1, groups=[{"params": "b", "learning_rate": 0.01}])
    guarded = mlx_optim.SGD(0.1, groups=[{"params": "b", "learning_rate": 0.01}])
    expected = plain.apply_gradients({"a": mx.ones((3,))}, params)
    got = SkipNonFinite(guarded).apply_gradients({"a": mx.ones((3,))}, params)  # was: ValueError
    assert got["a"].tolist() == expected["a"].tolist() == pytest.approx([0.9] * 3)
    got = SkipNonFinite(guarded).apply_gradients({"b": mx.ones((3,))}, params)
    assert got["b"].tolist() == pytest.approx([0.99] * 3)  # the group's rate
    with pytest.raises(ValueError, match=r"groups \[0\] select no parameter"):
        SkipNonFinite(mlx_optim.SGD(0.1, groups=[{"params": "typo"}])).apply_gradients(
            {"a": mx.ones((3,))}, params)


def test_clip_grad_norm_coefficient_rounds_as_torch():
    # torch's `max_norm / (norm + 1e-6)` is `reciprocal(norm + 1e-6) * max_norm`: two
    # roundings, which true division misses by an ulp for some max_norm (norm 5 exactly).
    arrays = [np.array([3.0, 4.0], np.float32), np.array([0.0], np.float32)]
    for max_norm in np.linspace(0.1, 4.9, 40).tolist():
        clipped, total = clip_grad_norm({"a": mx.array(arrays[0]), "b": mx.array(arrays[1])}, max_norm)
        expected, expected_total = _torch_clip(arrays, torch.nn.utils.clip_grad_norm_, max_norm)
        assert total.item() == expected_total.item() == 5.0
        np.testing.assert_array_equal(np.array(clipped["a"]), expected[0], err_msg=str(max_norm))
