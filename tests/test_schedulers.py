"""Schedules against torch.optim.lr_scheduler, step by step.

One table (CASES, in ``mlx_optim.parity.schedulers``) drives the parity, resume, float32
and compile tests: each row names a scheduler (found in ``mlx_optim.schedulers``/``swa_utils``
and in torch's modules under the same name) and its arguments; child schedulers of
SequentialLR/ChainedScheduler are rows themselves.
"""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
import torch
from torch.optim import lr_scheduler as torch_sched
from torch.optim import swa_utils as torch_swa

from mlx_optim import schedulers as S
from mlx_optim import swa_utils as swa
from mlx_optim.parity.schedulers import (
    CASES, LR, RTOL, build_ours, cycles_momentum, ours, torch_run,
)


@lru_cache(maxsize=None)
def torch_values(index: int) -> tuple[np.ndarray, np.ndarray]:
    return torch_run(CASES[index])


CASE_IDS = [str(case) for case in CASES]


def test_table_covers_every_torch_scheduler():
    torch_names = set(torch_sched.__all__) - {"LRScheduler", "ReduceLROnPlateau"}
    covered = {case.name for case in CASES}
    assert torch_names | {"SWALR"} <= covered
    for name in covered:
        assert sum(case.name == name for case in CASES) >= 3, name


# ------------------------------------------------------------------------- parity

@pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
def test_equals_torch_at_every_step(index):
    case = CASES[index]
    expected_lr, expected_momentum = torch_values(index)
    schedule = build_ours(case)
    np.testing.assert_allclose(ours(schedule, 0, case.steps), expected_lr, rtol=RTOL, atol=0)
    if cycles_momentum(case):
        np.testing.assert_allclose(ours(schedule.momentum, 0, case.steps), expected_momentum,
                                   rtol=RTOL, atol=0)
    else:
        assert getattr(schedule, "momentum", None) is None


@pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
def test_resumed_mid_schedule_equals_torch_resumed(index):
    case = CASES[index]
    resume_at = case.steps // 3 + 1
    expected_lr, expected_momentum = torch_run(case, resume_at=resume_at)
    schedule = build_ours(case)
    np.testing.assert_allclose(ours(schedule, resume_at, case.steps), expected_lr, rtol=RTOL, atol=0)
    if cycles_momentum(case):
        np.testing.assert_allclose(ours(schedule.momentum, resume_at, case.steps),
                                   expected_momentum, rtol=RTOL, atol=0)


@pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
def test_float32_default_is_torch_rounded(index):
    case = CASES[index]
    expected_lr, _ = torch_values(index)
    got = build_ours(case)(mx.arange(case.steps + 1))
    assert got.dtype == mx.float32
    # float32 rounding; near a zero of (1 + cos) float32 loses relative, not absolute, accuracy
    np.testing.assert_allclose(np.array(got), expected_lr, rtol=2e-5,
                               atol=1e-6 * np.abs(expected_lr).max())


@pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
def test_compiled_scalar_uint64_step_equals_vectorized(index):
    schedule, traces = build_ours(CASES[index]), []

    def at(step):
        traces.append(1)
        return schedule(step)

    compiled = mx.compile(at)
    whole = schedule(mx.arange(40))
    for k in (0, 1, 2, 17, 39):
        got = compiled(mx.array(k, dtype=mx.uint64))
        assert got.shape == () and got.item() == pytest.approx(whole[k].item(), rel=1e-6, abs=1e-12)
        assert schedule(k).item() == got.item()
    assert len(traces) == 1


def test_large_steps_stay_accurate_in_float32():
    # integer arithmetic on the step keeps float32 exact where the step itself is not
    k = 2**26 + 3
    assert S.StepLR(0.1, step_size=2**26 + 3)(k).item() == pytest.approx(0.01, rel=1e-6)
    assert S.CosineAnnealingLR(0.1, T_max=4)(k).item() == pytest.approx(
        0.05 * (1 + math.cos(math.pi * 3 / 4)), rel=1e-5)
    assert S.ExponentialLR(0.1, gamma=0.9999)(100_000).item() == pytest.approx(
        0.1 * 0.9999**100_000, rel=1e-5)
    # k % 4000 == 1: a 2000th of the way up (k / 4000 in float32 was 2.5e-3 off)
    cyclic = S.CyclicLR(base_lr=0.001, max_lr=0.006, step_size_up=2000)
    for k in (20_000_001, 2**40 + 1 - 2**40 % 4000):
        assert cyclic(k).item() == pytest.approx(0.001 + 0.005 / 2000, rel=1e-6)
        assert cyclic.momentum(k).item() == pytest.approx(0.9 - 0.1 / 2000, rel=1e-6)


# ----------------------------------------------------------------- in an optimizer

def test_compiled_sgd_step_traces_once_and_uses_each_steps_rate():
    schedule = S.OneCycleLR(max_lr=0.1, total_steps=10)
    model = nn.Linear(3, 1)
    opt = optim.SGD(learning_rate=schedule)
    x = mx.array([[1.0, -2.0, 0.5]])
    w0 = np.array(model.weight)
    opt.init(model.trainable_parameters())   # the state's structure is fixed before tracing
    state = [model.state, opt.state]
    traces = []

    def loss_fn(model):
        return model(x).sum()   # d/dw = x: the update is exactly -lr_k * x

    def step():
        traces.append(1)
        loss, grads = nn.value_and_grad(model, loss_fn)(model)
        opt.update(model, grads)
        return loss

    compiled = mx.compile(step, inputs=state, outputs=state)
    for k in range(6):
        mx.eval(compiled(), state)
        assert opt.learning_rate.item() == pytest.approx(schedule(k).item(), rel=1e-7)
    assert len(traces) == 1
    applied = sum(schedule(k).item() for k in range(6))
    np.testing.assert_allclose(np.array(model.weight), w0 - applied * np.array(x), rtol=1e-5)


def test_momentum_schedule_in_a_compiled_step():
    cyclic = S.CyclicLR(base_lr=0.01, max_lr=0.1, step_size_up=3)
    traces = []

    def hyper(step):
        traces.append(1)
        return cyclic(step), cyclic.momentum(step)

    compiled = mx.compile(hyper)
    for k in range(8):
        lr, momentum = compiled(mx.array(k, dtype=mx.uint64))
        x = 1 + k / 6 - math.floor(1 + k / 6)
        height = x / 0.5 if x <= 0.5 else (x - 1) / -0.5
        assert lr.item() == pytest.approx(0.01 + 0.09 * height, rel=1e-6)
        assert momentum.item() == pytest.approx(0.9 - 0.1 * height, rel=1e-6)
    assert len(traces) == 1


# ---------------------------------------------------------------- ReduceLROnPlateau

class Groups:
    """A stand-in for our optimizers: param_groups with a settable "learning_rate"."""

    def __init__(self, *rates):
        self.param_groups = [{"learning_rate": rate} for rate in rates]


METRICS = [1.0, 0.9, 0.85, 0.85, 0.86, 0.84, 0.84, 0.845, 0.9, 0.83, 0.83, 0.83, 0.83, 0.829,
           0.84, 0.85, 0.7, 0.7, 0.71, 0.72, 0.69, 0.69, 0.69, 0.69, 0.69, 0.70, 0.5, 0.5, 0.5,
           0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
PLATEAU_CASES = [
    dict(),
    dict(mode="min", patience=2, threshold=0.05, threshold_mode="rel", factor=0.5),
    dict(mode="max", patience=1, threshold=0.01, threshold_mode="abs", cooldown=2, factor=0.3),
    dict(mode="min", patience=0, threshold=0.0, threshold_mode="abs", cooldown=3,
         min_lr=[1e-3, 0.004], factor=0.5),
    dict(mode="max", patience=1, threshold=1e-4, factor=0.9, eps=0.006, min_lr=1e-3),
]


def torch_plateau(kwargs, metrics, rates=(0.1, 0.01)):
    opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": r} for r in rates])
    plateau = torch_sched.ReduceLROnPlateau(opt, **kwargs)
    out = []
    for metric in metrics:
        plateau.step(metric)
        out.append([g["lr"] for g in opt.param_groups])
    return out


@pytest.mark.parametrize("kwargs", PLATEAU_CASES, ids=str)
def test_reduce_on_plateau_equals_torch(kwargs):
    expected = torch_plateau(kwargs, METRICS)
    groups = Groups(0.1, 0.01)
    plateau = S.ReduceLROnPlateau(groups, **kwargs)
    got = []
    for metric in METRICS:
        plateau.step(mx.array(metric))
        got.append([g["learning_rate"] for g in groups.param_groups])
    assert got == expected
    assert plateau.get_last_lr() == expected[-1]
    assert len({tuple(r) for r in expected}) > 1, "the sequence must reduce at least once"


@pytest.mark.parametrize("kwargs", PLATEAU_CASES, ids=str)
def test_reduce_on_plateau_state_dict_resumes_through_json(kwargs):
    expected = torch_plateau(kwargs, METRICS)
    groups = Groups(0.1, 0.01)
    plateau = S.ReduceLROnPlateau(groups, **kwargs)
    for metric in METRICS[:17]:
        plateau.step(metric)
    saved = json.loads(json.dumps(plateau.state_dict()))
    resumed = S.ReduceLROnPlateau(Groups(*[g["learning_rate"] for g in groups.param_groups]))
    resumed.load_state_dict(saved)
    assert resumed.state_dict() == plateau.state_dict()
    for metric, rates in zip(METRICS[17:], expected[17:]):
        resumed.step(metric)
        assert [g["learning_rate"] for g in resumed.optimizer.param_groups] == rates


def test_reduce_on_plateau_drives_mlx_sgd():
    kwargs = dict(patience=1, factor=0.5, min_lr=0.01)
    expected = [rates[0] for rates in torch_plateau(kwargs, METRICS, rates=(0.1,))]
    opt = optim.SGD(learning_rate=0.1)
    plateau = S.ReduceLROnPlateau(opt, **kwargs)
    got = []
    for metric in METRICS:
        plateau.step(metric)
        got.append(opt.learning_rate.item())
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert expected[-1] == 0.01


# ---------------------------------------------------------------------- validation

def _plateau(**kwargs):
    return lambda: S.ReduceLROnPlateau(Groups(0.1), **kwargs)


def _torch_plateau(**kwargs):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    return lambda: torch_sched.ReduceLROnPlateau(opt, **kwargs)


def _torch(name, **kwargs):
    def make():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
        cls = getattr(torch_sched, name, None) or getattr(torch_swa, name)
        return cls(opt, **kwargs)
    return make


# (ours, torch's or None, the message both start with, the argument ours names)
ERRORS = [
    (lambda: S.ConstantLR(0.1, factor=1.5), _torch("ConstantLR", factor=1.5),
     "Constant multiplicative factor expected to be between 0 and 1", "factor"),
    (lambda: S.LinearLR(0.1, start_factor=0), _torch("LinearLR", start_factor=0),
     "Starting multiplicative factor expected", "start_factor"),
    (lambda: S.LinearLR(0.1, end_factor=2.0), _torch("LinearLR", end_factor=2.0),
     "Ending multiplicative factor expected", "end_factor"),
    (lambda: S.StepLR(-0.1, step_size=10), None, "Invalid learning rate", "learning_rate"),
    (lambda: S.StepLR(0.1, step_size=0), None, "Expected positive integer step_size", "step_size"),
    (lambda: S.CosineAnnealingLR(0.1, T_max=0), None, "Expected positive integer T_max", "T_max"),
    (lambda: S.MultiplicativeLR(0.1, lambda k: 0.9, total_steps=0), None,
     "Expected positive integer total_steps", "total_steps"),
    (lambda: S.CosineAnnealingWarmRestarts(0.1, T_0=0),
     _torch("CosineAnnealingWarmRestarts", T_0=0), "Expected positive integer T_0", "T_0"),
    (lambda: S.CosineAnnealingWarmRestarts(0.1, T_0=5, T_mult=0),
     _torch("CosineAnnealingWarmRestarts", T_0=5, T_mult=0), "Expected integer T_mult >= 1", "T_mult"),
    (lambda: S.CosineAnnealingWarmRestarts(0.1, T_0=5, eta_min="0"),
     _torch("CosineAnnealingWarmRestarts", T_0=5, eta_min="0"), "Expected float or int eta_min",
     "eta_min"),
    (lambda: S.OneCycleLR(0.1), _torch("OneCycleLR", max_lr=0.1),
     "You must define either total_steps OR (epochs AND steps_per_epoch)", "total_steps"),
    (lambda: S.OneCycleLR(0.1, total_steps=0), _torch("OneCycleLR", max_lr=0.1, total_steps=0),
     "Expected positive integer total_steps", "total_steps"),
    (lambda: S.OneCycleLR(0.1, epochs=0, steps_per_epoch=5),
     _torch("OneCycleLR", max_lr=0.1, epochs=0, steps_per_epoch=5),
     "Expected positive integer epochs", "epochs"),
    (lambda: S.OneCycleLR(0.1, epochs=2, steps_per_epoch=-1),
     _torch("OneCycleLR", max_lr=0.1, epochs=2, steps_per_epoch=-1),
     "Expected positive integer steps_per_epoch", "steps_per_epoch"),
    (lambda: S.OneCycleLR(0.1, total_steps=10, pct_start=1.5),
     _torch("OneCycleLR", max_lr=0.1, total_steps=10, pct_start=1.5),
     "Expected float between 0 and 1 pct_start", "pct_start"),
    (lambda: S.OneCycleLR(0.1, total_steps=10, anneal_strategy="exp"),
     _torch("OneCycleLR", max_lr=0.1, total_steps=10, anneal_strategy="exp"),
     "anneal_strategy must be one of 'cos' or 'linear'", "anneal_strategy"),
    (lambda: S.CyclicLR(0.01, 0.1, mode="sine"), _torch("CyclicLR", base_lr=0.01, max_lr=0.1, mode="sine"),
     "mode is invalid and scale_fn is None", "mode"),
    (lambda: S.CyclicLR(0.01, 0.1, step_size_up=0), None,
     "Expected positive step_size_up", "step_size_up"),
    (lambda: S.CyclicLR(0.01, 0.1, step_size_down=-1.0), None,
     "Expected step_size_down >= 0", "step_size_down"),
    (lambda: S.StepLR(0.1, step_size=2.5), None, "Expected positive integer step_size", "(float)"),
    (lambda: S.MultiStepLR(0.1, milestones=[30, 60.5]), None, "Expected integer >= 0 milestones",
     "60.5"),
    (lambda: S.OneCycleLR(0.1, total_steps=10, pct_start=0.1), None,
     "pct_start * total_steps must not be 1", "total_steps=10"),
    (lambda: S.CyclicLR(0.01, 0.1, scale_fn=lambda x: 1.0, scale_mode="epoch"), None,
     "scale_mode must be one of", "scale_mode"),
    (lambda: S.SequentialLR([], milestones=[]), None, "SequentialLR expects at least one scheduler",
     "schedules"),
    (lambda: S.SequentialLR([S.StepLR(0.1, 5), S.StepLR(0.1, 7)], milestones=[]), None,
     "Sequential Schedulers expects number of schedulers provided to be one more", "milestones"),
    (lambda: S.SequentialLR([S.StepLR(0.1, 5), S.ReduceLROnPlateau(Groups(0.1))], milestones=[3]),
     None, "SequentialLR does not support `ReduceLROnPlateau`", "index 1"),
    (lambda: S.ChainedScheduler([]), None, "ChainedScheduler expects at least one scheduler",
     "schedules"),
    (lambda: S.ChainedScheduler([S.StepLR(0.1, 5), S.OneCycleLR(0.1, total_steps=5)]), None,
     "ChainedScheduler multiplies factors", "schedules[1]"),
    (lambda: S.ChainedScheduler([S.StepLR(0.1, 5), S.StepLR(0.2, 5)]), None,
     "ChainedScheduler expects all schedules to start from the same learning_rate", "schedules[1]"),
    (_plateau(factor=1.0), _torch_plateau(factor=1.0), "Factor should be < 1.0.", "factor"),
    (_plateau(mode="median"), _torch_plateau(mode="median"), "mode median is unknown!", "mode"),
    (_plateau(threshold_mode="ratio"), _torch_plateau(threshold_mode="ratio"),
     "threshold mode ratio is unknown!", "threshold_mode"),
    (_plateau(min_lr=[0.1, 0.2]), _torch_plateau(min_lr=[0.1, 0.2]),
     "expected 1 min_lrs, got 2", "min_lr"),
    (lambda: swa.SWALR(0.1, swa_lr=0.05, anneal_strategy="step"),
     _torch("SWALR", swa_lr=0.05, anneal_strategy="step"),
     "anneal_strategy must be one of 'cos' or 'linear'", "anneal_strategy"),
    (lambda: swa.SWALR(0.1, swa_lr=0.05, anneal_epochs=-1),
     _torch("SWALR", swa_lr=0.05, anneal_epochs=-1),
     "anneal_epochs must be equal or greater than 0", "anneal_epochs"),
]


@pytest.mark.parametrize("make, make_torch, message, argument", ERRORS,
                         ids=[e[2][:40] + "/" + e[3] for e in ERRORS])
def test_bad_arguments_raise_value_error_naming_them(make, make_torch, message, argument):
    with pytest.raises(ValueError) as error:
        make()
    assert str(error.value).startswith(message)
    assert argument in str(error.value)
    if make_torch is not None:   # the same words as torch
        with pytest.raises(ValueError, match="^" + re.escape(message)):
            make_torch()


def test_non_callable_lambda_and_float_step_raise_type_error():
    with pytest.raises(TypeError, match="lr_lambda should be a function"):
        S.MultiplicativeLR(0.1, 0.95, total_steps=10)
    with pytest.raises(TypeError, match="lr_lambda should be a function"):
        S.LambdaLR(0.1, 0.95)
    with pytest.raises(TypeError, match="integer"):
        S.StepLR(0.1, 5)(mx.array(1.5))


def test_our_sgd_cycles_rate_and_momentum_like_torch_in_a_compiled_step():
    from mlx_optim import SGD

    schedule = S.OneCycleLR(max_lr=0.1, total_steps=12)
    model = nn.Linear(3, 1)
    opt = SGD(learning_rate=schedule, momentum=schedule.momentum)
    opt.init(model.trainable_parameters())
    state, traces = [model.state, opt.state], []
    x = mx.array([[1.0, -2.0, 0.5]])

    def step():
        traces.append(1)
        _, grads = nn.value_and_grad(model, lambda m: (m(x) ** 2).sum())(model)
        opt.update(model, grads)

    theirs = torch.nn.Linear(3, 1)
    with torch.no_grad():
        theirs.weight.copy_(torch.tensor(np.array(model.weight)))
        theirs.bias.copy_(torch.tensor(np.array(model.bias)))
    torch_opt = torch.optim.SGD(theirs.parameters(), lr=LR, momentum=0.9)
    torch_schedule = torch_sched.OneCycleLR(torch_opt, max_lr=0.1, total_steps=12)
    compiled = mx.compile(step, inputs=state, outputs=state)
    for _ in range(10):   # closed loop: the gradient depends on the parameters
        compiled()
        mx.eval(state)
        torch_opt.zero_grad()
        (theirs(torch.tensor(np.array(x))) ** 2).sum().backward()
        torch_opt.step()
        torch_schedule.step()
    assert len(traces) == 1
    np.testing.assert_allclose(np.array(model.weight), theirs.weight.detach().numpy(), rtol=1e-5)
    assert opt.param_groups[0]["momentum"].item() == pytest.approx(schedule.momentum(9).item())


# ------------------------------------------------------------ arguments torch accepts

def torch_rates(make, steps, lr=LR):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9)
    scheduler = make(opt)
    rates = [float(opt.param_groups[0]["lr"])]
    for _ in range(steps):
        opt.step()
        scheduler.step()
        rates.append(float(opt.param_groups[0]["lr"]))
    return np.array(rates)


# (name, arguments as torch takes them: numpy integers, whole floats, fractional step sizes)
TORCH_ACCEPTS = [
    ("StepLR", dict(step_size=np.int64(30))),
    ("StepLR", dict(step_size=30.0)),
    ("MultiStepLR", dict(milestones=np.array([30, 60]))),
    ("MultiStepLR", dict(milestones=[30.0, 60.0])),
    ("ConstantLR", dict(factor=0.5, total_iters=np.int32(40))),
    ("LinearLR", dict(start_factor=0.1, total_iters=10.0)),
    ("PolynomialLR", dict(total_iters=np.uint16(50), power=2.0)),
    ("CosineAnnealingLR", dict(T_max=np.int64(100))),
    ("CosineAnnealingLR", dict(T_max=100.0, eta_min=np.float64(1e-3))),
    ("CyclicLR", dict(base_lr=0.001, max_lr=0.006, step_size_up=20.0, step_size_down=np.int64(50))),
    ("CyclicLR", dict(base_lr=0.001, max_lr=0.006, step_size_up=2.5, step_size_down=4.5,
                      mode="triangular2")),
    ("SequentialLR", None),
]


@pytest.mark.parametrize("name, kwargs", TORCH_ACCEPTS, ids=[f"{n}-{k}" for n, k in TORCH_ACCEPTS])
def test_numpy_and_whole_float_arguments_schedule_as_in_torch(name, kwargs):
    if name == "SequentialLR":
        ours_schedule = S.SequentialLR([S.ConstantLR(LR, factor=0.5), S.ExponentialLR(LR, 0.9)],
                                       milestones=np.array([10.0]))
        expected = torch_rates(lambda opt: torch_sched.SequentialLR(
            opt, [torch_sched.ConstantLR(opt, factor=0.5), torch_sched.ExponentialLR(opt, 0.9)],
            milestones=np.array([10.0])), 200)
    else:
        ours_schedule = getattr(S, name)(**kwargs) if name == "CyclicLR" else getattr(S, name)(LR, **kwargs)
        expected = torch_rates(lambda opt: getattr(torch_sched, name)(opt, **kwargs), 200)
    np.testing.assert_allclose(ours(ours_schedule, 0, 200), expected, rtol=RTOL, atol=0)


def test_numpy_float32_arguments_are_accepted():
    # torch's rates become numpy float32 through NumPy's promotion; ours take the exact
    # float32 value in float64: equal to float32 rounding.
    for name, kwargs in [("ExponentialLR", dict(gamma=np.float32(0.9))),
                         ("LinearLR", dict(start_factor=np.float32(0.5))),
                         ("StepLR", dict(step_size=3, gamma=np.float32(0.5)))]:
        expected = torch_rates(lambda opt: getattr(torch_sched, name)(opt, **kwargs), 20)
        np.testing.assert_allclose(ours(getattr(S, name)(LR, **kwargs), 0, 20), expected,
                                   rtol=1e-6, err_msg=name)


def test_arguments_of_the_wrong_type_raise_type_error_naming_them():
    with pytest.raises(TypeError, match=r"^gamma must be a number, got '0\.9' \(str\)"):
        S.ExponentialLR(0.1, gamma="0.9")
    with pytest.raises(TypeError, match=r"^Expected positive integer T_max, but got None \(NoneType\)"):
        S.CosineAnnealingLR(0.1, T_max=None)
    with pytest.raises(TypeError, match=r"^Expected positive integer step_size, but got True \(bool\)"):
        S.StepLR(0.1, step_size=True)
    with pytest.raises(ValueError, match=r"^Expected positive step_size_up, but got inf"):
        S.CyclicLR(0.01, 0.1, step_size_up=math.inf)


# ------------------------------------------------------------------------- OneCycleLR

@pytest.mark.parametrize("total_steps, pct_start, three_phase",
                         [(10, 0.1, False), (100, 0.01, False), (100, 0.01, True)])
def test_onecycle_first_phase_of_zero_length_raises_where_torch_divides_by_zero(
        total_steps, pct_start, three_phase):
    kwargs = dict(max_lr=0.1, total_steps=total_steps, pct_start=pct_start, three_phase=three_phase)
    with pytest.raises(ZeroDivisionError):
        torch_rates(lambda opt: torch_sched.OneCycleLR(opt, **kwargs), 0)
    with pytest.raises(ValueError, match=r"pct_start=0\.[01]+, total_steps=(10|100)\).*ZeroDivisionError"):
        S.OneCycleLR(**kwargs)


def test_onecycle_last_phase_of_zero_length_holds_the_last_value_torch_computes():
    # pct_start=1.0: torch divides by zero when stepped to total_steps, not before
    with pytest.raises(ZeroDivisionError):
        torch_rates(lambda opt: torch_sched.OneCycleLR(opt, max_lr=0.1, total_steps=10,
                                                      pct_start=1.0), 10)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR, momentum=0.9)
    torch_schedule = torch_sched.OneCycleLR(opt, max_lr=0.1, total_steps=10, pct_start=1.0)
    lrs, momenta = [opt.param_groups[0]["lr"]], [opt.param_groups[0]["momentum"]]
    for _ in range(9):
        opt.step()
        torch_schedule.step()
        lrs.append(opt.param_groups[0]["lr"])
        momenta.append(opt.param_groups[0]["momentum"])
    schedule = S.OneCycleLR(max_lr=0.1, total_steps=10, pct_start=1.0)
    np.testing.assert_allclose(ours(schedule, 0, 9), lrs, rtol=RTOL, atol=0)
    np.testing.assert_allclose(ours(schedule.momentum, 0, 9), momenta, rtol=RTOL, atol=0)
    assert lrs[-1] == pytest.approx(0.1)   # the peak, at the last step
    np.testing.assert_array_equal(ours(schedule, 9, 12), [lrs[-1]] * 4)
    np.testing.assert_array_equal(ours(schedule.momentum, 9, 12), [momenta[-1]] * 4)


# ------------------------------------------------------- continuing in SequentialLR

def test_swalr_docstring_example_equals_torch():
    # the example's learning_rate is the rate torch's SWALR starts from at the milestone
    example = "\n".join(line.strip()[4:] for line in swa.SWALR.__doc__.splitlines()
                         if line.strip().startswith((">>> ", "... ")))
    namespace = {"mx": mx, **vars(S), "SWALR": swa.SWALR}
    exec(example, namespace)
    expected = torch_rates(lambda opt: torch_sched.SequentialLR(
        opt, [torch_sched.CosineAnnealingLR(opt, T_max=75), torch_swa.SWALR(opt, swa_lr=0.05)],
        milestones=[75]), 100)
    np.testing.assert_allclose(ours(namespace["schedule"], 0, 100), expected, rtol=RTOL, atol=0)
    assert expected[75] == expected[74] != LR   # from the cosine's last rate, not LR


def test_multiplicative_after_a_milestone_continues_as_documented():
    # SequentialLR's docstring: pass the previous rate times lr_lambda(0)
    lam = lambda k: 0.9 if k % 2 else 0.8   # noqa: E731
    expected = torch_rates(lambda opt: torch_sched.SequentialLR(
        opt, [torch_sched.StepLR(opt, step_size=3, gamma=0.5),
              torch_sched.MultiplicativeLR(opt, lam)], milestones=[10]), 30)
    step = S.StepLR(LR, step_size=3, gamma=0.5)
    previous = step(9, dtype=mx.float64).item()
    schedule = S.SequentialLR([step, S.MultiplicativeLR(previous * lam(0), lam, total_steps=30)],
                              milestones=[10])
    np.testing.assert_allclose(ours(schedule, 0, 30), expected, rtol=RTOL, atol=0)


def test_reduce_on_plateau_refuses_scheduled_rates_before_anything_changes():
    # It sets numbers; a scheduled group could not take one once stepped (a compiled step
    # holds the schedule), and finding out mid-reduction would leave groups half-cut.
    from mlx_optim import SGD

    params = {"w": mx.ones(2), "b": mx.ones(2)}
    opt = SGD(learning_rate=0.1, groups=[{"params": "b", "learning_rate": S.StepLR(0.1, step_size=2)}])
    with pytest.raises(ValueError, match=r"rate of group\(s\) \[1\].*is a schedule"):
        S.ReduceLROnPlateau(opt, patience=0)
    assert opt.attached == []
    opt = SGD(learning_rate=0.1)
    plateau = S.ReduceLROnPlateau(opt, patience=0)
    plateau.step(1.0)
    opt.learning_rate = S.StepLR(0.1, step_size=2)  # before the first step: allowed
    before = plateau.state_dict()
    with pytest.raises(ValueError, match="is a schedule"):
        plateau.step(2.0)
    assert plateau.state_dict() == before
    opt.apply_gradients({"w": mx.ones(2)}, params)


def test_reduce_on_plateau_refuses_a_constant_rate_and_a_failed_step_changes_nothing():
    from mlx_optim import SGD

    opt = SGD(learning_rate=0.1, momentum=0.9, constants=("learning_rate",))
    with pytest.raises(ValueError, match="has it among its constants"):
        S.ReduceLROnPlateau(opt)
    assert opt.attached == []
    # A reduction that raises (min_lrs for two groups, the optimizer has one, as torch's
    # RuntimeError when groups were added) leaves the counters as they were.
    opt = SGD(learning_rate=0.1)
    plateau = S.ReduceLROnPlateau(opt, patience=1)
    plateau.step(1.0)
    plateau.step(2.0)
    plateau.load_state_dict({**plateau.state_dict(), "min_lrs": [0.0, 0.0], "default_min_lr": None})
    before = plateau.state_dict()
    with pytest.raises(RuntimeError, match="number of param groups"):
        plateau.step(3.0)
    assert plateau.state_dict() == before
    assert opt.learning_rate.item() == pytest.approx(0.1)
