"""AveragedModel and update_bn against torch.optim.swa_utils (SWALR is in the schedule
table of test_schedulers.py)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten, tree_unflatten
from torch.optim import swa_utils as torch_swa

from mlx_optim import swa_utils as swa

UPDATES = 6

# (id, our averaging arguments, torch's)
AVERAGES = [
    ("swa-default", {}, {}),
    ("swa-multi", dict(multi_avg_fn=swa.get_swa_multi_avg_fn()),
     dict(multi_avg_fn=torch_swa.get_swa_multi_avg_fn())),
    ("swa-per-array", dict(avg_fn=swa.get_swa_avg_fn()), dict(avg_fn=torch_swa.get_swa_avg_fn())),
    ("ema-multi", dict(multi_avg_fn=swa.get_ema_multi_avg_fn(0.9)),
     dict(multi_avg_fn=torch_swa.get_ema_multi_avg_fn(0.9))),
    ("ema-multi-fast", dict(multi_avg_fn=swa.get_ema_multi_avg_fn(0.3)),   # lerp's other branch
     dict(multi_avg_fn=torch_swa.get_ema_multi_avg_fn(0.3))),
    ("ema-per-array", dict(avg_fn=swa.get_ema_avg_fn(0.99)), dict(avg_fn=torch_swa.get_ema_avg_fn(0.99))),
]


def mlx_model(dtype) -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm(3))
    model.set_dtype(dtype)
    return model


def torch_model(dtype) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).to(dtype)


def torch_name(mlx_name: str) -> str:
    return mlx_name.removeprefix("layers.")


def random_arrays(model: nn.Module, rng: np.random.Generator, dtype) -> dict[str, np.ndarray]:
    """New values for every array of ``model``, frozen ones (running stats) included."""
    return {k: rng.standard_normal(v.shape).astype(dtype) + (2.0 if "var" in k else 0.0)
            for k, v in tree_flatten(model.parameters())}


def set_both(mine: nn.Module, theirs: torch.nn.Module, values: dict[str, np.ndarray]) -> None:
    mine.update(tree_unflatten([(k, mx.array(v, dtype=getattr(mx, str(v.dtype)))) for k, v in values.items()]))
    state = theirs.state_dict()
    with torch.no_grad():
        for k, v in values.items():
            state[torch_name(k)].copy_(torch.from_numpy(v))


def assert_same(averaged: swa.AveragedModel, torch_averaged, tolerance: float) -> None:
    # values are O(1): a few ulps absolute (torch's kernels may fuse a multiply-add)
    state = torch_averaged.module.state_dict()
    for k, v in tree_flatten(averaged.module.parameters()):
        np.testing.assert_allclose(np.array(v), state[torch_name(k)].numpy(), rtol=tolerance,
                                   atol=tolerance, err_msg=k)
    assert averaged.n_averaged.item() == torch_averaged.n_averaged.item()


@pytest.mark.parametrize("use_buffers", [False, True], ids=["params", "buffers"])
@pytest.mark.parametrize("name, ours, theirs", AVERAGES, ids=[a[0] for a in AVERAGES])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_averaged_model_equals_torch(name, ours, theirs, use_buffers, dtype):
    if name == "swa-multi" and use_buffers:
        pytest.skip("torch's get_swa_multi_avg_fn raises on BatchNorm's integer num_batches_tracked")
    rng = np.random.default_rng(0)
    mine, their_model = mlx_model(getattr(mx, dtype)), torch_model(getattr(torch, dtype))
    averaged = swa.AveragedModel(mine, use_buffers=use_buffers, **ours)
    torch_averaged = torch_swa.AveragedModel(their_model, use_buffers=use_buffers, **theirs)
    for _ in range(UPDATES):
        set_both(mine, their_model, random_arrays(mine, rng, dtype))
        averaged.update_parameters(mine)
        torch_averaged.update_parameters(their_model)
        assert_same(averaged, torch_averaged, 1e-6 if dtype == "float32" else 1e-14)
    # the average is not the last model: the test could tell them apart
    last = dict(tree_flatten(mine.trainable_parameters()))
    first_key = next(iter(last))
    assert not np.allclose(np.array(dict(tree_flatten(averaged.module.parameters()))[first_key]),
                           np.array(last[first_key]))


@pytest.mark.parametrize("name, ours, theirs", AVERAGES[:4:3], ids=[a[0] for a in AVERAGES[:4:3]])
def test_unfreezing_after_construction_averages_as_torch(name, ours, theirs):
    # A backbone frozen during warm-up, then trained: torch averages it throughout (it is
    # constant while frozen, so its average is the copy ours keeps), then averages it on.
    rng = np.random.default_rng(3)
    mine, their_model = mlx_model(mx.float32), torch_model(torch.float32)
    mine.layers[0].freeze()
    for p in their_model[0].parameters():
        p.requires_grad_(False)
    averaged = swa.AveragedModel(mine, **ours)
    torch_averaged = torch_swa.AveragedModel(their_model, **theirs)
    backbone = {k: v for k, v in random_arrays(mine, rng, "float32").items() if k.startswith("layers.0")}
    for update in range(UPDATES):
        if update == 2:
            mine.layers[0].unfreeze()
            for p in their_model[0].parameters():
                p.requires_grad_(True)
        values = random_arrays(mine, rng, "float32")
        if update < 2:
            values.update(backbone)   # frozen: unchanged
        set_both(mine, their_model, values)
        averaged.update_parameters(mine)
        torch_averaged.update_parameters(their_model)
        assert_same(averaged, torch_averaged, 1e-6)
    last = np.array(mine.layers[0].weight)
    assert not np.allclose(np.array(averaged.module.layers[0].weight), last)


def test_update_parameters_compiles_once_and_equals_eager():
    rng = np.random.default_rng(1)
    model, reference_model = mlx_model(mx.float32), mlx_model(mx.float32)
    averaged = swa.AveragedModel(model, multi_avg_fn=swa.get_ema_multi_avg_fn(0.5))
    reference = swa.AveragedModel(model, multi_avg_fn=swa.get_ema_multi_avg_fn(0.5))
    state = [model.state, averaged.state]
    traces = []

    def update():
        traces.append(1)
        averaged.update_parameters(model)

    compiled = mx.compile(update, inputs=state, outputs=state)
    for _ in range(4):
        values = random_arrays(model, rng, "float32")
        for m in (model, reference_model):
            m.update(tree_unflatten([(k, mx.array(v)) for k, v in values.items()]))
        compiled()
        mx.eval(state)
        reference.update_parameters(reference_model)
    assert len(traces) == 1
    assert averaged.n_averaged.item() == 4
    for (k, v), (_, w) in zip(tree_flatten(averaged.module.parameters()),
                              tree_flatten(reference.module.parameters())):
        np.testing.assert_allclose(np.array(v), np.array(w), rtol=1e-6, err_msg=k)


def test_averaged_model_copies_and_calls_the_model():
    model = nn.Linear(2, 2)
    averaged = swa.AveragedModel(model)
    x = mx.array([[1.0, 2.0]])
    np.testing.assert_allclose(np.array(averaged(x)), np.array(model(x)))
    model.weight = model.weight + 1
    assert not np.allclose(np.array(averaged.module.weight), np.array(model.weight))
    assert "n_averaged" not in dict(tree_flatten(averaged.trainable_parameters()))


def test_bad_averaging_arguments_raise_value_error():
    with pytest.raises(ValueError, match="Only one of avg_fn and multi_avg_fn should be provided"):
        swa.AveragedModel(nn.Linear(2, 2), avg_fn=swa.get_swa_avg_fn(),
                          multi_avg_fn=swa.get_swa_multi_avg_fn())
    for make, make_torch in [(swa.get_ema_avg_fn, torch_swa.get_ema_avg_fn),
                             (swa.get_ema_multi_avg_fn, torch_swa.get_ema_multi_avg_fn)]:
        for decay in (-0.1, 1.5):
            with pytest.raises(ValueError, match=r"^Invalid decay value .* Please provide a value in \[0,1\] range"):
                make(decay)
            with pytest.raises(ValueError, match=r"^Invalid decay value"):
                make_torch(decay)
    with pytest.raises(ValueError, match="do not match"):
        swa.AveragedModel(nn.Linear(2, 2)).update_parameters(nn.Linear(2, 3, bias=False))


def test_update_bn_equals_torch():
    rng = np.random.default_rng(2)
    mine, theirs = mlx_model(mx.float32), torch_model(torch.float32)
    set_both(mine, theirs, random_arrays(mine, rng, "float32"))
    batches = [rng.standard_normal((8, 4)).astype("float32") * (i + 1) for i in range(3)]
    mine.eval()
    swa.update_bn([(mx.array(b), None) for b in batches], mine)
    torch_swa.update_bn([(torch.from_numpy(b), None) for b in batches], theirs)
    assert not mine.training, "update_bn restores the training mode"
    state = theirs.state_dict()
    for name in ("running_mean", "running_var"):
        np.testing.assert_allclose(np.array(mine.layers[1][name]), state[f"1.{name}"].numpy(),
                                   rtol=1e-5, err_msg=name)
    assert mine.layers[1].momentum == 0.1
