"""Updates spread over CPU streams (``set_cpu_streams``): the same results bit for bit, a
balanced plan, and small steps left on one stream."""

import os

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

import mlx_optim
from mlx_optim import RowSparseGrad, _base
from mlx_optim.parity.cases import config_id, config_params
from mlx_optim.parity.harness import flatten_slots, run_ours


@pytest.fixture(autouse=True)
def _restore_cpu_streams():
    default = mlx_optim.get_cpu_streams()
    yield
    mlx_optim.set_cpu_streams(default)


def _spread_run(case, config, streams, compiled, dtype="float32"):
    """run_ours on ``streams`` CPU streams; also the stream plans the steps used."""
    plans = []
    mlx_optim.set_cpu_streams(streams)

    def setup(i, opt):
        if i == 0:
            plan = opt._streams_for

            def spy(pairs):
                plans.append(plan(pairs))
                return plans[-1]

            opt._streams_for = spy

    params, opt = run_ours(case, config, dtype, steps=5, compiled=compiled, on_step=setup)
    return params, opt, plans


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("pair", config_params(), ids=config_id)
def test_spread_updates_equal_one_stream_bit_for_bit(pair, compiled, monkeypatch):
    case, config = pair
    monkeypatch.setattr(_base, "ELEMENTS_PER_STREAM", 1)  # every step spreads, however small
    params, opt, _ = _spread_run(case, config, 1, compiled)
    spread_params, spread_opt, plans = _spread_run(case, config, 3, compiled)
    dense = case.grad_kind == "dense" or compiled  # compiled row-sparse cases pass masks
    assert plans and all(len({id(s) for s in plan}) == (3 if dense else 1) for plan in plans)
    for (path, a), (_, b) in zip(tree_flatten(spread_params), tree_flatten(params)):
        assert mx.array_equal(a, b).item(), path
    slots, spread_slots = (flatten_slots(o.state["param_state"]) for o in (opt, spread_opt))
    for (path, slot), (_, spread_slot) in zip(slots, spread_slots):
        assert set(spread_slot) == set(slot)
        for key in slot:
            assert mx.array_equal(spread_slot[key], slot[key], equal_nan=True).item(), (path, key)


def _plan(opt, sizes, sparse=()):
    pairs = []
    for i, n in enumerate(sizes):
        param = mx.zeros((n,))
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


def test_a_stream_is_added_per_elements_per_stream_of_update():
    opt = mlx_optim.SGD(0.1)
    mlx_optim.set_cpu_streams(4)
    per = _base.ELEMENTS_PER_STREAM
    distinct = lambda sizes: len({str(s) for s in _plan(opt, sizes)})  # noqa: E731
    assert distinct([per, per - 1]) == 1  # below two streams' worth: one stream
    assert distinct([per, per]) == 2
    assert distinct([per] * 3 + [1]) == 3
    assert distinct([per] * 6) == 4  # at most set_cpu_streams' count
    mlx_optim.set_cpu_streams(1)
    assert distinct([per] * 6) == 1


def test_row_sparse_updates_stay_on_the_current_stream(monkeypatch):
    monkeypatch.setattr(_base, "ELEMENTS_PER_STREAM", 1)
    mlx_optim.set_cpu_streams(2)
    plan = _plan(mlx_optim.SparseAdam(0.1), [6, 5, 4], sparse={0})
    current = mx.default_stream(mx.default_device())
    assert plan[0] == current and plan[1] != plan[2]


def test_set_cpu_streams_refuses_what_is_not_a_positive_integer():
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert mlx_optim.get_cpu_streams() == min(usable, 4)
    for bad in (0, -2, 1.5, True, "2", None):
        with pytest.raises(ValueError,
                           match=f"set_cpu_streams: count must be a positive integer, got {bad!r}"):
            mlx_optim.set_cpu_streams(bad)
    assert mlx_optim.get_cpu_streams() == min(usable, 4)
    mlx_optim.set_cpu_streams(3)
    assert mlx_optim.get_cpu_streams() == 3


def test_wrapped_optimizers_follow_the_process_wide_count(monkeypatch):
    """MasterWeights, SkipNonFinite and muon_with_adamw's optimizers step on the streams
    set_cpu_streams gives, as a bare optimizer does: there is no per-optimizer switch to miss."""
    monkeypatch.setattr(_base, "ELEMENTS_PER_STREAM", 1)
    params = {"w": mx.ones((4, 3)), "b": mx.ones((3,)), "v": mx.ones((5, 2))}
    grads = {k: 0.1 * v for k, v in params.items()}
    for count, distinct in ((1, 1), (2, 2)):
        mlx_optim.set_cpu_streams(count)
        inner = mlx_optim.Adam(0.1)
        plans = []
        plan = inner._streams_for
        inner._streams_for = lambda pairs: plans.append(plan(pairs)) or plans[-1]
        wrapped = mlx_optim.MasterWeights(mlx_optim.SkipNonFinite(inner))
        wrapped.init(params)
        wrapped.apply_gradients(grads, params)
        assert plans and len({str(s) for s in plans[-1]}) == distinct
