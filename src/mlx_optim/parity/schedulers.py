"""Scheduler configurations checked against ``torch.optim.lr_scheduler``: the one table.

Drives ``tests/test_schedulers.py`` (parity, resume, float32, compile) and ``mlx-optim
verify``. Each row names a scheduler (found in ``mlx_optim.schedulers``/``swa_utils`` and in
torch's modules under the same name) and its arguments; child schedulers of
SequentialLR/ChainedScheduler are rows themselves.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
import torch
from torch.optim import lr_scheduler as torch_sched
from torch.optim import swa_utils as torch_swa

from mlx_optim import schedulers as S
from mlx_optim import swa_utils as swa

LR = 0.1
STEPS = 1200
RTOL = 1e-10


@dataclass(frozen=True)
class Case:
    """A scheduler configuration. ``torch_kwargs`` overrides arguments that must be
    written differently for torch (a lambda over Python ints instead of arrays)."""

    name: str
    kwargs: dict = field(default_factory=dict)
    torch_kwargs: dict = field(default_factory=dict)
    steps: int = STEPS
    optimizer: str = "sgd"   # "adam": torch cycles betas[0] instead of momentum
    id: str = ""

    def __str__(self) -> str:
        return self.id or f"{self.name}({', '.join(f'{k}={v}' for k, v in self.kwargs.items())})"


def sub(name: str, **kwargs) -> Case:
    return Case(name, kwargs)


def _warmup(k):
    return mx.minimum(1.0, (k + 1) / 100)


CASES = [
    Case("LambdaLR", dict(lr_lambda=lambda k: 0.995 ** k), id="LambdaLR-exp"),
    Case("LambdaLR", dict(lr_lambda=lambda k: 1 / (1 + k // 10)), id="LambdaLR-floordiv"),
    Case("LambdaLR", dict(lr_lambda=_warmup), dict(lr_lambda=lambda k: min(1.0, (k + 1) / 100)),
         id="LambdaLR-warmup"),
    Case("MultiplicativeLR", dict(lr_lambda=lambda k: 0.995, total_steps=STEPS),
         dict(lr_lambda=lambda k: 0.995, total_steps=None), id="MultiplicativeLR-const"),
    Case("MultiplicativeLR", dict(lr_lambda=lambda k: 0.5 if k % 100 == 0 else 1.0, total_steps=STEPS),
         dict(lr_lambda=lambda k: 0.5 if k % 100 == 0 else 1.0, total_steps=None),
         id="MultiplicativeLR-branch"),
    Case("MultiplicativeLR", dict(lr_lambda=lambda k: 1 - 1 / (k + 10), total_steps=STEPS + 50),
         dict(lr_lambda=lambda k: 1 - 1 / (k + 10), total_steps=None), id="MultiplicativeLR-harmonic"),
    Case("StepLR", dict(step_size=30, gamma=0.1)),
    Case("StepLR", dict(step_size=1, gamma=0.99)),
    Case("StepLR", dict(step_size=100)),
    Case("MultiStepLR", dict(milestones=[30, 80], gamma=0.1)),
    Case("MultiStepLR", dict(milestones=[10, 10, 500], gamma=0.5)),
    Case("MultiStepLR", dict(milestones=[0, 999], gamma=0.3)),
    Case("ConstantLR", dict()),
    Case("ConstantLR", dict(factor=0.5, total_iters=40)),
    Case("ConstantLR", dict(factor=0.25, total_iters=0)),
    Case("ConstantLR", dict(factor=1 / 7, total_iters=1000)),
    Case("LinearLR", dict()),
    Case("LinearLR", dict(start_factor=0.01, end_factor=1.0, total_iters=500)),
    Case("LinearLR", dict(start_factor=1.0, end_factor=0.0, total_iters=1000)),
    Case("LinearLR", dict(start_factor=1 / 3, end_factor=0.0, total_iters=7)),
    Case("ExponentialLR", dict(gamma=0.99)),
    Case("ExponentialLR", dict(gamma=0.9999)),
    Case("ExponentialLR", dict(gamma=0.9)),
    Case("PolynomialLR", dict()),
    Case("PolynomialLR", dict(total_iters=1000, power=2.0)),
    Case("PolynomialLR", dict(total_iters=777, power=0.5)),
    Case("PolynomialLR", dict(total_iters=0)),
    Case("CosineAnnealingLR", dict(T_max=100)),
    Case("CosineAnnealingLR", dict(T_max=1000, eta_min=1e-4)),
    Case("CosineAnnealingLR", dict(T_max=7, eta_min=0.01)),
    Case("CosineAnnealingLR", dict(T_max=1)),
    Case("CosineAnnealingWarmRestarts", dict(T_0=10)),
    Case("CosineAnnealingWarmRestarts", dict(T_0=10, T_mult=2, eta_min=1e-3)),
    Case("CosineAnnealingWarmRestarts", dict(T_0=1, T_mult=3)),
    Case("CosineAnnealingWarmRestarts", dict(T_0=50, eta_min=0.05)),
    Case("CyclicLR", dict(base_lr=0.01, max_lr=0.1, step_size_up=100)),
    Case("CyclicLR", dict(base_lr=0.001, max_lr=0.1, step_size_up=50, step_size_down=150,
                          mode="triangular2")),
    Case("CyclicLR", dict(base_lr=0.001, max_lr=0.1, step_size_up=200, mode="exp_range",
                          gamma=0.999), optimizer="adam"),
    Case("CyclicLR", dict(base_lr=0.01, max_lr=0.05, step_size_up=10, step_size_down=0,
                          scale_fn=lambda x: 0.5 ** (x / 100), scale_mode="iterations",
                          base_momentum=0.7, max_momentum=0.95), id="CyclicLR-custom-sawtooth"),
    Case("CyclicLR", dict(base_lr=0.01, max_lr=0.1, step_size_up=33, cycle_momentum=False)),
    Case("OneCycleLR", dict(max_lr=0.1, total_steps=1000), steps=1000),
    Case("OneCycleLR", dict(max_lr=0.01, total_steps=1100, anneal_strategy="linear",
                            three_phase=True), steps=1100, optimizer="adam"),
    Case("OneCycleLR", dict(max_lr=0.2, epochs=10, steps_per_epoch=120, pct_start=0.25,
                            div_factor=10.0, final_div_factor=100.0, base_momentum=0.8,
                            max_momentum=0.9), steps=1200),
    Case("OneCycleLR", dict(max_lr=0.05, total_steps=1001, three_phase=True,
                            cycle_momentum=False), steps=1001),
    Case("SequentialLR", dict(schedules=[sub("LinearLR", start_factor=0.1, total_iters=10),
                                         sub("ExponentialLR", gamma=0.99)], milestones=[10]),
         id="SequentialLR-warmup-exp"),
    Case("SequentialLR", dict(schedules=[sub("ConstantLR", factor=0.5, total_iters=5),
                                         sub("StepLR", step_size=100, gamma=0.5),
                                         sub("CosineAnnealingLR", T_max=300)],
                              milestones=[20, 600]), id="SequentialLR-three"),
    # torch starts a later child from its closed form: a ConstantLR with total_iters=0
    # gives the full rate there, not the scaled one it gives on its own.
    Case("SequentialLR", dict(schedules=[sub("ExponentialLR", gamma=0.5),
                                         sub("ConstantLR", factor=0.3, total_iters=0)],
                              milestones=[3]), id="SequentialLR-exp-constant0"),
    Case("SequentialLR", dict(schedules=[sub("MultiStepLR", milestones=[5, 15]),
                                         sub("PolynomialLR", total_iters=500, power=2.0)],
                              milestones=[50]), id="SequentialLR-multistep-poly"),
    # Momentum-cycling children: torch restarts a child's cycle at its milestone and keeps
    # the last momentum set on the other children's steps. OneCycleLR's max_lr / div_factor
    # and a first CyclicLR's base_lr are LR: torch makes the others start from them (not
    # reproduced, see SequentialLR).
    Case("SequentialLR", dict(schedules=[sub("ConstantLR", factor=0.5, total_iters=7),
                                         sub("CyclicLR", base_lr=0.01, max_lr=0.1, step_size_up=50)],
                              milestones=[100]), id="SequentialLR-constant-cyclic"),
    Case("SequentialLR", dict(schedules=[sub("LinearLR", start_factor=0.1, total_iters=50),
                                         sub("OneCycleLR", max_lr=0.5, div_factor=5.0, total_steps=600),
                                         sub("ExponentialLR", gamma=0.99)],
                              milestones=[100, 700]), optimizer="adam",
         id="SequentialLR-linear-onecycle-exp"),
    Case("SequentialLR", dict(schedules=[sub("CyclicLR", base_lr=LR, max_lr=0.5, step_size_up=40),
                                         sub("StepLR", step_size=100, gamma=0.5),
                                         sub("CyclicLR", base_lr=0.001, max_lr=0.1, step_size_up=30,
                                             step_size_down=70, mode="triangular2",
                                             base_momentum=0.7, max_momentum=0.95)],
                              milestones=[150, 400]), id="SequentialLR-cyclic-step-cyclic"),
    # torch never steps a child whose milestones coincide; the momentum before the second
    # CyclicLR is what its constructor set, not the first one's.
    Case("SequentialLR", dict(schedules=[sub("CyclicLR", base_lr=LR, max_lr=0.5, step_size_up=5,
                                             base_momentum=0.6, max_momentum=0.7),
                                         sub("ConstantLR", factor=0.5, total_iters=3),
                                         sub("CyclicLR", base_lr=0.01, max_lr=0.1, step_size_up=30)],
                              milestones=[0, 20]), id="SequentialLR-skipped-cyclic"),
    Case("ChainedScheduler", dict(schedules=[sub("ConstantLR", factor=0.1, total_iters=2),
                                             sub("ExponentialLR", gamma=0.99)]),
         id="ChainedScheduler-constant-exp"),
    Case("ChainedScheduler", dict(schedules=[sub("LinearLR", start_factor=0.01, total_iters=100),
                                             sub("StepLR", step_size=200, gamma=0.5)]),
         id="ChainedScheduler-linear-step"),
    Case("ChainedScheduler", dict(schedules=[sub("MultiStepLR", milestones=[100, 700], gamma=0.5),
                                             sub("PolynomialLR", total_iters=1000, power=1.5),
                                             sub("ExponentialLR", gamma=0.9995)]),
         id="ChainedScheduler-three"),
    Case("SWALR", dict(swa_lr=0.05)),
    Case("SWALR", dict(swa_lr=0.5, anneal_epochs=5, anneal_strategy="linear")),
    Case("SWALR", dict(swa_lr=0.01, anneal_epochs=0)),
    Case("SWALR", dict(swa_lr=0.02, anneal_epochs=300, anneal_strategy="cos")),
]

NO_LEARNING_RATE = {"CyclicLR", "OneCycleLR"}   # they set their own starting rate
COMPOSITES = {"SequentialLR", "ChainedScheduler"}


# ------------------------------------------------------------------------ builders

def build_ours(case: Case) -> S.Schedule:
    cls = getattr(S, case.name, None) or getattr(swa, case.name)
    kwargs = dict(case.kwargs)
    if case.name in COMPOSITES:
        kwargs["schedules"] = [build_ours(child) for child in kwargs["schedules"]]
        return cls(**kwargs)
    if case.name in NO_LEARNING_RATE:
        return cls(**kwargs)
    return cls(LR, **kwargs)


def build_torch(case: Case, opt: torch.optim.Optimizer):
    cls = getattr(torch_sched, case.name, None) or getattr(torch_swa, case.name)
    kwargs = {**case.kwargs, **case.torch_kwargs}
    kwargs = {k: v for k, v in kwargs.items() if not (k == "total_steps" and v is None)}
    if case.name in COMPOSITES:
        children = [build_torch(child, opt) for child in kwargs.pop("schedules")]
        return cls(opt, schedulers=children, **kwargs) if case.name == "SequentialLR" else cls(children)
    return cls(opt, **kwargs)


def torch_optimizer(case: Case) -> torch.optim.Optimizer:
    params = [torch.nn.Parameter(torch.zeros(1))]
    if case.optimizer == "adam":
        return torch.optim.Adam(params, lr=LR)
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


def torch_momentum(opt) -> float:
    group = opt.param_groups[0]
    return group["betas"][0] if "betas" in group else group["momentum"]


def torch_run(case: Case, resume_at: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """torch's rates (and momenta) after 0..steps scheduler steps; with ``resume_at``,
    rebuilt from state dicts at that step, and only the values from it on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = torch_optimizer(case)
        sched = build_torch(case, opt)
        lrs, moms = [opt.param_groups[0]["lr"]], [torch_momentum(opt)]
        for k in range(1, case.steps + 1):
            opt.step()
            sched.step()
            if k == resume_at:
                saved = copy.deepcopy((opt.state_dict(), sched.state_dict()))
                opt = torch_optimizer(case)
                sched = build_torch(case, opt)
                opt.load_state_dict(saved[0])
                sched.load_state_dict(saved[1])
                lrs, moms = [], []
            lrs.append(float(opt.param_groups[0]["lr"]))
            moms.append(float(torch_momentum(opt)))
    return np.array(lrs), np.array(moms)


def ours(schedule: S.Schedule, start: int, stop: int, dtype=mx.float64) -> np.ndarray:
    return np.array(schedule(mx.arange(start, stop + 1), dtype=dtype))


def cycles_momentum(case: Case) -> bool:
    if case.name == "SequentialLR":
        return any(cycles_momentum(child) for child in case.kwargs["schedules"])
    return case.name in NO_LEARNING_RATE and case.kwargs.get("cycle_momentum", True)


# (rtol, atol as a fraction of the largest rate) per dtype of the schedule's values:
# float64 must equal torch's doubles; float32 is torch's value rounded.
TOLERANCE = {"float64": (RTOL, 0.0), "float32": (2e-5, 1e-6)}
