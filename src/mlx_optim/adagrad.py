"""Adagrad with torch's lr_decay, initial accumulator and eps."""

from __future__ import annotations

import mlx.core as mx

from . import _validate as v
from ._base import Optimizer
from ._math import cast, scalar_dtype


def adagrad_update(param, grad, state, *, learning_rate, lr_decay, eps, initial_accumulator_value):
    """One Adagrad step on ``sum``."""
    step = state["step"].astype(scalar_dtype())
    clr = learning_rate / (1 + (step - 1) * lr_decay)
    total = state["sum"] + mx.square(grad)
    new_param = param - cast(clr, param) * grad / (mx.sqrt(total) + cast(eps, grad))
    return new_param, {**state, "sum": total}


class Adagrad(Optimizer):
    r"""Adagrad, as ``torch.optim.Adagrad``.

    .. math::

        \tilde\gamma_t &= \gamma / (1 + (t-1)\eta), \qquad
        s_t = s_{t-1} + g_t^2, \quad s_0 = \tau \\
        \theta_t &= \theta_{t-1} - \tilde\gamma_t\, g_t / (\sqrt{s_t} + \epsilon)

    Args:
        learning_rate: :math:`\gamma`. Default: ``1e-2``.
        lr_decay: :math:`\eta`. Default: ``0``.
        weight_decay: L2 penalty. Default: ``0``.
        initial_accumulator_value: :math:`\tau`. Default: ``0``.
        eps: :math:`\epsilon`. Default: ``1e-10``.
        maximize: ascend the objective. Default: ``False``.
        groups: per-group hyperparameters, see :class:`mlx_optim.Optimizer`.
        constants: hyperparameters compiled into the step, see :class:`mlx_optim.Optimizer`.

    Example:
        >>> opt = mlx_optim.Adagrad(learning_rate=0.1, lr_decay=1e-4)

    Gradients may be a :class:`~mlx_optim.RowSparseGrad` (eager; only its rows change, with
    weight_decay=0), as torch's accept sparse gradients.

    Differences: ``mlx.optimizers.Adagrad`` uses ``eps=1e-8`` and has no ``lr_decay``,
    ``initial_accumulator_value`` or ``weight_decay``.

    Reference: Duchi et al., "Adaptive Subgradient Methods for Online Learning and
    Stochastic Optimization", JMLR 2011.
    """

    rules = (v.LEARNING_RATE, v.EPS, v.WEIGHT_DECAY,
             v.at_least("lr_decay", 0.0, "Invalid lr_decay value: {value}"),
             v.at_least("initial_accumulator_value", 0.0,
                        "Invalid initial_accumulator_value value: {value}"))
    row_sparse = True  # a RowSparseGrad updates its rows only (as torch's sparse gradients)
    update_fn = staticmethod(adagrad_update)
    casts_in_kernel = True

    def __init__(self, learning_rate=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0,
                 eps=1e-10, *, maximize=False, groups=None, constants=()):
        super().__init__(dict(learning_rate=learning_rate, lr_decay=lr_decay, weight_decay=weight_decay,
                              initial_accumulator_value=initial_accumulator_value, eps=eps,
                              maximize=maximize), groups, constants)

    def init_state(self, param, hyper, active):
        # torch fills every group's accumulator with the constructor's value (a group's own
        # initial_accumulator_value is accepted and ignored): so do we.
        initial = self._get_hyper(0, "initial_accumulator_value")
        return {"sum": mx.full(param.shape, cast(initial, param))}
