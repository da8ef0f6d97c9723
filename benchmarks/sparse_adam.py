"""SparseAdam step time against touched rows, for a 100,000 x 256 embedding table.

Row-sparse: the gradient is a RowSparseGrad of the touched rows (eager; its cost grows
with those rows). Dense: the same gradient as a full table with zero rows elsewhere,
stepped by a compiled SparseAdam (same result, cost of the whole table). Times cover the
optimizer step and the evaluation of parameters and state, not the gradient's creation;
medians over interleaved rounds, so drift on a shared machine hits both alike.

    python benchmarks/sparse_adam.py [--rounds 7] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
import numpy as np

import mlx_optim

ROWS, DIM = 100_000, 256
FRACTIONS = (0.001, 0.01, 0.1, 0.5)


def _gradients(fraction, rng):
    touched = np.sort(rng.choice(ROWS, max(1, int(ROWS * fraction)), replace=False))
    values = mx.array(rng.standard_normal((touched.size, DIM)).astype(np.float32))
    sparse = mlx_optim.RowSparseGrad(mx.array(touched), values, ROWS)
    dense = sparse.to_dense()
    mx.eval(values, dense)
    return sparse, dense


class Runner:
    def __init__(self, compiled):
        self.params = {"embedding": mx.array(np.random.default_rng(0).standard_normal((ROWS, DIM)).astype(np.float32))}
        self.opt = mlx_optim.SparseAdam(learning_rate=1e-3)
        self.opt.init(self.params)
        step = lambda grads, params: self.opt.apply_gradients(grads, params)
        self.step = mx.compile(step, inputs=[self.opt.state], outputs=[self.opt.state]) if compiled else step
        mx.eval(self.params, self.opt.state)

    def time(self, grad):
        start = time.perf_counter()
        self.params = self.step({"embedding": grad}, self.params)
        mx.eval(self.params, self.opt.state)
        return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    rng = np.random.default_rng(1)
    sparse_run, dense_run = Runner(compiled=False), Runner(compiled=True)
    lines = [f"SparseAdam step on a {ROWS:,} x {DIM} float32 table (mlx {mx.__version__}, "
             f"{mx.default_device()}), medians of {args.rounds} rounds",
             "",
             "| touched rows | row-sparse ms | dense (compiled) ms | dense / row-sparse |",
             "|---:|---:|---:|---:|"]
    for fraction in FRACTIONS:
        sparse, dense = _gradients(fraction, rng)
        sparse_run.time(sparse), dense_run.time(dense)  # warm-up (and the compile)
        sparse_ms, dense_ms = [], []
        for _ in range(args.rounds):
            sparse_ms.append(1e3 * sparse_run.time(sparse))
            dense_ms.append(1e3 * dense_run.time(dense))
        s, d = statistics.median(sparse_ms), statistics.median(dense_ms)
        lines.append(f"| {sparse.indices.size:,} ({fraction:.1%}) | {s:.2f} | {d:.1f} | {d / s:.1f}x |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
