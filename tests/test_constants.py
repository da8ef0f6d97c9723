"""``constants=``: hyperparameters compiled into the step change its speed, never its values."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_optim
from mlx_optim.parity.cases import config_id, config_params
from mlx_optim.parity.harness import Problem, flatten_slots, run_ours

PAIRS = [pair for pair in config_params() if pair[1].desc not in pair[0].skips]


def _arrays(params, opt):
    """Every parameter and state array, by name."""
    out = {f"param {path}": np.array(a) for path, a in tree_flatten(params)}
    for path, slot in flatten_slots(opt.state["param_state"]):
        out.update({f"{path}.{key}": np.array(value) for key, value in slot.items()})
    return out


def _assert_identical(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("pair", PAIRS, ids=[config_id(p) for p in PAIRS])
def test_every_hyperparameter_as_a_constant_gives_identical_steps(pair, dtype):
    # Every configuration of the parity table with all its numeric hyperparameters
    # constants: the compiled closed loop is bitwise the one with arrays (which equals
    # torch's, test_parity), parameters and every state array.
    case, config = pair
    params, opt = run_ours(case, config, dtype, steps=8, compiled=True, constants=True)
    assert opt._constants, "the configuration has no numeric hyperparameter"
    expected = run_ours(case, config, dtype, steps=8, compiled=True)
    _assert_identical(_arrays(params, opt), _arrays(*expected))


def _loop(opt, steps=5, compiled=True, problem=None, params=None):
    problem = problem or Problem(((4, 3), (3,)))
    params = params if params is not None else problem.mlx_params(mx.float32)
    opt.init(params)
    traces = []

    def step(params):
        traces.append(1)
        return opt.apply_gradients(problem.mlx_grads(params), params)

    if compiled:
        state = [opt.state]
        step = mx.compile(step, inputs=state, outputs=state)
    for _ in range(steps):
        params = step(params)
        mx.eval(params, opt.state)
    return params, len(traces)


def test_groups_override_constants_and_arrays_still_change():
    groups = [{"params": "blocks.*", "eps": 1e-6, "betas": (0.8, 0.99), "weight_decay": 0.0}]
    problem = Problem(((4, 3), (3,), (2, 2)))

    def run(opt):
        params = problem.mlx_params(mx.float32)
        opt.init(params)
        state = [opt.state]
        traces = []

        def step(params):
            traces.append(1)
            return opt.apply_gradients(problem.mlx_grads(params), params)

        step = mx.compile(step, inputs=state, outputs=state)
        for i in range(6):
            if i == 3:  # learning rate and weight decay stay arrays: changing them works
                opt.learning_rate = 3e-3
                opt.param_groups[0]["weight_decay"] = 0.1
            params = step(params)
            mx.eval(params, opt.state)
        return _arrays(params, opt), opt, len(traces)

    with_constants, opt, traces = run(mlx_optim.AdamW(1e-2, groups=groups, constants=("betas", "eps")))
    with_arrays, _, _ = run(mlx_optim.AdamW(1e-2, groups=groups))
    assert traces == 1
    _assert_identical(with_constants, with_arrays)
    assert opt.param_groups[1]["betas"] == (0.8, 0.99) and opt.betas == (0.9, 0.999)
    assert "betas" not in opt.state and "eps" not in opt.state["param_groups"][0]


@pytest.mark.parametrize("kwargs, message", [
    (dict(constants=("nesterov",)), "constants: nesterov is a flag"),
    (dict(constants=("lr",)), "constants: SGD has no hyperparameter 'lr'"),
    (dict(constants=("momentum",), momentum=lambda step: 0.9), "momentum is a schedule in the default"),
    (dict(constants="dampening", groups=[{"params": "*", "dampening": lambda s: 0.1}]),
     r"dampening is a schedule in groups\[0\]"),
    (dict(constants=("momentum",), momentum=-0.5), "Invalid momentum value: -0.5"),
])
def test_constant_errors(kwargs, message):
    kwargs = {"learning_rate": 0.1, "momentum": 0.9, **kwargs}
    with pytest.raises(ValueError, match=message):
        mlx_optim.SGD(**kwargs)


def test_assigning_a_constant_raises_and_changes_nothing():
    opt = mlx_optim.SGD(0.1, momentum=mx.array(0.9), constants=("momentum",))
    params, _ = _loop(opt, steps=2)
    before = {k: np.array(v) for k, v in _arrays(params, opt).items()}
    for assign in (lambda: setattr(opt, "momentum", 0.5),
                   lambda: opt.param_groups[0].__setitem__("momentum", 0.5)):
        with pytest.raises(ValueError, match="momentum is one of this optimizer's constants"):
            assign()
    assert opt.momentum == mx.array(0.9).item() and isinstance(opt.momentum, float)
    _assert_identical(_arrays(params, opt), before)


def test_attribute_assignment_changes_an_array_hyperparameter():
    # opt.momentum = ... is validated and reaches a compiled step, as param_groups does.
    problem = Problem(((4, 3), (3,)))

    def run(change):
        opt = mlx_optim.SGD(0.1, momentum=0.9)
        params = problem.mlx_params(mx.float32)
        opt.init(params)
        state = [opt.state]
        step = mx.compile(lambda p: opt.apply_gradients(problem.mlx_grads(p), p),
                          inputs=state, outputs=state)
        for i in range(4):
            if i == 2:
                change(opt)
            params = step(params)
            mx.eval(params, opt.state)
        return _arrays(params, opt), opt

    by_attribute, opt = run(lambda o: setattr(o, "momentum", 0.5))
    by_group, _ = run(lambda o: o.param_groups[0].__setitem__("momentum", 0.5))
    unchanged, _ = run(lambda o: None)
    assert opt.momentum.item() == 0.5
    _assert_identical(by_attribute, by_group)
    assert not np.array_equal(by_attribute["param layer.weight"], unchanged["param layer.weight"])
    with pytest.raises(ValueError, match="Invalid momentum value: -1"):
        opt.momentum = -1
    assert opt.momentum.item() == 0.5


def test_checkpoints_load_across_constants_and_arrays(tmp_path):
    problem = Problem(((4, 3), (3,)))

    def build(**kwargs):
        return mlx_optim.Adam(1e-2, **{"betas": (0.8, 0.99), **kwargs})

    reference = build()
    expected, _ = _loop(reference, steps=6, compiled=False, problem=problem)
    for saved_kwargs, loaded_kwargs in [(dict(constants=("betas", "eps")), {}),
                                        ({}, dict(constants=("betas", "eps")))]:
        first = build(**saved_kwargs)
        params, _ = _loop(first, steps=3, compiled=False, problem=problem)
        first.save(tmp_path / "opt.safetensors")
        second = build(**loaded_kwargs)
        second.init(params)
        second.load(tmp_path / "opt.safetensors")
        resumed, _ = _loop(second, steps=3, compiled=False, problem=problem, params=params)
        for a, b in zip(resumed, expected):
            np.testing.assert_array_equal(np.array(a), np.array(b))
    # A constant with another value than the checkpoint's: refused, nothing changes.
    other = build(betas=(0.85, 0.99), constants=("betas",))
    params, _ = _loop(other, steps=1, compiled=False, problem=problem)
    before = _arrays(params, other)
    with pytest.raises(ValueError, match=r"betas is \[0.8, 0.99\] in the checkpoint"):
        other.load(tmp_path / "opt.safetensors")
    _assert_identical(_arrays(params, other), before)
    assert other.betas == (0.85, 0.99)
