"""Data parallel vs sharded optimizer state (ZeRO-1): per-rank state memory and step time.

    mlx.launch --backend ring -n 2 python benchmarks/distributed.py [--rounds 5] [--markdown out.md]

An MLP of ``--layers`` square ``--width`` layers, AdamW, global batch 64 split over the
ranks. One training step (gradients, bucketed all_sum, optimizer, and for the sharded one
the all_sum of the new parameters) is timed eager and compiled; medians over interleaved
rounds of 5 steps, so drift on a shared machine hits every variant alike. Rank 0 prints
the table; the state bytes of every rank are collected with all_gather.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import mlx.core as mx
import mlx.nn as nn

import mlx_optim
from mlx_optim.distributed import DataParallel, ShardedOptimizer, state_bytes

BATCH, STEPS_PER_ROUND = 64, 5


class MLP(nn.Module):
    def __init__(self, width, layers):
        super().__init__()
        self.layers = [nn.Linear(width, width) for _ in range(layers)]

    def __call__(self, x):
        for layer in self.layers:
            x = nn.relu(layer(x))
        return x


def loss_fn(model, x, y):
    return mx.mean(mx.square(model(x) - y))


class Variant:
    def __init__(self, wrapper, compiled, group, width, layers):
        mx.random.seed(0)
        self.model = MLP(width, layers)
        self.opt = wrapper(mlx_optim.AdamW(learning_rate=1e-3), group)
        self.opt.init(self.model.trainable_parameters())
        self.name = f"{'sharded' if wrapper is ShardedOptimizer else 'unsharded'}, {'compiled' if compiled else 'eager'}"

        def step(x, y):
            loss, grads = nn.value_and_grad(self.model, loss_fn)(self.model, x, y)
            self.opt.update(self.model, grads)
            return loss

        state = [self.model.state, self.opt.state]
        self.step = partial(mx.compile, inputs=state, outputs=state)(step) if compiled else step
        self.times: list[float] = []

    def round(self, x, y):
        mx.eval(self.step(x, y), self.model.parameters(), self.opt.state)  # warm (and trace)
        start = time.perf_counter()
        for _ in range(STEPS_PER_ROUND):
            mx.eval(self.step(x, y), self.model.parameters(), self.opt.state)
        self.times.append((time.perf_counter() - start) / STEPS_PER_ROUND * 1e3)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()

    group = mx.distributed.init()
    rank, world = group.rank(), group.size()
    local = BATCH // world
    x = mx.random.normal((BATCH, args.width), key=mx.random.key(1))[rank * local:(rank + 1) * local]
    y = mx.random.normal((BATCH, args.width), key=mx.random.key(2))[rank * local:(rank + 1) * local]
    variants = [Variant(w, c, group, args.width, args.layers)
                for w in (DataParallel, ShardedOptimizer) for c in (False, True)]
    for _ in range(args.rounds):
        for variant in variants:
            variant.round(x, y)

    n_params = sum(p.size for _, p in nn.utils.tree_flatten(variants[0].model.trainable_parameters()))
    lines = [f"AdamW on an MLP of {args.layers} x {args.width}x{args.width} layers ({n_params:,} "
             f"parameters), {world} ranks (ring backend, loopback), global batch {BATCH}, "
             f"mlx {mx.__version__}, {mx.default_device()}; medians of {args.rounds} rounds "
             f"of {STEPS_PER_ROUND} steps", "",
             "| variant | " + " | ".join(f"rank {r} state MB" for r in range(world))
             + " | state vs unsharded (max rank) | step ms (rank 0) |",
             "|---|" + "---:|" * (world + 2)]
    unsharded = None
    for variant in variants:
        # Every rank's bytes, collected; the step time of rank 0 (all ranks wait on all_sum).
        per_rank = mx.distributed.all_gather(mx.array([state_bytes(variant.opt.optimizer)], mx.float32),
                                             group=group).tolist()
        unsharded = unsharded or max(per_rank)
        lines.append(f"| {variant.name} | " + " | ".join(f"{b / 2**20:.2f}" for b in per_rank)
                     + f" | {max(per_rank) / unsharded:.2f}x | {statistics.median(variant.times):.1f} |")
    if rank == 0:
        print("\n".join(lines))
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
