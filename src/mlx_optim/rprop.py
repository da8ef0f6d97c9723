"""Rprop: resilient backpropagation, sign-based steps with per-weight step sizes."""

from __future__ import annotations

import mlx.core as mx

from . import _validate as v
from ._base import Optimizer
from ._math import cast


def rprop_update(param, grad, state, *, learning_rate, etas, step_sizes):
    """One Rprop step on ``prev`` (last gradient) and ``step_size``; ``learning_rate``
    only sets the initial step size."""
    etaminus, etaplus = (cast(e, grad) for e in etas)
    step_size_min, step_size_max = (cast(s, grad) for s in step_sizes)
    agreement = grad * state["prev"]
    factor = mx.where(agreement > 0, etaplus, mx.where(agreement < 0, etaminus, 1.0))
    # torch fills step_size with the learning rate at the parameter's first step (the rate
    # may have changed since init, or been scheduled): prev is 0 there, so factor is 1.
    step_size = mx.where(state["step"] == 1, cast(learning_rate, grad), state["step_size"])
    step_size = mx.clip(step_size * factor, step_size_min, step_size_max)
    # After a sign change the step is skipped and the gradient forgotten (torch's
    # `grad[sign.eq(etaminus)] = 0`).
    grad = mx.where(agreement < 0, 0.0, grad)
    new_param = param - mx.sign(grad) * step_size
    return new_param, {**state, "prev": grad, "step_size": step_size}


class Rprop(Optimizer):
    r"""Rprop, as ``torch.optim.Rprop``.

    .. math::

        \eta_t &= \begin{cases} \min(\eta_{t-1}\eta_+, \Gamma_{max}) & g_t g_{t-1} > 0 \\
            \max(\eta_{t-1}\eta_-, \Gamma_{min}) & g_t g_{t-1} < 0 \;(\text{then } g_t \leftarrow 0) \\
            \eta_{t-1} & \text{otherwise} \end{cases} \\
        \theta_t &= \theta_{t-1} - \eta_t \operatorname{sign}(g_t), \qquad \eta_0 = \gamma

    Args:
        learning_rate: the initial step size :math:`\gamma`. Default: ``1e-2``.
        etas: :math:`(\eta_-, \eta_+)`, with :math:`0 < \eta_- < 1 < \eta_+`. Default: ``(0.5, 1.2)``.
        step_sizes: :math:`(\Gamma_{min}, \Gamma_{max})`. Default: ``(1e-6, 50)``.
        maximize: ascend the objective. Default: ``False``.
        groups: per-group hyperparameters, see :class:`mlx_optim.Optimizer`.
        constants: hyperparameters compiled into the step, see :class:`mlx_optim.Optimizer`.

    Example:
        >>> opt = mlx_optim.Rprop(learning_rate=1e-2, etas=(0.5, 1.2))

    Differences: ``mlx.optimizers`` has no Rprop. As in torch, changing the learning rate
    after the first step has no effect: it only seeds ``step_size``.

    Reference: Riedmiller and Braun, "A Direct Adaptive Method for Faster Backpropagation
    Learning: The RPROP Algorithm", ICNN 1993.
    """

    rules = (
        v.LEARNING_RATE,
        v.Rule("etas", lambda e: 0.0 < e < 1.0, "Invalid eta values: {whole[0]}, {whole[1]}", "etas[0] must lie in (0, 1)", 0),
        v.Rule("etas", lambda e: e > 1.0, "Invalid eta values: {whole[0]}, {whole[1]}", "etas[1] must be > 1", 1),
        v.at_least("step_sizes", 0.0, "Invalid step_sizes value: {value}", index=0),
        v.at_least("step_sizes", 0.0, "Invalid step_sizes value: {value}", index=1),
    )
    update_fn = staticmethod(rprop_update)
    casts_in_kernel = True

    def __init__(self, learning_rate=1e-2, etas=(0.5, 1.2), step_sizes=(1e-6, 50), *, maximize=False,
                 groups=None, constants=()):
        super().__init__(dict(learning_rate=learning_rate, etas=tuple(etas), step_sizes=tuple(step_sizes),
                              maximize=maximize), groups, constants)

    def _validate_group(self, values):
        low, high = (v.scalar_value("step_sizes", s) for s in values["step_sizes"])
        if low > high:
            raise ValueError(f"Invalid step_sizes values: {low}, {high} (step_sizes[0] must be <= step_sizes[1])")

    def init_state(self, param, hyper, active):
        return {"prev": mx.zeros_like(param),
                "step_size": mx.full(param.shape, cast(hyper["learning_rate"], param))}
