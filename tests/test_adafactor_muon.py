"""What the table's generic tests do not cover for Adafactor and Muon."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

import mlx_optim
from mlx_optim.parity.harness import assert_close


def test_adafactor_state_is_factored():
    opt = mlx_optim.Adafactor()
    opt.init({"w": mx.zeros((4096, 4096)), "b": mx.zeros((4096,))})
    w = opt.state["param_state"]["w"]
    assert w["row_var"].shape == (4096, 1) and w["col_var"].shape == (1, 4096)
    assert sum(v.size for k, v in w.items() if k != "step") == 4096 + 4096
    assert opt.state["param_state"]["b"]["variance"].shape == (4096,)


@pytest.mark.parametrize("shape", [(), (5,), (2, 3, 4)])
def test_adafactor_scalars_vectors_and_batches_equal_torch(shape):
    init = np.asarray(np.random.default_rng(0).standard_normal(shape))
    tparam = torch.tensor(init, requires_grad=True)
    topt = torch.optim.Adafactor([tparam], lr=0.05, weight_decay=0.1)
    opt = mlx_optim.Adafactor(learning_rate=0.05, weight_decay=0.1)
    params = {"p": mx.array(init, dtype=mx.float64)}
    for _ in range(8):
        tparam.grad = 2 * tparam.detach() - 1
        topt.step()
        params = opt.apply_gradients({"p": 2 * params["p"] - 1}, params)
    assert_close(params["p"], tparam.detach().numpy(), 1e-10, "param")
    for key, value in topt.state[tparam].items():
        assert_close(opt.state["param_state"]["p"][key], value.numpy(), 1e-10, key)


def test_muon_rejects_a_vector_before_any_change():
    opt = mlx_optim.Muon()
    params = {"w": mx.ones((3, 2)), "b": mx.ones((2,))}
    with pytest.raises(ValueError, match=r"Muon only supports 2D parameters .*\(2,\) \('b'\)"):
        opt.apply_gradients({"w": mx.ones((3, 2)), "b": mx.ones((2,))}, params)
    assert opt.state["param_state"] == {} and opt.state["step"].item() == 0


def test_muon_unknown_adjust_lr_fn():
    with pytest.raises(ValueError, match="Adjust learning rate function arbitrary is not supported"):
        mlx_optim.Muon(adjust_lr_fn="arbitrary")


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.layers = [nn.Linear(8, 8), nn.Linear(8, 8)]
        self.norm = nn.LayerNorm(8)
        self.lm_head = nn.Linear(8, 16, bias=False)

    def __call__(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = x + nn.gelu(layer(x))
        return self.lm_head(self.norm(x))


def test_muon_with_adamw_splits_a_model_and_trains_it():
    mx.random.seed(0)
    model = TinyLM()
    opt = mlx_optim.muon_with_adamw(model, muon={"learning_rate": 0.02}, adamw={"learning_rate": 1e-2})
    ids = mx.array(np.random.default_rng(0).integers(0, 16, (4, 6)))
    loss_fn = lambda m: nn.losses.cross_entropy(m(ids[:, :-1]), ids[:, 1:], reduction="mean")
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    first = loss_fn(model).item()
    for _ in range(30):
        _, grads = loss_and_grad(model)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
    muon, adamw = opt.optimizers
    assert isinstance(muon, mlx_optim.Muon) and isinstance(adamw, mlx_optim.AdamW)
    assert sorted(muon.state["param_state"]["layers"][i]["weight"]["step"].item() for i in (0, 1)) == [30, 30]
    assert "layers" not in adamw.state["param_state"] or all(
        "weight" not in layer for layer in adamw.state["param_state"]["layers"])
    assert set(adamw.state["param_state"]) == {"embed", "layers", "norm", "lm_head"}  # biases in layers
    assert set(muon.state["param_state"]) == {"layers"}
    assert loss_fn(model).item() < 0.5 * first


def test_muon_with_adamw_takes_one_exclude_glob_as_a_string():
    # A string is one glob, as a group's "params" is (not a sequence of one-letter globs).
    mx.random.seed(0)
    model = TinyLM()
    opt = mlx_optim.muon_with_adamw(model, exclude="lm_head.weight")
    opt.init(model.trainable_parameters())
    muon, adamw = opt.optimizers
    assert "lm_head" not in muon.state["param_state"] and "lm_head" in adamw.state["param_state"]
