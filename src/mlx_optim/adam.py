"""Adam and AdamW, with torch's bias correction, amsgrad and weight decay."""

from __future__ import annotations

import mlx.core as mx

from . import _validate as v
from ._base import Optimizer
from ._math import bias_correction, cast, ema_square, lerp


def adam_update(param, grad, state, *, learning_rate, betas, eps, amsgrad):
    """One Adam step on ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq``)."""
    beta1, beta2 = betas
    exp_avg = lerp(state["exp_avg"], grad, 1 - beta1)
    exp_avg_sq = ema_square(state["exp_avg_sq"], grad, beta2)
    new_state = {**state, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    if amsgrad:
        exp_avg_sq = mx.maximum(state["max_exp_avg_sq"], exp_avg_sq)
        new_state["max_exp_avg_sq"] = exp_avg_sq
    # torch's  step_size * m / (sqrt(v) / sqrt(bc2) + eps), with sqrt(bc2) moved into the
    # two scalars: one divide per element instead of two, one scalar input fewer.
    bias_correction2_sqrt = mx.sqrt(bias_correction(beta2, state["step"]))
    step_size = learning_rate * bias_correction2_sqrt / bias_correction(beta1, state["step"])
    denom = mx.sqrt(exp_avg_sq) + cast(eps * bias_correction2_sqrt, param)
    return param - cast(step_size, param) * exp_avg / denom, new_state


class Adam(Optimizer):
    r"""Adam, as ``torch.optim.Adam``.

    .. math::

        g_t &\leftarrow g_t + \lambda \theta_{t-1}
            \quad\text{or}\quad \theta_{t-1} \leftarrow \theta_{t-1}(1 - \gamma\lambda)
            \;(\text{decoupled}) \\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t \\
        v_t &= \beta_2 v_{t-1} + (1-\beta_2) g_t^2
            \qquad \hat v_t = \max(\hat v_{t-1}, v_t) \;(\text{amsgrad}) \\
        \theta_t &= \theta_{t-1} - \frac{\gamma}{1-\beta_1^t}
            \frac{m_t}{\sqrt{v_t} / \sqrt{1-\beta_2^t} + \epsilon}

    Args:
        learning_rate: :math:`\gamma`. Default: ``1e-3``.
        betas: :math:`(\beta_1, \beta_2)`. Default: ``(0.9, 0.999)``.
        eps: :math:`\epsilon`. Default: ``1e-8``.
        weight_decay: :math:`\lambda`. Default: ``0`` (``1e-2`` for :class:`AdamW`).
        amsgrad: keep the maximum of the second moments. Default: ``False``.
        maximize: ascend the objective. Default: ``False``.
        decoupled_weight_decay: decay the weights directly (AdamW) instead of adding
            :math:`\lambda\theta` to the gradient. Default: ``False``.
        groups: per-group hyperparameters, see :class:`mlx_optim.Optimizer`.
        constants: hyperparameters compiled into the step, see :class:`mlx_optim.Optimizer`.

    Example:
        >>> opt = mlx_optim.Adam(learning_rate=3e-4, weight_decay=1e-4)
        >>> opt.update(model, grads)

    Differences: ``mlx.optimizers.Adam`` skips bias correction by default and has no
    weight decay; this class always bias-corrects, as torch does.

    Reference: Kingma and Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015;
    Reddi et al., "On the Convergence of Adam and Beyond" (amsgrad), ICLR 2018.
    """

    rules = (v.LEARNING_RATE, v.EPS, *v.BETAS, v.WEIGHT_DECAY)
    update_fn = staticmethod(adam_update)

    def __init__(self, learning_rate=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, maximize=False, decoupled_weight_decay=False, groups=None,
                 constants=()):
        super().__init__(
            dict(learning_rate=learning_rate, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                 amsgrad=amsgrad, maximize=maximize, decoupled_weight_decay=decoupled_weight_decay),
            groups, constants,
        )

    def init_state(self, param, hyper, active):
        state = {"exp_avg": mx.zeros_like(param), "exp_avg_sq": mx.zeros_like(param)}
        if hyper["amsgrad"]:
            state["max_exp_avg_sq"] = mx.zeros_like(param)
        return state


class AdamW(Adam):
    r"""AdamW, as ``torch.optim.AdamW``: :class:`Adam` with decoupled weight decay.

    .. math::

        \theta_{t-1} \leftarrow \theta_{t-1}(1 - \gamma\lambda), \text{ then Adam's step.}

    Args: as :class:`Adam`, with ``weight_decay`` defaulting to ``1e-2`` and always decoupled.

    Example:
        >>> opt = mlx_optim.AdamW(learning_rate=1e-3, weight_decay=0.05,
        ...     groups=[{"params": ["*.bias", "*norm*"], "weight_decay": 0.0}])

    Differences: ``mlx.optimizers.AdamW`` skips bias correction by default.

    Reference: Loshchilov and Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
    """

    def __init__(self, learning_rate=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, groups=None, constants=()):
        super().__init__(learning_rate, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         decoupled_weight_decay=True, groups=groups, constants=constants)
