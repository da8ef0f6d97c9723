"""Bad hyperparameters raise ValueError naming the argument; bad gradient trees change nothing."""

import re

import mlx.core as mx
import numpy as np
import pytest

import mlx_optim
from mlx_optim.parity.cases import CASES, ours_kwargs

ERRORS = [(case, error) for case in CASES for error in case.errors]


@pytest.mark.parametrize("pair", ERRORS, ids=[f"{c.name}-{e.kwargs}" for c, e in ERRORS])
def test_bad_hyperparameter_raises(pair):
    case, error = pair
    with pytest.raises(ValueError, match=error.match) as info:
        opt = case.ours(**ours_kwargs(error.kwargs))
        if error.params:  # an error about parameters, raised before any state exists
            params = _tree({path: mx.ones(shape) for path, shape in error.params})
            try:
                opt.init(params)
            finally:
                assert opt.state["param_state"] == {}
    # The message names the offending argument (or parameter), not only torch's wording:
    # each argument without which the construction succeeds, or else the parameter.
    offenders = [name for name in ours_kwargs(error.kwargs)
                 if _constructs(case, {k: v for k, v in ours_kwargs(error.kwargs).items() if k != name})]
    offenders = offenders or [path for path, shape in error.params
                              if not _inits(case.ours(**ours_kwargs(error.kwargs)), path, shape)]
    assert offenders
    for name in offenders:
        assert re.search(rf"\b{re.escape(name)}\b", str(info.value)), (name, str(info.value))


def _constructs(case, kwargs) -> bool:
    try:
        case.ours(**kwargs)
    except ValueError:
        return False
    return True


def _inits(opt, path, shape) -> bool:
    try:
        opt.init(_tree({path: mx.ones(shape)}))
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_group_hyperparameter_raises(case):
    # torch words it "Invalid learning rate: -1" or "Learning rate should be >= 0 but is: -1".
    with pytest.raises(ValueError, match="(Invalid learning rate|Learning rate should be >= 0 but is): -1"):
        case.ours(groups=[{"params": "*.bias", "learning_rate": -1}])


def test_group_errors():
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        mlx_optim.SGD(groups=[{"params": "*.bias", "betas": (0.9, 0.99)}])
    with pytest.raises(ValueError, match="needs a 'params' selector"):
        mlx_optim.SGD(groups=[{"learning_rate": 0.1}])
    opt = mlx_optim.SGD(groups=[{"params": "*.bias"}, {"params": "layer.*"}])
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.init({"layer": {"bias": mx.zeros(2)}})
    opt = mlx_optim.SGD(groups=[{"params": "*.bais", "weight_decay": 0.0}])
    with pytest.raises(ValueError, match=r"groups \[0\] select no parameter"):
        opt.init({"layer": {"bias": mx.zeros(2)}})


def test_group_selection_is_checked_against_the_parameters_before_anything_changes():
    params = {"layer": {"weight": mx.ones((2, 2)), "bias": mx.zeros(2)}}
    opt = mlx_optim.SGD(groups=[{"params": "*.bais", "weight_decay": 0.0}])
    with pytest.raises(ValueError, match=r"groups \[0\] select no parameter"):
        opt.apply_gradients({"layer": {"weight": mx.ones((2, 2))}}, params)
    assert opt.state["param_state"] == {} and opt.state["step"].item() == 0
    # A first step on some parameters only is fine when the group selects one of the others.
    opt = mlx_optim.SGD(groups=[{"params": "*.bias", "weight_decay": 0.0}])
    opt.apply_gradients({"layer": {"weight": mx.ones((2, 2))}}, params)
    assert opt.state["param_state"]["layer"]["weight"]["step"].item() == 1


@pytest.mark.parametrize("make, name", [
    (lambda: mlx_optim.Adam(eps=None), "eps"),
    (lambda: mlx_optim.Adam(learning_rate=None), "learning_rate"),
    (lambda: mlx_optim.Adam(betas=(0.9, None)), r"betas\[1\]"),
    (lambda: mlx_optim.SGD(momentum=None), "momentum"),
    (lambda: mlx_optim.ASGD(t0=None), "t0"),
    (lambda: mlx_optim.Adafactor(eps=(None, None)), r"eps\[1\]"),
    (lambda: mlx_optim.RMSprop(groups=[{"params": "*", "alpha": None}]), "alpha"),
])
def test_none_for_a_number_raises_at_construction(make, name):
    # None passes for a flag unless refused, and would fail inside the first step instead.
    with pytest.raises(TypeError, match=f"^{name} must be a number"):
        make()
    mlx_optim.Adafactor(eps=(None, 1e-3))  # None where the default is None stays allowed


def test_schedules_cannot_be_swapped_after_the_first_step():
    # A compiled step traced the schedules it met: a later swap would silently not happen.
    decay = mlx_optim.StepLR(0.1, step_size=2)
    opt = mlx_optim.Adam(learning_rate=0.1, betas=(0.9, 0.999))
    opt.learning_rate = decay  # before the first step: fine
    params = {"w": mx.ones(2)}
    step = mx.compile(lambda p: opt.apply_gradients({"w": mx.ones(2)}, p),
                      inputs=[opt.state], outputs=[opt.state])
    params = step(params)
    for swap in (lambda: setattr(opt, "learning_rate", 0.05),
                 lambda: setattr(opt, "learning_rate", mlx_optim.StepLR(0.2, step_size=2)),
                 lambda: setattr(opt, "betas", (decay, 0.999))):
        with pytest.raises(ValueError, match="a schedule is traced into a compiled step"):
            swap()
    assert opt._group_values[0]["learning_rate"] is decay and opt.betas[0].item() == 0.9
    opt.betas = (0.8, 0.99)  # numbers stay changeable
    params = step(params)
    assert opt.betas[0].item() == pytest.approx(0.8)
    assert opt.learning_rate.item() == pytest.approx(0.1)  # decay(1)


def test_flags_cannot_change_after_the_first_step():
    # A compiled step traced the flags and Python values it met: a later change would not
    # reach it.
    opt = mlx_optim.Rprop(learning_rate=0.1)
    opt.maximize = True  # before the first step: fine
    params = opt.apply_gradients({"w": mx.ones(2)}, {"w": mx.ones(2)})
    with pytest.raises(ValueError, match="maximize fixes the computation"):
        opt.maximize = False
    muon = mlx_optim.Muon(learning_rate=0.02)
    muon.apply_gradients({"w": mx.ones((2, 2))}, {"w": mx.ones((2, 2))})
    with pytest.raises(ValueError, match="ns_steps fixes the computation"):
        muon.ns_steps = 3
    muon.ns_steps = 5  # the same value is no change
    assert opt.maximize is True and muon.ns_steps == 5


def test_structural_zero_cannot_be_turned_on_later():
    opt = mlx_optim.SGD(learning_rate=0.1)
    with pytest.raises(ValueError, match="momentum was 0 when this optimizer was built"):
        opt.param_groups[0]["momentum"] = 0.9
    opt = mlx_optim.Adam()
    with pytest.raises(ValueError, match="weight_decay was 0"):
        opt.param_groups[0]["weight_decay"] = 0.1
    opt = mlx_optim.SGD(learning_rate=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="Invalid momentum value: -1"):
        opt.param_groups[0]["momentum"] = -1
    assert opt.momentum.item() == pytest.approx(0.9)  # unchanged by the refused value


def _tree(flat: dict) -> dict:
    from mlx.utils import tree_unflatten

    return tree_unflatten(list(flat.items()))


def _snapshot(tree):
    from mlx.utils import tree_flatten

    return [(k, np.array(v)) for k, v in tree_flatten(tree)]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("bad", ["unknown key", "wrong shape", "not an array", "integer gradient"])
def test_malformed_gradients_change_nothing(case, bad):
    if "test_malformed_gradients_change_nothing" in case.test_skips:
        pytest.skip(case.test_skips["test_malformed_gradients_change_nothing"])
    params = {"w": mx.ones((3, 2)), "b": mx.ones((2,))}
    opt = case.ours()
    good = {"w": mx.full((3, 2), 0.5), "b": mx.full((2,), 0.5)}
    params = opt.apply_gradients(good, params)  # state exists and has moved once
    mx.eval(params, opt.state)
    before_params, before_state = _snapshot(params), _snapshot(opt.state)
    grads = {"w": mx.full((3, 2), 0.5), "b": mx.full((2,), 0.5)}
    if bad == "unknown key":
        grads["extra"] = mx.ones((2,))
        message = "unknown parameter 'extra'"
    elif bad == "wrong shape":
        grads["b"] = mx.ones((3,))
        message = r"gradient for 'b' has shape \(3,\)"
    elif bad == "not an array":
        grads["b"] = 2.0
        message = "gradient for .b. must be an mx.array, got float"
    else:
        grads["b"] = mx.ones((2,), dtype=mx.int32)
        message = "gradient for 'b' has dtype mlx.core.int32; gradients must be real floating"
    with pytest.raises(ValueError, match=message):
        opt.apply_gradients(grads, params)
    after_state = _snapshot(opt.state)
    assert [k for k, _ in after_state] == [k for k, _ in before_state]
    for (k, a), (_, b) in zip(after_state, before_state):
        np.testing.assert_array_equal(a, b, err_msg=k)
    for (k, a), (_, b) in zip(_snapshot(params), before_params):
        np.testing.assert_array_equal(a, b, err_msg=k)


def test_a_parameter_in_two_groups_is_refused_before_any_state_exists():
    params = {"a": mx.ones(2), "b": mx.ones(2), "c": mx.ones(2)}
    opt = mlx_optim.SGD(momentum=0.9, groups=[{"params": lambda path, p: p.ndim == 1},
                                              {"params": "c"}])
    for call in (lambda: opt.init(params), lambda: opt.apply_gradients(params, params)):
        with pytest.raises(ValueError, match="'c' is selected by groups"):
            call()
        assert opt.state["param_state"] == {} and opt.state["step_classes"] == []


def test_groups_may_overlap_on_parameters_that_are_never_updated():
    # opt.update(model, grads) passes the whole model, frozen arrays included: the groups'
    # check asks the selectors about them, but only updated parameters must be in one group.
    import mlx.nn as nn

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    model.layers[0].freeze()
    opt = mlx_optim.AdamW(learning_rate=1e-3, groups=[
        {"params": "*.bias", "weight_decay": 0.0},
        {"params": ["layers.0.*", "layers.1.weight"], "learning_rate": 1e-4}])
    _, grads = nn.value_and_grad(model, lambda x: model(x).sum())(mx.ones((2, 4)))
    opt.update(model, grads)
    assert opt.state["param_state"]["layers"][1]["bias"]["step"].item() == 1


def _assert_same(before, after):
    assert [k for k, _ in after] == [k for k, _ in before]
    for (k, a), (_, b) in zip(after, before):
        np.testing.assert_array_equal(a, b, err_msg=k)


@pytest.mark.parametrize("dtype", [mx.int32, mx.complex64, mx.bool_])
def test_non_floating_parameters_are_refused_before_anything_changes(dtype):
    # torch cannot optimize integer tensors; a silent float32 update would truncate them.
    # init passes them over (a quantized model's frozen weights); a gradient for one raises.
    params = {"w": mx.ones((3,)), "table": mx.ones((2,), dtype=dtype)}
    opt = mlx_optim.Adam(learning_rate=0.1)
    opt.init(params)
    assert list(opt.state["param_state"]) == ["w"]
    before = _snapshot(opt.state)
    grads = {"w": mx.ones((3,)), "table": mx.ones((2,), dtype=dtype)}
    with pytest.raises(ValueError, match=f"parameter 'table' has dtype {dtype}; .* freeze it"):
        opt.apply_gradients(grads, params)
    _assert_same(before, _snapshot(opt.state))


def test_flags_take_0_and_1_as_torch_does_and_refuse_other_values():
    grads, params = {"w": mx.array([0.5, -1.0])}, {"w": mx.array([1.0, 2.0])}
    for flag, kwargs in (("amsgrad", {}), ("maximize", {}), ("nesterov", {"momentum": 0.9})):
        cls = mlx_optim.SGD if flag == "nesterov" else mlx_optim.Adam
        for given, meant in ((1, True), (0, False), (np.bool_(True), True)):
            ours = cls(learning_rate=0.1, **kwargs, **{flag: given})
            assert getattr(ours, flag) is meant
            reference = cls(learning_rate=0.1, **kwargs, **{flag: meant})
            np.testing.assert_array_equal(ours.apply_gradients(grads, params)["w"],
                                          reference.apply_gradients(grads, params)["w"])
        with pytest.raises(TypeError, match=f"{flag} is a flag: it must be True or False, got 2"):
            cls(learning_rate=0.1, **kwargs, **{flag: 2})
    opt = mlx_optim.Adam(learning_rate=0.1, amsgrad=0)
    opt.apply_gradients(grads, params)
    opt.amsgrad = 0  # unchanged: accepted
    with pytest.raises(ValueError, match="amsgrad fixes the computation"):
        opt.amsgrad = 1
    with pytest.raises(TypeError, match="amsgrad is a flag"):
        opt.amsgrad = "yes"
    assert opt.amsgrad is False


def test_tuple_hyperparameters_have_their_length():
    with pytest.raises(ValueError, match=r"betas must hold 2 values, got 3: \(0.9, 0.999, 0.5\)"):
        mlx_optim.Adam(betas=(0.9, 0.999, 0.5))
    with pytest.raises(ValueError, match="etas must hold 2 values, got 1"):
        mlx_optim.Rprop(etas=(0.5,))
    opt = mlx_optim.NAdam()
    with pytest.raises(ValueError, match="betas must hold 2 values, got 3"):
        opt.betas = (0.9, 0.99, 0.5)
    assert opt.betas[0].item() == pytest.approx(0.9) and len(opt.betas) == 2


def _failing_schedule():
    """A learning-rate schedule that raises once ``failing["on"]`` is set."""
    failing = {"on": False}

    def lr(step):
        if failing["on"]:
            raise RuntimeError("no rate")
        return 0.1

    return lr, failing


def test_a_failed_first_step_leaves_no_state_shape_behind():
    # A first step that raises after making the state: nothing of it may remain, or a
    # checkpoint of other shapes loaded next would pass the state-fits check.
    lr, failing = _failing_schedule()
    opt = mlx_optim.Adam(learning_rate=lr)
    failing["on"] = True
    with pytest.raises(RuntimeError, match="no rate"):
        opt.apply_gradients({"w": mx.ones((3,))}, {"w": mx.ones((3,))})
    assert opt.state["param_state"] == {} and opt._slot_params == {}
    failing["on"] = False
    other = mlx_optim.Adam(learning_rate=lr)
    other.init({"w": mx.ones((1,))})
    opt.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match=r"parameter 'w' has shape \(3,\), but its optimizer state"):
        opt.apply_gradients({"w": mx.ones((3,))}, {"w": mx.ones((3,))})


def test_skip_non_finite_step_that_raises_changes_nothing():
    lr, failing = _failing_schedule()
    opt = mlx_optim.Adam(learning_rate=lr)
    guard = mlx_optim.SkipNonFinite(opt)
    failing["on"] = True
    with pytest.raises(RuntimeError, match="no rate"):
        guard.apply_gradients({"w": mx.ones((3,))}, {"w": mx.ones((3,))})
    assert opt.state["param_state"] == {} and opt.state["step_classes"] == []


def test_a_step_that_raises_part_way_changes_nothing():
    # A schedule that raises at step 3, after the gradient checks and with state created.
    def lr(step):
        if step.item() == 2:
            raise RuntimeError("schedule out of range")
        return 0.1 / (1 + step)

    def make():
        return mlx_optim.Adam(learning_rate=lr, groups=[{"params": "b", "betas": (0.8, 0.9)}])

    params = {"w": mx.array([1.0, 2.0]), "b": mx.array([0.5])}
    grads = {"w": mx.array([0.3, -0.2]), "b": mx.array([0.1])}
    opt = make()
    params = opt.apply_gradients(grads, params)
    params = {**params, **opt.apply_gradients({"w": grads["w"]}, params)}  # splits the step sets
    mx.eval(params, opt.state)
    before, classes = _snapshot(opt.state), dict(opt._class_of)
    with pytest.raises(RuntimeError, match="schedule out of range"):
        opt.apply_gradients(grads, params)
    _assert_same(before, _snapshot(opt.state))
    assert opt._class_of == classes
    # ... and the optimizer goes on as one that never saw the failed call.
    def lr_ok(step):
        return 0.1 / (1 + step)
    reference = mlx_optim.Adam(learning_rate=lr_ok, groups=[{"params": "b", "betas": (0.8, 0.9)}])
    ref_params = {"w": mx.array([1.0, 2.0]), "b": mx.array([0.5])}
    ref_params = reference.apply_gradients(grads, ref_params)
    ref_params = {**ref_params, **reference.apply_gradients({"w": grads["w"]}, ref_params)}
    opt._state["step"] = opt._state["step"] + 1  # the schedule raised at step 2 only
    reference._state["step"] = reference._state["step"] + 1
    for _ in range(2):
        params = opt.apply_gradients(grads, params)
        ref_params = reference.apply_gradients(grads, ref_params)
    _assert_same(_snapshot(reference.state), _snapshot(opt.state))
    _assert_same(_snapshot(ref_params), _snapshot(params))


def test_state_that_does_not_fit_a_parameter_is_refused_before_anything_changes():
    import mlx.nn as nn

    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    opt = mlx_optim.AdamW(learning_rate=0.1)
    loss_grad = nn.value_and_grad(model, lambda x: model(x).sum())
    opt.update(model, loss_grad(mx.ones((2, 4)))[1])
    mx.eval(model.parameters(), opt.state)
    model.layers[1] = nn.Linear(3, 5)  # a new head, as when fine-tuning
    before = _snapshot(opt.state)
    message = r"parameter 'layers.1.weight' has shape \(5, 3\), but its optimizer state"
    with pytest.raises(ValueError, match=message):
        opt.update(model, loss_grad(mx.ones((2, 4)))[1])
    with pytest.raises(ValueError, match=message):
        opt.init(model.trainable_parameters())
    _assert_same(before, _snapshot(opt.state))
    # Loaded state is checked against the parameters at the first step too.
    fresh = mlx_optim.AdamW(learning_rate=0.1)
    fresh.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match=message):
        fresh.update(model, loss_grad(mx.ones((2, 4)))[1])


def test_numpy_numbers_are_hyperparameters_and_complex_ones_are_refused():
    grads, params = {"w": mx.array([0.5, -1.0])}, {"w": mx.array([1.0, 2.0])}
    ours = mlx_optim.SGD(learning_rate=np.float32(0.25), momentum=np.float64(0.5))
    reference = mlx_optim.SGD(learning_rate=float(np.float32(0.25)), momentum=0.5)
    np.testing.assert_array_equal(ours.apply_gradients(grads, params)["w"],
                                  reference.apply_gradients(grads, params)["w"])
    # They are held as the Python numbers they are, so a checkpoint saves them.
    assert type(ours.param_groups[0]["momentum"].item()) is float
    ours.load_state_dict(ours.state_dict())
    adam = mlx_optim.Adam(learning_rate=np.float32(1e-3), betas=[np.float64(0.8), 0.9])
    adam.load_state_dict(adam.state_dict())
    assert adam.betas[0].item() == pytest.approx(0.8)
    with pytest.raises(TypeError, match="learning_rate must be a real number, got an mx.array of"):
        mlx_optim.SGD(learning_rate=mx.array(1 + 1j))


def test_a_constant_learning_rate_reads_back():
    opt = mlx_optim.Adam(learning_rate=0.01, constants=("learning_rate",))
    assert opt.learning_rate == 0.01 == opt.param_groups[0]["learning_rate"]
