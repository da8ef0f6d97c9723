"""LBFGS and minimize: parity with torch.optim.LBFGS, termination rules, minimize vs scipy.

The problems below are also the benchmark's (benchmarks/lbfgs.py imports them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlx_optim import lbfgs as lbfgs_module
from mlx_optim.lbfgs import LBFGS
from mlx_optim.minimize import minimize


# --------------------------------------------------------------------------- problems

@dataclass
class Problem:
    """``loss(xp, params, data)`` is written once for both ``xp=mx`` and ``xp=torch``."""

    name: str
    init: Any  # tree of float64 numpy arrays
    data: dict[str, np.ndarray]
    loss: Callable[[Any, Any, dict], Any]

    def mlx(self, dtype=mx.float64):
        """(params tree, loss(params)) in MLX."""
        data = {k: mx.array(v, dtype=dtype) for k, v in self.data.items()}
        params = tree_map(lambda v: mx.array(v, dtype=dtype), self.init)
        return params, lambda p: self.loss(mx, p, data)

    def torch(self):
        """(list of leaf tensors in our flattening order, closure-ready loss())."""
        named = tree_flatten(self.init)
        tensors = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for _, v in named]
        data = {k: torch.from_numpy(v) for k, v in self.data.items()}
        return tensors, lambda: self.loss(torch, tree_unflatten(list(zip([k for k, _ in named], tensors))), data)


def _rosenbrock(xp, x, data):
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def _logistic(xp, p, data):
    margin = -data["y"] * (data["X"] @ p["w"] + p["b"])
    # e ** m, not exp(m): MLX's float64 exp on the CPU is only float32-accurate (~6e-7).
    return xp.log1p(math.e ** margin).mean() + 0.5e-2 * (p["w"] ** 2).sum()


def _mlp_forward(xp, p, h):
    layers = [layer for layer in p["layers"] if layer]
    for i, layer in enumerate(layers):
        h = h @ layer["weight"].T + layer["bias"]
        if i < len(layers) - 1:
            h = xp.tanh(h)
    return h


def _mlp(xp, p, data):
    return ((_mlp_forward(xp, p, data["X"]) - data["Y"]) ** 2).mean()


def _make_problems() -> list[Problem]:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 10))
    y = np.sign(X @ rng.normal(size=10) + 0.5 * rng.normal(size=200))
    sizes = (1, 16, 16, 1)
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers += [{"weight": rng.normal(size=(fan_out, fan_in)) / math.sqrt(fan_in),
                    "bias": 0.1 * rng.normal(size=fan_out)}, {}]
    grid = np.linspace(-3, 3, 64)[:, None]
    return [
        Problem("rosenbrock-2", np.array([-1.2, 1.0]), {}, _rosenbrock),
        Problem("rosenbrock-100", np.tile([-1.2, 1.0], 50), {}, _rosenbrock),
        Problem("logistic", {"w": np.zeros(10), "b": np.zeros(())}, {"X": X, "y": y}, _logistic),
        # the tree of nn.Sequential(Linear, Tanh, Linear, Tanh, Linear)
        Problem("mlp", {"layers": layers[:-1]}, {"X": grid, "Y": np.sin(grid)}, _mlp),
    ]


PROBLEMS = _make_problems()
