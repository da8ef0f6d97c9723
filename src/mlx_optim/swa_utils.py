"""torch.optim.swa_utils for MLX: weight averaging (SWA, EMA) and the SWALR schedule.

``AveragedModel`` keeps a running average of a model's parameters; the average and the
count ``n_averaged`` are arrays inside an ``mlx.nn.Module``, so ``update_parameters`` runs
inside a compiled training step (pass ``averaged.state`` in the step's inputs and
outputs). The averaging functions are torch's, written functionally.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Iterable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ._math import lerp
from .schedulers import Schedule, _choice, _cos, _learning_rate, _number

__all__ = ["AveragedModel", "SWALR", "update_bn", "get_ema_multi_avg_fn",
           "get_swa_multi_avg_fn", "get_ema_avg_fn", "get_swa_avg_fn"]

AvgFn = Callable[[mx.array, mx.array, mx.array], mx.array]
MultiAvgFn = Callable[[list, list, mx.array], list]


def _check_decay(decay: float) -> None:
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"Invalid decay value {decay} provided. Please provide a value in [0,1] range.")


def get_ema_multi_avg_fn(decay: float = 0.999) -> MultiAvgFn:
    r"""The exponential moving average :math:`\bar\theta \leftarrow \text{lerp}(\bar\theta,
    \theta, 1 - \text{decay})` over lists of arrays, as torch's ``_foreach_lerp_``.

    Args:
        decay (float): in [0, 1]. Default: 0.999.
    """
    _check_decay(decay)

    def ema_update(averaged: list, current: list, num_averaged: mx.array) -> list:
        return [lerp(a, c, 1 - decay) if mx.issubdtype(a.dtype, mx.inexact)
                else a * decay + c * (1 - decay) for a, c in zip(averaged, current)]
    return ema_update


def get_swa_multi_avg_fn() -> MultiAvgFn:
    r"""The running mean :math:`\bar\theta \leftarrow \text{lerp}(\bar\theta, \theta, 1/(n+1))`
    over lists of arrays, as torch's ``_foreach_lerp_``. As in torch, the weight
    :math:`1/(n+1)` is computed in float32 (torch's default dtype) whatever the parameters'.
    """
    def swa_update(averaged: list, current: list, num_averaged: mx.array) -> list:
        weight = 1 / (num_averaged + 1)   # integer / integer -> float32, as torch's
        return [lerp(a, c, weight) if mx.issubdtype(a.dtype, mx.inexact)
                else a + (c - a) / (num_averaged + 1) for a, c in zip(averaged, current)]
    return swa_update


def get_ema_avg_fn(decay: float = 0.999) -> AvgFn:
    r"""Per array: :math:`\bar\theta \leftarrow \text{decay}\,\bar\theta + (1 - \text{decay})\,\theta`.

    Args:
        decay (float): in [0, 1]. Default: 0.999.
    """
    _check_decay(decay)

    def ema_update(averaged: mx.array, current: mx.array, num_averaged: mx.array) -> mx.array:
        return decay * averaged + (1 - decay) * current
    return ema_update


def get_swa_avg_fn() -> AvgFn:
    r"""Per array: :math:`\bar\theta \leftarrow \bar\theta + (\theta - \bar\theta)/(n + 1)`
    (torch's default on the CPU)."""
    def swa_update(averaged: mx.array, current: mx.array, num_averaged: mx.array) -> mx.array:
        return averaged + (current - averaged) / (num_averaged + 1)
    return swa_update


class AveragedModel(nn.Module):
    r"""A model whose parameters are an average of another model's over training.

    The first ``update_parameters(model)`` copies the model's parameters; each later one
    averages them in with ``avg_fn`` (per array) or ``multi_avg_fn`` (all at once); the
    default is the equal-weight running mean of SWA,
    :math:`\bar\theta_{n+1} = \bar\theta_n + (\theta - \bar\theta_n)/(n + 1)`.

    Args:
        model (nn.Module): the model to average (copied; it is not changed).
        avg_fn (callable | None): ``avg_fn(averaged, current, n_averaged) -> new`` per
            array, e.g. :func:`get_ema_avg_fn`. Default: None.
        multi_avg_fn (callable | None): ``multi_avg_fn(averaged_list, current_list,
            n_averaged) -> new_list``, e.g. :func:`get_ema_multi_avg_fn`. Default: None.
        use_buffers (bool): average all arrays, the frozen ones too (MLX's counterpart of
            torch's buffers, e.g. BatchNorm's running statistics); when False the arrays
            frozen in ``model`` at each update are copied from it, the trainable ones
            averaged (unfreezing a backbone after warm-up averages it from then on).
            Default: False.

    Example:
        >>> ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999))
        >>> @partial(mx.compile, inputs=state, outputs=state)   # state includes ema.state
        ... def step(x, y):
        ...     ...; optimizer.update(model, grads); ema.update_parameters(model)

    Differences: no ``device`` argument (MLX's memory is unified). ``multi_avg_fn``
    returns the new arrays instead of updating in place. Giving both functions raises
    ``ValueError`` (torch: ``AssertionError``). torch averages on the CPU with
    :func:`get_swa_avg_fn` and on CUDA with :func:`get_swa_multi_avg_fn`; the default
    here is the former. torch averages every parameter whatever its ``requires_grad``;
    here being frozen is what marks a buffer, so with ``use_buffers=False`` a parameter
    frozen part-way through is copied from then on, not averaged. A compiled step keeps
    the split it was traced with: compile it again after freezing or unfreezing.
    """

    def __init__(self, model: nn.Module, avg_fn: AvgFn | None = None,
                 multi_avg_fn: MultiAvgFn | None = None, use_buffers: bool = False):
        super().__init__()
        if avg_fn is not None and multi_avg_fn is not None:
            raise ValueError("Only one of avg_fn and multi_avg_fn should be provided")
        self.module = copy.deepcopy(model)
        self.n_averaged = mx.array(0, dtype=mx.int64)
        self.freeze(keys=["n_averaged"], recurse=False)
        self.avg_fn, self.multi_avg_fn, self.use_buffers = avg_fn, multi_avg_fn, use_buffers

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def update_parameters(self, model: nn.Module) -> None:
        """Average ``model``'s current parameters in (a copy when none are yet)."""
        mine, theirs = dict(tree_flatten(self.module.parameters())), dict(tree_flatten(model.parameters()))
        if set(theirs) != set(mine):
            raise ValueError("model's parameters do not match the averaged model's (model)")
        # What is trainable now, in the live model: it may have changed since the copy
        # was made (a backbone unfrozen after warm-up).
        keys = list(theirs) if self.use_buffers else [
            key for key, _ in tree_flatten(model.trainable_parameters())]
        averaged, current = [mine[key] for key in keys], [theirs[key] for key in keys]
        n = self.n_averaged
        if self.multi_avg_fn is not None:
            new = self.multi_avg_fn(averaged, current, n)
        else:
            avg_fn = self.avg_fn or get_swa_avg_fn()
            new = [avg_fn(a, c, n) for a, c in zip(averaged, current)]
        # The first update copies; a select keeps the step free of Python branches on n.
        new = [mx.where(n == 0, c, x).astype(a.dtype) for a, c, x in zip(averaged, current, new)]
        self.module.update(tree_unflatten(list(zip(keys, new))))
        if not self.use_buffers:
            averaged_keys = set(keys)
            frozen = [(k, v) for k, v in theirs.items() if k not in averaged_keys]
            if frozen:
                self.module.update(tree_unflatten(frozen))
        self.n_averaged = n + 1


def update_bn(loader: Iterable[Any], model: nn.Module) -> None:
    """Recompute BatchNorm running statistics as the plain average over ``loader``.

    Averaged weights need their own normalisation statistics: this resets each
    ``nn.BatchNorm``'s running mean and variance and runs ``model`` over the batches in
    training mode, weighting batch ``i`` (1-based) by ``1/i`` (torch's ``momentum=None``).

    Args:
        loader: an iterable of inputs (or of tuples/lists whose first item is the input).
        model (nn.Module): the model, e.g. ``averaged.module``.
    """
    norms = [m for _, m in model.named_modules()
             if isinstance(m, nn.BatchNorm) and "running_mean" in m]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.running_mean = mx.zeros_like(m.running_mean)
        m.running_var = mx.ones_like(m.running_var)
    model.train()
    for i, batch in enumerate(loader, start=1):
        for m in norms:
            m.momentum = 1.0 / i
        model(batch[0] if isinstance(batch, (list, tuple)) else batch)
        mx.eval([(m.running_mean, m.running_var) for m in norms])
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)


class SWALR(Schedule):
    r"""Anneal the rate from its current value to ``swa_lr`` over ``anneal_epochs`` steps,
    then hold it: :math:`\eta_k = \alpha_k\,\eta_{swa} + (1 - \alpha_k)\,\eta` with
    :math:`t_k = \min(1, k / E)` and :math:`\alpha = (1 - \cos \pi t)/2` ("cos") or
    :math:`t` ("linear"). With :math:`E = 0`, the rate is :math:`\eta_{swa}` from step 0.

    Args:
        learning_rate (float): :math:`\eta`, the rate when SWA starts (torch: the
            optimizer's current rate).
        swa_lr (float): :math:`\eta_{swa}`.
        anneal_epochs (int): :math:`E`. Default: 10.
        anneal_strategy (str): "cos" or "linear". Default: "cos".

    Example:
        >>> cosine = CosineAnnealingLR(0.1, T_max=75)
        >>> swa = SWALR(cosine(74, dtype=mx.float64).item(), swa_lr=0.05)
        >>> schedule = SequentialLR([cosine, swa], milestones=[75])

        In torch's ``SequentialLR``, SWALR starts from the optimizer's current rate at its
        milestone ``m``: the rate the schedule before it set at step ``m - 1`` (here the
        cosine's at 74), which is what ``learning_rate`` must be to match torch.

    Differences: torch recovers :math:`\eta` from the current rate at every step, which
    costs it a few ulps; this is the closed form (equal to 1e-10). Per-group ``swa_lr``
    lists become one schedule per group.
    """

    def __init__(self, learning_rate: float, swa_lr: float, anneal_epochs: int = 10,
                 anneal_strategy: str = "cos"):
        _choice("anneal_strategy", anneal_strategy, ("cos", "linear"),
                f"anneal_strategy must be one of 'cos' or 'linear', instead got {anneal_strategy}")
        if isinstance(anneal_epochs, bool) or not isinstance(anneal_epochs, int) or anneal_epochs < 0:
            raise ValueError(f"anneal_epochs must be equal or greater than 0, got {anneal_epochs}")
        self.learning_rate = _learning_rate(learning_rate)
        self.swa_lr = _number("swa_lr", swa_lr)
        self.anneal_epochs, self.anneal_strategy = anneal_epochs, anneal_strategy

    def _at(self, k, dtype):
        if self.anneal_epochs == 0:   # torch treats step 0 as step 1 then
            k = mx.maximum(k, 1)
        t = mx.clip(k.astype(dtype) / max(1, self.anneal_epochs), 0, 1)
        alpha = (1 - _cos(math.pi * t)) / 2 if self.anneal_strategy == "cos" else t
        return self.swa_lr * alpha + self.learning_rate * (1 - alpha)
