"""Data-parallel training of a small MLP with sharded optimizer state (ZeRO stage 1).

    mlx.launch --backend ring -n 2 python examples/train_data_parallel.py [--steps 50]
        [--optimizer adamw|adam|sgd|adafactor] [--no-shard] [--compile] [--checkpoint DIR]

Each rank draws its half of every global batch of generated data (a fixed random linear
teacher plus noise), computes gradients on it, and the wrapper averages them across ranks
(bucketed all_sum), clips their global norm, and steps the optimizer: with sharding, each
rank holds and updates the state of its share of the parameters only. Rank 0 prints the
global loss; every rank prints the bytes of optimizer state it holds. Run alone
(``python examples/train_data_parallel.py``) it trains on one rank.
"""

from __future__ import annotations

import argparse
from functools import partial

import mlx.core as mx
import mlx.nn as nn

import mlx_optim
from mlx_optim.distributed import DataParallel, ShardedOptimizer, state_bytes

OPTIMIZERS = {
    "adamw": lambda: mlx_optim.AdamW(learning_rate=3e-3, weight_decay=1e-2),
    "adam": lambda: mlx_optim.Adam(learning_rate=3e-3),
    "sgd": lambda: mlx_optim.SGD(learning_rate=3e-2, momentum=0.9),
    "adafactor": lambda: mlx_optim.Adafactor(learning_rate=1e-2),
}


class MLP(nn.Module):
    def __init__(self, dims=(32, 128, 128, 128, 10)):
        super().__init__()
        self.layers = [nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])]

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = nn.gelu(layer(x))
        return self.layers[-1](x)


def loss_fn(model, x, y):
    return nn.losses.mse_loss(model(x), y)


def batch(step, size, teacher):
    """The global batch of ``step``: the same on every rank, each takes its slice."""
    key_x, key_noise = mx.random.split(mx.random.key(step))
    x = mx.random.normal((size, teacher.shape[0]), key=key_x)
    noise = mx.random.normal((size, teacher.shape[1]), key=key_noise)
    return x, mx.tanh(x @ teacher) + 0.01 * noise


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=256, help="global batch size")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adamw")
    parser.add_argument("--no-shard", action="store_true", help="every rank holds all state")
    parser.add_argument("--compile", action="store_true", help="mx.compile the step")
    parser.add_argument("--checkpoint", help="save the sharded optimizer state here at the end")
    args = parser.parse_args()

    group = mx.distributed.init()
    rank, world = group.rank(), group.size()
    if args.batch % world:
        parser.error(f"--batch {args.batch} must be a multiple of the {world} ranks")
    local = args.batch // world

    mx.random.seed(0)  # equal initial parameters on every rank
    model = MLP()
    teacher = mx.random.normal((32, 10), key=mx.random.key(1234))
    wrapper = DataParallel if args.no_shard else ShardedOptimizer
    opt = wrapper(OPTIMIZERS[args.optimizer](), group, max_grad_norm=1.0)
    opt.init(model.trainable_parameters())

    def step(x, y):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, x, y)
        opt.update(model, grads)
        return loss  # this rank's part of the batch

    if args.compile:
        state = [model.state, opt.state]
        step = partial(mx.compile, inputs=state, outputs=state)(step)

    for i in range(args.steps):
        x, y = batch(i, args.batch, teacher)
        loss = step(x[rank * local:(rank + 1) * local], y[rank * local:(rank + 1) * local])
        mx.eval(loss, model.parameters(), opt.state)
        if i % 10 == 0 or i == args.steps - 1:
            # Every rank runs (evaluates) this all_sum, after the step's own collectives:
            # a collective evaluated on some ranks only would wait forever.
            global_loss = mx.distributed.all_sum(loss, group=group) / world
            mx.eval(global_loss)
            if rank == 0:
                print(f"step {i:4d}  loss {global_loss.item():.5f}", flush=True)

    mode = "unsharded" if args.no_shard else "sharded"
    print(f"rank {rank}/{world}: {state_bytes(opt.optimizer):,} bytes of {mode} "
          f"{type(opt.optimizer).__name__} state", flush=True)
    if args.checkpoint and not args.no_shard:
        opt.save(args.checkpoint)
        if rank == 0:
            print(f"optimizer shards saved in {args.checkpoint}")


if __name__ == "__main__":
    main()
