"""``mlx-optim compare``: train one small model with several optimizers, side by side.

Every optimizer starts from the same weights and sees the same batches. Each step is
compiled with ``mx.compile(step, inputs=state, outputs=state)`` unless ``--no-compile``.
Writes ``<task>.json`` (every number, the loss of every step) and ``<task>.png`` (loss
curves; needs matplotlib, the ``plot`` extra) into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

import mlx_optim
from mlx_optim.schedulers import CosineAnnealingLR, LinearLR, SequentialLR

from . import UsageError, check_names, format_table, positive_int
from .progress import Progress
from .tasks import TASKS, Task


@dataclass(frozen=True)
class Recipe:
    """How compare builds one optimizer: its arguments and peak learning rate per task."""

    kwargs: dict = field(default_factory=dict)
    learning_rate: dict = field(default_factory=dict)  # task -> peak rate; else the default
    scheduled: bool = True  # warmup + cosine decay of the learning rate
    full_batch: bool = False  # methods that need the same function at every step
    make: object = None  # (model, kwargs) -> optimizer, where the class alone does not fit a model


NO_DECAY_ON_BIASES = [{"params": "*.bias", "weight_decay": 0.0}]
RECIPES = {
    "SGD": Recipe(dict(momentum=0.9, nesterov=True), {"digits": 0.05, "chars": 0.1, "curve": 0.05}),
    "Adam": Recipe(learning_rate={"digits": 3e-3, "chars": 3e-3, "curve": 1e-2}),
    "AdamW": Recipe(dict(weight_decay=0.05, groups=NO_DECAY_ON_BIASES),
                    {"digits": 3e-3, "chars": 3e-3, "curve": 1e-2}),
    "Adamax": Recipe(learning_rate={"digits": 6e-3, "chars": 6e-3, "curve": 2e-2}),
    "RMSprop": Recipe(dict(centered=True), {"digits": 1e-3, "chars": 1e-3, "curve": 3e-3}),
    "NAdam": Recipe(learning_rate={"digits": 3e-3, "chars": 3e-3, "curve": 1e-2}),
    "RAdam": Recipe(learning_rate={"digits": 3e-3, "chars": 3e-3, "curve": 1e-2}),
    "Adagrad": Recipe(learning_rate={"digits": 0.05, "chars": 0.05, "curve": 0.1}),
    "Adadelta": Recipe(learning_rate={"digits": 1.0, "chars": 1.0, "curve": 1.0}),
    "ASGD": Recipe(learning_rate={"digits": 0.05, "chars": 0.1, "curve": 0.05}),
    # Muon takes 2-D weights only: AdamW gets the biases, embeddings and output head.
    "Muon": Recipe(learning_rate={"digits": 0.02, "chars": 0.02, "curve": 0.02},
                   make=lambda model, kwargs: mlx_optim.muon_with_adamw(
                       model, muon=kwargs,
                       adamw={"learning_rate": lambda step: kwargs["learning_rate"](step) / 10})),
    # Rprop's learning rate only seeds its step sizes; its sign rule wants full batches.
    "Rprop": Recipe(learning_rate={"curve": 1e-3}, scheduled=False, full_batch=True),
    # A step is torch's LBFGS.step: up to 20 iterations (one per step stalls torch's line
    # search after a few steps); the table's "evals" column keeps the comparison fair.
    "LBFGS": Recipe(dict(history_size=20, line_search_fn="strong_wolfe"),
                    scheduled=False, full_batch=True),
}


def available() -> list[str]:
    """Every optimizer mlx_optim exports, in its order: new ones take part with defaults."""
    names = []
    for name in mlx_optim.__all__:
        obj = getattr(mlx_optim, name)
        if isinstance(obj, type) and (issubclass(obj, mlx_optim.Optimizer) or obj is mlx_optim.LBFGS) \
                and obj is not mlx_optim.Optimizer:
            names.append(name)
    return names


def warmup_cosine(peak: float, steps: int) -> SequentialLR:
    """Linear warmup from peak/10 over 5% of the run, then cosine decay to peak/100."""
    warmup = max(1, steps // 20)
    return SequentialLR([LinearLR(peak, start_factor=0.1, total_iters=warmup),
                         CosineAnnealingLR(peak, T_max=max(1, steps - warmup), eta_min=peak / 100)],
                        milestones=[warmup])


def build(name: str, task: str, steps: int, model: nn.Module):
    """(optimizer, recipe, peak learning rate or None, schedule description)."""
    cls = getattr(mlx_optim, name)
    recipe = RECIPES.get(name, Recipe())
    kwargs = copy.deepcopy(recipe.kwargs)
    peak = recipe.learning_rate.get(task)
    if recipe.scheduled:
        if peak is None:  # an optimizer without a recipe: its own default rate
            peak = float(cls().learning_rate.item())
        kwargs["learning_rate"] = warmup_cosine(peak, steps)
        schedule = "warmup+cosine"
    else:
        if peak is not None:
            kwargs["learning_rate"] = peak
        schedule = "constant"
    opt = recipe.make(model, kwargs) if recipe.make else cls(**kwargs)
    return opt, recipe, peak, schedule


def state_bytes(opt) -> int:
    """Bytes of every array in the optimizer's state (per-parameter slots and hyperparameters)."""
    return sum(leaf.nbytes for _, leaf in tree_flatten(opt.state) if isinstance(leaf, mx.array))


def train(task: Task, name: str, steps: int, seed: int, compiled: bool, progress: Progress) -> dict:
    mx.random.seed(seed)  # the same initial weights for every optimizer
    model = task.make_model()
    opt, recipe, peak, schedule = build(name, task.name, steps, model)
    x, y = task.train
    # the same batches for every optimizer; wrap so the largest seed stays a valid key
    batches = mx.random.randint(0, x.shape[0], (steps, task.batch_size or 1),
                                key=mx.random.key((seed + 1) % SEEDS))
    full_batch = recipe.full_batch or task.batch_size is None
    loss_and_grad = nn.value_and_grad(model, task.loss)
    losses = []

    if isinstance(opt, mlx_optim.LBFGS):
        evaluate = lambda xb, yb: loss_and_grad(model, xb, yb)
        if compiled:
            evaluate = mx.compile(evaluate, inputs=[model.state], outputs=[model.state])
        step = lambda xb, yb: opt.step(model, lambda: evaluate(xb, yb))
        state = [model.state]
    else:
        opt.init(model.trainable_parameters())  # the complete state before compiling
        state = [model.state, opt.state]

        def step(xb, yb):
            loss, grads = loss_and_grad(model, xb, yb)
            opt.update(model, grads)
            return loss

        if compiled:
            step = mx.compile(step, inputs=state, outputs=state)

    start = time.perf_counter()
    for i in range(steps):
        xb, yb = (x, y) if full_batch else (x[batches[i]], y[batches[i]])
        loss = step(xb, yb)
        mx.eval(loss, state)
        losses.append(loss.item())
        if i == 0 and steps > 1:
            start = time.perf_counter()  # steps/s without the one-off compilation
        progress.update(name, i + 1, losses[-1])
    elapsed = time.perf_counter() - start
    timed_steps = steps - 1 if steps > 1 else 1

    val = task.val or task.train
    return dict(
        optimizer=name, schedule=schedule, learning_rate=peak, full_batch=full_batch,
        steps=steps,
        final_loss=task.loss(model, x, y).item(),
        val_loss=task.loss(model, *task.val).item() if task.val else None,
        accuracy=task.accuracy(model, *val),
        steps_per_second=timed_steps / elapsed if elapsed > 0 else math.inf,
        state_bytes=state_bytes(opt),
        # loss-and-gradient evaluations: one per step, except in L-BFGS's iterations and line search
        evaluations=opt.state["func_evals"] if isinstance(opt, mlx_optim.LBFGS) else steps,
        losses=losses,
    )


def smoothed(values: list[float], window: int) -> list[float]:
    """Bias-corrected exponential moving average, so minibatch noise does not hide the trend."""
    alpha, average, weight, out = 2 / (window + 1), 0.0, 0.0, []
    for v in values:
        average = (1 - alpha) * average + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(average / weight)
    return out


def plot(report: dict, path: Path) -> bool:
    """Write the loss curves to ``path``; False if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    window = max(1, report["steps"] // 30)
    for row in report["results"]:
        full_batch = ", full batch" if row["full_batch"] and report["batch_size"] else ""
        label = f"{row['optimizer']} ({row['schedule']}{full_batch})"
        ax.plot(range(1, row["steps"] + 1), smoothed(row["losses"], window), label=label, lw=1.5)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (moving average, {window} steps)" if window > 1 else "training loss")
    ax.set_title(report["description"], fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def table(report: dict) -> str:
    def number(value, fmt):
        return "—" if value is None else format(value, fmt)

    minibatches = report["batch_size"] is not None  # then say which optimizers ran full batch
    rows = [(r["optimizer"] + (" (full batch)" if r["full_batch"] and minibatches else ""),
             r["schedule"], number(r["learning_rate"], "g"), number(r["final_loss"], ".4f"),
             number(r["val_loss"], ".4f"), number(r["accuracy"], ".1%"),
             r["evaluations"], number(r["steps_per_second"], ".0f"), f"{r['state_bytes']:,}")
             for r in report["results"]]
    header = ("optimizer", "schedule", "peak lr", "final loss", "val loss", "accuracy", "evals",
              "steps/s", "state bytes")
    return format_table(header, rows, right={2, 3, 4, 5, 6, 7, 8})


SEEDS = 2**64  # mx.random.key and mx.random.seed take an unsigned 64-bit integer


def seed_type(text: str) -> int:
    """An argparse type: an integer 0 <= seed < 2**64, checked here rather than in mlx."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value < SEEDS:
        raise argparse.ArgumentTypeError(f"expected a seed from 0 to 2**64 - 1, got {value}")
    return value


def writable_dir(text: str) -> Path:
    path = Path(text)
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()  # the real test: root ignores permission bits
    except OSError as error:
        raise UsageError(f"cannot write to --out {text}: {error.strerror or error}") from None
    return path


def run(args: argparse.Namespace) -> int:
    names = available()
    if args.optimizers == ["all"]:
        args.optimizers = names
    check_names(args.optimizers, names, "optimizer")
    out = writable_dir(args.out)
    task = TASKS[args.task](args.seed)
    steps = args.steps or task.steps
    optimizers = args.optimizers or list(task.optimizers)

    mx.random.seed(args.seed)
    model = task.make_model()
    parameters = tree_flatten(model.trainable_parameters())
    report = dict(
        task=task.name, description=task.description, steps=steps, seed=args.seed,
        compiled=args.compile, batch_size=task.batch_size,
        parameters=sum(p.size for _, p in parameters),
        parameter_bytes=sum(p.nbytes for _, p in parameters),
        initial_loss=task.loss(model, *task.train).item(),
        results=[],
    )
    print(f"{task.description}; {steps} {'compiled' if args.compile else 'eager'} steps, "
          f"seed {args.seed}, initial loss {report['initial_loss']:.4f}\n")
    progress = Progress(total=steps, tasks=len(optimizers))
    failures = []
    for name in optimizers:
        try:
            report["results"].append(train(task, name, steps, args.seed, args.compile, progress))
        except Exception as error:  # one optimizer that cannot run this task does not stop the rest
            failures.append(f"{name}: {type(error).__name__}: {error}")
        progress.next()
    progress.close()

    print(table(report))
    for failure in failures:
        print(f"failed  {failure}")
    json_path, png_path = out / f"{task.name}.json", out / f"{task.name}.png"
    report["png"] = png_path.name if plot(report, png_path) else None
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nresults: {json_path}")
    if report["png"]:
        print(f"loss curves: {png_path}")
    else:
        print("matplotlib is not installed, so no PNG (pip install 'mlx-optim[plot]')",
              file=sys.stderr)
    return 1 if failures else 0


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "compare", help="train a small model with several optimizers; table, JSON and PNG",
        description="Train one small model with several optimizers from the same weights on "
                    "the same batches; print a table and write <task>.json and <task>.png "
                    "(loss curves, needs matplotlib) into --out.")
    parser.add_argument("--task", choices=sorted(TASKS), default="digits",
                        help="digits (default): noisy 12x12 digit glyphs, MLP; chars: "
                             "character-level language model on bundled text; curve: "
                             "full-batch curve fit, where L-BFGS shines")
    parser.add_argument("--optimizers", nargs="+", metavar="NAME",
                        help="class names from mlx_optim (SGD Adam LBFGS ...) or 'all'; "
                             "default: a set chosen for the task")
    parser.add_argument("--steps", type=positive_int,
                        help="training steps; default: per task (digits 300, chars 400, curve 200)")
    parser.add_argument("--seed", type=seed_type, default=0,
                        help="seed of the data, initial weights and batches: 0 to 2**64 - 1 (default 0)")
    parser.add_argument("--out", default="out/compare", metavar="DIR",
                        help="directory for <task>.json and <task>.png (default out/compare)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="compile each step with mx.compile (default: on)")
    parser.set_defaults(run=run)
