"""``mlx-optim bench``: compiled step time of each optimizer, ours vs mlx.optimizers vs torch.

A transformer-shaped parameter tree (4 blocks of width 256: about 3.2M parameters in 66
tensors; ``--width`` scales it, e.g. 64 for 0.2M). Each MLX step is compiled with
``mx.compile(step, inputs=state, outputs=state)`` and evaluated before the next, as in a
training loop (whose next gradient needs the new parameters); torch runs its ``foreach``
and, where it has one, its ``fused`` CPU kernel. Times are medians over interleaved rounds
(each round runs every implementation once, in a shuffled order); a ratio is the median of
the rounds' ratios, so drift on a shared machine hits both sides of it alike. torch is
optional (the ``test`` extra).

Ours runs three times: as built by default (every hyperparameter an array in the state, the
updates spread over up to ``get_cpu_streams()`` streams); on one stream, as
``mlx.optimizers`` runs (so only the kernels differ); and, spread as by default, with
``constants=`` naming every hyperparameter but the learning rate, which is what
``mlx.optimizers`` does (it holds only the learning rate as an array): the same math with
the same semantics. ``mlx.optimizers`` runs twice too, as two independent runners timed in
the same rounds: the ratio of one to the other ("mlx.optimizers / itself") is what this
run's noise alone makes of two equal implementations.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as mlx_opt

import mlx_optim
from mlx_optim._base import array_hyperparameters

from . import UsageError, check_names, format_table, positive_int

WIDTH, BLOCKS = 256, 4


def shapes():
    block = {
        "attn": {n: {"weight": (WIDTH, WIDTH), "bias": (WIDTH,)} for n in ("q", "k", "v", "out")},
        "mlp": {"up": {"weight": (4 * WIDTH, WIDTH), "bias": (4 * WIDTH,)},
                "down": {"weight": (WIDTH, 4 * WIDTH), "bias": (WIDTH,)}},
        "norm1": {"weight": (WIDTH,), "bias": (WIDTH,)},
        "norm2": {"weight": (WIDTH,), "bias": (WIDTH,)},
    }
    return {"blocks": [block] * BLOCKS, "final_norm": {"weight": (WIDTH,), "bias": (WIDTH,)}}


def _tree(spec, make):
    if isinstance(spec, dict):
        return {k: _tree(v, make) for k, v in spec.items()}
    if isinstance(spec, list):
        return [_tree(v, make) for v in spec]
    return make(spec)


def flat_shapes() -> list[tuple]:
    flat = []
    _tree(shapes(), flat.append)
    return flat


# name: (ours, mlx.optimizers counterpart with the same math or None, torch factory, note);
# ours takes keyword arguments (``constants=``).
PAIRS = {
    "SGD": (lambda **kw: mlx_optim.SGD(learning_rate=0.01, momentum=0.9, **kw),
            lambda: mlx_opt.SGD(learning_rate=0.01, momentum=0.9),
            lambda torch, p, **kw: torch.optim.SGD(p, lr=0.01, momentum=0.9, **kw), ""),
    "Adam": (lambda **kw: mlx_optim.Adam(learning_rate=1e-3, **kw),
             lambda: mlx_opt.Adam(learning_rate=1e-3, bias_correction=True),
             lambda torch, p, **kw: torch.optim.Adam(p, lr=1e-3, **kw), ""),
    "AdamW": (lambda **kw: mlx_optim.AdamW(learning_rate=1e-3, **kw),
              lambda: mlx_opt.AdamW(learning_rate=1e-3, bias_correction=True),
              lambda torch, p, **kw: torch.optim.AdamW(p, lr=1e-3, **kw), ""),
    "RMSprop": (lambda **kw: mlx_optim.RMSprop(learning_rate=1e-3, **kw),
                lambda: mlx_opt.RMSprop(learning_rate=1e-3, alpha=0.99, eps=1e-8),
                lambda torch, p, **kw: torch.optim.RMSprop(p, lr=1e-3, **kw), ""),
    "Adagrad": (lambda **kw: mlx_optim.Adagrad(learning_rate=1e-2, **kw),
                lambda: mlx_opt.Adagrad(learning_rate=1e-2, eps=1e-10),
                lambda torch, p, **kw: torch.optim.Adagrad(p, lr=1e-2, **kw), ""),
    "Adadelta": (lambda **kw: mlx_optim.Adadelta(learning_rate=1.0, **kw),
                 lambda: mlx_opt.AdaDelta(learning_rate=1.0, rho=0.9, eps=1e-6),
                 lambda torch, p, **kw: torch.optim.Adadelta(p, lr=1.0, **kw), ""),
    "Adamax": (lambda **kw: mlx_optim.Adamax(learning_rate=2e-3, **kw),
               lambda: mlx_opt.Adamax(learning_rate=2e-3),
               lambda torch, p, **kw: torch.optim.Adamax(p, lr=2e-3, **kw),
               "mlx's Adamax differs (no bias correction, eps outside the max)"),
    "NAdam": (lambda **kw: mlx_optim.NAdam(**kw), None,
              lambda torch, p, **kw: torch.optim.NAdam(p, **kw), "no mlx counterpart"),
    "RAdam": (lambda **kw: mlx_optim.RAdam(**kw), None,
              lambda torch, p, **kw: torch.optim.RAdam(p, **kw), "no mlx counterpart"),
    "ASGD": (lambda **kw: mlx_optim.ASGD(**kw), None,
             lambda torch, p, **kw: torch.optim.ASGD(p, **kw), "no mlx counterpart"),
    "Rprop": (lambda **kw: mlx_optim.Rprop(**kw), None,
              lambda torch, p, **kw: torch.optim.Rprop(p, **kw), "no mlx counterpart"),
}
FUSED = {"SGD", "Adam", "AdamW", "Adagrad"}  # torch has fused CPU kernels for these
# The table's ratios: (numerator, denominator) implementations.
# "mlx, again" is a second mlx.optimizers runner: its ratio to the first is the noise floor,
# what a ratio of one implementation to itself looks like in this run.
RATIOS = (("ours", "mlx"), ("ours, one stream", "mlx"), ("ours, constants", "mlx"),
          ("mlx, again", "mlx"), ("ours", "torch foreach"), ("ours", "torch fused"))


def all_but_learning_rate(make_opt) -> tuple[str, ...]:
    """The hyperparameters ``mlx.optimizers`` compiles in: all but the learning rate."""
    return tuple(n for n in array_hyperparameters(make_opt()) if n != "learning_rate")


def mlx_runner(make_opt, steps, cpu_streams=None):
    """A function running ``steps`` compiled steps, each evaluated. The step is traced (and
    warmed up) here, on ``cpu_streams`` CPU streams when given: a compiled step keeps the
    streams it was traced with, so the process-wide count is restored on return."""
    if cpu_streams is None:
        return _mlx_runner(make_opt, steps)
    default = mlx_optim.get_cpu_streams()
    mlx_optim.set_cpu_streams(cpu_streams)
    try:
        return _mlx_runner(make_opt, steps)
    finally:
        mlx_optim.set_cpu_streams(default)


def _mlx_runner(make_opt, steps):
    keys = iter(mx.random.split(mx.random.key(0), 2 * len(flat_shapes())))
    params = _tree(shapes(), lambda s: 0.02 * mx.random.normal(s, key=next(keys)))
    grads = _tree(shapes(), lambda s: 1e-3 * mx.random.normal(s, key=next(keys)))
    opt = make_opt()
    opt.init(params)
    holder = {"params": params}
    state = [opt.state, holder]

    def step(grads):
        holder["params"] = opt.apply_gradients(grads, holder["params"])

    step = mx.compile(step, inputs=state, outputs=state)

    def run():
        for _ in range(steps):
            step(grads)
            mx.eval(holder["params"], opt.state)

    run()  # compile and warm up
    return run


def torch_runner(torch, factory, steps, **kw):
    generator = torch.Generator().manual_seed(0)
    params = [(0.02 * torch.randn(s, generator=generator)).requires_grad_() for s in flat_shapes()]
    for p in params:
        p.grad = 1e-3 * torch.randn(p.shape, generator=generator)
    opt = factory(torch, params, **kw)

    def run():
        for _ in range(steps):
            opt.step()

    run()
    return run


def timed(run, steps) -> float:
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) / steps * 1e3


def measure(rounds: int = 7, steps: int = 20, only: list[str] | None = None,
            torch=None) -> dict:
    """Per optimizer: median ms/step of each implementation, and the median and quartiles
    over rounds of each RATIOS ratio: {name: {"ms": {...}, "ratios": {"ours / mlx": ...},
    "quartiles": {"ours / mlx": [q1, q3]}, "note": ...}}."""
    order = random.Random(0)
    results = {}
    for name, (ours, theirs, torch_factory, note) in PAIRS.items():
        if only and name not in only:
            continue
        if sys.stderr.isatty():
            print(f"measuring {name}...\x1b[K", end="\r", file=sys.stderr, flush=True)
        runners = {"ours": mlx_runner(ours, steps)}
        if theirs:
            runners["ours, one stream"] = mlx_runner(ours, steps, cpu_streams=1)
            constants = all_but_learning_rate(ours)
            runners["ours, constants"] = mlx_runner(lambda: ours(constants=constants), steps)
            runners["mlx"] = mlx_runner(theirs, steps)
            runners["mlx, again"] = mlx_runner(theirs, steps)
        if torch is not None:
            runners["torch foreach"] = torch_runner(torch, torch_factory, steps, foreach=True)
            if name in FUSED:
                runners["torch fused"] = torch_runner(torch, torch_factory, steps, fused=True)
        samples = {k: [] for k in runners}
        for _ in range(rounds):
            keys = list(runners)
            order.shuffle(keys)
            for key in keys:
                samples[key].append(timed(runners[key], steps))
        per_round = {f"{a} / {b}": [x / y for x, y in zip(samples[a], samples[b])]
                     for a, b in RATIOS if a in samples and b in samples}
        results[name] = {"ms": {k: statistics.median(v) for k, v in samples.items()},
                         "ratios": {k: statistics.median(v) for k, v in per_round.items()},
                         "quartiles": {k: quartiles(v) for k, v in per_round.items()},
                         "note": note}
    return results


def quartiles(values: list[float]) -> list[float]:
    """The first and third quartiles: the middle half of the rounds' ratios."""
    if len(values) < 2:
        return [values[0], values[0]]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return [q1, q3]


def table(results: dict) -> str:
    rows = []
    for name, result in results.items():
        ratios, spread = result["ratios"], result["quartiles"]
        cells = [ratio_cell(ratios[key], spread[key]) if key in ratios else "—"
                 for key in (f"{a} / {b}" for a, b in RATIOS)]
        rows.append((name, f"{result['ms']['ours']:.2f}", *cells, result["note"]))
    header = ("optimizer", "ours ms/step", "ours / mlx.optimizers",
              "ours on one stream / mlx.optimizers", "ours with constants / mlx.optimizers",
              "mlx.optimizers / itself", "ours / torch foreach", "ours / torch fused", "note")
    return format_table(header, rows, right={1, 2, 3, 4, 5, 6, 7})


def ratio_cell(ratio: float, spread: list[float]) -> str:
    """``0.99x (0.95-1.03)``: the median ratio and the middle half of the rounds'."""
    return f"{ratio:.2f}x ({spread[0]:.2f}-{spread[1]:.2f})"


def writable_file(text: str) -> None:
    """Raise UsageError unless ``text`` can be opened for writing (not a directory, say)."""
    existed = os.path.lexists(text)
    try:
        open(text, "a").close()  # append: an existing file keeps its content
    except OSError as error:
        raise UsageError(f"cannot write --json {text}: {error.strerror or error}") from None
    if not existed:
        os.remove(text)  # no empty file left behind if the run is interrupted


def run(args: argparse.Namespace) -> int:
    check_names(args.only, list(PAIRS), "optimizer")
    if args.json:
        writable_file(args.json)  # refuse before minutes of measuring, not after
    try:
        import torch

        torch.set_num_threads(2)
    except ImportError:
        torch = None
    global WIDTH
    default_width, WIDTH = WIDTH, args.width
    try:
        flat = flat_shapes()
        n_params = sum(math.prod(s) for s in flat)
        print(f"{n_params / 1e6:.2f}M parameters in {len(flat)} tensors, {args.rounds} rounds x "
              f"{args.steps} compiled steps, each evaluated; ours on up to "
              f"{mlx_optim.get_cpu_streams()} CPU streams; medians, and in parentheses the middle "
              "half of the rounds' ratios"
              + ("" if torch else "; torch is not installed, so no torch columns") + "\n")
        results = measure(args.rounds, args.steps, args.only, torch)
    finally:
        WIDTH = default_width
    print(table(results))
    if args.json:
        try:
            Path(args.json).write_text(json.dumps({"parameters": n_params, "width": args.width,
                                                   "rounds": args.rounds, "steps": args.steps,
                                                   "results": results}, indent=2) + "\n")
        except OSError as error:
            raise UsageError(f"cannot write --json {args.json}: {error.strerror or error}") from None
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=positive_int, default=7, help="interleaved rounds")
    parser.add_argument("--steps", type=positive_int, default=20, help="compiled steps per round")
    parser.add_argument("--width", type=positive_int, default=WIDTH,
                        help=f"the tree's width (default {WIDTH}: 3.16M parameters; 64: 0.20M)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="optimizer names to measure")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "bench", help="step time: ours vs mlx.optimizers vs torch, as ratios",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(run=run)
