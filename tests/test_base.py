"""What the base class promises every optimizer: groups, dtypes, absent parameters, trees."""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

import mlx_optim
from mlx_optim.parity.cases import CASES, Config
from mlx_optim.parity.harness import Problem, assert_close, flatten_slots


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def __call__(self, x):
        return self.head(nn.relu(self.norm(self.backbone(x))))


def _data(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((16, 4)).astype(np.float32), rng.integers(0, 3, 16)


def test_adamw_two_groups_equal_torch():
    """No decay on biases and norms; a smaller learning rate on the backbone."""
    mx.random.seed(0)
    model = Net()
    x, y = _data()
    groups = [
        {"params": ["*.bias", "norm.*"], "weight_decay": 0.0},
        {"params": "backbone.weight", "learning_rate": 1e-3},
    ]
    opt = mlx_optim.AdamW(learning_rate=1e-2, weight_decay=0.1, groups=groups)
    loss_and_grad = nn.value_and_grad(model, lambda m: nn.losses.cross_entropy(m(mx.array(x)), mx.array(y), reduction="mean"))

    tmodel = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    names = {"0": "backbone", "1": "norm", "3": "head"}
    with torch.no_grad():
        for tname, tparam in tmodel.named_parameters():
            layer, kind = tname.split(".")
            tparam.copy_(torch.tensor(np.array(dict(tree_flatten(model.parameters()))[f"{names[layer]}.{kind}"])))
    tparams = dict(tmodel.named_parameters())
    no_decay = [tparams[n] for n in ("0.bias", "1.weight", "1.bias", "3.bias")]
    topt = torch.optim.AdamW([
        {"params": no_decay, "weight_decay": 0.0},
        {"params": [tparams["0.weight"]], "lr": 1e-3},
        {"params": [tparams["3.weight"]]},
    ], lr=1e-2, weight_decay=0.1)
    for _ in range(15):
        _, grads = loss_and_grad(model)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        topt.zero_grad()
        torch.nn.functional.cross_entropy(tmodel(torch.tensor(x)), torch.tensor(y)).backward()
        topt.step()
    ours = dict(tree_flatten(model.parameters()))
    for tname, tparam in tmodel.named_parameters():
        layer, kind = tname.split(".")
        path = f"{names[layer]}.{kind}"
        assert_close(ours[path], tparam.detach().numpy(), 1e-5, tname)
        theirs = topt.state[tparam]
        slot = dict(tree_flatten(opt.state["param_state"]))
        assert slot[f"{path}.step"].item() == theirs["step"].item() == 15
        for key in ("exp_avg", "exp_avg_sq"):
            assert_close(slot[f"{path}.{key}"], theirs[key].numpy(), 1e-5, f"{tname} {key}")
    assert opt.param_groups[1]["weight_decay"].item() == 0.0
    assert opt.param_groups[2]["learning_rate"].item() == pytest.approx(1e-3)


def test_group_predicate_and_per_group_schedule():
    opt = mlx_optim.SGD(learning_rate=0.1, groups=[
        {"params": lambda path, p: p.ndim == 1, "learning_rate": lambda step: 0.01 * (step + 1)}])
    params = {"w": mx.ones((2, 2)), "b": mx.ones((2,))}
    grads = {"w": mx.ones((2, 2)), "b": mx.ones((2,))}
    for _ in range(3):
        params = opt.apply_gradients(grads, params)
    # w: 1 - 3 * 0.1; b: 1 - (0.01 + 0.02 + 0.03)
    np.testing.assert_allclose(np.array(params["w"]), 0.7, rtol=1e-6)
    np.testing.assert_allclose(np.array(params["b"]), 0.94, rtol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32, mx.float64], ids=str)
def test_parameters_keep_their_dtype(case, dtype):
    # lr 0.1 and weights near 0.01: a step that bfloat16 can represent.
    params = {"w": mx.full((3, 2), 0.01, dtype=dtype)}
    opt = case.ours(learning_rate=0.1)
    for _ in range(3):
        params = opt.apply_gradients({"w": mx.full((3, 2), 0.25, dtype=dtype)}, params)
    mx.eval(params)
    assert params["w"].dtype == dtype
    assert np.isfinite(np.array(params["w"].astype(mx.float32))).all()
    assert not np.array_equal(np.array(params["w"].astype(mx.float32)), np.array(mx.full((3, 2), 0.01, dtype=dtype).astype(mx.float32))), "no step taken"
    for key, value in opt.state["param_state"]["w"].items():
        if key != "step" and value.ndim:
            assert value.dtype == dtype, key


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_absent_parameter_is_untouched(case):
    if "test_absent_parameter_is_untouched" in case.test_skips:
        pytest.skip(case.test_skips["test_absent_parameter_is_untouched"])
    params = {"a": mx.ones((2, 2)), "b": mx.ones((3,))}
    opt = case.ours()
    opt.init(params)
    for _ in range(3):
        new = opt.apply_gradients({"a": mx.full((2, 2), 0.5)}, params)
        params = {**params, **new}
    mx.eval(params, opt.state)
    np.testing.assert_array_equal(np.array(params["b"]), np.ones(3))
    assert opt.state["param_state"]["b"]["step"].item() == 0
    assert opt.state["param_state"]["a"]["step"].item() == 3
    assert opt.state["step"].item() == 3
    # Its first real step is a first step: as a fresh optimizer's on it alone.
    grads = {"b": mx.full((3,), 0.5)}
    stepped = opt.apply_gradients(grads, params)["b"]
    fresh = case.ours()
    np.testing.assert_array_equal(np.array(stepped), np.array(fresh.apply_gradients(grads, {"b": mx.ones((3,))})["b"]))
    assert opt.state["param_state"]["b"]["step"].item() == 1


def test_parameter_names_that_collide_with_hyperparameters():
    params = {"step": mx.ones((2,)), "learning_rate": mx.ones((2,)), "param_state": {"x": mx.ones((2,))}}
    opt = mlx_optim.Adam(learning_rate=0.1)
    grads = {k: v for k, v in params.items()}
    new = opt.apply_gradients(grads, params)
    mx.eval(new)
    assert opt.learning_rate.item() == pytest.approx(0.1)
    assert opt.state["step"].item() == 1
    for path, value in tree_flatten(new):
        np.testing.assert_allclose(np.array(value), 0.9, rtol=1e-5, err_msg=path)


def test_works_with_model_update_and_multioptimizer():
    mx.random.seed(1)
    model = Net()
    x, y = _data(1)
    loss_fn = lambda m: nn.losses.cross_entropy(m(mx.array(x)), mx.array(y), reduction="mean")
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    opt = mlx.optimizers.MultiOptimizer(
        [mlx_optim.SGD(learning_rate=0.1, momentum=0.9), mlx_optim.Adam(learning_rate=1e-2)],
        [lambda path, p: p.ndim == 2])
    first = loss_fn(model).item()
    for _ in range(30):
        _, grads = loss_and_grad(model)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
    assert loss_fn(model).item() < 0.7 * first


def test_asgd_averaged_parameters_load_into_a_model():
    model = nn.Linear(3, 2)
    opt = mlx_optim.ASGD(learning_rate=0.1, t0=0)
    x = mx.array(np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32))
    loss_and_grad = nn.value_and_grad(model, lambda m: mx.mean(m(x) ** 2))
    history = []
    for _ in range(5):
        _, grads = loss_and_grad(model)
        opt.update(model, grads)
        mx.eval(model.parameters())
        history.append(np.array(model.weight))
    model.update(opt.averaged_parameters())
    # With t0=0 torch's mu is 1 for the first two steps, then 1/(t-1): ax is the mean of
    # the iterates from the second on.
    np.testing.assert_allclose(np.array(model.weight), np.mean(history[1:], axis=0), rtol=1e-5)


def test_schedule_on_any_hyperparameter():
    opt = mlx_optim.SGD(learning_rate=0.1, momentum=lambda step: mx.where(step < 2, 0.5, 0.9))
    params = {"w": mx.zeros((1,))}
    for _ in range(3):
        params = opt.apply_gradients({"w": mx.ones((1,))}, params)
    # buf: 1, 0.5*1+1=1.5, 0.9*1.5+1=2.35; w = -0.1 * (1 + 1.5 + 2.35)
    np.testing.assert_allclose(np.array(params["w"]), [-0.485], rtol=1e-6)
    assert opt.momentum.item() == pytest.approx(0.9)


def test_maximize_ascends():
    opt = mlx_optim.Adam(learning_rate=0.1, maximize=True)
    params = opt.apply_gradients({"w": mx.ones((2,))}, {"w": mx.zeros((2,))})
    np.testing.assert_allclose(np.array(params["w"]), 0.1, rtol=1e-5)


def test_init_does_not_reset_existing_state():
    opt = mlx_optim.Adam()
    params = {"w": mx.ones((2,))}
    params = opt.apply_gradients({"w": mx.ones((2,))}, params)
    before = np.array(opt.state["param_state"]["w"]["exp_avg"])
    opt.init(params)
    np.testing.assert_array_equal(np.array(opt.state["param_state"]["w"]["exp_avg"]), before)
    assert opt.state["param_state"]["w"]["step"].item() == 1


def test_compiled_step_after_partial_update_keeps_per_parameter_steps():
    """Steps are shared while parameters are stepped together; a partial update splits
    them and a step compiled before the split retraces rather than running stale."""
    params = {"a": mx.ones((2,)), "b": mx.ones((2,))}
    grads = {"a": mx.full((2,), 0.5), "b": mx.full((2,), 0.5)}
    opt = mlx_optim.Adam(learning_rate=0.1)
    opt.init(params)
    state = [opt.state]
    full = mx.compile(lambda g, p: opt.apply_gradients(g, p), inputs=state, outputs=state)
    params = full(grads, params)
    params = {**params, **opt.apply_gradients({"a": grads["a"]}, params)}  # eager, "a" only
    params = full(grads, params)
    mx.eval(params, opt.state)
    steps = {k: opt.state["param_state"][k]["step"].item() for k in "ab"}
    assert steps == {"a": 3, "b": 2}

    # The same sequence stepped eagerly, one optimizer per parameter, gives the same values.
    for key, n in steps.items():
        alone = mlx_optim.Adam(learning_rate=0.1)
        p = {key: mx.ones((2,))}
        for _ in range(n):
            p = alone.apply_gradients({key: mx.full((2,), 0.5)}, p)
        np.testing.assert_allclose(np.array(params[key]), np.array(p[key]), rtol=1e-6)
        np.testing.assert_allclose(np.array(opt.state["param_state"][key]["exp_avg_sq"]),
                                   np.array(alone.state["param_state"][key]["exp_avg_sq"]), rtol=1e-6)


def test_loaded_state_is_regrouped_by_value():
    opt = mlx_optim.NAdam(learning_rate=0.1)
    params = {"a": mx.ones((2,)), "b": mx.ones((3,))}
    params = opt.apply_gradients({"a": mx.ones((2,))}, params)
    params = opt.apply_gradients({"a": mx.ones((2,)), "b": mx.ones((3,))}, {**params, "b": mx.ones((3,))})
    mx.eval(opt.state)
    fresh = mlx_optim.NAdam(learning_rate=0.1)
    from mlx.utils import tree_map

    fresh.state = tree_map(lambda x: x, opt.state)  # new containers, as a load gives
    new = fresh.apply_gradients({"a": mx.ones((2,)), "b": mx.ones((3,))}, params)
    ref = opt.apply_gradients({"a": mx.ones((2,)), "b": mx.ones((3,))}, params)
    for key in "ab":
        np.testing.assert_allclose(np.array(new[key]), np.array(ref[key]), rtol=1e-6)
        assert fresh.state["param_state"][key]["step"].item() == opt.state["param_state"][key]["step"].item()
    # a (3 steps) and b (2 steps) differ, so they no longer share a step array.
    assert fresh.state["param_state"]["a"]["step"] is not fresh.state["param_state"]["b"]["step"]


SCALAR_SHAPES = ((), (3,), (), ())  # several 0-d parameters in one step set, and a vector


SCALAR_RUNS = [(c, compiled) for c in CASES if c.grad_kind == "dense" and c.name != "Muon"
               for compiled in ((False, True) if c.name in ("SGD", "Adam") else (False,))]


@pytest.mark.parametrize("case, compiled", SCALAR_RUNS,
                         ids=[f"{c.name}-{'compiled' if k else 'eager'}" for c, k in SCALAR_RUNS])
def test_zero_dimensional_parameters_keep_their_own_state(case, compiled):
    # A 0-d parameter's state is 0-d too; it must not be shared like a set's scalars
    # (ASGD's eta), or every scalar parameter would follow the first one's moments.
    import dataclasses

    from mlx_optim.parity.harness import compare_with_torch, run_ours, run_torch

    case = dataclasses.replace(case, shapes=SCALAR_SHAPES)
    config = next(c for c in case.configs if c.desc == "default")
    params, opt = run_ours(case, config, "float32", steps=6, compiled=compiled)
    torch_params, torch_opt = run_torch(case, config, "float32", steps=6)
    compare_with_torch(params, opt, torch_params, torch_opt, 1e-5)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("name, kwargs", [
    ("SGD", {"momentum": 0.9, "dampening": 0.5}),
    ("SGD", {"momentum": 0.9, "weight_decay": 0.1}),
    ("RMSprop", {"momentum": 0.9, "centered": True}),
], ids=["SGD-dampening", "SGD-weight-decay", "RMSprop-centered"])
def test_momentum_set_to_zero_while_training_matches_torch(name, kwargs, compiled):
    # torch skips the momentum buffer while momentum is 0: it keeps its value, and the step
    # follows the gradient (undamped), until momentum returns.
    from mlx_optim.parity.harness import compare_with_torch

    case = next(c for c in CASES if c.name == name)
    problem = Problem(case.shapes)
    params = problem.mlx_params(mx.float32)
    opt = getattr(mlx_optim, name)(learning_rate=0.01, **kwargs)
    torch_params = problem.torch_params(torch.float32)
    torch_opt = case.torch_cls(torch_params, lr=0.01, **kwargs)
    step = lambda p: opt.apply_gradients(problem.mlx_grads(p), p)
    if compiled:
        opt.init(params)
        step = mx.compile(step, inputs=[opt.state], outputs=[opt.state])
    for i, momentum in enumerate([0.9, 0.9, 0.0, 0.0, 0.9, 0.9]):
        opt.momentum = momentum
        torch_opt.param_groups[0]["momentum"] = momentum
        params = step(params)
        mx.eval(params, opt.state)
        problem.set_torch_grads(torch_params)
        torch_opt.step()
    compare_with_torch(params, opt, torch_params, torch_opt, 1e-5)


def test_radam_with_zero_eps_stays_finite_before_rectification():
    # torch reads exp_avg_sq only once rectified (step 6 with the default betas); before,
    # a zero gradient with eps = 0 must not make the unused term 0 / 0.
    grad = np.array([0.5, 0.0, -1.0], np.float32)
    params = {"p": mx.array([1.0, 2.0, 3.0])}
    torch_param = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    opt = mlx_optim.RAdam(learning_rate=0.1, eps=0.0)
    torch_opt = torch.optim.RAdam([torch_param], lr=0.1, eps=0.0)
    for _ in range(4):
        params = opt.apply_gradients({"p": mx.array(grad)}, params)
        torch_param.grad = torch.tensor(grad)
        torch_opt.step()
        np.testing.assert_allclose(np.array(params["p"]), torch_param.detach().numpy(), rtol=1e-6)


@pytest.mark.parametrize("name", ["Rprop", "ASGD"])
def test_state_seeded_from_the_learning_rate_at_the_first_step(name):
    # torch seeds Rprop's step_size and ASGD's eta with the rate of the parameter's first
    # step: a rate changed after init, or scheduled, counts (parameter b starts late).
    case = next(c for c in CASES if c.name == name)
    schedule = mlx_optim.StepLR(0.1, step_size=1, gamma=0.5)
    params = {"a": mx.array([1.0, -2.0, 3.0]), "b": mx.array([1.0, -2.0, 3.0])}
    opt = case.ours(learning_rate=0.01)
    opt.init(params)
    opt.learning_rate = schedule  # before the first step: allowed
    torch_params = {k: torch.tensor(np.array(v), requires_grad=True) for k, v in params.items()}
    torch_opt = case.torch_cls(list(torch_params.values()), lr=0.1)
    torch_sched = torch.optim.lr_scheduler.StepLR(torch_opt, step_size=1, gamma=0.5)
    for step in range(4):
        names = ["a"] if step < 2 else ["a", "b"]
        grads = {k: mx.sin(params[k] * (step + 1)) for k in names}
        params = {**params, **opt.apply_gradients(grads, params)}
        for k, p in torch_params.items():
            p.grad = torch.tensor(np.array(grads[k])) if k in grads else None
        torch_opt.step()
        torch_sched.step()
    for k in params:
        np.testing.assert_allclose(np.array(params[k]), torch_params[k].detach().numpy(), rtol=1e-6)


def test_asgd_averaged_parameters_leave_out_parameters_never_stepped():
    params = {"w": mx.ones(2), "b": mx.full((2,), 3.0)}
    opt = mlx_optim.ASGD(learning_rate=0.1, t0=0)
    opt.init(params)
    assert tree_flatten(opt.averaged_parameters()) == []
    params = {**params, **opt.apply_gradients({"w": mx.ones(2)}, params)}
    assert [k for k, _ in tree_flatten(opt.averaged_parameters())] == ["w"]


def test_adagrad_accumulators_start_at_the_constructors_value_in_every_group():
    # torch ignores a group's own initial_accumulator_value (it fills every group's sum
    # with the constructor's).
    params = {"w": mx.array([1.0, 2.0]), "b": mx.array([0.5, -0.5])}
    opt = mlx_optim.Adagrad(learning_rate=0.1, initial_accumulator_value=0.2,
                            groups=[{"params": "b", "initial_accumulator_value": 0.5}])
    torch_params = [torch.tensor(np.array(params[k]), requires_grad=True) for k in ("w", "b")]
    torch_opt = torch.optim.Adagrad([{"params": torch_params[:1]},
                                     {"params": torch_params[1:], "initial_accumulator_value": 0.5}],
                                    lr=0.1, initial_accumulator_value=0.2)
    for _ in range(3):
        params = opt.apply_gradients({k: mx.ones(2) for k in params}, params)
        for p in torch_params:
            p.grad = torch.ones(2)
        torch_opt.step()
    for k, p in zip(("w", "b"), torch_params):
        np.testing.assert_allclose(np.array(params[k]), p.detach().numpy(), rtol=1e-6)
        np.testing.assert_allclose(np.array(opt.state["param_state"][k]["sum"]),
                                   torch_opt.state[p]["sum"].numpy(), rtol=1e-6)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("case", [c for c in CASES if c.grad_kind == "dense" and c.name != "Muon"],
                         ids=lambda c: c.name)
def test_update_with_a_model(case, compiled):
    # optimizer.update(model, grads), as mlx.optimizers is used, eager and inside mx.compile.
    mx.random.seed(0)
    model = Net()
    reference = Net()
    reference.update(model.parameters())
    x, y = _data()
    loss_fn = lambda m: nn.losses.cross_entropy(m(mx.array(x)), mx.array(y), reduction="mean")
    opt, ref_opt = case.ours(learning_rate=1e-2), case.ours(learning_rate=1e-2)
    opt.init(model.trainable_parameters())

    def step():
        _, grads = nn.value_and_grad(model, loss_fn)(model)
        opt.update(model, grads)

    if compiled:
        state = [model.state, opt.state]
        step = mx.compile(step, inputs=state, outputs=state)
    for _ in range(3):
        step()
        mx.eval(model.parameters(), opt.state)
        _, grads = nn.value_and_grad(reference, loss_fn)(reference)
        reference.update(ref_opt.apply_gradients(grads, reference.trainable_parameters()))
    for (path, a), (_, b) in zip(tree_flatten(model.parameters()), tree_flatten(reference.parameters())):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-7, err_msg=path)
    assert opt.state["step"].item() == 3


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_signature_is_torchs(case):
    # torch's hyperparameters and defaults (lr named learning_rate); torch's implementation
    # switches are not ported, groups and constants are ours.
    import inspect

    def defaults(fn, skip):
        return {("learning_rate" if n == "lr" else n): p.default
                for n, p in inspect.signature(fn).parameters.items()
                if n not in skip and p.kind is not p.VAR_KEYWORD}

    ours = defaults(case.ours.__init__, {"self", "groups", "constants"})
    theirs = defaults(case.torch_cls.__init__, {"self", "params", "foreach", "fused",
                                                "capturable", "differentiable"})
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert ours[name] == value, f"{name}: {ours[name]!r} vs torch's {value!r}"
    # What torch takes by position (up to its first switch we do not port), ours takes at
    # the same position: a ported call such as NAdam(params, 2e-3, ..., True) keeps working.
    def positional(fn):
        return [("learning_rate" if n == "lr" else n)
                for n, p in inspect.signature(fn).parameters.items()
                if n not in ("self", "params") and p.kind is p.POSITIONAL_OR_KEYWORD]

    torch_order = positional(case.torch_cls.__init__)
    ported = next((i for i, n in enumerate(torch_order) if n not in ours), len(torch_order))
    assert positional(case.ours.__init__) == torch_order[:ported]


@pytest.mark.parametrize("weight", [0.001, 0.1, 0.3, 0.5, 0.9, 1.0])
def test_lerp_is_torchs(weight):
    from mlx_optim._math import lerp

    rng = np.random.default_rng(0)
    start = rng.standard_normal(20000).astype(np.float32)
    end = (rng.standard_normal(20000) * 0.3).astype(np.float32)
    # float32 rounded once, as torch's fused multiply-add: equal to torch element for element.
    expected = torch.lerp(torch.tensor(start), torch.tensor(end), weight).numpy()
    ours = np.array(lerp(mx.array(start), mx.array(end), weight, single_rounding=True))
    np.testing.assert_array_equal(ours, expected)
    # bfloat16 / float16 in float32, rounded once to their dtype, as torch's opmath.
    for mx_dtype, torch_dtype in ((mx.bfloat16, torch.bfloat16), (mx.float16, torch.float16)):
        expected = torch.lerp(torch.tensor(start).to(torch_dtype), torch.tensor(end).to(torch_dtype),
                              weight).float().numpy()
        ours = np.array(lerp(mx.array(start).astype(mx_dtype), mx.array(end).astype(mx_dtype),
                             weight).astype(mx.float32))
        assert np.mean(ours != expected) < 5e-3, mx_dtype  # an f32 ulp may cross a rounding
    # A weight of 1 gives the end exactly (a decay of 0), with or without the float64 detour.
    if weight == 1.0:
        for single in (False, True):
            np.testing.assert_array_equal(
                np.array(lerp(mx.array(start), mx.array(end), weight, single_rounding=single)), end)
