"""``make demo``: train one small MLP with several optimizers and print a loss table.

The data are generated here (two interleaved spirals, 3 classes), so nothing is
downloaded. Every optimizer starts from the same weights and sees the same batches;
each step is compiled. A later command (``mlx-optim compare``) grows out of this.

    python -m mlx_optim.demo [--steps 300] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

import mlx_optim

OPTIMIZERS = {
    "SGD (momentum, nesterov)": lambda: mlx_optim.SGD(learning_rate=0.1, momentum=0.9, nesterov=True),
    "Adam": lambda: mlx_optim.Adam(learning_rate=1e-2),
    "AdamW (no decay on biases)": lambda: mlx_optim.AdamW(
        learning_rate=1e-2, weight_decay=0.05, groups=[{"params": "*.bias", "weight_decay": 0.0}]),
    "NAdam": lambda: mlx_optim.NAdam(learning_rate=1e-2),
    "RAdam": lambda: mlx_optim.RAdam(learning_rate=1e-2),
    "RMSprop (centered)": lambda: mlx_optim.RMSprop(learning_rate=3e-3, centered=True),
    "Adagrad": lambda: mlx_optim.Adagrad(learning_rate=0.1),
    "Rprop (full batch)": lambda: mlx_optim.Rprop(learning_rate=1e-2),
    "SGD + OneCycleLR": lambda: mlx_optim.SGD(
        learning_rate=mlx_optim.OneCycleLR(max_lr=0.3, total_steps=STEPS[0]), momentum=0.9),
}
STEPS = [300]


def spirals(n_per_class=200, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c in range(classes):
        r = np.linspace(0.05, 1.0, n_per_class)
        t = np.linspace(c * 4.0, (c + 1) * 4.0, n_per_class) + rng.normal(0, 0.2, n_per_class)
        xs.append(np.stack([r * np.sin(t), r * np.cos(t)], axis=1))
        ys.append(np.full(n_per_class, c))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys)


class MLP(nn.Module):
    def __init__(self, width=64):
        super().__init__()
        self.layers = [nn.Linear(2, width), nn.Linear(width, width), nn.Linear(width, 3)]

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = nn.relu(layer(x))
        return self.layers[-1](x)


def train(make_optimizer, x, y, initial, steps, batch, seed):
    model = MLP()
    model.update(tree_map(lambda a: mx.array(a), initial))
    opt = make_optimizer()
    opt.init(model.trainable_parameters())
    loss_fn = lambda m, xb, yb: nn.losses.cross_entropy(m(xb), yb, reduction="mean")
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, opt.state]

    def step(xb, yb):
        loss, grads = loss_and_grad(model, xb, yb)
        opt.update(model, grads)
        return loss

    step = mx.compile(step, inputs=state, outputs=state)
    rng = np.random.default_rng(seed)
    start = None
    for i in range(steps):
        # Rprop is a full-batch method: its sign rule needs the same gradient each step.
        idx = np.arange(len(x)) if batch is None else rng.choice(len(x), batch, replace=False)
        step(mx.array(x[idx]), mx.array(y[idx]))
        mx.eval(state)
        if i == 0:
            start = time.perf_counter()  # steps/s without the one-off compilation
    elapsed = time.perf_counter() - start
    logits = model(mx.array(x))
    final = nn.losses.cross_entropy(logits, mx.array(y), reduction="mean").item()
    accuracy = (mx.argmax(logits, axis=1) == mx.array(y)).mean().item()
    return final, accuracy, steps / elapsed


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train a small MLP with several mlx-optim optimizers.")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps <= 0:
        parser.error("--steps must be positive")
    STEPS[0] = args.steps
    mx.random.seed(args.seed)
    x, y = spirals(seed=args.seed)
    model = MLP()
    initial = tree_map(np.array, model.parameters())
    first = nn.losses.cross_entropy(model(mx.array(x)), mx.array(y), reduction="mean").item()
    print(f"3-class spirals, {len(x)} points, MLP 2-64-64-3, {args.steps} compiled steps, "
          f"batch 64 (initial loss {first:.3f})\n")
    print(f"| {'optimizer':<28} | final loss | accuracy | steps/s |")
    print(f"|{'-' * 30}|-----------:|---------:|--------:|")
    for name, make in OPTIMIZERS.items():
        batch = None if "full batch" in name else 64
        loss, accuracy, speed = train(make, x, y, initial, max(args.steps, 2), batch, args.seed)
        print(f"| {name:<28} | {loss:10.4f} | {accuracy:8.1%} | {speed:7.0f} |")


if __name__ == "__main__":
    main()
