"""ASGD: averaged stochastic gradient descent, with its averaged parameters."""

from __future__ import annotations

import mlx.core as mx

from . import _validate as v
from ._base import Optimizer, map_slots
from ._math import cast, scalar_dtype


def asgd_update(param, grad, state, *, learning_rate, lambd, alpha, t0):
    """One ASGD step on ``ax`` (the average) and the scalars ``eta`` and ``mu``."""
    # torch sets eta to the learning rate at the parameter's first step (the rate may have
    # changed since init, or been scheduled).
    eta = mx.where(state["step"] == 1, learning_rate, state["eta"]).astype(state["eta"].dtype)
    mu = state["mu"]
    new_param = param * cast(1 - lambd * eta, param) - cast(eta, param) * grad
    ax = state["ax"] + (new_param - state["ax"]) * cast(mu, param)
    step = state["step"].astype(scalar_dtype())
    new_eta = learning_rate / (1 + lambd * learning_rate * step) ** alpha
    new_mu = 1 / mx.maximum(step - t0, 1)
    return new_param, {**state, "ax": ax, "eta": new_eta.astype(eta.dtype), "mu": new_mu.astype(mu.dtype)}


class ASGD(Optimizer):
    r"""Averaged SGD, as ``torch.optim.ASGD``.

    .. math::

        \theta_t &= \theta_{t-1}(1 - \lambda\eta_{t-1}) - \eta_{t-1} g_t \\
        \bar\theta_t &= \bar\theta_{t-1} + \mu_{t-1}(\theta_t - \bar\theta_{t-1}) \\
        \eta_t &= \gamma / (1 + \lambda\gamma t)^\alpha, \qquad \mu_t = 1 / \max(1, t - t_0)

    The averaged parameters :math:`\bar\theta` (torch's ``ax``) are what ASGD is for; read
    them back into a model with :meth:`averaged_parameters`::

        model.update(opt.averaged_parameters())

    Args:
        learning_rate: :math:`\gamma`. Default: ``1e-2``.
        lambd: decay term :math:`\lambda`. Default: ``1e-4``.
        alpha: power for the :math:`\eta` update. Default: ``0.75``.
        t0: step at which averaging starts. Default: ``1e6``.
        weight_decay: L2 penalty. Default: ``0``.
        maximize: ascend the objective. Default: ``False``.
        groups: per-group hyperparameters, see :class:`mlx_optim.Optimizer`.
        constants: hyperparameters compiled into the step, see :class:`mlx_optim.Optimizer`.

    Example:
        >>> opt = mlx_optim.ASGD(learning_rate=0.01, t0=100)
        >>> # ... train ...
        >>> model.update(opt.averaged_parameters())

    Differences: ``mlx.optimizers`` has no ASGD.

    Reference: Polyak and Juditsky, "Acceleration of Stochastic Approximation by
    Averaging", SIAM J. Control Optim. 1992.
    """

    rules = (v.LEARNING_RATE, v.WEIGHT_DECAY,
             v.at_least("lambd", 0.0, "Invalid lambd value: {value}"),
             v.at_least("alpha", 0.0, "Invalid alpha value: {value}"))
    update_fn = staticmethod(asgd_update)
    casts_in_kernel = True

    def __init__(self, learning_rate=1e-2, lambd=1e-4, alpha=0.75, t0=1e6, weight_decay=0.0, *,
                 maximize=False, groups=None, constants=()):
        super().__init__(dict(learning_rate=learning_rate, lambd=lambd, alpha=alpha, t0=t0,
                              weight_decay=weight_decay, maximize=maximize), groups, constants)

    def init_state(self, param, hyper, active):
        lr = mx.array(hyper["learning_rate"], dtype=scalar_dtype())  # also when a constant
        return {"eta": lr, "mu": mx.ones_like(lr), "ax": mx.zeros_like(param)}

    def averaged_parameters(self) -> dict:
        """The averaged parameters, in the parameters' tree structure.

        A parameter that has not been stepped yet has no average; it is left out (so that
        ``model.update`` keeps its weights).
        """
        return map_slots(lambda slot: slot["ax"] if slot["step"].item() else {},
                         self.state["param_state"])
