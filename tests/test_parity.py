"""Parameters and every state array equal torch's after closed-loop steps."""

import pytest

from mlx_optim.parity.cases import config_id, config_params
from mlx_optim.parity.harness import compare_with_torch, run_ours, run_torch

PAIRS = config_params()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("pair", PAIRS, ids=[config_id(p) for p in PAIRS])
def test_parity_with_torch(pair, compiled, dtype):
    case, config = pair
    if config.desc in case.skips:
        pytest.skip(case.skips[config.desc])
    params, opt = run_ours(case, config, dtype, steps=12, compiled=compiled)
    torch_params, torch_opt = run_torch(case, config, dtype, steps=12)
    compare_with_torch(params, opt, torch_params, torch_opt, case.tolerance[dtype])
