"""When spreading a step over CPU streams pays: ours on one stream against ours spread over
``get_cpu_streams()`` streams (at least 2), over the bench's transformer-shaped tree at
several widths.

    .venv/bin/python benchmarks/streams.py [--widths 64 128 192 256 512] [--rounds 11]
                                           [--markdown benchmarks/results/streams.md]

Every width is forced to spread over all of them (``ELEMENTS_PER_STREAM = 1``), so the table
shows what spreading costs where the default keeps one stream, and what it saves where the
default spreads (the last column; where the default would use fewer streams than that, as at
3.2M on 4 cores, the spread run uses more than the default). Each compiled step is evaluated
before the next, as in a training loop; rounds interleave the two runs, and a ratio is the
median of the rounds' ratios (in parentheses the middle half of them).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
from pathlib import Path

import mlx.core as mx

import mlx_optim
from mlx_optim import _base
from mlx_optim.cli import bench, format_table

OPTIMIZERS = {  # SGD does the least work per element, Adam more
    "SGD": lambda: mlx_optim.SGD(learning_rate=0.01, momentum=0.9),
    "Adam": lambda: mlx_optim.Adam(learning_rate=1e-3),
}


def spread_count() -> int:
    """The default stream count, and at least 2 (on one core, what a second would do)."""
    return max(2, mlx_optim.get_cpu_streams())


def streams_by_default(shapes) -> int:
    """How many streams the default plan gives a step over parameters of these shapes."""
    pairs = [(mx.zeros(shape),) * 2 for shape in shapes]  # lazy: nothing is allocated
    return len({str(stream) for stream in mlx_optim.SGD()._streams_for(pairs)})


def measure(name: str, spread: int, rounds: int) -> tuple[float, float, list[float]]:
    """(one stream ms/step, ms/step on ``spread`` streams, spread/one ratios over rounds)
    at the bench's current width."""
    steps = max(5, round(20 * (256 / bench.WIDTH) ** 2))  # about the same time per round
    runners = {1: bench.mlx_runner(OPTIMIZERS[name], steps, cpu_streams=1),
               spread: bench.mlx_runner(OPTIMIZERS[name], steps, cpu_streams=spread)}
    samples = {k: [] for k in runners}
    order = random.Random(0)
    for _ in range(rounds):
        keys = list(runners)
        order.shuffle(keys)
        for key in keys:
            samples[key].append(bench.timed(runners[key], steps))
    ratios = [b / a for a, b in zip(samples[1], samples[spread])]
    return statistics.median(samples[1]), statistics.median(samples[spread]), ratios


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 192, 256, 512])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    spread = spread_count()
    default = _base.ELEMENTS_PER_STREAM
    rows = []
    for width in args.widths:
        bench.WIDTH = width
        used = streams_by_default(bench.flat_shapes())
        size = sum(math.prod(s) for s in bench.flat_shapes())
        for name in OPTIMIZERS:
            _base.ELEMENTS_PER_STREAM = 1  # every width spreads
            try:
                one, many, ratios = measure(name, spread, args.rounds)
            finally:
                _base.ELEMENTS_PER_STREAM = default
            q1, q3 = bench.quartiles(ratios)
            rows.append((f"{width}", f"{size / 1e6:.2f}M", name, f"{one:.2f}", f"{many:.2f}",
                         f"{statistics.median(ratios):.2f}x ({q1:.2f}-{q3:.2f})",
                         "spread" if used > 1 else "one stream"))
    header = ("width", "parameters", "optimizer", "one stream ms/step",
              f"{spread} streams ms/step", f"{spread} streams / one", "default")
    text = (f"66 tensors per tree, {args.rounds} rounds; the default spreads over one stream per "
            f"{default} elements, at most get_cpu_streams() = {mlx_optim.get_cpu_streams()}\n\n"
            + format_table(header, rows, right={3, 4, 5}))
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
