"""RMSprop with torch's centered and momentum variants."""

from __future__ import annotations

import mlx.core as mx

from . import _validate as v
from ._base import Optimizer
from ._math import cast, ema_square, lerp


def rmsprop_update(param, grad, state, *, learning_rate, alpha, eps, momentum, centered):
    """One RMSprop step on ``square_avg`` (and ``grad_avg``, ``momentum_buffer``)."""
    square_avg = ema_square(state["square_avg"], grad, alpha)
    new_state = {**state, "square_avg": square_avg}
    if centered:
        grad_avg = lerp(state["grad_avg"], grad, 1 - alpha)
        new_state["grad_avg"] = grad_avg
        avg = mx.sqrt(square_avg - mx.square(grad_avg)) + cast(eps, grad)
    else:
        avg = mx.sqrt(square_avg) + cast(eps, grad)
    lr = cast(learning_rate, param)
    if momentum is not None:  # None: momentum is zero, there is no buffer
        mu = cast(momentum, grad)
        # While momentum is 0 (a schedule may pass through 0) torch leaves the buffer alone;
        # the momentum itself is the condition (see sgd_update).
        buf = mx.where(mu, mu * state["momentum_buffer"] + grad / avg, state["momentum_buffer"])
        new_state["momentum_buffer"] = buf
        return param - mx.where(mu, lr * buf, lr * grad / avg), new_state
    return param - lr * grad / avg, new_state


class RMSprop(Optimizer):
    r"""RMSprop, as ``torch.optim.RMSprop``.

    .. math::

        v_t &= \alpha v_{t-1} + (1-\alpha) g_t^2 \\
        \bar g_t &= \alpha \bar g_{t-1} + (1-\alpha) g_t,
            \quad \tilde v_t = v_t - \bar g_t^2 \;(\text{centered}) \\
        b_t &= \mu b_{t-1} + g_t / (\sqrt{\tilde v_t} + \epsilon),
            \quad \theta_t = \theta_{t-1} - \gamma b_t \;(\mu > 0) \\
        \theta_t &= \theta_{t-1} - \gamma\, g_t / (\sqrt{\tilde v_t} + \epsilon)
            \;(\mu = 0)

    Args:
        learning_rate: :math:`\gamma`. Default: ``1e-2``.
        alpha: smoothing constant :math:`\alpha`. Default: ``0.99``.
        eps: :math:`\epsilon`. Default: ``1e-8``.
        weight_decay: L2 penalty. Default: ``0``.
        momentum: :math:`\mu`. Default: ``0``.
        centered: normalise by the variance estimate instead of the second moment.
            Default: ``False``.
        maximize: ascend the objective. Default: ``False``.
        groups: per-group hyperparameters, see :class:`mlx_optim.Optimizer`.
        constants: hyperparameters compiled into the step, see :class:`mlx_optim.Optimizer`.

    Example:
        >>> opt = mlx_optim.RMSprop(learning_rate=1e-3, momentum=0.9, centered=True)

    Differences: ``mlx.optimizers.RMSprop`` has no ``centered``, ``momentum`` or
    ``weight_decay``. Whether momentum is zero is fixed at construction.

    Reference: Hinton, Lecture 6.5 of "Neural Networks for Machine Learning", 2012;
    Graves, "Generating Sequences With Recurrent Neural Networks" (centered), 2013.
    """

    rules = (v.LEARNING_RATE, v.EPS, v.MOMENTUM, v.WEIGHT_DECAY,
             v.at_least("alpha", 0.0, "Invalid alpha value: {value}"))
    structural_zeros = ("weight_decay", "momentum")
    update_fn = staticmethod(rmsprop_update)

    @property
    def casts_in_kernel(self) -> bool:
        # Centered (a second lerp) is deep enough that mx.compile splits the update anyway.
        return not any(values["centered"] for values in self._group_values)

    def __init__(self, learning_rate=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                 centered=False, *, maximize=False, groups=None, constants=()):
        super().__init__(dict(learning_rate=learning_rate, alpha=alpha, eps=eps,
                              weight_decay=weight_decay, momentum=momentum, centered=centered,
                              maximize=maximize), groups, constants)

    def init_state(self, param, hyper, active):
        state = {"square_avg": mx.zeros_like(param)}
        if active["momentum"]:
            state["momentum_buffer"] = mx.zeros_like(param)
        if hyper["centered"]:
            state["grad_avg"] = mx.zeros_like(param)
        return state
