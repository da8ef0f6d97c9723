"""Small pure helpers shared by the update functions."""

from __future__ import annotations

from contextvars import ContextVar

import mlx.core as mx

# True while mx.compile traces the update of a parameter whose casts should be its kernel's
# own; set by the optimizer around that parameter's update, see ``cast``.
OWN_KERNEL: ContextVar[bool] = ContextVar("own_kernel", default=False)


def scalar_dtype() -> mx.Dtype:
    """The dtype of scalar hyperparameter math: float64 where the device allows it (CPU).

    torch computes scalar coefficients such as ``1 - beta2`` in double precision; in
    float32 that difference alone moves ``exp_avg_sq`` by 1e-5 relative. Metal has no
    float64, so on the GPU hyperparameters are float32.
    """
    return mx.float64 if mx.default_device() == mx.cpu else mx.float32


def cast(scalar: mx.array | float, like: mx.array, *, shared: bool = False) -> mx.array:
    """A scalar coefficient, computed in ``scalar_dtype``, in ``like``'s dtype.

    Update functions compute coefficients such as ``1 - beta2`` or ``lr / (1 - beta1**t)``
    at the hyperparameters' precision (as torch does in Python floats) and cast them
    once, where they meet a tensor.

    Two things are for speed under ``mx.compile``, which fuses each tensor's elementwise
    update into one kernel:

    - ``mx.contiguous`` is never fused, so a scalar chain (``beta ** step`` ...) is computed
      once instead of for every element of a kernel it would be fused into (measured 10x
      slower on an Adam step; a reshape to (1, 1) also blocks fusion but makes the kernel
      index a broadcast, 1.4x slower).
    - The cast to ``like``'s dtype should happen inside each kernel. MLX's CPU kernels read
      a scalar input inside their loop through a pointer; a float32 scalar may alias the
      float32 outputs, so g++ vectorizes the loop only behind runtime alias checks, at most
      10 (SGD's kernel needs 11: 1.16x slower than with its momentum as a constant), while
      a float64 one cannot alias and its load leaves the loop. But ``mx.compile`` merges the
      identical casts of all parameters into one node, which then cannot fuse into any of
      them. Under ``OWN_KERNEL`` a select on ``like`` itself keeps them apart: it changes
      no value (g++ folds ``c ? s : s`` away) and adds no kernel input, but makes the cast
      this kernel's alone. Optimizers with shallow updates ask for it
      (``Optimizer.casts_in_kernel``). The select adds depth where the scalar is used, and
      ``mx.compile`` splits a kernel deeper than 11 into several (each own cast then a node
      of its own), so ``shared=True`` keeps one cast for a scalar used at the bottom of the
      update (L2 weight decay, applied to the gradient first).

    A Python number (one of an optimizer's ``constants``) becomes a constant array of
    ``like``'s dtype, which a compiled kernel holds as a literal.
    """
    if not isinstance(scalar, mx.array):
        return mx.array(scalar, like.dtype)
    if not like.ndim:
        return scalar.astype(like.dtype)
    if OWN_KERNEL.get() and not shared:
        # No barrier needed: every parameter's select reads the scalar, so none fuses it.
        return mx.where(like == like, scalar, scalar).astype(like.dtype)
    return mx.contiguous(scalar).astype(like.dtype)


def lerp(start: mx.array, end: mx.array, weight: mx.array | float, *,
         single_rounding: bool = False) -> mx.array:
    """torch's ``lerp``: ``start + w (end - start)`` for ``|w| < 0.5``, else
    ``end + (w - 1)(end - start)``, in ``start``'s dtype (float32 for bfloat16 and float16,
    rounded once, as torch's kernel).

    The second form is exact at ``w = 1`` (a decay of 0, as Adam's ``betas=(0, 0.99)``),
    where the first would leave ``end`` with the rounding error of ``end - start``.
    torch's CPU kernel rounds the multiply-add once; MLX's kernels round each op. With
    ``single_rounding`` a float32 lerp is computed in float64 (where the product is exact)
    where the device has float64: for Muon, whose bfloat16 Newton–Schulz turns a float32
    ulp of its input into a bfloat16 one, and Adafactor, whose lerp weights are near 1 in
    its first steps (torch's own arithmetic there). Elsewhere the ulp stays an ulp, and the
    float64 detour would cost the fused kernels their speed (Adamax's step 1.5x).
    """
    if start.dtype in (mx.float16, mx.bfloat16):  # torch's opmath: float32, rounded once
        wide = lerp(start.astype(mx.float32), end.astype(mx.float32), weight,
                    single_rounding=single_rounding)
        return wide.astype(start.dtype)
    w = cast(weight, start)
    small = mx.abs(w) < 0.5
    coeff, base, diff = mx.where(small, w, w - 1), mx.where(small, start, end), end - start
    if single_rounding and start.dtype == mx.float32 and scalar_dtype() == mx.float64:
        wide = mx.float64
        return (coeff.astype(wide) * diff.astype(wide) + base.astype(wide)).astype(mx.float32)
    return coeff * diff + base


def ema_square(avg: mx.array, grad: mx.array, decay: mx.array) -> mx.array:
    """``decay * avg + (1 - decay) * grad**2``, the running mean of squared gradients.

    torch multiplies and adds (``mul_``, ``addcmul_``); this is the lerp that equals it, up
    to rounding and exactly at a decay of 0 or 1, with one scalar reaching the fused kernel
    instead of two (each scalar input costs time in MLX's CPU kernels, see ``cast``: 5% of
    an Adam step). One difference is left: once ``avg`` overflows to ``inf`` (gradients
    above 1.8e19 in float32), ``inf - inf`` makes it NaN where torch keeps ``inf``.
    """
    return lerp(avg, mx.square(grad), 1 - decay)


def bias_correction(beta: mx.array | float, step: mx.array) -> mx.array:
    """``1 - beta**step`` for an integer step array, in ``scalar_dtype``."""
    return 1 - beta ** step.astype(scalar_dtype())


def newton_schulz(matrix: mx.array, coefficients: tuple[float, float, float], steps: int,
                  eps: mx.array) -> mx.array:
    """The orthogonalisation of a 2-D ``matrix`` (about ``U V^T`` of its SVD), in bfloat16.

    ``steps`` quintic iterations ``X <- a X + (b A + c A^2) X`` with ``A = X X^T``, after
    ``X = M / max(||M||_F, eps)``; a tall matrix is transposed so that ``A`` is the
    smaller Gram matrix. bfloat16 and fused ``addmm`` as torch's Muon, so the rounding
    matches torch's as closely as two backends allow.
    """
    a, b, c = coefficients
    x = matrix.astype(mx.bfloat16)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    norm = mx.sqrt(mx.sum(mx.square(x.astype(mx.float32)))).astype(mx.bfloat16)
    x = x / mx.maximum(norm, cast(eps, x))
    for _ in range(steps):
        gram = x @ x.T
        x = mx.addmm(x, mx.addmm(gram, gram, gram, alpha=c, beta=b), x, beta=a)
    return x.T if tall else x
