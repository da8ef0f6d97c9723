"""Adamax: Adam with an infinity-norm second moment, as torch computes it."""

from __future__ import annotations

import mlx.core as mx

from . import _validate as v
from ._base import Optimizer
from ._math import bias_correction, cast, lerp


def adamax_update(param, grad, state, *, learning_rate, betas, eps):
    """One Adamax step on ``exp_avg`` and ``exp_inf``."""
    beta1, beta2 = betas
    exp_avg = lerp(state["exp_avg"], grad, 1 - beta1)
    exp_inf = mx.maximum(cast(beta2, grad) * state["exp_inf"], mx.abs(grad) + cast(eps, grad))
    step_size = learning_rate / bias_correction(beta1, state["step"])
    new_param = param - cast(step_size, param) * exp_avg / exp_inf
    return new_param, {**state, "exp_avg": exp_avg, "exp_inf": exp_inf}


class Adamax(Optimizer):
    r"""Adamax, as ``torch.optim.Adamax``.

    .. math::

        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t \\
        u_t &= \max(\beta_2 u_{t-1}, |g_t| + \epsilon) \\
        \theta_t &= \theta_{t-1} - \frac{\gamma}{1-\beta_1^t} \frac{m_t}{u_t}

    Args:
        learning_rate: :math:`\gamma`. Default: ``2e-3``.
        betas: :math:`(\beta_1, \beta_2)`. Default: ``(0.9, 0.999)``.
        eps: :math:`\epsilon`. Default: ``1e-8``.
        weight_decay: L2 penalty. Default: ``0``.
        maximize: ascend the objective. Default: ``False``.
        groups: per-group hyperparameters, see :class:`mlx_optim.Optimizer`.
        constants: hyperparameters compiled into the step, see :class:`mlx_optim.Optimizer`.

    Example:
        >>> opt = mlx_optim.Adamax(learning_rate=2e-3)

    Differences: ``mlx.optimizers.Adamax`` uses ``max(beta2 * u, |g|)``, adds ``eps`` to
    the denominator and does not bias-correct; torch adds ``eps`` inside the maximum and
    scales the learning rate by ``1 / (1 - beta1^t)``.

    Reference: Kingma and Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015, sec. 7.
    """

    rules = (v.LEARNING_RATE, v.EPS, *v.BETAS, v.WEIGHT_DECAY)
    update_fn = staticmethod(adamax_update)
    casts_in_kernel = True

    def __init__(self, learning_rate=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 maximize=False, groups=None, constants=()):
        super().__init__(dict(learning_rate=learning_rate, betas=tuple(betas), eps=eps,
                              weight_decay=weight_decay, maximize=maximize), groups, constants)

    def init_state(self, param, hyper, active):
        return {"exp_avg": mx.zeros_like(param), "exp_inf": mx.zeros_like(param)}
