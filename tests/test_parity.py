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


# A decay of 0 (beta = 0, alpha = 0, rho = 0, Muon's momentum = 0): torch's moving averages
# then hold the new value exactly, however small it is next to the old one. Computed as
# `old + 1 * (new - old)`, a gradient 1e4 times smaller than the last one would leave a
# second moment of rounding noise (0 here), and the step would divide by eps.
DECAY_ZERO = [
    ("Adam", dict(lr=0.01, betas=(0.0, 0.0))),
    ("NAdam", dict(lr=0.01, betas=(0.0, 0.0))),
    ("RAdam", dict(lr=0.01, betas=(0.9, 0.0))),
    ("Adamax", dict(lr=0.01, betas=(0.0, 0.9))),
    ("RMSprop", dict(lr=0.01, alpha=0.0)),
    ("Adadelta", dict(lr=1.0, rho=0.0)),
    ("Adafactor", dict(lr=0.01, beta2_decay=0.0)),
    ("Muon", dict(lr=0.01, momentum=0.0, nesterov=False)),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name, kwargs", DECAY_ZERO, ids=[n for n, _ in DECAY_ZERO])
def test_a_decay_of_zero_keeps_the_new_value_exactly(name, kwargs, dtype):
    import mlx.core as mx
    import numpy as np
    import torch

    from mlx_optim.parity.cases import BY_NAME, ours_kwargs

    case = BY_NAME[name]
    grads = [np.array([[1.0, 0.5], [-2.0, 0.25]]), np.array([[1e-4, 0.5], [-3e-5, 0.25]])]
    start = np.array([[1.0, -1.0], [0.5, 2.0]])
    mx_dtype, torch_dtype = getattr(mx, dtype), getattr(torch, dtype)
    params = {"w": mx.array(start, dtype=mx_dtype)}
    opt = case.ours(**ours_kwargs(kwargs))
    weight = torch.tensor(start, dtype=torch_dtype, requires_grad=True)
    torch_opt = case.torch_cls([weight], **kwargs)
    for g in grads:
        params = opt.apply_gradients({"w": mx.array(g, dtype=mx_dtype)}, params)
        weight.grad = torch.tensor(g, dtype=torch_dtype)
        torch_opt.step()
    rtol = 2e-6 if dtype == "float32" else 1e-12
    if name == "Muon":  # bfloat16 Newton–Schulz: agree to a bfloat16 ulp of the update
        rtol = 4e-3 * kwargs["lr"]
    np.testing.assert_allclose(np.array(params["w"]), weight.detach().numpy(), rtol=rtol, atol=0)
    ours_state = opt.state["param_state"]["w"]
    for key, value in torch_opt.state[weight].items():
        if key in ours_state and value.ndim:
            np.testing.assert_allclose(np.array(ours_state[key]), value.numpy(), rtol=rtol,
                                       atol=0, err_msg=key)
