"""Muon: momentum orthogonalised by Newton–Schulz, for 2-D weights, as torch.optim.Muon."""

from __future__ import annotations

import math

import mlx.core as mx

from . import _validate as v
from ._base import Optimizer
from ._math import cast, lerp, newton_schulz

ADJUST_LR_FNS = (None, "original", "match_rms_adamw")


def adjusted_lr_ratio(adjust_lr_fn: str | None, shape: tuple[int, ...]) -> float:
    """The learning rate's scale for a ``(A, B)`` matrix, so updates have a consistent RMS."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":  # Moonshot: AdamW's update RMS
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1, rows / cols))  # Keller Jordan's original


def muon_update(param, grad, state, *, learning_rate, momentum, nesterov, ns_coefficients, eps,
                ns_steps, adjust_lr_fn):
    """One Muon step on ``momentum_buffer`` (weight decay, decoupled, is the base's)."""
    buf = lerp(state["momentum_buffer"], grad, 1 - momentum, single_rounding=True)
    update = lerp(grad, buf, momentum, single_rounding=True) if nesterov else buf
    ortho = newton_schulz(update, ns_coefficients, ns_steps, eps)
    lr = learning_rate * adjusted_lr_ratio(adjust_lr_fn, param.shape)
    return param - cast(lr, param) * ortho.astype(param.dtype), {**state, "momentum_buffer": buf}


class Muon(Optimizer):
    r"""Muon, as ``torch.optim.Muon``: for the 2-D weights of hidden layers.

    .. math::

        B_t &= \mu B_{t-1} + (1-\mu) g_t, \qquad
        \tilde B_t = \begin{cases} g_t + \mu (B_t - g_t) & \text{nesterov} \\
                                   B_t & \text{otherwise} \end{cases} \\
        O_t &= \mathrm{NS}^{(a,b,c)}_k(\tilde B_t;\ \varepsilon) \quad\text{(in bfloat16)} \\
        \theta_t &= \theta_{t-1}(1 - \gamma\lambda) - \gamma\, s(A, B)\, O_t,
            \quad s = \sqrt{\max(1, A/B)} \;\text{or}\; 0.2\sqrt{\max(A, B)}

    Args:
        learning_rate: :math:`\gamma`. Default: ``1e-3``.
        weight_decay: :math:`\lambda`, decoupled. Default: ``0.1``.
        momentum: :math:`\mu`. Default: ``0.95``.
        nesterov: Nesterov momentum. Default: ``True``.
        ns_coefficients: :math:`(a, b, c)` of the Newton–Schulz quintic.
            Default: ``(3.4445, -4.775, 2.0315)``.
        eps: :math:`\varepsilon`, the floor of the Frobenius norm. Default: ``1e-7``.
        ns_steps: Newton–Schulz iterations :math:`k` (< 100). Default: ``5``.
        adjust_lr_fn: ``None`` or ``"original"`` (:math:`\sqrt{\max(1, A/B)}`, Keller
            Jordan) or ``"match_rms_adamw"`` (:math:`0.2\sqrt{\max(A, B)}`, Moonshot).
            Default: ``None``.
        groups: per-group hyperparameters, see :class:`mlx_optim.Optimizer`.
        constants: hyperparameters compiled into the step, see :class:`mlx_optim.Optimizer`.

    Every parameter must be 2-D (``ValueError`` naming it otherwise); use
    :func:`mlx_optim.muon_with_adamw` to pair Muon with AdamW for the rest of a model.

    Example:
        >>> opt = mlx_optim.Muon(learning_rate=0.02)
        >>> opt.update(mlp, grads)  # an MLP's 2-D weights only

    Differences: ``mlx.optimizers.Muon`` couples weight decay into the gradient, runs
    Newton–Schulz in the gradient's dtype, flattens parameters of more than 2 dimensions
    and scales the step by :math:`\sqrt{\max(1, A/B)}` only. ``ns_coefficients`` and
    ``ns_steps`` are Python values here, fixed (like flags) once the first step is taken.

    Reference: Jordan et al., "Muon: An optimizer for hidden layers in neural networks",
    2024 (https://kellerjordan.github.io/posts/muon/); Liu et al., "Muon is Scalable for
    LLM Training", 2025.
    """

    rules = (
        v.at_least("learning_rate", 0.0, "Learning rate should be >= 0 but is: {value}"),
        v.at_least("momentum", 0.0, "momentum should be >= 0 but is: {value}"),
        v.at_least("weight_decay", 0.0, "weight decay should be >= 0 but is: {value}"),
        v.at_least("eps", 0.0, "Invalid epsilon value: {value}"),
        v.in_range("ns_steps", 0, 100, "Number of steps must be less than 100 for computational "
                   "efficiency, got {value}", high_open=True),
    )
    static_hyperparameters = ("ns_coefficients", "ns_steps")
    update_fn = staticmethod(muon_update)

    def __init__(self, learning_rate=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7, ns_steps=5,
                 adjust_lr_fn=None, *, groups=None, constants=()):
        super().__init__(
            dict(learning_rate=learning_rate, weight_decay=weight_decay, momentum=momentum,
                 nesterov=nesterov, ns_coefficients=tuple(ns_coefficients), eps=eps,
                 ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn, decoupled_weight_decay=True),
            groups, constants,
        )

    def _validate_group(self, values):
        if values["adjust_lr_fn"] not in ADJUST_LR_FNS:
            raise ValueError(f"Adjust learning rate function {values['adjust_lr_fn']} is not "
                             "supported (adjust_lr_fn must be None, 'original' or 'match_rms_adamw')")
        coefficients = values["ns_coefficients"]
        if len(coefficients) != 3 or not all(isinstance(c, (int, float)) for c in coefficients):
            raise ValueError("Coefficients must be a tuple of exactly 3 values "
                             f"(ns_coefficients={coefficients!r})")
        if not isinstance(values["ns_steps"], int) or isinstance(values["ns_steps"], bool):
            raise TypeError(f"ns_steps must be an int, got {values['ns_steps']!r}")

    def _check_parameter(self, path, param):
        if param.ndim != 2:
            raise ValueError(f"Muon only supports 2D parameters whereas we found a parameter with "
                             f"size: {tuple(param.shape)} ({path!r}); optimize it with AdamW, "
                             "e.g. through mlx_optim.muon_with_adamw")

    def init_state(self, param, hyper, active):
        return {"momentum_buffer": mx.zeros_like(param)}


OUTPUT_HEADS = ("*head*", "*classifier*")


def muon_with_adamw(model, muon=None, adamw=None, exclude=OUTPUT_HEADS):
    """Muon for a model's hidden 2-D weights, AdamW for everything else, in one optimizer.

    Muon takes every 2-D trainable parameter except those of ``nn.Embedding`` layers and
    those whose dotted path matches a glob in ``exclude`` (the output head: by default any
    path containing ``head`` or ``classifier``); AdamW takes embeddings, the head, biases
    and norms. Returns an ``mlx.optimizers.MultiOptimizer``, so ``opt.update(model, grads)``,
    ``opt.state`` and ``mx.compile`` work as for a single optimizer.

    Args:
        model: the ``mlx.nn.Module`` to train.
        muon: keyword arguments of :class:`Muon`. Default: Muon's defaults.
        adamw: keyword arguments of :class:`~mlx_optim.AdamW`. Default: AdamW's defaults.
        exclude: globs of 2-D parameters kept out of Muon. Default: ``("*head*", "*classifier*")``.

    Example:
        >>> opt = muon_with_adamw(model, muon={"learning_rate": 0.02}, adamw={"learning_rate": 3e-4})
        >>> opt.update(model, grads)
    """
    import fnmatch

    import mlx.nn as nn
    from mlx.optimizers import MultiOptimizer

    from .adam import AdamW

    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)  # one glob, or several
    hidden = set()
    for path, module in model.named_modules():
        if isinstance(module, (nn.Embedding, nn.QuantizedEmbedding)):
            continue
        for name, value in module.trainable_parameters().items():
            full = f"{path}.{name}" if path else name
            if isinstance(value, mx.array) and value.ndim == 2 and not any(
                    fnmatch.fnmatchcase(full, glob) for glob in exclude):
                hidden.add(full)
    if not hidden:
        raise ValueError("muon_with_adamw found no hidden 2-D weight for Muon in this model")
    return MultiOptimizer([Muon(**(muon or {})), AdamW(**(adamw or {}))],
                          [lambda path, _: path in hidden])
