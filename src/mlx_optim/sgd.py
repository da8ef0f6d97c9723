"""Stochastic gradient descent with torch's momentum, dampening and Nesterov."""

from __future__ import annotations

import mlx.core as mx

from . import _validate as v
from ._base import Optimizer
from ._math import cast, scalar_dtype


def sgd_update(param, grad, state, *, learning_rate, momentum, dampening, nesterov):
    """One SGD step. ``momentum`` (and ``dampening``) is None when zero: no buffer."""
    if momentum is not None:
        mu = cast(momentum, grad)
        buf = mu * state["momentum_buffer"]
        if dampening is None:
            buf = buf + grad
        else:
            # torch's first step sets the buffer to the gradient itself (no dampening);
            # the buffer starts at zero, so only the gradient's coefficient changes.
            grad_weight = mx.where(state["step"] == 1, mx.array(1.0, scalar_dtype()), 1 - dampening)
            buf = buf + cast(grad_weight, grad) * grad
        # While momentum is 0 (a schedule may pass through 0) torch leaves the buffer alone
        # and steps along the gradient. The momentum itself is the condition (non-zero is
        # true): `mu != 0` would add a constant input to every parameter's kernel.
        buf = mx.where(mu, buf, state["momentum_buffer"])
        grad = grad + mu * buf if nesterov else mx.where(mu, buf, grad)
        state = {**state, "momentum_buffer": buf}
    return param - cast(learning_rate, param) * grad, state


class SGD(Optimizer):
    r"""Stochastic gradient descent, as ``torch.optim.SGD``.

    .. math::

        g_t &\leftarrow g_t + \lambda \theta_{t-1} \quad (\text{weight decay}) \\
        b_t &= \begin{cases} g_t & t = 1 \\ \mu b_{t-1} + (1-\tau) g_t & t > 1 \end{cases} \\
        g_t &\leftarrow g_t + \mu b_t \;(\text{nesterov}) \;\text{ or }\; b_t \\
        \theta_t &= \theta_{t-1} - \gamma g_t

    Args:
        learning_rate: :math:`\gamma`. Default: ``1e-3``.
        momentum: :math:`\mu`. Default: ``0``.
        dampening: :math:`\tau`. Default: ``0``.
        weight_decay: L2 penalty :math:`\lambda`. Default: ``0``.
        nesterov: Nesterov momentum (needs momentum > 0 and dampening = 0). Default: ``False``.
        maximize: ascend the objective. Default: ``False``.
        groups: per-group hyperparameters, see :class:`mlx_optim.Optimizer`.
        constants: hyperparameters compiled into the step, see :class:`mlx_optim.Optimizer`.

    Example:
        >>> opt = mlx_optim.SGD(learning_rate=0.1, momentum=0.9, nesterov=True)
        >>> opt.update(model, grads)

    Differences: ``mlx.optimizers.SGD`` dampens the first momentum step and needs a
    learning rate; torch (and this class) copy the first gradient into the buffer.
    Whether momentum, dampening and weight decay are zero is fixed at construction; a
    momentum set to 0 later (or scheduled through 0) skips the buffer as torch does,
    except that with ``nesterov`` it must stay positive (checked on assignment, where
    torch checks only at construction). With dampening, torch's buffer starts undamped at
    the first step whose momentum is non-zero, ours at the first step.

    Reference: Sutskever et al., "On the importance of initialization and momentum in
    deep learning", ICML 2013.
    """

    rules = (v.LEARNING_RATE, v.MOMENTUM, v.WEIGHT_DECAY)
    structural_zeros = ("weight_decay", "momentum", "dampening")
    update_fn = staticmethod(sgd_update)
    casts_in_kernel = True

    def __init__(self, learning_rate=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, maximize=False, groups=None, constants=()):
        super().__init__(
            dict(learning_rate=learning_rate, momentum=momentum, dampening=dampening,
                 weight_decay=weight_decay, nesterov=nesterov, maximize=maximize),
            groups, constants,
        )

    def _validate_group(self, values):
        if values["nesterov"] and (
            v.scalar_value("momentum", values["momentum"]) <= 0
            or v.scalar_value("dampening", values["dampening"]) != 0
        ):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening "
                             f"(nesterov=True with momentum={values['momentum']}, "
                             f"dampening={values['dampening']})")

    def init_state(self, param, hyper, active):
        return {"momentum_buffer": mx.zeros_like(param)} if active["momentum"] else {}
