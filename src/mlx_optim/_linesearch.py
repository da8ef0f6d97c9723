"""Strong-Wolfe line search with cubic interpolation, as ``torch.optim.LBFGS`` runs it.

Ported in meaning (not in code) from torch 2.13's ``_cubic_interpolate`` and ``_strong_wolfe``,
which follow minFunc / torch7's ``lswolfe.lua`` (Nocedal & Wright, *Numerical Optimization*,
2nd ed., Algorithms 3.5 and 3.6). Step lengths, losses and directional derivatives are
Python floats (float64); gradients stay MLX arrays. Every comparison below is the one torch
makes, in the same order, so that float64 runs pick the same trial steps.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import mlx.core as mx


class Point(NamedTuple):
    """A trial step ``t`` along the direction, with the loss, gradient and slope there."""

    t: float
    f: float
    g: mx.array
    gtd: float | None  # g . d; None where torch leaves it undefined (never read)


def cubic_interpolate(x1: float, f1: float, g1: float, x2: float, f2: float, g2: float,
                      bounds: tuple[float, float] | None = None) -> float:
    """Minimiser of the cubic through (x1, f1, f'=g1) and (x2, f2, f'=g2), clipped to bounds.

    Falls back to the middle of the bounds when the cubic has no real minimiser.
    """
    low, high = bounds if bounds is not None else ((x1, x2) if x1 <= x2 else (x2, x1))
    d1 = g1 + g2 - _divide(3 * (f1 - f2), x1 - x2)
    d2_square = d1 * d1 - g1 * g2
    if d2_square >= 0:
        d2 = math.sqrt(d2_square)
        if x1 <= x2:
            min_pos = x2 - (x2 - x1) * _divide(g2 + d2 - d1, g2 - g1 + 2 * d2)
        else:
            min_pos = x1 - (x1 - x2) * _divide(g1 + d2 - d1, g1 - g2 + 2 * d2)
        return min(max(min_pos, low), high)
    return (low + high) / 2.0


def _divide(a: float, b: float) -> float:
    """``a / b`` as torch's tensors divide (IEEE: ±inf or nan by zero), not raising: two
    probes on one linear piece (an L1 loss, a ReLU) make the cubic's denominator 0, and
    torch's bounds then clip the infinite step."""
    if b != 0:
        return a / b
    if a == 0 or math.isnan(a):
        return math.nan
    return math.copysign(math.inf, a) * math.copysign(1.0, b)  # the sign of b's zero counts


def strong_wolfe(phi: Callable[[float], tuple[float, mx.array]], d: mx.array, t: float,
                 f: float, g: mx.array, gtd: float, *, c1: float = 1e-4, c2: float = 0.9,
                 tolerance_change: float = 1e-9, max_ls: int = 25) -> tuple[float, mx.array, float]:
    """Find ``t`` with ``phi(t) <= f + c1 t gtd`` and ``|phi'(t)| <= c2 |gtd|``.

    ``phi(t)`` returns the loss and gradient at ``x + t d``; ``f, g, gtd`` are those at t=0.
    ``max_ls`` bounds the iterations after the first evaluation (torch's budget: one more
    evaluation than ``max_ls`` can happen). Returns ``(loss, gradient, t)`` of the best point.
    """
    d_norm = mx.abs(d).max().item()

    def probe(t: float) -> Point:
        f_t, g_t = phi(t)
        return Point(t, f_t, g_t, mx.inner(g_t, d).item())

    def sufficient_decrease(p: Point) -> bool:
        return p.f > f + c1 * p.t * gtd

    def curvature_ok(p: Point) -> bool:
        return abs(p.gtd) <= -c2 * gtd

    # Bracketing: grow t until [prev, new] must contain a strong-Wolfe point.
    prev, new = Point(0, f, g, gtd), probe(t)
    done = False
    ls_iter = 0
    while ls_iter < max_ls:
        if sufficient_decrease(new) or (ls_iter > 1 and new.f >= prev.f):
            bracket = [prev, new]
            break
        if curvature_ok(new):
            bracket, done = [new], True
            break
        if new.gtd >= 0:
            bracket = [prev, new]
            break
        # Extrapolate: between 1.01x and 10x the current step.
        t = cubic_interpolate(prev.t, prev.f, prev.gtd, new.t, new.f, new.gtd,
                              bounds=(new.t + 0.01 * (new.t - prev.t), new.t * 10))
        prev, new = new, probe(t)
        ls_iter += 1
    else:
        bracket = [Point(0, f, g, None), Point(new.t, new.f, new.g, None)]

    # Zoom: shrink the bracket until a point satisfies both conditions.
    low, high = (0, 1) if bracket[0].f <= bracket[-1].f else (1, 0)
    insufficient_progress = False
    while not done and ls_iter < max_ls:
        a, b = bracket
        if abs(b.t - a.t) * d_norm < tolerance_change:
            break
        t = cubic_interpolate(a.t, a.f, a.gtd, b.t, b.f, b.gtd)

        # Keep t at least 10% of the bracket away from its ends when progress stalls.
        left, right = min(a.t, b.t), max(a.t, b.t)
        eps = 0.1 * (right - left)
        if min(right - t, t - left) < eps:
            if insufficient_progress or t >= right or t <= left:
                t = right - eps if abs(t - right) < abs(t - left) else left + eps
                insufficient_progress = False
            else:
                insufficient_progress = True
        else:
            insufficient_progress = False

        new = probe(t)
        ls_iter += 1
        if sufficient_decrease(new) or new.f >= bracket[low].f:
            bracket[high] = new
            low, high = (0, 1) if bracket[0].f <= bracket[1].f else (1, 0)
        else:
            if curvature_ok(new):
                done = True
            elif new.gtd * (bracket[high].t - bracket[low].t) >= 0:
                bracket[high] = bracket[low]
            bracket[low] = new

    best = bracket[low]
    return best.f, best.g, best.t
