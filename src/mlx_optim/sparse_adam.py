"""SparseAdam: Adam that only moves the rows a gradient touches, as torch.optim.SparseAdam."""

from __future__ import annotations

import mlx.core as mx

from . import _validate as v
from ._base import Optimizer
from ._math import bias_correction, cast


def sparse_adam_update(param, grad, state, *, learning_rate, betas, eps):
    """One Adam step, torch's sparse arithmetic, on the rows given (all of them touched).

    The base runs it on the gathered rows of a RowSparseGrad, or on the whole table for a
    dense gradient and keeps the old values where a row's gradient is all zero.
    """
    beta1, beta2 = betas
    # torch's sparse kernel adds (g - m)(1 - beta1) and (g^2 - v)(1 - beta2) to the rows.
    exp_avg = state["exp_avg"] + (grad - state["exp_avg"]) * cast(1 - beta1, grad)
    exp_avg_sq = state["exp_avg_sq"] + (mx.square(grad) - state["exp_avg_sq"]) * cast(1 - beta2, grad)
    # torch's sparse kernel: lr * sqrt(1 - beta2^t) / (1 - beta1^t), and eps added to the
    # uncorrected sqrt(v) (Adam adds it to the corrected one).
    step_size = learning_rate * mx.sqrt(bias_correction(beta2, state["step"])) / bias_correction(beta1, state["step"])
    new_param = param - cast(step_size, param) * exp_avg / (mx.sqrt(exp_avg_sq) + cast(eps, param))
    return new_param, {**state, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


class SparseAdam(Optimizer):
    r"""SparseAdam, as ``torch.optim.SparseAdam``: lazy Adam for embedding tables.

    For each row :math:`r` the gradient touches (all others, their moments included, are
    left as they are):

    .. math::

        m_r &= \beta_1 m_r + (1-\beta_1) g_r, \qquad v_r = \beta_2 v_r + (1-\beta_2) g_r^2 \\
        \theta_r &= \theta_r - \gamma \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}
            \frac{m_r}{\sqrt{v_r} + \epsilon}

    where :math:`t` counts this parameter's steps. Gradients may be a
    :class:`~mlx_optim.RowSparseGrad` (cost grows with the touched rows; a row named twice
    is summed, as torch coalesces; every named row counts as touched; eager only), or a
    dense array, where a row that is all zero counts as untouched (compiles).

    Args:
        learning_rate: :math:`\gamma > 0`. Default: ``1e-3``.
        betas: :math:`(\beta_1, \beta_2)`. Default: ``(0.9, 0.999)``.
        eps: :math:`\epsilon > 0`. Default: ``1e-8``.
        maximize: ascend the objective. Default: ``False``.
        groups: per-group hyperparameters, see :class:`mlx_optim.Optimizer`.
        constants: hyperparameters compiled into the step, see :class:`mlx_optim.Optimizer`.

    Example:
        >>> opt = mlx_optim.SparseAdam(learning_rate=1e-2)
        >>> loss, grads = mlx_optim.embedding_value_and_grad(model, loss_fn)(ids, y)
        >>> opt.update(model, grads)  # only the looked-up rows move

    Differences: torch accepts sparse gradients only; dense ones are accepted here, with
    all-zero rows untouched. An empty gradient changes no row but counts a step, as in
    torch. ``mlx.optimizers`` has no SparseAdam.

    Reference: Kingma and Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015.
    """

    rules = (v.greater_than("learning_rate", 0.0, "Invalid learning rate: {value}"),
             v.greater_than("eps", 0.0, "Invalid epsilon value: {value}"), *v.BETAS)
    row_sparse = True
    lazy_rows = True
    update_fn = staticmethod(sparse_adam_update)

    def __init__(self, learning_rate=1e-3, betas=(0.9, 0.999), eps=1e-8, maximize=False, *, groups=None,
                 constants=()):
        super().__init__(dict(learning_rate=learning_rate, betas=tuple(betas), eps=eps, maximize=maximize),
                         groups, constants)

    def init_state(self, param, hyper, active):
        return {"exp_avg": mx.zeros_like(param), "exp_avg_sq": mx.zeros_like(param)}
