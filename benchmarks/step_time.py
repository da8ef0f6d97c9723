"""Compiled step time of each optimizer: ours vs mlx.optimizers vs torch, in one run.

A transformer-shaped parameter tree (4 blocks of width 256: about 3.2M parameters in 66
tensors). Each step is compiled with ``mx.compile(step, inputs=state, outputs=state)``.
Times are medians over interleaved rounds (ours, mlx, torch in turn), so drift on a
shared machine hits all three alike; the table reports ratios.

    python benchmarks/step_time.py [--rounds 7] [--steps 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mlx.core as mx
import mlx.optimizers as mlx_opt
import numpy as np

import mlx_optim

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

# name: (ours, mlx.optimizers counterpart with the same math or None, torch factory, note)
PAIRS = {
    "SGD": (lambda: mlx_optim.SGD(learning_rate=0.01, momentum=0.9),
            lambda: mlx_opt.SGD(learning_rate=0.01, momentum=0.9),
            lambda torch, p, **kw: torch.optim.SGD(p, lr=0.01, momentum=0.9, **kw), ""),
    "Adam": (lambda: mlx_optim.Adam(learning_rate=1e-3),
             lambda: mlx_opt.Adam(learning_rate=1e-3, bias_correction=True),
             lambda torch, p, **kw: torch.optim.Adam(p, lr=1e-3, **kw), ""),
    "AdamW": (lambda: mlx_optim.AdamW(learning_rate=1e-3),
              lambda: mlx_opt.AdamW(learning_rate=1e-3, bias_correction=True),
              lambda torch, p, **kw: torch.optim.AdamW(p, lr=1e-3, **kw), ""),
    "RMSprop": (lambda: mlx_optim.RMSprop(learning_rate=1e-3),
                lambda: mlx_opt.RMSprop(learning_rate=1e-3, alpha=0.99, eps=1e-8),
                lambda torch, p, **kw: torch.optim.RMSprop(p, lr=1e-3, **kw), ""),
    "Adagrad": (lambda: mlx_optim.Adagrad(learning_rate=1e-2),
                lambda: mlx_opt.Adagrad(learning_rate=1e-2, eps=1e-10),
                lambda torch, p, **kw: torch.optim.Adagrad(p, lr=1e-2, **kw), ""),
    "Adadelta": (lambda: mlx_optim.Adadelta(learning_rate=1.0),
                 lambda: mlx_opt.AdaDelta(learning_rate=1.0, rho=0.9, eps=1e-6),
                 lambda torch, p, **kw: torch.optim.Adadelta(p, lr=1.0, **kw), ""),
    "Adamax": (lambda: mlx_optim.Adamax(learning_rate=2e-3),
               lambda: mlx_opt.Adamax(learning_rate=2e-3),
               lambda torch, p, **kw: torch.optim.Adamax(p, lr=2e-3, **kw),
               "mlx's Adamax differs (no bias correction, eps outside the max)"),
    "NAdam": (lambda: mlx_optim.NAdam(), None,
              lambda torch, p, **kw: torch.optim.NAdam(p, **kw), "no mlx counterpart"),
    "RAdam": (lambda: mlx_optim.RAdam(), None,
              lambda torch, p, **kw: torch.optim.RAdam(p, **kw), "no mlx counterpart"),
    "ASGD": (lambda: mlx_optim.ASGD(), None,
             lambda torch, p, **kw: torch.optim.ASGD(p, **kw), "no mlx counterpart"),
    "Rprop": (lambda: mlx_optim.Rprop(), None,
              lambda torch, p, **kw: torch.optim.Rprop(p, **kw), "no mlx counterpart"),
}
FUSED = {"SGD", "Adam", "AdamW", "Adagrad"}  # torch has fused CPU kernels for these

def mlx_runner(make_opt, steps):
    rng = np.random.default_rng(0)
    params = _tree(shapes(), lambda s: mx.array(rng.standard_normal(s).astype(np.float32) * 0.02))
    grads = _tree(shapes(), lambda s: mx.array(rng.standard_normal(s).astype(np.float32) * 1e-3))
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

def torch_runner(factory, steps, **kw):
    import torch

    rng = np.random.default_rng(0)
    flat = []
    _tree(shapes(), lambda s: flat.append(s))
    params = [torch.tensor(rng.standard_normal(s).astype(np.float32) * 0.02, requires_grad=True) for s in flat]
    for p in params:
        p.grad = torch.tensor(rng.standard_normal(p.shape).astype(np.float32) * 1e-3)
    opt = factory(torch, params, **kw)

    def run():
        for _ in range(steps):
            opt.step()

    run()
    return run

def timed(run, steps):
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) / steps * 1e3

def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--only", nargs="*", help="optimizer names to measure")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    try:
        import torch

        torch.set_num_threads(2)
    except ImportError:
        torch = None

    n_params = sum(int(np.prod(s)) for s in _flat_shapes())
    print(f"{n_params / 1e6:.2f}M parameters in {len(_flat_shapes())} tensors, "
          f"{args.rounds} rounds x {args.steps} compiled steps, medians\n")
    rows, results = [], {}
    for name, (ours, theirs, torch_factory, note) in PAIRS.items():
        if args.only and name not in args.only:
            continue
        runners = {"ours": mlx_runner(ours, args.steps)}
        if theirs:
            runners["mlx"] = mlx_runner(theirs, args.steps)
        if torch is not None:
            runners["torch foreach"] = torch_runner(torch_factory, args.steps, foreach=True)
            if name in FUSED:
                runners["torch fused"] = torch_runner(torch_factory, args.steps, fused=True)
        samples = {k: [] for k in runners}
        for _ in range(args.rounds):
            for key, run in runners.items():
                samples[key].append(timed(run, args.steps))
        ms = {k: statistics.median(v) for k, v in samples.items()}
        results[name] = {"ms": ms, "note": note}
        ratio = lambda key: f"{ms['ours'] / ms[key]:.2f}x" if key in ms else "—"
        rows.append((name, f"{ms['ours']:.2f}", ratio("mlx"), ratio("torch foreach"), ratio("torch fused"), note))
    header = ("optimizer", "ours ms/step", "ours / mlx.optimizers", "ours / torch foreach",
              "ours / torch fused", "note")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"parameters": n_params, "results": results}, f, indent=2)

def _flat_shapes():
    flat = []
    _tree(shapes(), lambda s: flat.append(s))
    return flat

if __name__ == "__main__":
    main()
