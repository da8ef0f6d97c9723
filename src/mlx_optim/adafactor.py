"""Adafactor as torch implements it: factored second moments, relative step size, clipping."""

from __future__ import annotations

import math

import mlx.core as mx

from . import _validate as v
from ._base import Optimizer
from ._math import cast, lerp, scalar_dtype


def _rms(x: mx.array, dtype: mx.Dtype) -> mx.array:
    """torch's ``x.norm(2).item() / numel**0.5``: the norm in x's dtype, the rest in ``dtype``."""
    return mx.sqrt(mx.sum(mx.square(x))).astype(dtype) / math.sqrt(max(x.size, 1))


def adafactor_update(param, grad, state, *, learning_rate, beta2_decay, eps, d, weight_decay):
    """One Adafactor step on ``row_var``/``col_var`` (2 or more dims) or ``variance``."""
    dtype = scalar_dtype()
    eps1, eps2 = (mx.array(mx.finfo(param.dtype).eps if e is None else e, dtype) for e in eps)
    step = state["step"].astype(dtype)
    beta2_complement = step ** beta2_decay  # 1 - beta2_t
    rho = mx.minimum(learning_rate, 1 / mx.sqrt(step))  # relative step size
    alpha = mx.maximum(eps2, _rms(param, dtype)) * rho  # from the parameter before decay
    if weight_decay is not None:
        param = param * cast(1 - learning_rate * weight_decay, param)
    square = mx.square(grad)
    if "variance" in state:
        variance = lerp(state["variance"], square, beta2_complement, single_rounding=True)
        new_state = {**state, "variance": variance}
    else:
        # Factored along the last two dimensions: row and column means of grad**2.
        row_var = lerp(state["row_var"], mx.mean(square, axis=-1, keepdims=True), beta2_complement,
                       single_rounding=True)
        col_var = lerp(state["col_var"], mx.mean(square, axis=-2, keepdims=True), beta2_complement,
                       single_rounding=True)
        row_mean = mx.maximum(mx.mean(row_var, axis=-2, keepdims=True), cast(eps1, row_var))
        variance = row_var * col_var / row_mean
        new_state = {**state, "row_var": row_var, "col_var": col_var}
    # eps1 squared, as the square root comes after.
    update = grad * mx.rsqrt(mx.maximum(variance, cast(eps1 * eps1, variance)))
    clip = mx.maximum(1, _rms(update, dtype) / d)
    return param - cast(alpha / clip, param) * update, new_state


class Adafactor(Optimizer):
    r"""Adafactor, as ``torch.optim.Adafactor``.

    .. math::

        \hat\beta_{2,t} &= 1 - t^{\tau}, \qquad
        \rho_t = \min(\gamma, 1/\sqrt t), \qquad
        \alpha_t = \max(\epsilon_2, \mathrm{RMS}(\theta_{t-1}))\,\rho_t \\
        \theta_{t-1} &\leftarrow \theta_{t-1}(1 - \gamma\lambda) \\
        R_t &= \hat\beta_{2,t} R_{t-1} + (1-\hat\beta_{2,t})\,\mathrm{mean}_{\text{cols}}(G_t^2),
            \quad
        C_t = \hat\beta_{2,t} C_{t-1} + (1-\hat\beta_{2,t})\,\mathrm{mean}_{\text{rows}}(G_t^2) \\
        \hat V_t &= \frac{R_t C_t}{\max(\mathrm{mean}(R_t), \epsilon_1)}
            \quad\text{(2 or more dims; vectors: } \hat V_t = \hat\beta_{2,t}\hat V_{t-1}
            + (1-\hat\beta_{2,t}) G_t^2) \\
        U_t &= G_t / \sqrt{\max(\hat V_t, \epsilon_1^2)}, \qquad
        \theta_t = \theta_{t-1} - \frac{\alpha_t}{\max(1, \mathrm{RMS}(U_t)/d)}\, U_t

    State per parameter: ``row_var`` (shape ``(..., rows, 1)``) and ``col_var``
    (``(..., 1, cols)``) for 2 or more dimensions, so ``rows + cols`` numbers per matrix;
    ``variance`` (the parameter's shape) for vectors and scalars.

    Args:
        learning_rate: :math:`\gamma`, the largest relative step size and the weight
            decay's scale. Default: ``1e-2``.
        beta2_decay: :math:`\tau \le 0`. Default: ``-0.8``.
        eps: :math:`(\epsilon_1, \epsilon_2)`; ``None`` for :math:`\epsilon_1` means the
            parameter's dtype's machine epsilon. Default: ``(None, 1e-3)``.
        d: the clipping threshold :math:`d \ge 1`. Default: ``1.0``.
        weight_decay: :math:`\lambda`, decoupled. Default: ``0``.
        maximize: ascend the objective. Default: ``False``.
        groups: per-group hyperparameters, see :class:`mlx_optim.Optimizer`.
        constants: hyperparameters compiled into the step, see :class:`mlx_optim.Optimizer`.

    Example:
        >>> opt = mlx_optim.Adafactor(learning_rate=1e-2, weight_decay=1e-4)
        >>> opt.update(model, grads)

    Differences: ``mlx.optimizers.Adafactor`` is the HuggingFace algorithm (``eps`` added
    to the squared gradient, ``beta_1``, ``scale_parameter``, ``relative_step`` switches,
    factoring only from ``min_dim_size_to_factor``); this class is torch's. For bf16/fp16
    parameters :math:`\epsilon_1` defaults to float32's epsilon (the step is computed in
    float32), where torch takes the low-precision dtype's.

    Reference: Shazeer and Stern, "Adafactor: Adaptive Learning Rates with Sublinear
    Memory Cost", ICML 2018.
    """

    rules = (
        v.at_least("learning_rate", 0.0, "Learning rate should be >= 0 but is: {value}"),
        v.at_most("beta2_decay", 0.0, "beta2_decay should be <= 0 but is: {value}"),
        v.at_least("eps", 0.0, "epsilon1 should be >= 0 but is: {value}", index=0),
        v.at_least("eps", 0.0, "epsilon2 should be >= 0 but is: {value}", index=1),
        v.at_least("d", 1.0, "Clipping threshold d should be >= 1 but is: {value}"),
        v.at_least("weight_decay", 0.0, "weight_decay should be >= 0 but is: {value}"),
    )
    own_weight_decay = True  # alpha reads the parameter before the decay
    update_fn = staticmethod(adafactor_update)

    def __init__(self, learning_rate=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0,
                 weight_decay=0.0, *, maximize=False, groups=None, constants=()):
        super().__init__(
            dict(learning_rate=learning_rate, beta2_decay=beta2_decay, eps=tuple(eps), d=d,
                 weight_decay=weight_decay, maximize=maximize),
            groups, constants,
        )

    def init_state(self, param, hyper, active):
        if param.ndim < 2:
            return {"variance": mx.zeros_like(param)}
        return {"row_var": mx.zeros((*param.shape[:-1], 1), param.dtype),
                "col_var": mx.zeros((*param.shape[:-2], 1, param.shape[-1]), param.dtype)}
