"""Small pure helpers shared by the update functions."""

from __future__ import annotations

import mlx.core as mx


def cast(scalar: mx.array, like: mx.array) -> mx.array:
    """A scalar coefficient, computed in ``scalar_dtype``, in ``like``'s dtype.

    Update functions compute coefficients such as ``1 - beta2`` or ``lr / (1 - beta1**t)``
    at the hyperparameters' precision (as torch does in Python floats) and cast them
    once, where they meet a tensor.
    """
    return scalar.astype(like.dtype)


def lerp(start: mx.array, end: mx.array, weight: mx.array) -> mx.array:
    """``start + weight * (end - start)``, torch's ``lerp`` (an exponential moving average)."""
    return start + cast(weight, start) * (end - start)


def ema_square(avg: mx.array, grad: mx.array, decay: mx.array) -> mx.array:
    """``decay * avg + (1 - decay) * grad**2``, the running mean of squared gradients."""
    return cast(decay, avg) * avg + cast(1 - decay, avg) * mx.square(grad)


def bias_correction(beta: mx.array, step: mx.array) -> mx.array:
    """``1 - beta**step`` for an integer step array, at ``beta``'s precision."""
    return 1 - beta ** step.astype(beta.dtype)
