"""RAdam: Adam with the variance rectification switch, compile-friendly."""

from __future__ import annotations

import mlx.core as mx

from . import _validate as v
from ._base import Optimizer
from ._math import bias_correction, cast, ema_square, lerp, scalar_dtype


def radam_update(param, grad, state, *, learning_rate, betas, eps):
    """One RAdam step on ``exp_avg`` and ``exp_avg_sq``."""
    beta1, beta2 = betas
    step = state["step"].astype(scalar_dtype())
    exp_avg = lerp(state["exp_avg"], grad, 1 - beta1)
    exp_avg_sq = ema_square(state["exp_avg_sq"], grad, beta2)
    bias_correction1 = bias_correction(beta1, state["step"])
    bias_correction2 = bias_correction(beta2, state["step"])
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * beta2**step / bias_correction2
    rectified = rho_t > 5.0  # torch's eager `if rho_t > 5`, as a scalar select
    safe_rho = mx.where(rectified, rho_t, rho_inf)
    rect = mx.sqrt((safe_rho - 4) * (safe_rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * safe_rho))
    step_size = learning_rate / bias_correction1
    # step = step_size * m * (rect * adaptive  if rectified else  1), with the switch
    # folded into two scalar coefficients instead of a select over the tensor.
    adaptive_coef = mx.where(rectified, step_size * rect * mx.sqrt(bias_correction2), 0.0)
    plain_coef = mx.where(rectified, 0.0, step_size)
    # Unrectified, torch never reads exp_avg_sq: a denominator of 1 keeps 0 / 0 (eps = 0,
    # a zero gradient) from turning the unused term into NaN.
    denominator_eps = mx.where(rectified, eps, mx.array(1.0, scalar_dtype()))
    adaptive = cast(adaptive_coef, grad) / (mx.sqrt(exp_avg_sq) + cast(denominator_eps, grad))
    new_param = param - exp_avg * (adaptive + cast(plain_coef, grad))
    return new_param, {**state, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


class RAdam(Optimizer):
    r"""RAdam, as ``torch.optim.RAdam``.

    .. math::

        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        \rho_\infty &= \tfrac{2}{1-\beta_2} - 1, \qquad
        \rho_t = \rho_\infty - \tfrac{2 t \beta_2^t}{1-\beta_2^t} \\
        r_t &= \sqrt{\tfrac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}},
            \qquad l_t = \tfrac{\sqrt{1-\beta_2^t}}{\sqrt{v_t}+\epsilon} \\
        \theta_t &= \theta_{t-1} - \gamma \tfrac{m_t}{1-\beta_1^t}
            \cdot \begin{cases} r_t l_t & \rho_t > 5 \\ 1 & \text{otherwise} \end{cases}

    Args:
        learning_rate: :math:`\gamma`. Default: ``1e-3``.
        betas: :math:`(\beta_1, \beta_2)`. Default: ``(0.9, 0.999)``.
        eps: :math:`\epsilon`. Default: ``1e-8``.
        weight_decay: :math:`\lambda`. Default: ``0``.
        decoupled_weight_decay: decay weights directly (RAdamW). Default: ``False``.
        maximize: ascend the objective. Default: ``False``.
        groups: per-group hyperparameters, see :class:`mlx_optim.Optimizer`.
        constants: hyperparameters compiled into the step, see :class:`mlx_optim.Optimizer`.

    Example:
        >>> opt = mlx_optim.RAdam(learning_rate=1e-3)

    Differences: ``mlx.optimizers`` has no RAdam. The ``rho_t > 5`` switch is a select,
    so the step compiles once.

    Reference: Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond", ICLR 2020.
    """

    rules = (v.LEARNING_RATE, v.EPS, *v.BETAS, v.WEIGHT_DECAY)
    update_fn = staticmethod(radam_update)

    def __init__(self, learning_rate=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 decoupled_weight_decay=False, *, maximize=False, groups=None, constants=()):
        super().__init__(dict(learning_rate=learning_rate, betas=tuple(betas), eps=eps,
                              weight_decay=weight_decay,
                              decoupled_weight_decay=decoupled_weight_decay, maximize=maximize),
                         groups, constants)

    def init_state(self, param, hyper, active):
        return {"exp_avg": mx.zeros_like(param), "exp_avg_sq": mx.zeros_like(param)}
