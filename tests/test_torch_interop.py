"""torch.optim state dicts: torch trains N steps, ours continues from its state == torch continuing."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

import mlx_optim
from mlx_optim.parity.harness import continue_ours
from mlx_optim.checkpoint import load_torch_state_dict, to_torch_state_dict
from mlx_optim.parity.cases import BY_NAME, config_id, config_params, ours_kwargs
from mlx_optim.parity.harness import Problem, compare_with_torch

N, M = 6, 6


def _torch_steps(case, problem, params, opt, start, stop):
    for i in range(start, stop):
        problem.set_torch_grads(params)
        if case.grad_kind == "row-sparse":
            problem.torch_row_sparse(params, problem.touched_rows(i))
        opt.step()




def _mlx_like(problem, torch_params):
    arrays = [mx.array(p.detach().numpy()) for p in torch_params]
    return problem.tree(arrays)


@pytest.mark.parametrize("pair", config_params(), ids=config_id)
def test_ours_continues_from_torchs_state(pair):
    case, config = pair
    problem = Problem(case.shapes)
    torch_params = problem.torch_params(torch.float32)
    torch_opt = case.torch_cls(torch_params, **config.kwargs)
    _torch_steps(case, problem, torch_params, torch_opt, 0, N)

    params = _mlx_like(problem, torch_params)
    paths = [k for k, _ in tree_flatten(params)]
    opt = case.ours(**ours_kwargs(config.kwargs))
    load_torch_state_dict(opt, torch_opt.state_dict(), paths, params)
    if "step" in torch_opt.state[torch_params[0]]:  # torch's SGD keeps no step
        assert opt.state["param_state"]["layer"]["weight"]["step"].item() == N

    _torch_steps(case, problem, torch_params, torch_opt, N, N + M)
    params = continue_ours(case, opt, params, problem, N, N + M)
    compare_with_torch(params, opt, torch_params, torch_opt, case.tolerance["float32"])


@pytest.mark.parametrize("name", ["Adam", "RMSprop", "ASGD", "NAdam", "Adafactor"])
def test_torch_continues_from_our_state(name):
    case = BY_NAME[name]
    config = case.configs[0]
    problem = Problem(case.shapes)
    params = problem.mlx_params(mx.float32)
    opt = case.ours(**ours_kwargs(config.kwargs))
    opt.init(params)
    params = continue_ours(case, opt, params, problem, 0, N)

    torch_params = [torch.tensor(np.array(a), requires_grad=True) for _, a in tree_flatten(params)]
    torch_opt = case.torch_cls(torch_params, **config.kwargs)
    torch_opt.load_state_dict(to_torch_state_dict(opt, [k for k, _ in tree_flatten(params)]))
    _torch_steps(case, problem, torch_params, torch_opt, N, N + M)
    params = continue_ours(case, opt, params, problem, N, N + M)
    compare_with_torch(params, opt, torch_params, torch_opt, case.tolerance["float32"])


def test_torch_file_with_groups(tmp_path):
    """A torch.save file, two groups (lr renamed), flags checked."""
    case = BY_NAME["AdamW"]
    problem = Problem(case.shapes)
    torch_params = problem.torch_params(torch.float32)
    torch_opt = torch.optim.AdamW([{"params": torch_params[:1]},
                                   {"params": torch_params[1:], "lr": 0.05, "weight_decay": 0.0}],
                                  lr=0.01, weight_decay=0.1)
    _torch_steps(case, problem, torch_params, torch_opt, 0, N)
    torch.save(torch_opt.state_dict(), tmp_path / "opt.pt")

    params = _mlx_like(problem, torch_params)
    paths = [k for k, _ in tree_flatten(params)]
    opt = mlx_optim.AdamW(learning_rate=1.0, weight_decay=0.5,
                          groups=[{"params": "blocks.*", "weight_decay": 0.2}])
    load_torch_state_dict(opt, tmp_path / "opt.pt", paths, params)
    assert opt.param_groups[1]["learning_rate"].item() == pytest.approx(0.05)
    assert opt.param_groups[0]["weight_decay"].item() == pytest.approx(0.1)
    _torch_steps(case, problem, torch_params, torch_opt, N, N + M)
    params = continue_ours(case, opt, params, problem, N, N + M)
    compare_with_torch(params, opt, torch_params, torch_opt, 1e-5)

    amsgrad = mlx_optim.AdamW(amsgrad=True, groups=[{"params": "blocks.*", "weight_decay": 0.2}])
    with pytest.raises(ValueError, match="amsgrad"):
        load_torch_state_dict(amsgrad, tmp_path / "opt.pt", paths, params)
    with pytest.raises(ValueError, match="numbers 3 parameters, paths names 2"):
        load_torch_state_dict(opt, tmp_path / "opt.pt", paths[:2], params)


def test_a_torch_term_this_optimizer_lacks_raises_and_changes_nothing():
    # Built with weight_decay=0 (or momentum=0), the step has no such term: torch's
    # non-zero value would load and then never be applied.
    w = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    params = {"w": mx.array([1.0, -2.0, 3.0])}
    for ours, theirs, name in ((mlx_optim.Adam(), torch.optim.Adam([w], weight_decay=0.1), "weight_decay"),
                               (mlx_optim.SGD(), torch.optim.SGD([w], momentum=0.9), "momentum")):
        ours.init(params)
        with pytest.raises(ValueError, match=f"{name} is 0.1 in torch's group and 0|"
                                             f"{name} is 0.9 in torch's group and 0"):
            load_torch_state_dict(ours, theirs.state_dict(), ["w"], params)
        assert getattr(ours, name).item() == 0.0 and ours.state["step"].item() == 0


def test_a_torch_value_that_is_not_a_number_raises_and_changes_nothing():
    w, torch_opt = _torch_adam_state()
    params = {"w": mx.array(w.detach().numpy())}
    opt = mlx_optim.Adam(learning_rate=0.5)
    opt.init(params)
    for name, value, match in (("lr", torch.tensor([0.1, 0.2]), r"learning_rate is \[0.1"),
                               ("eps", None, "eps is None"), ("lr", -1.0, "Invalid learning rate")):
        sd = torch_opt.state_dict()
        sd["param_groups"][0][name] = value
        with pytest.raises(ValueError, match=match):
            load_torch_state_dict(opt, sd, ["w"], params)
        assert opt.learning_rate.item() == 0.5 and opt.state["param_state"]["w"]["step"].item() == 0


def test_export_leaves_out_parameters_never_stepped():
    # torch has no state for a parameter it never stepped; SGD's first step then copies the
    # gradient into the buffer (undamped), which a zero buffer from us would not.
    kwargs = dict(momentum=0.9, dampening=0.5)
    params = {"a": mx.array([1.0, -2.0, 3.0]), "b": mx.array([0.5, 0.25, -1.0])}
    opt = mlx_optim.SGD(learning_rate=0.1, **kwargs)
    opt.init(params)
    params = {**params, **opt.apply_gradients({"a": mx.ones(3)}, params)}
    exported = to_torch_state_dict(opt, ["a", "b"])
    assert set(exported["state"]) == {0}
    torch_params = [torch.tensor(np.array(params[k]), requires_grad=True) for k in ("a", "b")]
    torch_opt = torch.optim.SGD(torch_params, lr=0.1, **kwargs)
    torch_opt.load_state_dict(exported)
    for _ in range(2):
        grads = {"a": mx.array([0.3, -0.2, 0.1]), "b": mx.array([1.0, 2.0, -3.0])}
        params = {**params, **opt.apply_gradients(grads, params)}
        for p, k in zip(torch_params, ("a", "b")):
            p.grad = torch.tensor(np.array(grads[k]))
        torch_opt.step()
    for p, k in zip(torch_params, ("a", "b")):
        np.testing.assert_allclose(np.array(params[k]), p.detach().numpy(), rtol=1e-6)


def test_export_puts_every_parameter_in_its_own_group(tmp_path):
    params = {"a": mx.ones(3), "b": mx.full((3,), 0.5), "c": mx.full((3,), 2.0)}
    opt = mlx_optim.Adam(learning_rate=0.01, groups=[{"params": ["b", "c"], "learning_rate": 0.5}])
    opt.apply_gradients({"a": mx.ones(3), "c": mx.ones(3)}, params)  # b: no state yet
    exported = to_torch_state_dict(opt, ["a", "b", "c"])
    assert [(g["lr"], g["params"]) for g in exported["param_groups"]] == [(0.01, [0]), (0.5, [1, 2])]
    torch_params = [torch.ones(3, requires_grad=True) for _ in range(3)]
    torch.optim.Adam([{"params": torch_params[:1]}, {"params": torch_params[1:], "lr": 0.5}],
                     lr=0.01).load_state_dict(exported)

    # A predicate is asked about parameters only: a restored optimizer that has not seen
    # them needs the parameters to place them, and its own groups stay right after export.
    make = lambda: mlx_optim.SGD(learning_rate=0.1, groups=[
        {"params": lambda path, array: array.ndim == 1, "learning_rate": 1.0}])
    params = {"w": mx.ones((2, 2)), "bias": mx.ones((2,))}
    grads = {"w": mx.ones((2, 2)), "bias": mx.ones((2,))}
    source = make()
    source.apply_gradients(grads, params)
    source.save(tmp_path / "sgd")
    restored = make()
    restored.load(tmp_path / "sgd")
    with pytest.raises(ValueError, match="pass parameters="):
        to_torch_state_dict(restored, ["w", "bias"])
    exported = to_torch_state_dict(restored, ["w", "bias"], params)
    assert [(g["lr"], g["params"]) for g in exported["param_groups"]] == [(0.1, [0]), (1.0, [1])]
    np.testing.assert_allclose(np.array(restored.apply_gradients(grads, params)["bias"]), [0.0, 0.0])


def test_bfloat16_state_round_trips_through_torch():
    w = torch.tensor([1.0, -2.0, 3.0], dtype=torch.bfloat16, requires_grad=True)
    torch_opt = torch.optim.Adam([w], lr=0.01)
    for _ in range(2):
        (w.float() ** 2).sum().backward()
        torch_opt.step()
    params = {"w": mx.array(w.detach().float().numpy()).astype(mx.bfloat16)}
    opt = mlx_optim.Adam(learning_rate=0.01)
    load_torch_state_dict(opt, torch_opt.state_dict(), ["w"], params)
    back = to_torch_state_dict(opt, ["w"])["state"][0]
    for key, value in torch_opt.state[w].items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


def _torch_adam_state(dtype=torch.float32, steps=2):
    w = torch.tensor([1 / 3, -2 / 7, 3.1415926535897], dtype=dtype, requires_grad=True)
    torch_opt = torch.optim.Adam([w], lr=0.01)
    for _ in range(steps):
        torch_opt.zero_grad()
        (w ** 3).sum().backward()
        torch_opt.step()
    return w, torch_opt


def _assert_state_is_torchs(slot, torch_state):
    """Every state array of ours equals torch's bit for bit (step as our int32)."""
    assert set(slot) == set(torch_state)
    for key, value in torch_state.items():
        if key == "step":
            assert slot[key].item() == int(value.item())
        else:
            expected = value.detach().float().numpy() if value.dtype == torch.bfloat16 else value.numpy()
            assert slot[key].dtype == {torch.float32: mx.float32, torch.float64: mx.float64,
                                       torch.bfloat16: mx.bfloat16}[value.dtype], key
            ours = slot[key].astype(mx.float32) if slot[key].dtype == mx.bfloat16 else slot[key]
            assert np.array_equal(np.array(ours), expected), key


def test_import_with_a_plateau_scheduler_attached_keeps_its_state():
    """torch's state dict holds no attached scheduler: the import succeeds and the
    attached ReduceLROnPlateau's state stays as it was."""
    w, torch_opt = _torch_adam_state()
    params = {"w": mx.array(w.detach().numpy())}
    opt = mlx_optim.Adam(learning_rate=0.5)
    plateau = mlx_optim.ReduceLROnPlateau(opt, patience=5, factor=0.5)
    for metric in (1.0, 1.0, 1.0):
        plateau.step(metric)
    before = plateau.state_dict()
    load_torch_state_dict(opt, torch_opt.state_dict(), ["w"], params)
    assert plateau.state_dict() == before and before["num_bad_epochs"] > 0
    assert opt.learning_rate.item() == 0.01
    _assert_state_is_torchs(opt.state["param_state"]["w"], torch_opt.state[w])


def test_float64_state_is_imported_bitwise():
    """float64 state (also 0-d: ASGD's eta and mu, NAdam's mu_product, float64 when torch's
    default dtype is) arrives as torch holds it, not rounded through float32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for cls, ours in ((torch.optim.Adam, mlx_optim.Adam), (torch.optim.ASGD, mlx_optim.ASGD),
                          (torch.optim.NAdam, mlx_optim.NAdam)):
            w = torch.tensor([1 / 3, -2 / 7, 3.1415926535897], requires_grad=True)
            torch_opt = cls([w], lr=0.0123, **({"t0": 0} if cls is torch.optim.ASGD else {}))
            for _ in range(3):
                torch_opt.zero_grad()
                (w ** 3).sum().backward()
                torch_opt.step()
            opt = ours(learning_rate=0.0123, **({"t0": 0} if ours is mlx_optim.ASGD else {}))
            params = {"w": mx.array(w.detach().numpy(), dtype=mx.float64)}
            load_torch_state_dict(opt, torch_opt.state_dict(), ["w"], params)
            _assert_state_is_torchs(opt.state["param_state"]["w"], torch_opt.state[w])
    finally:
        torch.set_default_dtype(previous)


def test_import_makes_state_in_state_dtype():
    """bfloat16 weights with opt.state_dtype = float32: torch's float32 state is kept in
    float32, as init would make it, with init before the import or without."""
    w, torch_opt = _torch_adam_state()
    params = {"w": mx.array(w.detach().numpy()).astype(mx.bfloat16)}
    for init_first in (False, True):
        opt = mlx_optim.Adam(learning_rate=0.01)
        opt.state_dtype = mx.float32
        if init_first:
            opt.init(params)
        load_torch_state_dict(opt, torch_opt.state_dict(), ["w"], params)
        _assert_state_is_torchs(opt.state["param_state"]["w"], torch_opt.state[w])
