"""Updates spread over CPU streams (``set_cpu_streams``): the same results bit for bit, a
balanced plan that the step uses, and small steps left on one stream."""

import os
import re

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

import mlx_optim
from mlx_optim import RowSparseGrad, _base
from mlx_optim.parity.cases import config_id, config_params
from mlx_optim.parity.harness import flatten_slots, run_ours


def _record_plans(monkeypatch) -> list:
    """The stream plans of every optimizer's steps from now on (traces, when compiled)."""
    plans, plan = [], _base.Optimizer._streams_for
    monkeypatch.setattr(_base.Optimizer, "_streams_for",
                        lambda self, pairs: plans.append(plan(self, pairs)) or plans[-1])
    return plans


def _distinct(plan) -> int:
    return len({str(stream) for stream in plan})


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("pair", config_params(), ids=config_id)
def test_spread_updates_equal_one_stream_bit_for_bit(pair, compiled, monkeypatch):
    case, config = pair
    monkeypatch.setattr(_base, "ELEMENTS_PER_STREAM", 1)  # every step spreads, however small
    mlx_optim.set_cpu_streams(1)
    params, opt = run_ours(case, config, "float32", steps=5, compiled=compiled)
    plans = _record_plans(monkeypatch)
    mlx_optim.set_cpu_streams(3)
    spread_params, spread_opt = run_ours(case, config, "float32", steps=5, compiled=compiled)
    dense = case.grad_kind == "dense" or compiled  # compiled row-sparse cases pass masks
    assert plans and all(_distinct(plan) == (3 if dense else 1) for plan in plans)
    for (path, a), (_, b) in zip(tree_flatten(spread_params), tree_flatten(params), strict=True):
        assert mx.array_equal(a, b).item(), path
    slots, spread_slots = (flatten_slots(o.state["param_state"]) for o in (opt, spread_opt))
    for (path, slot), (_, spread_slot) in zip(slots, spread_slots, strict=True):
        assert set(spread_slot) == set(slot)
        for key in slot:
            assert mx.array_equal(spread_slot[key], slot[key], equal_nan=True).item(), (path, key)


def test_each_update_runs_on_the_stream_its_plan_gives(monkeypatch):
    monkeypatch.setattr(_base, "ELEMENTS_PER_STREAM", 1)
    mlx_optim.set_cpu_streams(2)
    params = {"w": mx.ones((4, 3)), "b": mx.ones((3,)), "v": mx.ones((5, 2))}
    grads = {k: 0.1 * v for k, v in params.items()}
    opt = mlx_optim.Adam(0.1)
    opt.init(params)
    plans, used = _record_plans(monkeypatch), []
    apply_one = opt._apply_one

    def spy(*args):
        used.append(mx.default_stream(mx.default_device()))
        return apply_one(*args)

    opt._apply_one = spy
    opt.apply_gradients(grads, params)
    assert _distinct(plans[-1]) == 2 and used == plans[-1]


def _plan(opt, sizes, sparse=()):
    pairs = []
    for i, n in enumerate(sizes):
        param = mx.zeros((n,))  # lazy: nothing is allocated
        grad = RowSparseGrad(mx.array([0]), mx.zeros((1,)), n) if i in sparse else param
        pairs.append((grad, param))
    return opt._streams_for(pairs)


def test_the_plan_puts_the_largest_first_on_the_least_loaded_stream(monkeypatch):
    monkeypatch.setattr(_base, "ELEMENTS_PER_STREAM", 1)
    mlx_optim.set_cpu_streams(2)
    plan = _plan(mlx_optim.SGD(0.1), [3, 5, 1, 4, 3])
    current = mx.default_stream(mx.default_device())
    # 5 -> first (5, 0); 4 -> second (5, 4); the first 3 -> second (5, 7); the other 3 ->
    # first (8, 7); 1 -> second (8, 8)
    assert [s == current for s in plan] == [False, True, False, False, True]
    load = {}
    for stream, n in zip(plan, [3, 5, 1, 4, 3]):
        load[str(stream)] = load.get(str(stream), 0) + n
    assert sorted(load.values()) == [8, 8]


def test_a_stream_is_added_per_elements_per_stream_of_dense_update():
    opt = mlx_optim.SGD(0.1)
    mlx_optim.set_cpu_streams(4)
    per = _base.ELEMENTS_PER_STREAM
    assert _distinct(_plan(opt, [per, per - 1])) == 1  # below two streams' worth: one stream
    assert _distinct(_plan(opt, [per, per])) == 2
    assert _distinct(_plan(opt, [per] * 3 + [1])) == 3
    assert _distinct(_plan(opt, [per] * 6)) == 4  # at most set_cpu_streams' count
    # A row-sparse update is not counted: a large embedding does not spread small dense ones.
    assert _distinct(_plan(mlx_optim.SparseAdam(0.1), [2 * per, 1, 1], sparse={0})) == 1
    mlx_optim.set_cpu_streams(1)
    assert _distinct(_plan(opt, [per] * 6)) == 1


def test_row_sparse_updates_stay_on_the_current_stream(monkeypatch):
    monkeypatch.setattr(_base, "ELEMENTS_PER_STREAM", 1)
    mlx_optim.set_cpu_streams(2)
    plan = _plan(mlx_optim.SparseAdam(0.1), [6, 5, 4], sparse={0})
    current = mx.default_stream(mx.default_device())
    assert plan[0] == current and plan[1] != plan[2]


def test_set_cpu_streams_refuses_what_is_not_a_positive_integer():
    default = mlx_optim.get_cpu_streams()
    assert default == min(_base._usable_cpus(), 4)
    for bad in (0, -2, 1.5, True, "2", None):
        message = f"set_cpu_streams: count must be a positive integer, got {bad!r}"
        with pytest.raises(ValueError, match=re.escape(message)):
            mlx_optim.set_cpu_streams(bad)
    assert mlx_optim.get_cpu_streams() == default
    mlx_optim.set_cpu_streams(3)
    assert mlx_optim.get_cpu_streams() == 3


def test_usable_cpus_is_the_affinity_mask_where_there_is_one(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    assert _base._usable_cpus() == 3
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS, Windows
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert _base._usable_cpus() == 1


def test_wrapped_optimizers_follow_the_process_wide_count(monkeypatch):
    """MasterWeights, SkipNonFinite and muon_with_adamw's optimizers step on the streams
    set_cpu_streams gives, as a bare optimizer does: there is no per-optimizer switch to miss."""
    monkeypatch.setattr(_base, "ELEMENTS_PER_STREAM", 1)
    plans = _record_plans(monkeypatch)
    params = {"w": mx.ones((4, 3)), "b": mx.ones((3,)), "v": mx.ones((5, 2))}
    grads = {k: 0.1 * v for k, v in params.items()}
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    model_grads = {"layers": [{"weight": 0.1 * mx.ones(layer.weight.shape),
                               "bias": 0.1 * mx.ones(layer.bias.shape)} for layer in model.layers]}
    for count in (1, 2):
        mlx_optim.set_cpu_streams(count)
        plans.clear()
        wrapped = mlx_optim.MasterWeights(mlx_optim.SkipNonFinite(mlx_optim.Adam(0.1)))
        wrapped.init(params)
        wrapped.apply_gradients(grads, params)
        mlx_optim.muon_with_adamw(model).update(model, model_grads)
        assert len(plans) == 3  # Adam, then Muon's and AdamW's
        assert all(_distinct(plan) == count for plan in plans), plans
