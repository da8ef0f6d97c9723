"""torch.optim.lr_scheduler as pure functions of the step.

Every scheduler of ``torch.optim.lr_scheduler`` (torch 2.13) has a counterpart here with
the same name and arguments, except that the optimizer argument becomes the starting
learning rate (``StepLR(0.1, step_size=30)``); ``CyclicLR`` and ``OneCycleLR``, which set
their own starting rate, simply drop it. Each is a callable: ``schedule(k)`` is the rate
torch's scheduler has set after ``k`` calls of ``scheduler.step()``, which is the rate the
``k``-th optimizer update uses (0-based). That is exactly how ``mlx.optimizers`` and our
optimizers call a schedule: ``schedule(step)`` with the optimizer's update counter, so

    >>> import mlx.optimizers as optim
    >>> schedule = OneCycleLR(max_lr=0.1, total_steps=1000)
    >>> opt = optim.SGD(learning_rate=schedule, momentum=0.9)

Schedules are built from array operations only (no Python branch on the step's value), so
they run inside ``mx.compile`` without retracing; ``k`` may be a Python int or an integer
``mx.array`` of any shape (``schedule(mx.arange(1000))`` gives the whole curve at once).

Precision: ``schedule(k)`` returns float32, the learning rate's dtype in an MLX step;
``schedule(k, dtype=mx.float64)`` evaluates in float64 on the CPU and matches torch's
``step()`` to 1e-10 relative (checked over thousands of steps). torch computes several
schedulers recursively (``lr <- lr * ratio``); where the closed form equals that recursion
to 1e-10 we use it, and where it does not (the end value of ``LinearLR``, the running
product of ``MultiplicativeLR``) we replay torch's recursion once at construction. A numpy
float32 argument (``gamma=np.float32(0.9)``) is taken at its exact value; NumPy's promotion
makes torch's rates float32 then, so the two agree to float32 rounding only.

Integer arguments that torch leaves unchecked (``step_size``, ``milestones``,
``total_iters``, ``T_max``) take numpy integers and whole floats (``30.0``) as torch does;
a fractional value raises ``ValueError`` (``CyclicLR``'s step sizes, floats in torch, may
be fractional). Those torch requires to be ``int`` (``T_0``, ``total_steps``) are checked
as torch checks them.

``ReduceLROnPlateau`` depends on a metric, not on the step: it stays a stateful object
that sets the optimizer's learning rates, as torch's does.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Callable, Sequence

import mlx.core as mx

from ._base import is_schedule

__all__ = [
    "Schedule", "LambdaLR", "MultiplicativeLR", "StepLR", "MultiStepLR", "ConstantLR",
    "LinearLR", "ExponentialLR", "SequentialLR", "CosineAnnealingLR", "ChainedScheduler",
    "ReduceLROnPlateau", "CyclicLR", "CosineAnnealingWarmRestarts", "OneCycleLR",
    "PolynomialLR",
]


# --------------------------------------------------------------------------- helpers

def _steps(step: int | mx.array) -> mx.array:
    """The step as an int64 array (mlx optimizers pass a uint64 counter)."""
    if isinstance(step, mx.array):
        if mx.issubdtype(step.dtype, mx.floating):
            raise TypeError(f"a schedule's step must be an integer, got dtype {step.dtype}")
        return step.astype(mx.int64)
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"a schedule's step must be an int or an integer mx.array, got {step!r}")
    return mx.array(step, dtype=mx.int64)


def _full(value: float, like: mx.array, dtype: mx.Dtype) -> mx.array:
    return mx.full(like.shape, value, dtype=dtype)


def _number(name: str, value: Any) -> float:
    """A real argument: a Python or numpy number, or a 1-element ``mx.array``."""
    if isinstance(value, mx.array) and value.size == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    return float(value)


def _learning_rate(value: Any) -> float:
    value = _number("learning_rate", value)
    if not value >= 0.0:
        raise ValueError(f"Invalid learning rate: {value} (learning_rate must be >= 0)")
    return value


def _int(name: str, value: Any, minimum: int) -> int:
    """An integer argument: an int, a numpy integer or an integral float (torch takes 30.0
    as 30). A fractional value, which torch's recursions would treat in their own way,
    is refused."""
    kind = "positive integer" if minimum == 1 else f"integer >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"Expected {kind} {name}, but got {value!r} ({type(value).__name__})")
    if isinstance(value, numbers.Integral):
        number = operator.index(value)
    elif math.isfinite(value) and float(value).is_integer():
        number = int(value)
    else:
        number = None
    if number is None or number < minimum:
        raise ValueError(f"Expected {kind} {name}, but got {value!r} ({type(value).__name__})")
    return number


def _choice(name: str, value: Any, options: Sequence[str], message: str | None = None) -> str:
    if value not in options:
        raise ValueError(message or f"{name} must be one of {', '.join(map(repr, options))}, "
                                    f"instead got {value!r}")
    return value


def _power(base: float, exponent: mx.array) -> mx.array:
    """``base ** exponent``. In float32 a positive base goes through ``exp(exponent *
    log(base))`` with the log taken in float64: ``base`` itself would round (0.9999 by
    3e-8), an error that ``base ** k`` multiplies by ``k``. MLX's float64 ``power`` is
    exact, its float64 ``exp`` is not (see :func:`_cos`)."""
    if base > 0 and exponent.dtype != mx.float64:
        return mx.exp(exponent * math.log(base))
    return base ** exponent


# fdlibm's split of pi/2: the first part has 33 bits, so n * _PIO2_HI is exact.
_PIO2_HI, _PIO2_LO = 1.57079632673412561417e+00, 6.07710050650619224932e-11
_COS_TAYLOR = [(-1) ** i / math.factorial(2 * i) for i in range(9)]        # up to r^16
_SIN_TAYLOR = [(-1) ** i / math.factorial(2 * i + 1) for i in range(9)]    # up to r^17


def _cos(x: mx.array) -> mx.array:
    """cos(x). MLX computes float64 cos (and exp) to float32 accuracy only (errors of
    5e-7), so float64 goes through a reduction to |r| <= pi/4 and Taylor series (error
    ~1e-16, as libm's); float32 uses ``mx.cos``."""
    if x.dtype != mx.float64:
        return mx.cos(x)
    n = mx.round(x / (math.pi / 2))
    r = (x - n * _PIO2_HI) - n * _PIO2_LO
    r2 = r * r
    cos_r, sin_r = mx.zeros_like(r), mx.zeros_like(r)
    for c, s in zip(reversed(_COS_TAYLOR), reversed(_SIN_TAYLOR)):   # Horner
        cos_r, sin_r = cos_r * r2 + c, sin_r * r2 + s
    sin_r = sin_r * r
    quadrant = n.astype(mx.int64) % 4
    return mx.where(quadrant == 0, cos_r, mx.where(quadrant == 1, -sin_r,
                    mx.where(quadrant == 2, -cos_r, sin_r)))


def _annealing_cos(start: float, end: float, pct: mx.array) -> mx.array:
    # torch's operation order, so float64 results are torch's to the last bit or two.
    return end + (start - end) / 2.0 * (_cos(math.pi * pct) + 1)


def _annealing_linear(start: float, end: float, pct: mx.array) -> mx.array:
    return (end - start) * pct + start


_ANNEAL = {"cos": _annealing_cos, "linear": _annealing_linear}


class Schedule:
    """A hyperparameter as a pure function of the optimizer's step.

    Subclasses implement ``_at(k, dtype)`` for an int64 step array ``k``.
    """

    def __call__(self, step: int | mx.array, dtype: mx.Dtype = mx.float32) -> mx.array:
        """The value after ``step`` scheduler steps, as an array of ``step``'s shape.

        Args:
            step: a Python int or an integer ``mx.array`` (any shape).
            dtype: the output dtype (default float32). float64 is evaluated on the CPU,
                the only device where MLX has it.
        """
        if dtype == mx.float64:
            with mx.stream(mx.cpu):
                return self._at(_steps(step), dtype)
        return self._at(_steps(step), dtype)

    def _at(self, k: mx.array, dtype: mx.Dtype) -> mx.array:
        raise NotImplementedError

    def _after_milestone(self, k: mx.array, dtype: mx.Dtype) -> mx.array:
        """The value as a child of ``SequentialLR`` started at a milestone, ``k`` steps in:
        torch starts such a child with its closed form at step 0, not its first step."""
        return self._at(k, dtype)

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({shown})"


class _Bound(Schedule):
    """A second schedule computed by its parent (the momentum of a cycling schedule)."""

    def __init__(self, at: Callable[[mx.array, mx.Dtype], mx.array]):
        self._at = at

    def __repr__(self) -> str:
        return f"<momentum schedule of a {type(self._at.__self__).__name__}>"


class _Table:
    """Values replayed from torch's recursion, looked up by step (held after the end)."""

    def __init__(self, values: list[float]):
        self.values = values
        self._arrays: dict[mx.Dtype, mx.array] = {}

    def __call__(self, k: mx.array, dtype: mx.Dtype) -> mx.array:
        if dtype not in self._arrays:
            self._arrays[dtype] = mx.array(self.values, dtype=dtype)
        return mx.take(self._arrays[dtype], mx.clip(k, 0, len(self.values) - 1))


# ------------------------------------------------------------------------ schedules

class LambdaLR(Schedule):
    r"""The starting rate times a function of the step: :math:`\eta_k = \eta\,\lambda(k)`.

    Args:
        learning_rate (float): the starting rate :math:`\eta` (torch: the optimizer's).
        lr_lambda (callable): :math:`\lambda`. It receives the step as a float array
            (integral values) of the output dtype, so write it with array operations:
            ``lambda k: 0.95 ** k``, ``lambda k: mx.minimum(1.0, (k + 1) / 100)``.

    Example:
        >>> warmup = LambdaLR(1e-3, lambda k: mx.minimum(1.0, (k + 1) / 500))

    Differences: torch calls ``lr_lambda`` with a Python int, one call per step; a lambda
    with a Python ``if`` on the step needs ``mx.where`` here. A list of lambdas (one per
    parameter group) becomes one schedule per group.
    """

    def __init__(self, learning_rate: float, lr_lambda: Callable[[mx.array], Any]):
        if not callable(lr_lambda):
            raise TypeError(f"lr_lambda should be a function, but got {type(lr_lambda).__name__}")
        self.learning_rate = _learning_rate(learning_rate)
        self.lr_lambda = lr_lambda

    def _at(self, k, dtype):
        factor = mx.array(self.lr_lambda(k.astype(dtype)), dtype=dtype)
        return mx.broadcast_to(self.learning_rate * factor, k.shape)


class MultiplicativeLR(Schedule):
    r"""The rate multiplied by a factor at every step:
    :math:`\eta_0 = \eta,\ \eta_k = \eta_{k-1}\,\lambda(k)`.

    Args:
        learning_rate (float): the starting rate :math:`\eta`.
        lr_lambda (callable): :math:`\lambda`, called with Python ints as torch does.
        total_steps (int): how many steps to tabulate. A compiled step cannot loop a
            step-dependent number of times, so the running product is computed once,
            at construction, in torch's order.

    Example:
        >>> schedule = MultiplicativeLR(0.1, lambda k: 0.95 if k % 10 else 0.5, total_steps=5000)

    Differences: ``total_steps`` is new; after it the rate holds (torch keeps multiplying).
    """

    def __init__(self, learning_rate: float, lr_lambda: Callable[[int], float], *,
                 total_steps: int):
        if not callable(lr_lambda):
            raise TypeError(f"lr_lambda should be a function, but got {type(lr_lambda).__name__}")
        self.learning_rate = _learning_rate(learning_rate)
        self.lr_lambda = lr_lambda
        self.total_steps = _int("total_steps", total_steps, 1)
        values = [self.learning_rate]
        for k in range(1, self.total_steps + 1):
            values.append(values[-1] * lr_lambda(k))
        self._table = _Table(values)

    def _at(self, k, dtype):
        return self._table(k, dtype)


class StepLR(Schedule):
    r"""Decay by ``gamma`` every ``step_size`` steps:
    :math:`\eta_k = \eta\,\gamma^{\lfloor k / \text{step\_size} \rfloor}`.

    Args:
        learning_rate (float): the starting rate :math:`\eta`.
        step_size (int): the period of the decay.
        gamma (float): the decay factor. Default: 0.1.

    Example:
        >>> schedule = StepLR(0.1, step_size=30, gamma=0.1)   # 0.1, then 0.01 from step 30
    """

    def __init__(self, learning_rate: float, step_size: int, gamma: float = 0.1):
        self.learning_rate = _learning_rate(learning_rate)
        self.step_size = _int("step_size", step_size, 1)
        self.gamma = _number("gamma", gamma)

    def _at(self, k, dtype):
        decays = (k // self.step_size).astype(dtype)   # integer division: exact at any step
        return self.learning_rate * _power(self.gamma, decays)


class MultiStepLR(Schedule):
    r"""Decay by ``gamma`` at each milestone:
    :math:`\eta_k = \eta\,\gamma^{\#\{m \in \text{milestones} : m \le k\}}`.

    Args:
        learning_rate (float): the starting rate :math:`\eta`.
        milestones (sequence of int): the steps where the rate decays (a repeated
            milestone decays once per repetition, as in torch).
        gamma (float): the decay factor. Default: 0.1.

    Example:
        >>> schedule = MultiStepLR(0.05, milestones=(30, 80), gamma=0.1)
    """

    def __init__(self, learning_rate: float, milestones: Sequence[int], gamma: float = 0.1):
        self.learning_rate = _learning_rate(learning_rate)
        self.milestones = tuple(sorted(_int("milestones", m, 0) for m in milestones))
        self.gamma = _number("gamma", gamma)

    def _at(self, k, dtype):
        if not self.milestones:
            return _full(self.learning_rate, k, dtype)
        passed = mx.sum(k[..., None] >= mx.array(self.milestones, dtype=mx.int64), axis=-1)
        return self.learning_rate * _power(self.gamma, passed.astype(dtype))


class ConstantLR(Schedule):
    r"""``factor`` times the rate until step ``total_iters``, then the rate:
    :math:`\eta_k = \eta\,f` for :math:`k < T`, :math:`\eta` after.

    Args:
        learning_rate (float): the starting rate :math:`\eta`.
        factor (float): :math:`f \in [0, 1]`. Default: 1/3.
        total_iters (int): :math:`T`. Default: 5.

    Example:
        >>> schedule = ConstantLR(0.05, factor=0.5, total_iters=40)

    Differences: none; the rate after ``T`` is torch's ``(eta * f) * (1 / f)`` (with
    ``f = 0`` torch divides by zero; this gives ``eta``). ``T = 0`` keeps ``eta * f``, as
    torch's; as a child of ``SequentialLR`` after a milestone, ``T = 0`` gives the rate
    (torch starts such a child from its closed form).
    """

    def __init__(self, learning_rate: float, factor: float = 1.0 / 3, total_iters: int = 5):
        factor = _number("factor", factor)
        if factor > 1.0 or factor < 0:
            raise ValueError("Constant multiplicative factor expected to be between 0 and 1. "
                             f"(factor={factor})")
        self.learning_rate = _learning_rate(learning_rate)
        self.factor = factor
        self.total_iters = _int("total_iters", total_iters, 0)
        self._during = self.learning_rate * factor
        self._after = self._during * (1.0 / factor) if factor else self.learning_rate

    def _at(self, k, dtype):
        if self.total_iters == 0:   # torch scales at step 0 and never reaches "step == 0" again
            return _full(self._during, k, dtype)
        return mx.where(k >= self.total_iters, mx.array(self._after, dtype),
                        mx.array(self._during, dtype))

    def _after_milestone(self, k, dtype):
        if self.total_iters == 0:   # torch's closed form at 0: the rate times f + (1 - f)
            return _full(self.learning_rate * (self.factor + (1.0 - self.factor)), k, dtype)
        return self._at(k, dtype)


class LinearLR(Schedule):
    r"""A linear ramp of the factor from ``start_factor`` to ``end_factor`` over
    ``total_iters`` steps: :math:`\eta_k = \eta\,(s + (e - s)\min(k, T)/T)`.

    Args:
        learning_rate (float): the starting rate :math:`\eta`.
        start_factor (float): :math:`s \in (0, 1]`. Default: 1/3.
        end_factor (float): :math:`e \in [0, 1]`. Default: 1.0.
        total_iters (int): :math:`T`. Default: 5.

    Example:
        >>> warmup = LinearLR(1e-3, start_factor=0.01, total_iters=500)

    Differences: none. torch reaches :math:`e` through a product of :math:`T` ratios; with
    ``end_factor=0`` that leaves a rounding residue (e.g. -5.7e-19), not 0, so the value
    held from step :math:`T` on is torch's own, replayed once at construction.
    """

    def __init__(self, learning_rate: float, start_factor: float = 1.0 / 3,
                 end_factor: float = 1.0, total_iters: int = 5):
        start_factor, end_factor = _number("start_factor", start_factor), _number("end_factor", end_factor)
        if start_factor > 1.0 or start_factor <= 0:
            raise ValueError("Starting multiplicative factor expected to be greater than 0 and "
                             f"less or equal to 1. (start_factor={start_factor})")
        if end_factor > 1.0 or end_factor < 0:
            raise ValueError("Ending multiplicative factor expected to be between 0 and 1. "
                             f"(end_factor={end_factor})")
        self.learning_rate = _learning_rate(learning_rate)
        self.start_factor, self.end_factor = start_factor, end_factor
        self.total_iters = _int("total_iters", total_iters, 0)
        lr, slope = self.learning_rate * start_factor, end_factor - start_factor
        for k in range(1, self.total_iters + 1):
            lr = lr * (1.0 + slope / (self.total_iters * start_factor + (k - 1) * slope))
        self._final = lr

    def _at(self, k, dtype):
        start, slope, total = self.start_factor, self.end_factor - self.start_factor, self.total_iters
        ramp = self.learning_rate * (start + slope * k.astype(dtype) / max(total, 1))
        return mx.where(k < total, ramp, mx.array(self._final, dtype))


class ExponentialLR(Schedule):
    r"""Decay by ``gamma`` every step: :math:`\eta_k = \eta\,\gamma^k`.

    Args:
        learning_rate (float): the starting rate :math:`\eta`.
        gamma (float): the decay factor.

    Example:
        >>> schedule = ExponentialLR(0.1, gamma=0.99)
    """

    def __init__(self, learning_rate: float, gamma: float):
        self.learning_rate = _learning_rate(learning_rate)
        self.gamma = _number("gamma", gamma)

    def _at(self, k, dtype):
        return self.learning_rate * _power(self.gamma, k.astype(dtype))


class PolynomialLR(Schedule):
    r"""Polynomial decay to zero over ``total_iters`` steps:
    :math:`\eta_k = \eta\,(1 - \min(k, T)/T)^{p}`.

    Args:
        learning_rate (float): the starting rate :math:`\eta`.
        total_iters (int): :math:`T`. Default: 5.
        power (float): :math:`p`. Default: 1.0.

    Example:
        >>> schedule = PolynomialLR(0.1, total_iters=1000, power=2.0)
    """

    def __init__(self, learning_rate: float, total_iters: int = 5, power: float = 1.0):
        self.learning_rate = _learning_rate(learning_rate)
        self.total_iters = _int("total_iters", total_iters, 0)
        self.power = _number("power", power)

    def _at(self, k, dtype):
        if self.total_iters == 0:   # torch leaves the rate alone
            return _full(self.learning_rate, k, dtype)
        done = mx.minimum(k, self.total_iters).astype(dtype) / self.total_iters
        return self.learning_rate * (1.0 - done) ** self.power


class CosineAnnealingLR(Schedule):
    r"""Cosine annealing from the rate to ``eta_min`` over ``T_max`` steps, then back up
    (period :math:`2T`): :math:`\eta_k = \eta_{min} + (\eta - \eta_{min})
    \frac{1 + \cos(\pi k / T)}{2}`.

    Args:
        learning_rate (float): the starting rate :math:`\eta`.
        T_max (int): :math:`T`, the half period.
        eta_min (float): the minimum rate. Default: 0.0.

    Example:
        >>> schedule = CosineAnnealingLR(0.1, T_max=1000, eta_min=1e-5)

    Differences: torch's ``step()`` runs a recursion whose rounding differs from this
    closed form by < 1e-11 relative when ``eta_min = 0`` or ``T_max <= 1000``; with a
    large ``T_max`` and ``eta_min > 0`` it reaches ~5e-10 in the rising half periods
    after ``T_max``, where torch's recursion amplifies its own rounding.
    """

    def __init__(self, learning_rate: float, T_max: int, eta_min: float = 0.0):
        self.learning_rate = _learning_rate(learning_rate)
        self.T_max = _int("T_max", T_max, 1)
        self.eta_min = _number("eta_min", eta_min)

    def _at(self, k, dtype):
        # cos has period 2T: reducing k first keeps float32 exact at any step.
        phase = (k % (2 * self.T_max)).astype(dtype)
        cos_out = 1 + _cos(math.pi * phase / self.T_max)
        return self.eta_min + (self.learning_rate - self.eta_min) * cos_out / 2


class CosineAnnealingWarmRestarts(Schedule):
    r"""Cosine annealing with warm restarts (SGDR): periods :math:`T_i = T_0 T_{mult}^i`,
    :math:`\eta_k = \eta_{min} + (\eta - \eta_{min}) \frac{1 + \cos(\pi T_{cur}/T_i)}{2}`
    with :math:`T_{cur}` the steps since the last restart.

    Args:
        learning_rate (float): the starting rate :math:`\eta`.
        T_0 (int): the first period.
        T_mult (int): the growth of the period at each restart. Default: 1.
        eta_min (float): the minimum rate. Default: 0.0.

    Example:
        >>> schedule = CosineAnnealingWarmRestarts(0.1, T_0=10, T_mult=2)
    """

    def __init__(self, learning_rate: float, T_0: int, T_mult: int = 1, eta_min: float = 0.0):
        if isinstance(T_0, bool) or not isinstance(T_0, int) or T_0 <= 0:
            raise ValueError(f"Expected positive integer T_0, but got {T_0}")
        if isinstance(T_mult, bool) or not isinstance(T_mult, int) or T_mult < 1:
            raise ValueError(f"Expected integer T_mult >= 1, but got {T_mult}")
        if isinstance(eta_min, bool) or not isinstance(eta_min, (float, int)):
            raise ValueError(f"Expected float or int eta_min, but got {eta_min} of type {type(eta_min)}")
        self.learning_rate = _learning_rate(learning_rate)
        self.T_0, self.T_mult, self.eta_min = T_0, T_mult, float(eta_min)
        # Restart steps T_0 (T_mult^n - 1) / (T_mult - 1) and periods, until int64 runs out.
        self._starts, self._periods = [0], [T_0]
        while T_mult > 1 and self._starts[-1] + self._periods[-1] < 2**62:
            self._starts.append(self._starts[-1] + self._periods[-1])
            self._periods.append(self._periods[-1] * T_mult)

    def _at(self, k, dtype):
        if self.T_mult == 1:
            t_cur, t_i = k % self.T_0, mx.array(self.T_0, dtype=mx.int64)
        else:
            starts = mx.array(self._starts, dtype=mx.int64)
            cycle = mx.sum(k[..., None] >= starts[1:], axis=-1)
            t_cur = k - mx.take(starts, cycle)
            t_i = mx.take(mx.array(self._periods, dtype=mx.int64), cycle)
        cos_out = 1 + _cos(math.pi * t_cur.astype(dtype) / t_i.astype(dtype))
        return self.eta_min + (self.learning_rate - self.eta_min) * cos_out / 2


class CyclicLR(Schedule):
    r"""Cyclical learning rate (Smith, 2017) between ``base_lr`` and ``max_lr``, with the
    momentum cycling inversely.

    With :math:`S = \text{up} + \text{down}`, :math:`c = \lfloor 1 + k/S \rfloor`,
    :math:`x = 1 + k/S - c` and :math:`r = \text{up}/S`, the height is
    :math:`h = x/r` while rising (:math:`x \le r`) and :math:`(x - 1)/(r - 1)` after, and

    .. math::
        \eta_k = \eta_{base} + (\eta_{max} - \eta_{base})\,h\,\sigma, \qquad
        \mu_k = \mu_{max} - (\mu_{max} - \mu_{base})\,h\,\sigma

    with :math:`\sigma` = ``scale_fn(c)`` (scale_mode "cycle") or ``scale_fn(k)``
    ("iterations"): 1 for "triangular", :math:`2^{1-c}` for "triangular2",
    :math:`\gamma^k` for "exp_range".

    Args:
        base_lr (float): the lower rate, where a cycle starts.
        max_lr (float): the upper rate.
        step_size_up (float): steps in the rising half (fractional values are valid, as
            in torch). Default: 2000.
        step_size_down (float | None): steps in the falling half. Default: ``step_size_up``.
        mode (str): "triangular", "triangular2" or "exp_range". Default: "triangular".
        gamma (float): the base of "exp_range". Default: 1.0.
        scale_fn (callable | None): a custom :math:`\sigma`, called with a float array;
            overrides ``mode``. Default: None.
        scale_mode (str): "cycle" or "iterations", for a custom ``scale_fn``. Default: "cycle".
        cycle_momentum (bool): whether ``self.momentum`` is a schedule. Default: True.
        base_momentum (float): the lower momentum. Default: 0.8.
        max_momentum (float): the upper momentum. Default: 0.9.

    Attributes:
        momentum: the momentum schedule (what torch writes into ``momentum`` or
            ``betas[0]``), or None when ``cycle_momentum`` is False.

    Example:
        >>> cyclic = CyclicLR(base_lr=0.01, max_lr=0.1, step_size_up=500)
        >>> opt = SGD(learning_rate=cyclic, momentum=cyclic.momentum)

    Differences: torch takes the optimizer (and checks that it has a momentum); here the
    momentum schedule is wired by the caller. Per-group lists become one schedule per group.
    """

    def __init__(self, base_lr: float, max_lr: float, step_size_up: int = 2000,
                 step_size_down: int | None = None, mode: str = "triangular",
                 gamma: float = 1.0, scale_fn: Callable[[mx.array], Any] | None = None,
                 scale_mode: str = "cycle", cycle_momentum: bool = True,
                 base_momentum: float = 0.8, max_momentum: float = 0.9):
        self.base_lr, self.max_lr = _number("base_lr", base_lr), _number("max_lr", max_lr)
        # torch uses the step sizes as floats: fractional ones are valid too.
        up = _number("step_size_up", step_size_up)
        if not 0 < up < math.inf:
            raise ValueError(f"Expected positive step_size_up, but got {step_size_up!r}")
        down = up if step_size_down is None else _number("step_size_down", step_size_down)
        if not 0 <= down < math.inf:
            raise ValueError(f"Expected step_size_down >= 0, but got {step_size_down!r}")
        self.step_size_up, self.step_size_down = step_size_up, step_size_down
        self.total_size, self.step_ratio = up + down, up / (up + down)
        # Whole step sizes: the cycle and the position in it by integer arithmetic on the
        # step, exact at any step (k / total_size in float32 is not).
        self._whole_size = int(up + down) if up.is_integer() and down.is_integer() else None
        if scale_fn is None:
            _choice("mode", mode, ("triangular", "triangular2", "exp_range"),
                    f"mode is invalid and scale_fn is None (mode={mode!r})")
            scale_mode = "iterations" if mode == "exp_range" else "cycle"
        else:
            _choice("scale_mode", scale_mode, ("cycle", "iterations"))
        self.mode, self.gamma, self.scale_fn, self.scale_mode = mode, gamma, scale_fn, scale_mode
        self.cycle_momentum = cycle_momentum
        self.base_momentum = _number("base_momentum", base_momentum)
        self.max_momentum = _number("max_momentum", max_momentum)
        self.momentum = _Bound(self._momentum_at) if cycle_momentum else None

    def _scale(self, x: mx.array) -> mx.array:
        if self.scale_fn is not None:
            return self.scale_fn(x)
        if self.mode == "triangular":
            return 1.0
        if self.mode == "triangular2":
            return 1 / 2.0 ** (x - 1)
        return _power(self.gamma, x)

    def _height_and_scale(self, k: mx.array, dtype: mx.Dtype) -> tuple[mx.array, Any]:
        kf = k.astype(dtype)
        if self._whole_size is not None:
            cycle = (k // self._whole_size + 1).astype(dtype)
            x = (k % self._whole_size).astype(dtype) / self._whole_size
        else:   # torch's float formula
            cycle = mx.floor(1 + kf / self.total_size)
            x = 1.0 + kf / self.total_size - cycle
        ratio = self.step_ratio
        # The unselected side may divide by zero (step_size_down=0): harmless in a select.
        height = mx.where(x <= ratio, x / ratio, (x - 1) / (ratio - 1))
        return height, self._scale(cycle if self.scale_mode == "cycle" else kf)

    def _at(self, k, dtype):
        height, scale = self._height_and_scale(k, dtype)
        return self.base_lr + (self.max_lr - self.base_lr) * height * scale

    def _momentum_at(self, k, dtype):
        height, scale = self._height_and_scale(k, dtype)
        return self.max_momentum - (self.max_momentum - self.base_momentum) * height * scale


class OneCycleLR(Schedule):
    r"""The 1cycle policy (Smith & Topin, 2018): anneal the rate from
    ``max_lr / div_factor`` up to ``max_lr`` over ``pct_start * total_steps`` steps, then
    down to ``max_lr / div_factor / final_div_factor``; the momentum moves the other way.

    Within a phase from step :math:`a` to :math:`b`, with :math:`p = (k - a)/(b - a)`,
    "cos" gives :math:`v_{end} + (v_{start} - v_{end})(1 + \cos \pi p)/2` and "linear"
    :math:`v_{start} + (v_{end} - v_{start})\,p`. Phase ends are
    :math:`\text{pct\_start}\,N - 1` and :math:`N - 1` (``three_phase``:
    :math:`\text{pct\_start}\,N - 1`, :math:`2\,\text{pct\_start}\,N - 2`, :math:`N - 1`,
    the middle phase mirroring the first).

    Args:
        max_lr (float): the peak rate.
        total_steps (int | None): :math:`N`; or give ``epochs`` and ``steps_per_epoch``.
        epochs (int | None), steps_per_epoch (int | None): :math:`N` = their product.
        pct_start (float): the rising fraction of the cycle. Default: 0.3.
        anneal_strategy (str): "cos" or "linear". Default: "cos".
        cycle_momentum (bool): whether ``self.momentum`` is a schedule. Default: True.
        base_momentum (float): the momentum at the peak rate. Default: 0.85.
        max_momentum (float): the momentum at the ends. Default: 0.95.
        div_factor (float): initial rate = max_lr / div_factor. Default: 25.0.
        final_div_factor (float): final rate = initial rate / final_div_factor. Default: 1e4.
        three_phase (bool): add a phase that returns to the initial rate before the final
            decay. Default: False.

    Attributes:
        momentum: the momentum schedule (torch's ``momentum`` or ``betas[0]``), or None.

    Example:
        >>> one_cycle = OneCycleLR(max_lr=0.01, total_steps=10_000)
        >>> opt = Adam(learning_rate=one_cycle, betas=(one_cycle.momentum, 0.999))

    Differences: torch raises when stepped past ``total_steps``; a compiled step cannot
    raise, so the value at ``total_steps`` holds. A last phase of zero length
    (``pct_start=1.0``), where torch divides by zero at ``total_steps``, holds the value at
    ``total_steps - 1`` instead. ``pct_start * total_steps == 1`` (a first phase of zero
    length) raises ``ValueError`` where torch raises ``ZeroDivisionError``. In a torch
    ``SequentialLR``, torch's constructor also changes the rate the other children start
    from (see :class:`SequentialLR`); not reproduced.
    """

    def __init__(self, max_lr: float, total_steps: int | None = None, epochs: int | None = None,
                 steps_per_epoch: int | None = None, pct_start: float = 0.3,
                 anneal_strategy: str = "cos", cycle_momentum: bool = True,
                 base_momentum: float = 0.85, max_momentum: float = 0.95,
                 div_factor: float = 25.0, final_div_factor: float = 1e4,
                 three_phase: bool = False):
        if total_steps is not None:
            if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
                raise ValueError(f"Expected positive integer total_steps, but got {total_steps}")
        elif epochs is not None and steps_per_epoch is not None:
            if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs <= 0:
                raise ValueError(f"Expected positive integer epochs, but got {epochs}")
            if (isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int)
                    or steps_per_epoch <= 0):
                raise ValueError(f"Expected positive integer steps_per_epoch, but got {steps_per_epoch}")
            total_steps = epochs * steps_per_epoch
        else:
            raise ValueError("You must define either total_steps OR (epochs AND steps_per_epoch)")
        if not isinstance(pct_start, float) or pct_start < 0 or pct_start > 1:
            raise ValueError(f"Expected float between 0 and 1 pct_start, but got {pct_start}")
        _choice("anneal_strategy", anneal_strategy, ("cos", "linear"),
                f"anneal_strategy must be one of 'cos' or 'linear', instead got {anneal_strategy}")
        self.max_lr = _number("max_lr", max_lr)
        self.total_steps, self.pct_start, self.anneal_strategy = total_steps, pct_start, anneal_strategy
        self.three_phase, self.cycle_momentum = three_phase, cycle_momentum
        self.div_factor, self.final_div_factor = div_factor, final_div_factor
        self.base_momentum = _number("base_momentum", base_momentum)
        self.max_momentum = _number("max_momentum", max_momentum)
        initial = self.max_lr / div_factor
        lr = {"initial": initial, "max": self.max_lr, "min": initial / final_div_factor}
        mom = {"max": self.max_momentum, "base": self.base_momentum}
        rise = float(pct_start * total_steps) - 1
        # (end step, start lr, end lr, start momentum, end momentum), as torch's phases.
        if three_phase:
            self._phases = [
                (rise, lr["initial"], lr["max"], mom["max"], mom["base"]),
                (float(2 * pct_start * total_steps) - 2, lr["max"], lr["initial"], mom["base"], mom["max"]),
                (total_steps - 1, lr["initial"], lr["min"], mom["max"], mom["max"]),
            ]
        else:
            self._phases = [
                (rise, lr["initial"], lr["max"], mom["max"], mom["base"]),
                (total_steps - 1, lr["max"], lr["min"], mom["base"], mom["max"]),
            ]
        if rise == 0:   # torch computes 0 / 0 at step 0
            raise ValueError(
                f"pct_start * total_steps must not be 1: the first phase would have zero length "
                f"(pct_start={pct_start}, total_steps={total_steps}); torch raises "
                "ZeroDivisionError at construction")
        # A last phase of zero length (pct_start=1.0) is 0 / 0 at step total_steps, where
        # torch raises: the value at total_steps - 1 holds from there on instead.
        last_start = self._phases[-2][0]
        self._last_step = total_steps - 1 if last_start == total_steps - 1 else total_steps
        self.momentum = _Bound(self._momentum_at) if cycle_momentum else None

    def _anneal(self, k: mx.array, dtype: mx.Dtype, lr: bool) -> mx.array:
        anneal = _ANNEAL[self.anneal_strategy]
        step = mx.minimum(k, self._last_step).astype(dtype)
        start_step, pieces = 0.0, []
        for end_step, start_lr, end_lr, start_m, end_m in self._phases:
            pct = (step - start_step) / (end_step - start_step)
            pieces.append((end_step, anneal(start_lr, end_lr, pct) if lr else anneal(start_m, end_m, pct)))
            start_step = end_step
        # torch takes the first phase with step <= end_step, else the last one. An
        # unselected piece may divide by zero (a last phase of zero length): harmless.
        value = pieces[-1][1]
        for end_step, piece in reversed(pieces[:-1]):
            value = mx.where(step <= end_step, piece, value)
        return value

    def _at(self, k, dtype):
        return self._anneal(k, dtype, lr=True)

    def _momentum_at(self, k, dtype):
        return self._anneal(k, dtype, lr=False)


class SequentialLR(Schedule):
    r"""Schedules one after another: ``schedules[i]`` runs from ``milestones[i-1]``
    (restarting at its own step 0) until ``milestones[i]``.

    Args:
        schedules (sequence of Schedule): the schedules, in order.
        milestones (sequence of int): the steps where the next schedule starts; one fewer
            than ``schedules``.

    Attributes:
        momentum: when a child cycles the momentum (``CyclicLR``, ``OneCycleLR``), the
            momentum torch sets: a cycling child's ``momentum`` on its own steps (restarting
            at its milestone); on the other children's steps the last value set holds, and
            before any cycling child has run, what the last of them in ``schedules`` (the
            last constructed, in torch) set at construction: its step 0. None when no
            child cycles.

    Example:
        >>> schedule = SequentialLR([LinearLR(0.1, 0.01, total_iters=100),
        ...                          CosineAnnealingLR(0.1, T_max=900)], milestones=[100])

    Differences: every schedule here starts from its own rate. In torch, ``SWALR`` and
    ``MultiplicativeLR`` after the first milestone ``m`` continue from the optimizer's
    current rate instead, the one the previous schedule set at step ``m - 1``: give that
    rate as their ``learning_rate`` to match torch (times ``lr_lambda(0)`` for
    ``MultiplicativeLR``, which torch applies at ``m``). torch's ``OneCycleLR`` constructor
    overwrites the optimizer's ``initial_lr`` with ``max_lr / div_factor`` (and a
    ``CyclicLR`` constructed before any other scheduler sets it to ``base_lr``), which
    torch's SequentialLR and the schedulers constructed after start from: a warmup before
    a OneCycleLR child runs from ``max_lr / div_factor``. This is not reproduced; it equals
    torch when that rate is the other schedules' ``learning_rate``.
    """

    def __init__(self, schedules: Sequence[Schedule], milestones: Sequence[int]):
        name = type(self).__name__
        schedules = list(schedules)
        if len(schedules) < 1:
            raise ValueError(f"{name} expects at least one scheduler, but got no scheduler. (schedules=[])")
        _check_children(name, schedules)
        milestones = [_int("milestones", m, 0) for m in milestones]
        if len(milestones) != len(schedules) - 1:
            raise ValueError(
                "Sequential Schedulers expects number of schedulers provided to be one more than "
                f"the number of milestone points, but got number of schedulers {len(schedules)} and "
                f"the number of milestones to be equal to {len(milestones)} (milestones={milestones})")
        self.schedules, self.milestones = schedules, milestones
        cycling = [s for s in schedules if getattr(s, "momentum", None) is not None]
        self.momentum = _Bound(self._momentum_at) if cycling else None

    def _at(self, k, dtype):
        value = self.schedules[0]._at(k, dtype)
        for start, schedule in zip(self.milestones, self.schedules[1:]):
            later = schedule._after_milestone(mx.maximum(k - start, 0), dtype)
            value = mx.where(k >= start, later, value)
        return value

    def _momentum_at(self, k, dtype):
        # torch's cycling children write the momentum on their own steps only; the others
        # leave it. Before any has run it is what the last one constructed wrote: its step 0.
        cycling = [i for i, s in enumerate(self.schedules) if getattr(s, "momentum", None) is not None]
        value = self.schedules[cycling[-1]].momentum._at(mx.zeros_like(k), dtype)
        starts, ends = [0, *self.milestones], [*self.milestones, None]
        for i in cycling:
            start, end = starts[i], ends[i]
            if end is not None and end <= start:   # a child torch never steps
                continue
            last = k if end is None else mx.minimum(k, end - 1)   # held after its last step
            own = self.schedules[i].momentum._at(mx.maximum(last - start, 0), dtype)
            value = mx.where(k >= start, own, value)
        return value


class ChainedScheduler(Schedule):
    r"""Several schedules at once: the product of their factors,
    :math:`\eta_k = \eta \prod_i s_i(k) / s_i(0^-)` with :math:`s_i(0^-)` the starting
    rate ``s_i.learning_rate`` (all the same, as in torch where they share an optimizer).

    Args:
        schedules (sequence of Schedule): schedules with a ``learning_rate``.

    Example:
        >>> schedule = ChainedScheduler([ConstantLR(0.1, factor=0.1, total_iters=2),
        ...                              ExponentialLR(0.1, gamma=0.9)])

    Differences: torch applies each scheduler's update in turn to the shared rate. That is
    this product for the multiplicative schedulers (StepLR, MultiStepLR, ConstantLR,
    LinearLR, ExponentialLR, PolynomialLR, MultiplicativeLR, and CosineAnnealingLR with
    ``eta_min=0`` within ``T_max``); schedulers that set an absolute rate (LambdaLR,
    CosineAnnealingWarmRestarts, ...) make torch's result depend on their order, which
    this does not reproduce.
    """

    def __init__(self, schedules: Sequence[Schedule]):
        name = type(self).__name__
        schedules = list(schedules)
        if len(schedules) < 1:
            raise ValueError(f"{name} expects at least one scheduler to be chained, but got no "
                             "scheduler. (schedules=[])")
        _check_children(name, schedules)
        rates = [getattr(s, "learning_rate", None) for s in schedules]
        for i, (schedule, rate) in enumerate(zip(schedules, rates)):
            if rate is None:
                raise ValueError(f"{name} multiplies factors of a learning_rate, but "
                                 f"{type(schedule).__name__} at index {i} has none (schedules[{i}])")
            if rate != rates[0]:
                raise ValueError(f"{name} expects all schedules to start from the same learning_rate, "
                                 f"but schedules[{i}] starts from {rate} and schedules[0] from {rates[0]}")
        self.schedules, self.learning_rate = schedules, rates[0]

    def _at(self, k, dtype):
        value = self.schedules[0]._at(k, dtype)
        for schedule in self.schedules[1:]:
            if schedule.learning_rate == 0:   # torch's product is then 0 from the start
                value = value * 0
            else:
                value = value * (schedule._at(k, dtype) / schedule.learning_rate)
        return value


def _check_children(name: str, schedules: list) -> None:
    for i, schedule in enumerate(schedules):
        if isinstance(schedule, ReduceLROnPlateau):
            raise ValueError(
                f"{name} does not support `ReduceLROnPlateau` scheduler as it requires additional "
                f"kwargs to be specified when calling `step`, but got one at index {i} in the given "
                "schedulers sequence.")
        if not isinstance(schedule, Schedule):
            raise TypeError(f"{name} at index {i} should be a Schedule, got {type(schedule).__name__}")


# ------------------------------------------------------------------ ReduceLROnPlateau

class ReduceLROnPlateau:
    r"""Reduce the optimizer's learning rates when a metric stops improving.

    ``step(metric)`` once per evaluation: a metric better than the best so far (by
    ``threshold``, relative or absolute) resets the count of bad epochs; after more than
    ``patience`` bad epochs each group's rate becomes :math:`\max(\eta f, \eta_{min})`
    (unless that changes it by no more than ``eps``), followed by ``cooldown`` epochs in
    which bad epochs are not counted.

    Args:
        optimizer: one of ours (its ``param_groups``' ``"learning_rate"`` are set) or an
            ``mlx.optimizers`` optimizer (its ``learning_rate``).
        mode (str): "min" (the metric should fall) or "max". Default: "min".
        factor (float): :math:`f < 1`. Default: 0.1.
        patience (int): bad epochs tolerated before a reduction. Default: 10.
        threshold (float): the least improvement that counts. Default: 1e-4.
        threshold_mode (str): "rel" (best * (1 -/+ threshold)) or "abs" (best -/+ threshold).
            Default: "rel".
        cooldown (int): epochs after a reduction in which bad epochs are not counted.
            Default: 0.
        min_lr (float | sequence of float): a floor, or one per group. Default: 0.
        eps (float): the smallest change applied. Default: 1e-8.

    Example:
        >>> plateau = ReduceLROnPlateau(opt, mode="min", patience=5)
        >>> for epoch in range(100):
        ...     train_one_epoch()
        ...     plateau.step(validation_loss)

    Differences: rates are read as floats from the optimizer; a float32 rate is rounded
    back to float32 when set, so a long run drifts from torch's float64 rates by float32
    rounding. An optimizer of ours with a group whose rate is a schedule is refused
    (``ValueError``): a compiled step holds the schedule, so a number could not replace
    it; use this with constant rates, as in torch.
    """

    def __init__(self, optimizer: Any, mode: str = "min", factor: float = 0.1, patience: int = 10,
                 threshold: float = 1e-4, threshold_mode: str = "rel", cooldown: int = 0,
                 min_lr: float | Sequence[float] = 0, eps: float = 1e-8):
        if factor >= 1.0:
            raise ValueError(f"Factor should be < 1.0. (factor={factor})")
        self.optimizer = optimizer
        _refuse_unsettable_rates(optimizer)
        groups = len(_rate_slots(optimizer))
        if isinstance(min_lr, (list, tuple)):
            if len(min_lr) != groups:
                raise ValueError(f"expected {groups} min_lrs, got {len(min_lr)} (min_lr)")
            self.default_min_lr, self.min_lrs = None, [float(m) for m in min_lr]
        else:
            self.default_min_lr, self.min_lrs = float(min_lr), [float(min_lr)] * groups
        self.factor, self.patience, self.cooldown, self.eps = float(factor), patience, cooldown, float(eps)
        self._set_mode(mode, threshold, threshold_mode)
        self.last_epoch = 0
        self.best, self.cooldown_counter, self.num_bad_epochs = self.mode_worse, 0, 0
        self._last_lr = [get() for get, _ in _rate_slots(optimizer)]
        # Ours keep attached stateful schedulers in their checkpoints (opt.save / load).
        attached = getattr(optimizer, "attached", None)
        if isinstance(attached, list):
            attached.append(self)

    def _set_mode(self, mode: str, threshold: float, threshold_mode: str) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode {mode} is unknown! (mode must be 'min' or 'max')")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"threshold mode {threshold_mode} is unknown! "
                             "(threshold_mode must be 'rel' or 'abs')")
        self.mode, self.threshold, self.threshold_mode = mode, float(threshold), threshold_mode
        self.mode_worse = math.inf if mode == "min" else -math.inf

    @property
    def in_cooldown(self) -> bool:
        return self.cooldown_counter > 0

    def is_better(self, current: float, best: float) -> bool:
        """Whether ``current`` improves on ``best`` by more than the threshold."""
        if self.mode == "min":
            return current < (best * (1.0 - self.threshold) if self.threshold_mode == "rel"
                              else best - self.threshold)
        return current > (best * (self.threshold + 1.0) if self.threshold_mode == "rel"
                          else best + self.threshold)

    def step(self, metric: Any) -> None:
        """Record one evaluation of the metric (a number or a 1-element array)."""
        current = float(metric.item() if isinstance(metric, mx.array) else metric)
        _refuse_unsettable_rates(self.optimizer)  # (assigned since): before anything changes
        # Counted in locals and set once the rates are reduced: a failed call changes nothing.
        best, bad, cooldown = self.best, self.num_bad_epochs, self.cooldown_counter
        if self.is_better(current, best):
            best, bad = current, 0
        else:
            bad += 1
        if cooldown > 0:
            cooldown, bad = cooldown - 1, 0
        if bad > self.patience:
            self._reduce_lr()
            cooldown, bad = self.cooldown, 0
        self.last_epoch += 1
        self.best, self.num_bad_epochs, self.cooldown_counter = best, bad, cooldown
        self._last_lr = [get() for get, _ in _rate_slots(self.optimizer)]

    def _reduce_lr(self) -> None:
        slots = _rate_slots(self.optimizer)
        if len(slots) != len(self.min_lrs):
            if self.default_min_lr is None:
                raise RuntimeError(
                    f"The number of param groups in the `optimizer` ({len(slots)}) differs from when "
                    f"`ReduceLROnPlateau` was initialized ({len(self.min_lrs)}), usually due to a new "
                    "param group being added to the optimizer. Please modify the `min_lrs` field to "
                    "match the length of the `optimizer` param groups.")
            self.min_lrs = [self.default_min_lr] * len(slots)
        for (get, put), min_lr in zip(slots, self.min_lrs):
            old_lr = get()
            new_lr = max(old_lr * self.factor, min_lr)
            if old_lr - new_lr > self.eps:
                put(new_lr)

    def get_last_lr(self) -> list[float]:
        """The groups' rates after the last ``step``."""
        return list(self._last_lr)

    _STATE = ("mode", "factor", "patience", "threshold", "threshold_mode", "cooldown",
              "min_lrs", "default_min_lr", "eps", "best", "num_bad_epochs", "cooldown_counter",
              "last_epoch", "_last_lr")

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values (``best`` may be ``inf``, which ``json`` writes as Infinity)."""
        return {key: list(v) if isinstance(v := getattr(self, key), list) else v for key in self._STATE}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s values; all are checked before any is set."""
        self.check_state_dict(state_dict)
        for key in self._STATE:
            if key in state_dict:
                setattr(self, key, list(state_dict[key]) if isinstance(state_dict[key], list)
                        else state_dict[key])
        self._set_mode(self.mode, self.threshold, self.threshold_mode)

    def check_state_dict(self, state_dict: Any) -> None:
        """Raise ``ValueError`` if ``load_state_dict(state_dict)`` would fail; changes nothing
        (an optimizer's checkpoint checks its attached schedulers before it loads anything)."""
        if not isinstance(state_dict, dict):
            raise ValueError(f"a ReduceLROnPlateau state must be a dict, got {type(state_dict).__name__}")
        values = {key: state_dict.get(key, getattr(self, key)) for key in self._STATE}
        if values["mode"] not in ("min", "max"):
            raise ValueError(f"mode {values['mode']!r} is unknown (mode must be 'min' or 'max')")
        if values["threshold_mode"] not in ("rel", "abs"):
            raise ValueError(f"threshold mode {values['threshold_mode']!r} is unknown "
                             "(threshold_mode must be 'rel' or 'abs')")
        for key, value in values.items():
            if key in ("mode", "threshold_mode"):
                continue
            kinds = _PLATEAU_STATE_KINDS[key]
            items = value if isinstance(value, list) and list in kinds else [value]
            if not isinstance(value, kinds) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool)
                    for v in items if v is not None):
                raise ValueError(f"ReduceLROnPlateau state {key!r} is {value!r}, expected "
                                 f"{' or '.join(k.__name__ for k in kinds)}")


def _refuse_unsettable_rates(optimizer: Any) -> None:
    """ReduceLROnPlateau sets numbers; a group of ours whose rate is a schedule cannot take
    one once stepped (a compiled step holds the schedule), nor can a rate compiled in as
    one of the optimizer's ``constants``: such optimizers are refused."""
    if "learning_rate" in getattr(optimizer, "_constants", ()):
        raise ValueError("ReduceLROnPlateau sets the learning rate, but this optimizer has it "
                         "among its constants (compiled into its step); build it without")
    scheduled = [i for i, values in enumerate(getattr(optimizer, "_group_values", ()))
                 if is_schedule(values.get("learning_rate"))]
    if scheduled:
        raise ValueError(f"ReduceLROnPlateau sets the learning rate, but the rate of group(s) "
                         f"{scheduled} (0: the default group) is a schedule; use it with "
                         "constant rates, as in torch")


# What each saved ReduceLROnPlateau value may be (lists hold numbers).
_PLATEAU_STATE_KINDS = {
    "factor": (int, float), "patience": (int,), "threshold": (int, float), "cooldown": (int,),
    "min_lrs": (list,), "default_min_lr": (int, float, type(None)), "eps": (int, float),
    "best": (int, float), "num_bad_epochs": (int,), "cooldown_counter": (int,),
    "last_epoch": (int,), "_last_lr": (list,),
}


def _rate_slots(optimizer: Any) -> list[tuple[Callable[[], float], Callable[[float], None]]]:
    """(read, write) of each group's learning rate, for ours or an mlx.optimizers optimizer."""
    def as_float(value: Any) -> float:
        return float(value.item() if isinstance(value, mx.array) else value)

    groups = getattr(optimizer, "param_groups", None)
    if groups is not None:
        return [(lambda g=g: as_float(g["learning_rate"]),
                 lambda value, g=g: g.__setitem__("learning_rate", value)) for g in groups]
    if hasattr(type(optimizer), "learning_rate") or hasattr(optimizer, "learning_rate"):
        return [(lambda: as_float(optimizer.learning_rate),
                 lambda value: setattr(optimizer, "learning_rate", value))]
    raise TypeError(f"{type(optimizer).__name__} is not an optimizer: it has neither "
                    "param_groups nor learning_rate")
