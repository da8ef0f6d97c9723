"""Fails when torch's own optimizer test database lists something our table lacks."""

import pytest
import torch
from torch.testing._internal.common_optimizers import optim_db

from mlx_optim.parity.cases import BY_NAME, TORCH_ONLY, normalized

INFOS = [info for info in optim_db if info.optim_cls.__name__ in BY_NAME]
# torch-only error checks: tensor betas/lr combined with foreach, and type mixes of
# tensor/float betas, which concern torch's kernels; ours accept any scalar array.
TORCH_ONLY_ERRORS = ("betas must be either both floats or both Tensors", "is not supported for capturable=False")


def test_table_covers_the_optimizers():
    assert {info.optim_cls.__name__ for info in INFOS} == set(BY_NAME)


@pytest.mark.parametrize("info", INFOS, ids=[i.optim_cls.__name__ for i in INFOS])
def test_every_torch_configuration_is_in_the_table(info):
    case = BY_NAME[info.optim_cls.__name__]
    ours = {normalized(c.kwargs) for c in case.configs if not c.extra}
    for dtype in (torch.float32, torch.float64):
        for optim_input in info.optim_inputs_func(device="cpu", dtype=dtype):
            if any(optim_input.kwargs.get(k) for k in TORCH_ONLY):
                continue
            assert normalized(optim_input.kwargs) in ours, (
                f"torch lists {case.name}({optim_input.kwargs}) [{optim_input.desc}]; add it to src/mlx_optim/parity/cases.py")


@pytest.mark.parametrize("info", INFOS, ids=[i.optim_cls.__name__ for i in INFOS])
def test_every_torch_error_is_in_the_table(info):
    case = BY_NAME[info.optim_cls.__name__]
    ours = {normalized(e.kwargs): e.match for e in case.errors}
    for error in info.optim_error_inputs_func(device="cpu", dtype=torch.float32):
        kwargs = error.optimizer_error_input.kwargs
        if not kwargs or any(k in kwargs for k in TORCH_ONLY):
            continue  # errors about torch's params argument, or torch-only switches
        if any(text in str(error.error_regex) for text in TORCH_ONLY_ERRORS):
            continue
        assert normalized(kwargs) in ours, f"torch checks {case.name}({kwargs}); add it to src/mlx_optim/parity/cases.py"
        if error.error_type is ValueError and "must be 1-element" not in error.error_regex:
            assert ours[normalized(kwargs)].startswith(error.error_regex.replace("\\", "")[:12])
