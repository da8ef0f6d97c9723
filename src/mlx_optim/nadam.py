"""NAdam: Adam with Nesterov momentum and torch's momentum-decay schedule."""

from __future__ import annotations

import mlx.core as mx

from . import _validate as v
from ._base import Optimizer
from ._math import bias_correction, cast, ema_square, lerp, scalar_dtype


def nadam_update(param, grad, state, *, learning_rate, betas, eps, momentum_decay):
    """One NAdam step on ``exp_avg``, ``exp_avg_sq`` and the scalar ``mu_product``."""
    beta1, beta2 = betas
    step = state["step"].astype(scalar_dtype())
    mu = beta1 * (1.0 - 0.5 * 0.96 ** (step * momentum_decay))
    mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((step + 1) * momentum_decay))
    mu_product = state["mu_product"].astype(scalar_dtype()) * mu
    exp_avg = lerp(state["exp_avg"], grad, 1 - beta1)
    exp_avg_sq = ema_square(state["exp_avg_sq"], grad, beta2)
    # torch's  (...) / (sqrt(v / bc2) + eps), with sqrt(bc2) moved into the scalars: one
    # divide per element instead of two (as in Adam).
    bias_correction2_sqrt = mx.sqrt(bias_correction(beta2, state["step"]))
    denom = mx.sqrt(exp_avg_sq) + cast(eps * bias_correction2_sqrt, grad)
    grad_coef = learning_rate * bias_correction2_sqrt * (1.0 - mu) / (1.0 - mu_product)
    avg_coef = learning_rate * bias_correction2_sqrt * mu_next / (1.0 - mu_product * mu_next)
    new_param = param - (cast(grad_coef, param) * grad + cast(avg_coef, param) * exp_avg) / denom
    return new_param, {**state, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "mu_product": mu_product}


class NAdam(Optimizer):
    r"""NAdam, as ``torch.optim.NAdam``.

    .. math::

        \mu_t &= \beta_1 \left(1 - \tfrac12\, 0.96^{t\psi}\right),
            \qquad \Pi_t = \prod_{i\le t} \mu_i \\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        \theta_t &= \theta_{t-1} - \gamma\,
            \frac{\frac{1-\mu_t}{1-\Pi_t} g_t + \frac{\mu_{t+1}}{1-\Pi_t\mu_{t+1}} m_t}
                 {\sqrt{v_t / (1-\beta_2^t)} + \epsilon}

    Args:
        learning_rate: :math:`\gamma`. Default: ``2e-3``.
        betas: :math:`(\beta_1, \beta_2)`. Default: ``(0.9, 0.999)``.
        eps: :math:`\epsilon`. Default: ``1e-8``.
        weight_decay: :math:`\lambda`. Default: ``0``.
        momentum_decay: :math:`\psi`. Default: ``4e-3``.
        decoupled_weight_decay: decay weights directly (NAdamW). Default: ``False``.
        maximize: ascend the objective. Default: ``False``.
        groups: per-group hyperparameters, see :class:`mlx_optim.Optimizer`.
        constants: hyperparameters compiled into the step, see :class:`mlx_optim.Optimizer`.

    Example:
        >>> opt = mlx_optim.NAdam(learning_rate=2e-3, momentum_decay=4e-3)

    Differences: ``mlx.optimizers`` has no NAdam. ``mu_product`` is kept per parameter,
    as in torch, so its state loads from a torch checkpoint.

    Reference: Dozat, "Incorporating Nesterov Momentum into Adam", ICLR workshop 2016.
    """

    rules = (v.LEARNING_RATE, v.EPS, *v.BETAS, v.WEIGHT_DECAY,
             v.at_least("momentum_decay", 0.0, "Invalid momentum_decay value: {value}"))
    update_fn = staticmethod(nadam_update)

    def __init__(self, learning_rate=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 momentum_decay=4e-3, decoupled_weight_decay=False, *, maximize=False, groups=None,
                 constants=()):
        super().__init__(dict(learning_rate=learning_rate, betas=tuple(betas), eps=eps,
                              weight_decay=weight_decay, momentum_decay=momentum_decay,
                              decoupled_weight_decay=decoupled_weight_decay, maximize=maximize),
                         groups, constants)

    def init_state(self, param, hyper, active):
        return {"mu_product": mx.array(1.0, dtype=scalar_dtype()),
                "exp_avg": mx.zeros_like(param), "exp_avg_sq": mx.zeros_like(param)}
