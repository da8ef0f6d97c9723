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
    # ((dotted path, shape), ...): parameters to init with, for errors about parameters.
    params: tuple = ()


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
    grad_kind: str = "dense"  # or "row-sparse": see parity.harness
    skips: dict = field(default_factory=dict)  # config desc -> reason
    test_skips: dict = field(default_factory=dict)  # generic test name -> reason


def C(desc, extra=False, **kwargs):
    return Config(kwargs, desc, extra)


def E(match, extra=False, params=(), **kwargs):
    return ErrorCase(kwargs, match, extra, params)


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

# Muon's tests use 2-D parameters only, so generic tests built on vectors skip it.
MUON_2D_ONLY = "Muon takes 2-D parameters only; this test's tree holds a vector"
# Muon runs Newton–Schulz in bfloat16 as torch does. MLX's and torch's bf16 matmuls mostly
# round alike, but where one rounds an element of the orthogonalised update the other way,
# it differs by a bf16 ulp (2**-8 relative): times lr, over 12 steps, ~1e-5 of the
# parameters' scale, whatever their dtype. Measured worst: 3.3e-6 (ns_coefficients
# (3.4, -4.7, 2.0), float32 and float64); the other rows within 2e-7.
MUON_TOLERANCE = {"float32": 2e-5, "float64": 2e-5}

CASES = CASES + (
    Case("Adafactor", mlx_optim.Adafactor, torch.optim.Adafactor, (
        C("default"),
        C("nonzero weight_decay", weight_decay=0.1, lr=0.01),
        C("maximize", weight_decay=0.1, maximize=True),
        C("non-default beta2_decay", beta2_decay=-1.0),
        C("non-default clipping threshold d", d=1.5),
        C("eps given, large lr", extra=True, lr=0.5, eps=(1e-6, 1e-2), weight_decay=0.01),
        C("tensor lr", extra=True, lr=torch.tensor(0.02)),
    ), errors=(
        E(r"epsilon1 should be >= 0 but is: -1e-30 \(eps\[0\]", eps=(-1e-30, 1e-3)),
        E(r"Clipping threshold d should be >= 1 but is: 0.0 \(d must", d=0.0),
        E(r"beta2_decay should be <= 0 but is: 0.8 \(beta2_decay must be <= 0", beta2_decay=0.8),
        E(r"epsilon2 should be >= 0 but is: -0.1 \(eps\[1\]", extra=True, eps=(None, -0.1)),
        E(r"Learning rate should be >= 0 but is: -0.1 \(learning_rate", extra=True, lr=-0.1),
        E(r"weight_decay should be >= 0 but is: -0.1 \(weight_decay", extra=True, weight_decay=-0.1),
        VECTOR_LR,
    ), shapes=((4, 3), (3,), (2, 3, 4))),
    Case("Muon", mlx_optim.Muon, torch.optim.Muon, (
        C("default"),
        C("non-default lr", lr=0.01),
        C("Tensor lr", lr=torch.tensor(0.001)),
        C("non-default weight_decay", weight_decay=0.2),
        C("non-default momentum", momentum=0.8),
        C("passing alternative ns_steps", ns_steps=6),
        C("passing alternative ns_coefficients", ns_coefficients=(3.4, -4.7, 2.0)),
        C("no nesterov, large lr", extra=True, lr=0.05, nesterov=False),
        C("match_rms_adamw", extra=True, lr=0.01, adjust_lr_fn="match_rms_adamw"),
        C("original, eps", extra=True, lr=0.01, adjust_lr_fn="original", eps=1e-3),
    ), errors=(
        E(r"Adjust learning rate function arbitrary is not supported \(adjust_lr_fn",
          adjust_lr_fn="arbitrary"),
        E(r"Muon only supports 2D parameters whereas we found a parameter with size: "
          r"\(2, 3, 4\) \('blocks.conv'\)", extra=True,
          params=(("layer.weight", (3, 2)), ("blocks.conv", (2, 3, 4)))),
        E(r"Muon only supports 2D parameters .* size: \(3,\) \('layer.bias'\)", extra=True,
          params=(("layer.bias", (3,)),)),
        E(r"Learning rate should be >= 0 but is: -0.1 \(learning_rate", extra=True, lr=-0.1),
        E(r"momentum should be >= 0 but is: -0.5 \(momentum", extra=True, momentum=-0.5),
        E(r"weight decay should be >= 0 but is: -0.1 \(weight_decay", extra=True, weight_decay=-0.1),
        E(r"Number of steps must be less than 100 .*\(ns_steps", extra=True, ns_steps=100),
        E(r"Coefficients must be a tuple of exactly 3 values \(ns_coefficients", extra=True,
          ns_coefficients=(3.4, -4.7)),
        VECTOR_LR,
    ), tolerance=MUON_TOLERANCE, shapes=((4, 3), (3, 5), (6, 2)),
       test_skips={"test_absent_parameter_is_untouched": MUON_2D_ONLY,
                   "test_malformed_gradients_change_nothing": MUON_2D_ONLY}),
    Case("SparseAdam", mlx_optim.SparseAdam, torch.optim.SparseAdam, (
        C("default"),
        C("non-default lr", lr=0.01),
        C("Tensor lr", lr=torch.tensor(0.001)),
        C("maximize", maximize=True),
        C("betas, eps, large lr", extra=True, lr=0.1, betas=(0.5, 0.9), eps=1e-3),
    ), errors=(
        E(r"Invalid beta parameter at index 0: 1.0", lr=0.01, betas=(1.0, 0.0)),
        E(r"Invalid learning rate: 0.0 \(learning_rate must be > 0", extra=True, lr=0.0),
        E(r"Invalid epsilon value: 0.0 \(eps must be > 0", extra=True, eps=0.0),
        BAD_BETA2, VECTOR_LR,
    ), grad_kind="row-sparse", shapes=((5, 3), (4,), (3, 2, 2))),
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
