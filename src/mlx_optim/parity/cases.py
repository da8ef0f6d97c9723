"""The one table of optimizer configurations: it drives the generic tests and `mlx-optim verify`.

Configurations are written in torch's argument names (``lr`` ...), seeded from torch
2.13's own test database (``torch.testing._internal.common_optimizers.optim_db``:
``optim_inputs_func`` and ``optim_error_inputs_func``), minus torch's implementation
switches. ``tests/test_drift.py`` fails when torch's database lists a configuration this table
lacks. ``extra=True`` marks configurations we add beyond torch's database.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import torch

import mlx_optim

TORCH_ONLY = ("foreach", "fused", "capturable", "differentiable")


@dataclass(frozen=True)
class Config:
    kwargs: dict
    desc: str
    extra: bool = False  # ours, beyond torch's database


@dataclass(frozen=True)
class ErrorCase:
    kwargs: dict
    match: str  # a regex our message must contain (torch's own where torch has one)
    extra: bool = False


@dataclass(frozen=True)
class Case:
    name: str
    ours: type
    torch_cls: type
    configs: tuple[Config, ...]
    errors: tuple[ErrorCase, ...] = ()
    # (rtol, atol relative to the array's scale) per dtype; loosened only with a reason.
    tolerance: dict = field(default_factory=lambda: {"float32": 1e-5, "float64": 1e-6})
    shapes: tuple = ((4, 3), (3,), (2, 5))
    grad_kind: str = "dense"
    skips: dict = field(default_factory=dict)  # config desc -> reason


def C(desc, extra=False, **kwargs):
    return Config(kwargs, desc, extra)


def E(match, extra=False, **kwargs):
    return ErrorCase(kwargs, match, extra)


NEG_LR = E(r"Invalid learning rate: -0.1 \(learning_rate must be >= 0", extra=True, lr=-0.1)
NEG_EPS = E(r"Invalid epsilon value: -1e-08 \(eps must be >= 0", extra=True, eps=-1e-8)
NEG_WD = E(r"Invalid weight_decay value: -0.1 \(weight_decay", extra=True, weight_decay=-0.1)
BAD_BETA1 = E(r"Invalid beta parameter at index 0: -0.1 \(betas\[0\]", extra=True, betas=(-0.1, 0.999))
BAD_BETA2 = E(r"Invalid beta parameter at index 1: 1.0 \(betas\[1\]", extra=True, betas=(0.9, 1.0))
VECTOR_LR = E(r"learning_rate must be a scalar \(1-element\) value", lr=torch.tensor([0.001, 0.001]))
ADAM_ERRORS = (
    E(r"Invalid beta parameter at index 0: 1.0", lr=0.01, betas=(1.0, 0.0)),
    E(r"Invalid weight_decay value: -1", lr=0.01, weight_decay=-1),
    NEG_LR, NEG_EPS, BAD_BETA1, BAD_BETA2, VECTOR_LR,
)

CASES = (
    Case("SGD", mlx_optim.SGD, torch.optim.SGD, (
        C("default"),
        C("non-default lr", lr=0.01),
        C("tensor lr", lr=torch.tensor(0.001)),
        C("non-zero weight_decay", weight_decay=0.5),
        C("momentum", momentum=0.9),
        C("maximize", weight_decay=0.1, maximize=True),
        C("dampening", momentum=0.9, dampening=0.5),
        C("weight_decay w/ momentum", momentum=0.9, weight_decay=0.1),
        C("nesterov", momentum=0.9, nesterov=True, weight_decay=0.1),
        C("nesterov, maximize, lr", extra=True, lr=0.05, momentum=0.5, nesterov=True, maximize=True),
    ), errors=(
        E(r"Invalid momentum value: -0.5", lr=0.01, momentum=-0.5),
        E(r"Nesterov momentum requires a momentum and zero dampening", extra=True, nesterov=True),
        E(r"Nesterov momentum requires a momentum and zero dampening", extra=True, nesterov=True,
          momentum=0.9, dampening=0.1),
        NEG_LR, NEG_WD, VECTOR_LR,
    )),
    Case("Adam", mlx_optim.Adam, torch.optim.Adam, (
        C("default"),
        C("non-default lr", lr=0.01),
        C("nonzero weight_decay", weight_decay=0.1),
        C("maximize", weight_decay=0.1, maximize=True),
        C("amsgrad", weight_decay=0.1, amsgrad=True),
        C("decoupled_weight_decay", extra=True, lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
        C("amsgrad, maximize, betas", extra=True, lr=0.01, betas=(0.8, 0.99), amsgrad=True, maximize=True),
        C("tensor lr", extra=True, lr=torch.tensor(0.002)),
    ), errors=ADAM_ERRORS),
    Case("AdamW", mlx_optim.AdamW, torch.optim.AdamW, (
        C("default"),
        C("non-default lr", lr=0.01),
        C("nonzero weight_decay", weight_decay=0.1),
        C("maximize", weight_decay=0.1, maximize=True),
        C("amsgrad", weight_decay=0.1, amsgrad=True),
        C("eps, betas", extra=True, lr=0.01, eps=1e-6, betas=(0.5, 0.9)),
    ), errors=ADAM_ERRORS),
    Case("Adamax", mlx_optim.Adamax, torch.optim.Adamax, (
        C("default"),
        C("non-default lr", lr=0.1),
        C("nonzero weight_decay", weight_decay=0.1),
        C("maximize", maximize=True),
        C("maximize, weight_decay", weight_decay=0.1, maximize=True),
        C("betas, eps", extra=True, lr=0.01, betas=(0.5, 0.9), eps=1e-3),
    ), errors=(
        E(r"Invalid beta parameter at index 1: 1.0", lr=0.01, betas=(0.0, 1.0)),
        NEG_LR, NEG_EPS, NEG_WD, BAD_BETA1, VECTOR_LR,
    )),
    Case("RMSprop", mlx_optim.RMSprop, torch.optim.RMSprop, (
        C("default"),
        C("non-default lr", lr=0.001),
        C("nonzero weight_decay", weight_decay=0.1),
        C("maximize", maximize=True),
        C("centered", weight_decay=0.1, centered=True),
        C("maximize, weight_decay", maximize=True, weight_decay=0.1),
        C("momentum", weight_decay=0.1, centered=True, momentum=0.1),
        C("maximize, centered, weight_decay, w/ momentum", weight_decay=0.1, centered=True,
          momentum=0.1, maximize=True),
        C("momentum, alpha", extra=True, lr=0.001, momentum=0.9, alpha=0.9),
    ), errors=(
        E(r"Invalid momentum value: -1.0", lr=0.01, momentum=-1.0),
        E(r"Invalid alpha value: -0.5 \(alpha", extra=True, alpha=-0.5),
        NEG_LR, NEG_EPS, NEG_WD, VECTOR_LR,
    )),
    Case("NAdam", mlx_optim.NAdam, torch.optim.NAdam, (
        C("default"),
        C("non-default lr", lr=0.001),
        C("non-zero momentum_decay", momentum_decay=0.006),
        C("weight_decay", weight_decay=0.1),
        C("weight_decay, momentum_decay", weight_decay=0.1, momentum_decay=0.006),
        C("decoupled_weight_decay", weight_decay=0.1, momentum_decay=0.006, decoupled_weight_decay=True),
        C("maximize", weight_decay=0.1, maximize=True),
        C("betas, eps", extra=True, lr=0.01, betas=(0.8, 0.99), eps=1e-6),
    ), errors=(
        E(r"Invalid beta parameter at index 0: 1.0", lr=0.01, betas=(1.0, 0.0)),
        E(r"Invalid momentum_decay value: -0.2", lr=0.01, momentum_decay=-0.2),
        NEG_LR, NEG_EPS, NEG_WD, BAD_BETA2, VECTOR_LR,
    )),
    Case("RAdam", mlx_optim.RAdam, torch.optim.RAdam, (
        C("default"),
        C("non-default lr", lr=0.002),
        C("non-default eps", eps=1e-6),
        C("nonzero weight_decay", weight_decay=0.1),
        C("decoupled_weight_decay", weight_decay=0.1, decoupled_weight_decay=True),
        C("maximize", weight_decay=0.1, maximize=True),
        # beta2 = 0.9 puts rho_t above 5 from step 6 on, so both branches run in 12 steps.
        C("rectification switches on", extra=True, lr=0.01, betas=(0.9, 0.9)),
    ), errors=(
        E(r"Invalid beta parameter at index 0: 1.0", lr=0.01, betas=(1.0, 0.0)),
        E(r"Invalid weight_decay value: -1", lr=0.01, weight_decay=-1),
        NEG_LR, NEG_EPS, BAD_BETA2, VECTOR_LR,
    )),
    Case("Adagrad", mlx_optim.Adagrad, torch.optim.Adagrad, (
        C("default"),
        C("nonzero weight_decay", weight_decay=0.1),
        C("maximize", weight_decay=0.1, maximize=True),
        C("non-default lr", lr=0.1),
        C("initial_accumulator_value", initial_accumulator_value=0.1, weight_decay=0.1),
        C("lr_decay", lr=0.1, lr_decay=0.5, weight_decay=0.1),
        C("Tensor lr", lr=torch.tensor(0.001)),
        C("eps", extra=True, lr=0.1, eps=1e-3),
    ), errors=(
        E(r"Invalid lr_decay value: -0.5", lr=0.01, lr_decay=-0.5),
        E(r"Invalid initial_accumulator_value value: -1", extra=True, initial_accumulator_value=-1),
        NEG_LR, NEG_EPS, NEG_WD, VECTOR_LR,
    )),
    Case("Adadelta", mlx_optim.Adadelta, torch.optim.Adadelta, (
        C("default"),
        C("non-default lr", lr=0.01),
        C("nonzero weight_decay", weight_decay=0.1),
        C("maximize", maximize=True),
        C("maximize, weight_decay", weight_decay=0.1, maximize=True),
        C("rho", rho=0.95, weight_decay=0.9),
        C("eps", extra=True, eps=1e-3, rho=0.5),
    ), errors=(
        E(r"Invalid rho value: 1.1", lr=0.01, rho=1.1),
        NEG_LR, NEG_EPS, NEG_WD, VECTOR_LR,
    )),
    Case("ASGD", mlx_optim.ASGD, torch.optim.ASGD, (
        C("default"),
        C("non-default lambd", lambd=0.1),
        C("non-default lr", lr=0.02),
        C("t0", t0=100),
        C("maximize", maximize=True),
        C("nonzero weight_decay", weight_decay=0.1),
        C("maximize, nonzero weight_decay", weight_decay=0.1, maximize=True),
        # t0 inside the run, so the average moves from copying to averaging.
        C("averaging starts", extra=True, lr=0.05, t0=4, lambd=0.01, alpha=0.5),
    ), errors=(
        E(r"Invalid weight_decay value: -0.5", lr=0.01, weight_decay=-0.5),
        E(r"Invalid lambd value: -1 \(lambd", extra=True, lambd=-1),
        NEG_LR, VECTOR_LR,
    )),
    Case("Rprop", mlx_optim.Rprop, torch.optim.Rprop, (
        C("default"),
        C("non-default lr", lr=0.0002),
        C("non-default etas", etas=(0.5, 1.5)),
        C("non-default step_sizes", step_sizes=(2e-6, 100)),
        C("maximize", maximize=True),
        C("tight step_sizes", extra=True, lr=0.1, step_sizes=(0.01, 0.2)),
    ), errors=(
        E(r"Invalid eta values: 1.0, 0.5", lr=0.01, etas=(1.0, 0.5)),
        E(r"Invalid eta values: 0.5, 0.9 \(etas\[1\] must be > 1", extra=True, etas=(0.5, 0.9)),
        E(r"Invalid step_sizes values: 1.0, 0.1", extra=True, step_sizes=(1.0, 0.1)),
        NEG_LR, VECTOR_LR,
    )),
)

BY_NAME = {case.name: case for case in CASES}


def ours_kwargs(kwargs: dict) -> dict:
    """torch's keyword arguments in our names and types."""
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            value = mx.array(value.numpy())
        out["learning_rate" if key == "lr" else key] = value
    return out


def normalized(kwargs: dict) -> tuple:
    """A comparable form of a configuration: torch-only switches dropped, tensors as values."""
    def norm(value):
        if isinstance(value, torch.Tensor):
            return ("tensor", tuple(value.reshape(-1).tolist()))
        if isinstance(value, (tuple, list)):
            return tuple(norm(v) for v in value)
        return value

    return tuple(sorted((k, norm(v)) for k, v in kwargs.items() if k not in TORCH_ONLY))


def config_params():
    """(case, config) pairs for pytest parametrisation, with readable ids."""
    return [(case, config) for case in CASES for config in case.configs]


def config_id(pair) -> str:
    case, config = pair
    return f"{case.name}-{config.desc}"
