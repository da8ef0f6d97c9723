"""``mlx-optim verify``: parity with the installed torch, configuration by configuration.

Optimizers: every configuration in ``mlx_optim.parity.cases`` runs closed-loop steps (the
gradient depends on the current parameters) in ours and in torch; the parameters and every
state array torch keeps must agree within the row's tolerance. Schedulers: every
configuration in ``mlx_optim.parity.schedulers``; the rate (and the cycled momentum) at
every step must agree with ``torch.optim.lr_scheduler``. A cell of the matrix is the largest
relative error over the row's configurations (error / the largest |value| of torch's array
for optimizers, error / |torch's value| for schedules). Exit status 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import mlx.core as mx

from . import UsageError, check_names, format_table, positive_int
from .progress import Progress

DTYPES = ("float32", "float64")
MODES = ("eager", "compiled")


@dataclass(frozen=True)
class Check:
    """One configuration in one dtype and mode, against torch."""

    kind: str  # "optimizer" or "scheduler"
    name: str  # the matrix row
    config: str
    dtype: str
    mode: str
    error: float  # max relative error; nan when the run failed
    tolerance: float
    detail: str  # the worst array, or the exception

    @property
    def passed(self) -> bool:
        return self.error <= self.tolerance  # False for nan


def _worst(errors: list[tuple[float, str]]) -> tuple[float, str]:
    return max(errors, key=lambda e: math.inf if math.isnan(e[0]) else e[0], default=(0.0, ""))


def optimizer_jobs(names, dtypes, modes, steps):
    """Zero-argument callables, one per (configuration, dtype), each yielding its Checks."""
    from mlx_optim.parity.cases import CASES
    from mlx_optim.parity.harness import run_ours, run_torch, scaled_error, torch_pairs

    def job(case, config, dtype):
        tolerance = case.tolerance[dtype]
        try:
            torch_params, torch_opt = run_torch(case, config, dtype, steps=steps)
        except Exception as error:
            for mode in modes:
                yield Check("optimizer", case.name, config.desc, dtype, mode, math.nan, tolerance,
                            f"torch failed: {type(error).__name__}: {error}")
            return
        for mode in modes:
            try:
                params, opt = run_ours(case, config, dtype, steps=steps, compiled=mode == "compiled")
                errors = []
                for what, ours, theirs in torch_pairs(params, opt, torch_params, torch_opt):
                    error, scale = scaled_error(ours, theirs, what)
                    errors.append((error / scale, what))
                error, detail = _worst(errors)
            except Exception as failure:  # a crash is a mismatch too, shown with its message
                error, detail = math.nan, f"{type(failure).__name__}: {failure}"
            yield Check("optimizer", case.name, config.desc, dtype, mode, error, tolerance, detail)

    return [(case.name, lambda c=case, k=config, d=dtype: job(c, k, d))
            for case in CASES if not names or case.name in names
            for config in case.configs if config.desc not in case.skips
            for dtype in dtypes]


def scheduler_jobs(names, dtypes, modes):
    import numpy as np

    from mlx_optim.parity import schedulers as table

    def values(schedule, dtype, mode, steps):
        at = lambda k: schedule(k, dtype=getattr(mx, dtype))
        if mode == "compiled":
            at = mx.compile(at)
        return np.array(at(mx.arange(steps + 1)), dtype=np.float64)

    def job(case):
        expected_lr, expected_momentum = table.torch_run(case)
        schedule = table.build_ours(case)
        curves = [("rate", schedule, expected_lr)]
        if table.cycles_momentum(case):
            curves.append(("momentum", schedule.momentum, expected_momentum))
        for dtype in dtypes:
            rtol, atol = table.TOLERANCE[dtype]
            for mode in modes:
                errors = []
                for what, curve, expected in curves:
                    got = values(curve, dtype, mode, case.steps)
                    # |got - expected| <= atol + rtol |expected|, as a ratio to compare with rtol
                    floor = atol * np.abs(expected).max() / rtol
                    with np.errstate(divide="ignore", invalid="ignore"):
                        ratio = np.abs(got - expected) / (np.abs(expected) + floor)
                    ratio[got == expected] = 0.0  # also 0 / 0
                    # the first NaN if there is one (a NaN rate is a mismatch), else the largest
                    step = int(np.argmax(np.isnan(ratio)) if np.isnan(ratio).any() else ratio.argmax())
                    errors.append((float(ratio[step]), f"{what} at step {step}"))
                error, detail = _worst(errors)
                yield Check("scheduler", case.name, str(case), dtype, mode, error, rtol, detail)

    return [(case.name, lambda c=case: job(c))
            for case in table.CASES if not names or case.name in names]


def matrix(checks: list[Check], dtypes, modes) -> str:
    columns = [(d, m) for d in dtypes for m in modes]
    rows = []
    for kind in ("optimizer", "scheduler"):
        for name in dict.fromkeys(c.name for c in checks if c.kind == kind):
            mine = [c for c in checks if c.kind == kind and c.name == name]
            cells = []
            for dtype, mode in columns:
                cell = [c for c in mine if c.dtype == dtype and c.mode == mode]
                error, _ = _worst([(c.error, "") for c in cell])
                verdict = "ok" if all(c.passed for c in cell) else "FAIL"
                cells.append(f"{error:.1e} {verdict}" if cell else "—")
            tolerances = "/".join(dict.fromkeys(f"{c.tolerance:g}" for c in mine))
            configs = len({c.config for c in mine})
            rows.append((f"{name} ({kind})", configs, tolerances, *cells))
    header = ("name", "configs", "tolerance", *(f"{d} {m}" for d, m in columns))
    return format_table(header, rows, right=set(range(1, len(header))))


def run(args: argparse.Namespace) -> int:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise UsageError("torch is not installed; verify compares against it "
                         "(pip install 'mlx-optim[test]')") from None
    from mlx_optim.parity import schedulers as scheduler_table
    from mlx_optim.parity.cases import CASES

    optimizer_names = [case.name for case in CASES]
    scheduler_names = list(dict.fromkeys(case.name for case in scheduler_table.CASES))
    check_names(args.only, optimizer_names + scheduler_names, "optimizer or scheduler")
    jobs = optimizer_jobs(args.only, args.dtypes, args.modes, args.steps)
    if args.schedulers:
        jobs += scheduler_jobs(args.only, args.dtypes, args.modes)
    if not jobs:  # else "0 checks, 0 failed" and exit 0 would read as a pass
        raise UsageError("nothing to check: --only names no optimizer, and --no-schedulers "
                         "leaves out the schedulers it names")
    progress = Progress(total=len(jobs))
    checks = []
    for done, (label, job) in enumerate(jobs, 1):
        checks.extend(job())
        progress.update(label, done)
    progress.close()

    print(f"parity with torch {torch.__version__}: the largest relative error per optimizer/scheduler, "
          f"dtype and mode ({args.steps} closed-loop optimizer steps)\n")
    print(matrix(checks, args.dtypes, args.modes))
    failed = [c for c in checks if not c.passed]
    for c in failed:
        print(f"FAIL {c.name} [{c.config}] {c.dtype} {c.mode}: {c.detail}: "
              f"relative error {c.error:.3g} > tolerance {c.tolerance:g}")
    print(f"\n{len(checks)} checks, {len(failed)} failed")
    return 1 if failed else 0


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "verify", help="parity with the installed torch, as a matrix; exit 1 on a mismatch",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="optimizer and scheduler names to check (default: all)")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="compiled: each step under mx.compile")
    parser.add_argument("--steps", type=positive_int, default=12,
                        help="closed-loop optimizer steps (schedulers: each row's own length)")
    parser.add_argument("--schedulers", action=argparse.BooleanOptionalAction, default=True,
                        help="check the schedulers too")
    parser.set_defaults(run=run)
