"""minimize vs torch.optim.LBFGS vs scipy L-BFGS-B on the test problems; prints a markdown table.

    .venv/bin/python benchmarks/lbfgs.py

Ours and torch run the same algorithm with ``minimize``'s defaults (torch as one ``step``);
scipy runs L-BFGS-B with its defaults. Everything in float64 on the CPU, torch on one
thread and scipy's OpenBLAS on one thread (with its default thread pool on these 2 shared
cores, scipy's L-BFGS-B spent 3 ms per iteration in BLAS). Times are the best of 3 runs in this process, so ratios are comparable across rows,
absolute times are not across machines.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy/scipy load OpenBLAS

import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import torch
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_lbfgs import PROBLEMS, _scipy_minimize  # noqa: E402  (the problems live with the tests)

from mlx_optim.minimize import minimize  # noqa: E402

SETTINGS = dict(max_iter=15000, tolerance_grad=1e-7, tolerance_change=1e-11, history_size=20)


def run_ours(problem):
    params, loss = problem.mlx()
    result = minimize(loss, params)
    return result.nit, result.nfev, result.fun


def run_torch(problem):
    tensors, loss = problem.torch()
    opt = torch.optim.LBFGS(tensors, lr=1, line_search_fn="strong_wolfe", **SETTINGS)

    def closure():
        opt.zero_grad()
        value = loss()
        value.backward()
        return value

    opt.step(closure)
    state = opt.state[tensors[0]]
    with torch.no_grad():
        return state["n_iter"], state["func_evals"], float(loss())


def run_scipy(problem):
    result = _scipy_minimize(problem)
    return result.nit, result.nfev, float(result.fun)


def best_of(run, problem, repeats=3):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = run(problem)
        times.append(time.perf_counter() - start)
    return (*out, min(times))


def main() -> None:
    torch.set_num_threads(1)
    rows = [("mlx_optim.minimize", run_ours), ("torch LBFGS, same settings", run_torch),
            ("scipy L-BFGS-B, defaults", run_scipy)]
    print("| problem | n | solver | iterations | evaluations | final loss | wall ms |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for problem in PROBLEMS:
        size = sum(np.size(v) for _, v in tree_flatten(problem.init))
        for name, run in rows:
            nit, nfev, fun, seconds = best_of(run, problem)
            print(f"| {problem.name} | {size} | {name} | {nit} | {nfev} | {fun:.9e} | {seconds * 1e3:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
