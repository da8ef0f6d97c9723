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
