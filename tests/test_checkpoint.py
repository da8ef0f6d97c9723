"""Checkpoints: resume == uninterrupted (bitwise, in a new process), and bad files change nothing."""

import json
import subprocess
import sys
import textwrap

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

import mlx_optim
from mlx_optim.checkpoint import read
from mlx_optim.parity.cases import BY_NAME, config_params, ours_kwargs
from mlx_optim.parity.harness import Problem, continue_ours

N, M = 5, 4  # steps before the checkpoint, steps after it




def leaves(tree, prefix=""):
    """(path, leaf) of a state tree, including empty containers, so structure is compared too."""
    if isinstance(tree, dict):
        out = [(prefix + "{}", None)] if not tree else []
        for k, v in tree.items():
            out += leaves(v, f"{prefix}.{k}")
        return out
    if isinstance(tree, (list, tuple)):
        out = [(prefix + "[]", None)] if not tree else []
        for i, v in enumerate(tree):
            out += leaves(v, f"{prefix}[{i}]")
        return out
    return [(prefix, tree)]


def assert_bitwise(actual, expected, what):
    a, e = leaves(actual), leaves(expected)
    assert [p for p, _ in a] == [p for p, _ in e], f"{what}: structure differs"
    for (path, x), (_, y) in zip(a, e):
        if isinstance(y, mx.array):
            assert isinstance(x, mx.array) and x.dtype == y.dtype, f"{what}{path}: dtype"
            assert np.array_equal(np.array(x), np.array(y), equal_nan=True), f"{what}{path} differs"
        else:
            assert x == y, f"{what}{path}: {x!r} != {y!r}"


def snapshot(opt):
    """Everything a load could change, copied out (arrays as numpy)."""
    sd = opt.state_dict()
    arrays = [(p, np.array(v) if isinstance(v, mx.array) else v) for p, v in leaves(sd["state"])]
    return arrays, {k: v for k, v in sd.items() if k != "state"}, id(opt.state)


def assert_unchanged(opt, before):
    arrays, meta, ident = snapshot(opt)
    assert ident == before[2]
    assert meta == before[1]
    assert [p for p, _ in arrays] == [p for p, _ in before[0]]
    for (path, x), (_, y) in zip(arrays, before[0]):
        assert np.array_equal(x, y, equal_nan=True) if isinstance(y, np.ndarray) else x == y, path


# ------------------------------------------------------------------ resume == uninterrupted
RESUME_SCRIPT = textwrap.dedent("""
    import json, sys
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_optim.parity.cases import BY_NAME, ours_kwargs
    from mlx_optim.parity.harness import Problem, continue_ours

    for job in json.load(open(sys.argv[1])):
        case = BY_NAME[job["case"]]
        config = next(c for c in case.configs if c.desc == job["config"])
        problem = Problem(case.shapes)
        params = tree_unflatten(list(mx.load(job["params"]).items()))
        opt = case.ours(**ours_kwargs(config.kwargs))
        opt.init(params)
        opt.load(job["checkpoint"])
        params = continue_ours(case, opt, params, problem, job["start"], job["stop"])
        mx.save_safetensors(job["params_out"], dict(tree_flatten(params)))
        opt.save(job["checkpoint_out"])
""")


def test_resume_in_a_new_process_is_bitwise(tmp_path):
    """Every configuration of the table: N steps, save, load in a new process, M steps ==
    N + M steps uninterrupted, parameters and every state array bit for bit (float32)."""
    jobs, expected = [], {}
    for index, (case, config) in enumerate(config_params()):
        problem = Problem(case.shapes)
        params = problem.mlx_params(mx.float32)
        opt = case.ours(**ours_kwargs(config.kwargs))
        opt.init(params)
        params = continue_ours(case, opt, params, problem, 0, N)
        job = {"case": case.name, "config": config.desc, "start": N, "stop": N + M}
        for name in ("params", "checkpoint", "params_out", "checkpoint_out"):
            job[name] = str(tmp_path / f"{index}-{name}.safetensors")
        mx.save_safetensors(job["params"], dict(tree_flatten(params)))
        opt.save(job["checkpoint"])
        params = continue_ours(case, opt, params, problem, N, N + M)
        expected[index] = (params, opt.state_dict())
        jobs.append(job)
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    script = RESUME_SCRIPT
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "jobs.json")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for index, job in enumerate(jobs):
        params, sd = expected[index]
        what = f"{job['case']} ({job['config']})"
        resumed = tree_unflatten(list(mx.load(job["params_out"]).items()))
        assert_bitwise(resumed, params, f"{what} params")
        resumed_sd = read(job["checkpoint_out"])
        assert_bitwise(resumed_sd["state"], sd["state"], f"{what} state")
        assert {k: v for k, v in resumed_sd.items() if k != "state"} == \
               {k: v for k, v in sd.items() if k != "state"}, what


def test_state_dict_is_json_apart_from_arrays():
    case = BY_NAME["Adam"]
    opt = case.ours(learning_rate=0.01, amsgrad=True)
    problem = Problem(case.shapes)
    params = continue_ours(case, opt, problem.mlx_params(mx.float32), problem, 0, 2)
    sd = opt.state_dict()
    meta = {k: v for k, v in sd.items() if k != "state"}
    assert json.loads(json.dumps(meta)) == meta
    assert sd["optimizer"] == "Adam" and sd["version"] == 1
    assert sd["groups"][0]["betas"] == [0.9, 0.999] and sd["groups"][0]["amsgrad"] is True
    # A snapshot: later steps do not change it.
    before = np.array(sd["state"]["param_state"]["layer"]["weight"]["exp_avg"])
    continue_ours(case, opt, params, problem, 2, 3)
    assert np.array_equal(np.array(sd["state"]["param_state"]["layer"]["weight"]["exp_avg"]), before)


# ------------------------------------------------------------------------- bad checkpoints
def _trained(name="Adam", steps=3, **kwargs):
    case = BY_NAME[name]
    problem = Problem(case.shapes)
    opt = case.ours(**kwargs)
    params = problem.mlx_params(mx.float32)
    opt.init(params)
    return continue_ours(case, opt, params, problem, 0, steps), opt


def _drop_key(sd):
    del sd["state"]["param_state"]["blocks"][1]["kernel"]["exp_avg_sq"]


def _wrong_shape(sd):
    slot = sd["state"]["param_state"]["layer"]["weight"]
    slot["exp_avg"] = mx.zeros((3, 4))


def _wrong_dtype(sd):
    slot = sd["state"]["param_state"]["layer"]["weight"]
    slot["exp_avg"] = slot["exp_avg"].astype(mx.float16)


def _missing_parameter(sd):
    del sd["state"]["param_state"]["layer"]


def _missing_hyper(sd):
    del sd["state"]["eps"]


def _groups_not_dicts(sd):
    sd["groups"] = [1]


def _class_not_an_index(sd):
    sd["step_class_of"] = {path: 0.0 for path in sd["step_class_of"]}


def _group_value(name, value, group=0):
    """A damage: the checkpoint's group value of ``name`` replaced by ``value``."""
    def damage(sd):
        sd["groups"][group][name] = value
    damage.__name__ = f"{name}_{value!r}"
    return damage


def _state_learning_rate_negative(sd):
    # The groups still say 0.001; the array the step reads says -1.
    sd["state"]["learning_rate"] = mx.array(-1.0, dtype=sd["state"]["learning_rate"].dtype)


def _state_beta1_out_of_range(sd):
    betas = sd["state"]["betas"]
    sd["state"]["betas"] = [mx.array(1.5, dtype=betas[0].dtype), betas[1]]


BAD_DICTS = [
    (_groups_not_dicts, "groups, active terms or step_class_of are damaged"),
    # Values of the wrong type (they would pass for a flag: True ran as eps=1) or that the
    # constructor refuses, in the groups or in the arrays the step reads.
    (_group_value("eps", None), r"default group: eps is None in the checkpoint, not a number"),
    (_group_value("eps", "1e-8"), r"eps is '1e-8' in the checkpoint, not a number"),
    (_group_value("eps", True), r"eps is True in the checkpoint, not a number"),
    (_group_value("betas", [None, 0.999]), r"betas\[0\] is None in the checkpoint, not a number"),
    (_group_value("betas", [0.9, "0.999"]), r"betas\[1\] is '0.999' in the checkpoint, not a number"),
    (_group_value("betas", [1.5, 0.999]), r"default group: .*Invalid beta parameter at index 0: 1.5"),
    (_group_value("learning_rate", -1.0), r"Invalid learning rate: -1.0 \(learning_rate must be"),
    (_group_value("learning_rate", float("nan")), r"Invalid learning rate: nan"),
    (_group_value("amsgrad", "no"), r"amsgrad is a flag: it must be True or False, got 'no'"),
    (_state_learning_rate_negative, r"learning_rate is 0.001 in the checkpoint's groups but -1.0 "
                                    r"in its state: the checkpoint is damaged"),
    (_state_beta1_out_of_range, r"betas\[0\] is 0.9 in the checkpoint's groups but 1.5 in its state"),
    (_class_not_an_index, "step class 0.0 of parameter .* is out of range"),
    (_drop_key, r"state of parameter 'blocks.1.kernel'.*lacks key\(s\) \['exp_avg_sq'\]"),
    (_wrong_shape, r"state of parameter 'layer.weight'\['exp_avg'\].*shape \(3, 4\).*\(4, 3\)"),
    (_wrong_dtype, r"'layer.weight'\['exp_avg'\].*dtype mlx.core.float16.*float32"),
    (_missing_parameter, r"no state for parameter\(s\) \['layer.weight'\]"),
    (_missing_hyper, r"state: the checkpoint lacks key\(s\) \['eps'\]"),
]


@pytest.mark.parametrize("damage, match", BAD_DICTS, ids=[f.__name__ for f, _ in BAD_DICTS])
def test_bad_state_dict_raises_and_changes_nothing(damage, match, tmp_path):
    _, source = _trained(steps=4)
    sd = source.state_dict()
    damage(sd)
    _, opt = _trained(steps=2)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert_unchanged(opt, before)


def test_other_optimizers_checkpoint_raises_and_changes_nothing(tmp_path):
    _, sgd = _trained("SGD", momentum=0.9)
    sgd.save(tmp_path / "sgd.safetensors")
    _, opt = _trained("Adam")
    before = snapshot(opt)
    with pytest.raises(ValueError, match="state of a SGD optimizer, not of a Adam"):
        opt.load(tmp_path / "sgd.safetensors")
    assert_unchanged(opt, before)


@pytest.mark.parametrize("cut", [1, 200, -7])
def test_truncated_file_raises_and_changes_nothing(tmp_path, cut):
    _, source = _trained(steps=4)
    path = tmp_path / "opt.safetensors"
    source.save(path)
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut > 0 else data[:cut])
    _, opt = _trained(steps=2)
    before = snapshot(opt)
    with pytest.raises(ValueError, match="damaged or truncated"):
        opt.load(path)
    assert_unchanged(opt, before)


def test_flag_and_schedule_mismatches_raise_and_change_nothing(tmp_path):
    _, source = _trained(amsgrad=True)
    sd = source.state_dict()
    _, opt = _trained()
    before = snapshot(opt)
    with pytest.raises(ValueError, match="amsgrad is True in the checkpoint and False"):
        opt.load_state_dict(sd)
    assert_unchanged(opt, before)
    _, scheduled = _trained(learning_rate=mlx_optim.StepLR(1e-3, step_size=2))
    with pytest.raises(ValueError, match="learning_rate is a schedule in the checkpoint"):
        opt.load_state_dict(scheduled.state_dict())
    assert_unchanged(opt, before)
    _, decayed = _trained(weight_decay=0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        opt.load_state_dict(decayed.state_dict())
    assert_unchanged(opt, before)


def test_file_with_array_missing_is_damaged(tmp_path):
    _, source = _trained()
    path = tmp_path / "opt.safetensors"
    source.save(path)
    arrays, metadata = mx.load(str(path), return_metadata=True)
    del arrays["state.param_state.layer.weight.exp_avg"]
    mx.save_safetensors(str(path), arrays, metadata=metadata)
    _, opt = _trained()
    before = snapshot(opt)
    with pytest.raises(ValueError, match="damaged: array 'state.param_state.layer.weight.exp_avg' is missing"):
        opt.load(path)
    assert_unchanged(opt, before)


def _edit_metadata(path, edit):
    """Rewrite the checkpoint file at ``path`` with ``edit`` applied to its JSON metadata."""
    arrays, metadata = mx.load(str(path), return_metadata=True)
    meta = json.loads(metadata["mlx_optim"])
    edit(meta)
    mx.save_safetensors(str(path), arrays, metadata={"mlx_optim": json.dumps(meta)})


DAMAGED_NODES = [
    (lambda m: m["state"].update({"dict": [1, 2]}), "unexpected metadata node"),
    (lambda m: m["state"]["dict"].update({"step": {"list": 5}}), "unexpected metadata node"),
    (lambda m: m["state"]["dict"].update({"step": {"array": ["x"]}}), "unexpected metadata node"),
    (lambda m: m["state"]["dict"].update({"step": {"array": "state.step", "dtype": "int4"}}),
     "unknown stored dtype 'int4'"),
    (lambda m: m["state"]["dict"].update({"eps": {"value": [1e-8]}}), "unexpected metadata node"),
    (lambda m: m["groups"][0].update({"learning_rate": None}),
     "learning_rate is None in the checkpoint, not a number"),
]


@pytest.mark.parametrize("edit, match", DAMAGED_NODES, ids=[
    "dict_holds_a_list", "list_holds_a_number", "array_named_by_a_list", "unknown_dtype",
    "value_is_a_list", "null_learning_rate"])
def test_damaged_metadata_raises_value_error_and_changes_nothing(tmp_path, edit, match):
    _, source = _trained()
    path = tmp_path / "opt.safetensors"
    source.save(path)
    _edit_metadata(path, edit)
    _, opt = _trained(steps=2)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.load(path)
    assert_unchanged(opt, before)


# ------------------------------------------------------------------------ loading details
def test_init_after_load_does_not_reinitialise(tmp_path):
    case = BY_NAME["Adam"]
    problem = Problem(case.shapes)
    params, source = _trained(steps=4)
    source.save(tmp_path / "opt.safetensors")
    fresh = case.ours()  # no init: the checkpoint brings every slot
    fresh.load(tmp_path / "opt.safetensors")
    fresh.init(params)  # only fills missing slots: none
    assert_bitwise(fresh.state_dict()["state"], source.state_dict()["state"], "after init")
    assert_bitwise(continue_ours(case, fresh, params, problem, 4, 7),
                   continue_ours(case, source, params, problem, 4, 7), "continued params")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.0), nn.ReLU(), nn.Linear(8, 2))

    def __call__(self, x):
        return self.layers(x)


def _fit(model, opt, steps, seed=0):
    rng = np.random.default_rng(seed)
    x, y = mx.array(rng.standard_normal((8, 4)), mx.float32), mx.array(rng.standard_normal((8, 2)), mx.float32)
    loss_and_grad = nn.value_and_grad(model, lambda m: nn.losses.mse_loss(m(x), y))
    for _ in range(steps):
        _, grads = loss_and_grad(model)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)


def _make_adamw():
    return mlx_optim.AdamW(learning_rate=mlx_optim.StepLR(0.01, step_size=2, gamma=0.5),
                           groups=[{"params": "*.bias", "weight_decay": 0.0}])


def test_model_with_empty_subtrees_groups_and_schedule_round_trip(tmp_path):
    mx.random.seed(0)
    model = Net()
    assert model.trainable_parameters()["layers"]["layers"][1] == {}  # Dropout: no parameters
    opt = _make_adamw()
    _fit(model, opt, 3)
    opt.save(tmp_path / "opt.safetensors")
    saved_params = dict(tree_flatten(model.parameters()))
    _fit(model, opt, 3, seed=1)

    resumed_model = Net()
    resumed_model.update(tree_unflatten(list(saved_params.items())))
    resumed = _make_adamw()
    resumed.init(resumed_model.trainable_parameters())
    resumed.load(tmp_path / "opt.safetensors")
    _fit(resumed_model, resumed, 3, seed=1)
    assert_bitwise(resumed_model.parameters(), model.parameters(), "params")
    assert_bitwise(resumed.state_dict()["state"], opt.state_dict()["state"], "state")
    assert resumed.param_groups[0]["learning_rate"].item() == pytest.approx(0.01 * 0.5 ** 2)


def test_load_into_a_compiled_step_in_place(tmp_path):
    """A step compiled over opt.state sees loaded state: load fills the same dict."""
    case = BY_NAME["Adam"]
    problem = Problem(case.shapes)
    params, source = _trained(steps=3, learning_rate=0.05)
    source.save(tmp_path / "at3.safetensors")
    expected = continue_ours(case, source, params, problem, 3, 6)  # eager, from step 3

    opt = case.ours(learning_rate=0.05)
    start = problem.mlx_params(mx.float32)
    opt.init(start)
    state = [opt.state]
    step = mx.compile(lambda p: opt.apply_gradients(problem.mlx_grads(p), p), inputs=state, outputs=state)
    other = start
    for _ in range(5):  # a different history that the load must replace
        other = step(other)
        mx.eval(other, opt.state)
    held = opt.state
    opt.load(tmp_path / "at3.safetensors")
    assert opt.state is held
    resumed = params
    for _ in range(3):
        resumed = step(resumed)
        mx.eval(resumed, opt.state)
    for (path, a), (_, b) in zip(tree_flatten(resumed), tree_flatten(expected)):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-6, atol=1e-7, err_msg=path)
    assert opt.state["step"].item() == 6


def _partial_grads(params, only=None):
    """Gradients of every parameter of ``params`` (a flat dict), or of those in ``only``."""
    return {k: mx.sin(3 * v + 0.3) for k, v in params.items() if only is None or k in only}


def test_load_into_a_compiled_step_after_partial_steps(tmp_path):
    """Partial steps leave step sets numbered by history; a step compiled before a load
    reads each parameter's set by that number, so the load must keep it or retrace."""
    shapes = {"w": (4, 3), "b": (3,), "k": (2, 2), "m": (2,)}
    start = {k: mx.random.normal(s, key=mx.random.key(i)) for i, (k, s) in enumerate(shapes.items())}

    def partial_steps(opt, params):
        for only in (None, {"w", "k"}, {"m"}):  # sets: {w, k}, {b}, {m}, steps 2, 1, 2
            params = {**params, **opt.apply_gradients(_partial_grads(params, only), params)}
        return params

    saver = mlx_optim.Adam(learning_rate=0.01)
    params = partial_steps(saver, start)
    saver.save(tmp_path / "partial")
    expected = params
    for _ in range(2):
        expected = {**expected, **saver.apply_gradients(_partial_grads(expected), expected)}

    for history in (partial_steps, lambda opt, p: opt.init(p)):  # other numberings, same count
        opt = mlx_optim.Adam(learning_rate=0.01)
        history(opt, start)
        step = mx.compile(lambda p: opt.apply_gradients(_partial_grads(p), p),
                          inputs=[opt.state], outputs=[opt.state])
        mx.eval(step(start), opt.state)  # traced with this optimizer's own step sets
        opt.load(tmp_path / "partial")
        resumed = params
        for _ in range(2):
            resumed = step(resumed)
        mx.eval(resumed, opt.state)
        assert_bitwise(resumed, expected, "params")
        assert {k: opt.state["param_state"][k]["step"].item() for k in shapes} == {
            "w": 4, "b": 3, "k": 4, "m": 4}


def test_load_into_a_compiled_step_keeps_this_optimizers_parameter_order(tmp_path):
    """A checkpoint whose optimizer met the parameters in another order: a compiled step
    pairs state leaves by position, so the loaded state keeps this optimizer's order."""
    start = {"a": mx.array([1.0, 2.0]), "b": mx.array([0.5, -0.5])}
    saver = mlx_optim.Adam(learning_rate=0.1)
    saver.init({"b": start["b"], "a": start["a"]})
    params = start
    for _ in range(2):
        params = saver.apply_gradients(_partial_grads(params), params)
    saver.save(tmp_path / "b_first")
    expected = saver.apply_gradients(_partial_grads(params), params)

    opt = mlx_optim.Adam(learning_rate=0.1)
    opt.init(start)
    step = mx.compile(lambda p: opt.apply_gradients(_partial_grads(p), p),
                      inputs=[opt.state], outputs=[opt.state])
    mx.eval(step(start), opt.state)
    opt.load(tmp_path / "b_first")
    assert list(opt.state["param_state"]) == ["a", "b"]
    resumed = step(params)
    mx.eval(resumed, opt.state)
    assert_bitwise(resumed, expected, "params")
    for key in ("a", "b"):
        assert_bitwise(opt.state["param_state"][key], saver.state["param_state"][key], key)


def test_init_before_load_keeps_fresh_state_of_parameters_the_checkpoint_lacks(tmp_path):
    """The saving optimizer met only some parameters (partial gradients, lazy state): after
    init, the others' state here is fresh (step 0) and stays, also under a step compiled
    before the load; resuming equals not stopping. A parameter stepped here is refused."""
    start = {"a": mx.array([1.0, 2.0]), "b": mx.array([0.5, -0.5]), "c": mx.array([3.0])}
    saver = mlx_optim.ASGD(learning_rate=0.01, t0=0)  # 0-d state (eta, mu) per step set too
    params = start
    for _ in range(2):
        params = {**params, **saver.apply_gradients(_partial_grads(params, {"a"}), params)}
    saver.save(tmp_path / "only_a")
    expected = params
    for only in ({"a"}, None):  # then every parameter: b and c start in the saver only now
        expected = {**expected, **saver.apply_gradients(_partial_grads(expected, only), expected)}

    opt = mlx_optim.ASGD(learning_rate=0.01, t0=0)
    opt.init(start)
    step = mx.compile(lambda p: opt.apply_gradients(_partial_grads(p, {"a"}), p),
                      inputs=[opt.state], outputs=[opt.state])
    mx.eval(step(start), opt.state)  # traced with a stepped, b and c fresh
    opt.load(tmp_path / "only_a")
    assert list(opt.state["param_state"]) == ["a", "b", "c"]
    assert [opt.state["param_state"][k]["step"].item() for k in "abc"] == [2, 0, 0]
    resumed = {**params, **step(params)}
    resumed = {**resumed, **opt.apply_gradients(_partial_grads(resumed), resumed)}
    mx.eval(resumed, opt.state)
    assert_bitwise(resumed, expected, "params")
    assert_bitwise(opt.state["param_state"], saver.state["param_state"], "param_state")

    # A checkpoint written before any state, into an optimizer after init: nothing to lose.
    fresh = mlx_optim.ASGD(learning_rate=0.01, t0=0)
    fresh.init(start)
    before = fresh.state_dict()["state"]["param_state"]
    fresh.load_state_dict(mlx_optim.ASGD(learning_rate=0.01, t0=0).state_dict())
    assert_bitwise(fresh.state["param_state"], before, "fresh state")

    stepped = mlx_optim.ASGD(learning_rate=0.01, t0=0)
    stepped.apply_gradients(_partial_grads(start), start)
    snap = snapshot(stepped)
    with pytest.raises(ValueError, match=r"no state for parameter\(s\) \['b', 'c'\], which this "
                                         r"optimizer has stepped"):
        stepped.load(tmp_path / "only_a")
    assert_unchanged(stepped, snap)


def test_a_loaded_step_set_spanning_new_groups_splits_without_init(tmp_path):
    """Members of a step set share scalar state (ASGD's eta): a set loaded into an optimizer
    whose groups part it splits at the first step, init() before load or not."""
    start = {"w": mx.array([1.0, 2.0]), "b": mx.array([0.5, -0.5]), "x": mx.array([3.0])}
    saver = mlx_optim.ASGD(learning_rate=0.01, t0=0, groups=[{"params": "x", "learning_rate": 0.5}])
    params = start
    for _ in range(2):
        params = saver.apply_gradients(_partial_grads(params), params)
    saver.save(tmp_path / "asgd")

    results = []
    for init_first in (True, False):
        opt = mlx_optim.ASGD(learning_rate=0.01, t0=0,
                             groups=[{"params": ["b", "x"], "learning_rate": 0.5}])
        if init_first:
            opt.init(params)
        opt.load(tmp_path / "asgd")
        resumed = params
        for _ in range(3):
            resumed = opt.apply_gradients(_partial_grads(resumed), resumed)
        mx.eval(resumed, opt.state)
        assert opt.state["param_state"]["b"]["eta"].item() == pytest.approx(
            opt.state["param_state"]["x"]["eta"].item())  # group 0.5's, not w's
        assert opt.state["param_state"]["w"]["eta"].item() < 0.011
        results.append(resumed)
    assert_bitwise(results[1], results[0], "params")


def test_schedule_of_one_beta_survives_a_load(tmp_path):
    beta1 = mlx_optim.LinearLR(0.9, start_factor=0.5, total_iters=4)
    opt = mlx_optim.Adam(learning_rate=0.01, betas=(beta1, 0.999))
    params = {"w": mx.array([1.0, 2.0])}
    params = opt.apply_gradients({"w": mx.array([1.0, -1.0])}, params)
    opt.save(tmp_path / "beta1")

    resumed = mlx_optim.Adam(learning_rate=0.01, betas=(beta1, 0.9))
    resumed.load(tmp_path / "beta1")
    assert resumed.param_groups[0]["betas"][1].item() == 0.999
    resumed.learning_rate = 0.02  # the group still holds its schedule, so this validates
    for _ in range(3):
        params = resumed.apply_gradients({"w": mx.array([1.0, -1.0])}, params)
        assert resumed.betas[0].item() == pytest.approx(beta1(resumed.state["step"] - 1).item())

    plain = mlx_optim.Adam(learning_rate=0.01)
    before = snapshot(plain)
    with pytest.raises(ValueError, match=r"betas\[0\] is a schedule in the checkpoint"):
        plain.load(tmp_path / "beta1")
    assert_unchanged(plain, before)


def test_a_damaged_attached_scheduler_state_changes_nothing():
    def trained(steps, lr):
        opt = mlx_optim.Adam(learning_rate=lr)
        plateau = mlx_optim.ReduceLROnPlateau(opt, patience=0)
        params = {"w": mx.array([1.0, 2.0])}
        for _ in range(steps):
            params = opt.apply_gradients({"w": mx.array([0.5, -0.5])}, params)
            plateau.step(1.0)
        return opt, plateau

    source, _ = trained(5, 0.1)
    sd = source.state_dict()
    sd["attached"][0]["state"].update(mode="median", patience=99)
    opt, plateau = trained(2, 0.01)
    before, plateau_before = snapshot(opt), plateau.state_dict()
    with pytest.raises(ValueError, match="mode 'median' is unknown"):
        opt.load_state_dict(sd)
    assert_unchanged(opt, before)
    assert plateau.state_dict() == plateau_before


def test_float64_state_round_trips_through_a_file(tmp_path):
    case = BY_NAME["NAdam"]
    problem = Problem(case.shapes)
    opt = case.ours(learning_rate=0.01)
    params = problem.mlx_params(mx.float64)
    opt.init(params)
    params = continue_ours(case, opt, params, problem, 0, 3)
    opt.save(tmp_path / "opt.safetensors")
    resumed = case.ours(learning_rate=0.01)
    resumed.init(params)
    resumed.load(tmp_path / "opt.safetensors")
    assert_bitwise(resumed.state_dict()["state"], opt.state_dict()["state"], "state")
    assert resumed.state["param_state"]["layer"]["weight"]["exp_avg"].dtype == mx.float64


# ---------------------------------------------------------------------------------- LBFGS
def _lbfgs_problem():
    target = mx.array([1.0, -2.0, 0.5, 3.0])

    def fun(p):
        return mx.value_and_grad(lambda q: ((q["x"] - target) ** 2 * mx.arange(1, 5)).sum()
                                 + (q["x"] ** 4).sum() * 0.01)(p)
    return fun


LBFGS_RESUME_SCRIPT = textwrap.dedent("""
    import sys
    import mlx.core as mx
    import mlx_optim
    target = mx.array([1.0, -2.0, 0.5, 3.0])
    fun = lambda p: mx.value_and_grad(lambda q: ((q["x"] - target) ** 2 * mx.arange(1, 5)).sum()
                                      + (q["x"] ** 4).sum() * 0.01)(p)
    resumed = mlx_optim.LBFGS()
    resumed.load(sys.argv[1])
    assert resumed.history_size == 4 and resumed.learning_rate == 0.5
    params = {"x": mx.load(sys.argv[2])["x"]}
    for _ in range(2):
        params, _ = resumed.step_tree(params, fun)
    mx.save_safetensors(sys.argv[3], params)
    resumed.save(sys.argv[4])
""")


def test_lbfgs_resumes_bitwise_in_a_new_process(tmp_path):
    fun = _lbfgs_problem()
    opt = mlx_optim.LBFGS(learning_rate=0.5, max_iter=3, history_size=4)
    params = {"x": mx.zeros(4)}
    for _ in range(2):
        params, _ = opt.step_tree(params, fun)
    opt.save(tmp_path / "lbfgs.safetensors")
    mx.save_safetensors(str(tmp_path / "x.safetensors"), params)
    done = subprocess.run([sys.executable, "-c", LBFGS_RESUME_SCRIPT, str(tmp_path / "lbfgs.safetensors"),
                           str(tmp_path / "x.safetensors"), str(tmp_path / "x_out.safetensors"),
                           str(tmp_path / "lbfgs_out.safetensors")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for _ in range(2):  # the uninterrupted run
        params, _ = opt.step_tree(params, fun)
    resumed = mlx_optim.LBFGS()
    resumed.load(tmp_path / "lbfgs_out.safetensors")
    assert np.array_equal(np.array(mx.load(str(tmp_path / "x_out.safetensors"))["x"]), np.array(params["x"]))
    assert_bitwise(resumed.state_dict()["state"], opt.state_dict()["state"], "lbfgs state")
    assert resumed.state["n_iter"] == opt.state["n_iter"] > 0


def test_lbfgs_rejects_other_state_and_changes_nothing(tmp_path):
    _, adam = _trained()
    opt = mlx_optim.LBFGS(max_iter=2)
    opt.step_tree({"x": mx.zeros(4)}, _lbfgs_problem())
    before = snapshot(opt)
    with pytest.raises(ValueError, match="state of a Adam optimizer, not of a LBFGS"):
        opt.load_state_dict(adam.state_dict())
    sd = opt.state_dict()
    sd["state"]["d"] = mx.zeros(5)
    with pytest.raises(ValueError, match=r"LBFGS state vector is array of shape \(5,\)"):
        opt.load_state_dict(sd)
    assert_unchanged(opt, before)


# ---------------------------------------------------------------------- documentation
def test_path_without_suffix_saves_and_loads_the_same_file(tmp_path):
    params, source = _trained(steps=2)
    source.save(tmp_path / "opt")  # MLX writes opt.safetensors
    assert (tmp_path / "opt.safetensors").exists()
    resumed = BY_NAME["Adam"].ours()
    resumed.init(params)
    resumed.load(tmp_path / "opt")
    assert_bitwise(resumed.state_dict()["state"], source.state_dict()["state"], "state")


def test_reduce_on_plateau_is_saved_and_restored_with_the_optimizer(tmp_path):
    """ReduceLROnPlateau attached to an optimizer travels in its checkpoint; a checkpoint
    without it (or an optimizer without one) is refused and changes nothing."""
    def build():
        opt = mlx_optim.SGD(learning_rate=0.1, momentum=0.9)
        return opt, mlx_optim.ReduceLROnPlateau(opt, patience=1, factor=0.5)

    opt, plateau = build()
    params = {"w": mx.ones((3,))}
    for metric in (1.0, 1.0, 1.0, 1.0, 0.5):
        params = opt.apply_gradients({"w": mx.ones((3,))}, params)
        plateau.step(metric)
    assert opt.learning_rate.item() < 0.1  # it did reduce
    opt.save(tmp_path / "ckpt")

    resumed, resumed_plateau = build()
    resumed.init(params)
    resumed.load(tmp_path / "ckpt")
    assert resumed_plateau.state_dict() == plateau.state_dict()
    assert resumed.learning_rate.item() == opt.learning_rate.item()
    for metric in (0.7, 0.7, 0.7):  # both continue identically
        plateau.step(metric)
        resumed_plateau.step(metric)
    assert resumed.learning_rate.item() == opt.learning_rate.item()

    bare = mlx_optim.SGD(learning_rate=0.1, momentum=0.9)
    bare.init(params)
    before = bare.state_dict()
    with pytest.raises(ValueError, match="attached scheduler"):
        bare.load(tmp_path / "ckpt")
    after = bare.state_dict()
    assert after["groups"] == before["groups"] and after["attached"] == []


def test_a_gpu_checkpoint_resumed_on_the_cpu_saves_and_loads_again(tmp_path, monkeypatch):
    # On the GPU hyperparameters are float32 arrays; the CPU holds them in float64, made from
    # the checked values, so a checkpoint saved again on the CPU still agrees with itself.
    import mlx_optim._base as base

    params, grads = {"w": mx.ones((3,))}, {"w": mx.full((3,), 0.1)}
    monkeypatch.setattr(base, "scalar_dtype", lambda: mx.float32)  # as on the GPU
    gpu = mlx_optim.Adam(learning_rate=0.1)
    monkeypatch.undo()
    assert gpu.state["learning_rate"].dtype == mx.float32
    gpu.apply_gradients(grads, params)
    gpu.save(tmp_path / "gpu")
    cpu = mlx_optim.Adam(learning_rate=0.1)
    cpu.load(tmp_path / "gpu")
    assert cpu.state["learning_rate"].dtype == mx.float64
    assert cpu.state["learning_rate"].item() == 0.1  # the value, not its float32 rounding
    cpu.apply_gradients(grads, params)
    cpu.save(tmp_path / "cpu")
    again = mlx_optim.Adam(learning_rate=0.1)
    again.load(tmp_path / "cpu")
    assert again.state["step"].item() == 2


def test_fresh_state_kept_by_a_load_is_made_from_the_loaded_values():
    # The saving optimizer never met "b": it makes b's state at b's first step, from its own
    # initial_accumulator_value; an optimizer that ran init() with another value must too.
    params = {"a": mx.ones((3,)), "b": mx.ones((3,))}
    both = {"a": mx.full((3,), 0.1), "b": mx.full((3,), 0.2)}
    saving = mlx_optim.Adagrad(learning_rate=0.1, initial_accumulator_value=0.1)
    saving.apply_gradients({"a": both["a"]}, params)
    checkpoint = saving.state_dict()
    expected = saving.apply_gradients(both, params)
    resumed = mlx_optim.Adagrad(learning_rate=0.1, initial_accumulator_value=5.0)
    resumed.init(params)
    resumed.load_state_dict(checkpoint)
    got = resumed.apply_gradients(both, params)
    for key in params:
        np.testing.assert_array_equal(np.array(got[key]), np.array(expected[key]), err_msg=key)
