"""Worker for tests/test_distributed.py: run by ``mlx.launch`` (2 ranks) or alone (1 rank).

Usage: ``distributed_worker.py ranks OUT`` under mlx.launch, then
``distributed_worker.py reload OUT`` in a single process. Each rank writes its results
(final parameters as safetensors, measurements as JSON) under OUT; the test asserts on them.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import time
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as mlx_optimizers
from mlx.utils import tree_flatten, tree_map, tree_unflatten

import mlx_optim
from mlx_optim import RowSparseGrad
from mlx_optim.distributed import DataParallel, ShardedOptimizer, clip_grad_norm, state_bytes
from mlx_optim.grad_utils import grad_norm

START = time.perf_counter()
# Every step spreads its updates over 2 CPU streams, however small and however many cores
# (by default a step this small stays on one): the collectives then meet updates made on
# several streams.
mlx_optim._base.ELEMENTS_PER_STREAM = 1
mlx_optim.set_cpu_streams(2)
BATCH = 16
RESUME_AT, STEPS = 3, 6
OPTIMIZERS = {  # name -> (factory, bias): Muon takes 2-D weights only
    "Adam": (lambda: mlx_optim.Adam(learning_rate=1e-2), True),
    "AdamW": (lambda: mlx_optim.AdamW(learning_rate=1e-2, weight_decay=0.1), True),
    "SGD": (lambda: mlx_optim.SGD(learning_rate=5e-2, momentum=0.9, nesterov=True), True),
    "Adafactor": (lambda: mlx_optim.Adafactor(learning_rate=1e-2), True),
    "Muon": (lambda: mlx_optim.Muon(learning_rate=0.02), False),
    "mlx.optimizers.Adam": (lambda: mlx_optimizers.Adam(learning_rate=1e-2), True),
}


class MLP(nn.Module):
    def __init__(self, dims=(8, 32, 32, 4), bias=True):
        super().__init__()
        self.layers = [nn.Linear(a, b, bias=bias) for a, b in zip(dims[:-1], dims[1:])]

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = nn.relu(layer(x))
        return self.layers[-1](x)


def log(rank, what):
    """Progress on stderr: the test shows it when a run fails or times out."""
    print(f"rank {rank} {time.perf_counter() - START:6.1f}s {what}", file=sys.stderr, flush=True)


def make_model(bias=True, dims=(8, 32, 32, 4)):
    mx.random.seed(0)  # the same initial parameters on every rank
    model = MLP(dims, bias)
    mx.eval(model.parameters())
    return model


def data(step, dims=(8, 32, 32, 4)):
    key = mx.random.key(100 + step)
    kx, ky = mx.random.split(key)
    return mx.random.normal((BATCH, dims[0]), key=kx), mx.random.normal((BATCH, dims[-1]), key=ky)


def half(x, rank, world):
    n = x.shape[0] // world
    return x[rank * n:(rank + 1) * n]


def loss_fn(model, x, y):
    return mx.mean(mx.square(model(x) - y))


def grads_of(model, x, y):
    return nn.value_and_grad(model, loss_fn)(model, x, y)[1]


def flat_params(model):
    return dict(tree_flatten(model.trainable_parameters()))


def max_diff(a, b):
    return max(mx.max(mx.abs(a[k] - b[k])).item() for k in a)


def bitwise_equal(a, b):
    return set(a) == set(b) and all(mx.array_equal(a[k], b[k]).item() for k in a)


def train(model, opt, steps, rank, world, start=0):
    """Data-parallel steps: each rank its half of the batch."""
    for step in range(start, steps):
        x, y = data(step)
        opt.update(model, grads_of(model, half(x, rank, world), half(y, rank, world)))
        mx.eval(model.parameters(), opt.state)
    return flat_params(model)


def averaged_grads(model, x, y, world):
    """What 2 ranks average, computed in one process: (g0 + g1) / 2, bitwise the same."""
    parts = [grads_of(model, half(x, r, world), half(y, r, world)) for r in range(world)]
    return tree_map(lambda *g: sum(g[1:], g[0]) / world, *parts)


def ranks(out):
    group = mx.distributed.init()
    rank, world = group.rank(), group.size()
    results = {"rank": rank, "world": world}
    saved = {}

    log(rank, "1. Data parallel (global batch B, each rank")
    # 1. Data parallel (global batch B, each rank B/2) == one process with batch B.
    for clip in (None, 0.05):
        model = make_model()
        # Small buckets: several all_sums, one tensor (4 KiB) filling a bucket alone.
        dp = DataParallel(mlx_optim.Adam(learning_rate=1e-2), group, max_grad_norm=clip,
                          bucket_bytes=4096 if clip is None else 2**20)
        dp_params = train(model, dp, 5, rank, world)
        single, opt = make_model(), mlx_optim.Adam(learning_rate=1e-2)
        for step in range(5):
            x, y = data(step)
            g = grads_of(single, x, y)
            if clip is not None:
                g = tree_unflatten(list(clip_grad_norm(dict(tree_flatten(g)), clip)[0].items()))
            opt.update(single, g)
            mx.eval(single.parameters(), opt.state)
        name = f"dp_vs_single_clip{clip}"
        results[name] = max_diff(dp_params, flat_params(single))
        if clip is not None:
            results["dp_grad_norm"] = dp.last_grad_norm.item()
        saved.update({f"{name}.{k}": v for k, v in dp_params.items()})

    log(rank, "2. Sharded == unsharded, per optimizer; sta")
    # 2. Sharded == unsharded, per optimizer; state bytes of each.
    for name, (factory, bias) in OPTIMIZERS.items():
        model = make_model(bias)
        plain = train(model, DataParallel(factory(), group), 4, rank, world)
        model = make_model(bias)
        sharded_opt = ShardedOptimizer(factory(), group, bucket_bytes=2048)
        sharded_opt.init(model.trainable_parameters())
        sharded = train(model, sharded_opt, 4, rank, world)
        results[f"sharded_equal.{name}"] = bitwise_equal(plain, sharded)
        results[f"sharded_diff.{name}"] = max_diff(plain, sharded)
        results[f"owned.{name}"] = sharded_opt.owned
        saved.update({f"sharded.{name}.{k}": v for k, v in sharded.items()})

    log(rank, "3. Per-rank state bytes, on a model whose t")
    # 3. Per-rank state bytes, on a model whose tensors can be balanced.
    dims = (32, 64, 64, 64, 8)
    model = make_model(dims=dims)
    full = mlx_optim.Adam()
    full.init(model.trainable_parameters())
    sharded_opt = ShardedOptimizer(mlx_optim.Adam(), group)
    sharded_opt.init(model.trainable_parameters())
    results["state_bytes_unsharded"] = state_bytes(full)
    results["state_bytes_sharded"] = state_bytes(sharded_opt.optimizer)

    log(rank, "4. Compiled == eager (DataParallel and Shar")
    # 4. Compiled == eager (DataParallel and ShardedOptimizer, all_sum inside mx.compile).
    for kind, wrapper in (("dp", DataParallel), ("sharded", ShardedOptimizer)):
        eager_model = make_model()
        eager_opt = wrapper(mlx_optim.AdamW(learning_rate=1e-2), group, max_grad_norm=10.0,
                            bucket_bytes=2048)
        eager = train(eager_model, eager_opt, 4, rank, world)
        model = make_model()
        opt = wrapper(mlx_optim.AdamW(learning_rate=1e-2), group, max_grad_norm=10.0, bucket_bytes=2048)
        opt.init(model.trainable_parameters())
        state = [model.state, opt.state]
        traces = []

        @partial(mx.compile, inputs=state, outputs=state)
        def step(x, y):
            traces.append(1)
            opt.update(model, grads_of(model, x, y))

        for s in range(4):
            x, y = data(s)
            step(half(x, rank, world), half(y, rank, world))
            mx.eval(state)
        results[f"compiled_vs_eager.{kind}"] = max_diff(eager, flat_params(model))
        results[f"compiled_traces.{kind}"] = len(traces)

    log(rank, "5. Sharded checkpoint: save at RESUME_AT, r")
    # 5. Sharded checkpoint: save at RESUME_AT, resume in fresh objects, compare bitwise.
    for name in ("AdamW", "mlx.optimizers.Adam"):
        factory, _ = OPTIMIZERS[name]
        ckpt = os.path.join(out, "ckpt", name)
        model = make_model()
        opt = ShardedOptimizer(factory(), group)
        opt.init(model.trainable_parameters())
        train(model, opt, RESUME_AT, rank, world)
        opt.save(ckpt)
        if rank == 0:
            mx.save_safetensors(os.path.join(ckpt, "model.safetensors"), flat_params(model))
        uninterrupted = train(model, opt, STEPS, rank, world, start=RESUME_AT)
        model = make_model()
        model.update(tree_unflatten(list(mx.load(os.path.join(ckpt, "model.safetensors")).items())))
        resumed_opt = ShardedOptimizer(factory(), group)
        resumed_opt.init(model.trainable_parameters())
        resumed_opt.load(ckpt)
        resumed = train(model, resumed_opt, STEPS, rank, world, start=RESUME_AT)
        results[f"resume_equal.{name}"] = bitwise_equal(uninterrupted, resumed)
        saved.update({f"uninterrupted.{name}.{k}": v for k, v in uninterrupted.items()})

    log(rank, "6. bfloat16 parameters, float32 gradients")
    # 6. bfloat16 parameters, float32 gradients: every rank must send each parameter in one
    # dtype. mlx.optimizers' Adam returns float32 (one step: the unsharded model turns
    # float32, the sharded one keeps bfloat16); ours keeps bfloat16 (partition taken from
    # the first gradients, no init: the float32 gradient tree).
    for name, steps in (("mlx.optimizers.Adam", 1), ("Adam", 3)):
        ends = {}
        for wrapper in (DataParallel, ShardedOptimizer):
            params = {"a": mx.full((4,), 1.0, dtype=mx.bfloat16), "b": mx.full((3,), 2.0, dtype=mx.bfloat16)}
            opt = wrapper(OPTIMIZERS[name][0](), group)
            if name != "Adam":
                opt.init(params)
            for step in range(steps):
                g = {"a": mx.array([0.1, 0.2, 0.3, 0.4]) * (rank + 1 + step),
                     "b": mx.array([-0.5, 0.5, 1.0]) * (rank + 1 - step)}
                params = opt.apply_gradients(g, params)
                mx.eval(params, opt.state)
            ends[wrapper.__name__] = params
        sharded, plain = ends["ShardedOptimizer"], ends["DataParallel"]
        results[f"bf16_dtypes.{name}"] = sorted({str(v.dtype) for v in sharded.values()})
        results[f"bf16_equal.{name}"] = bitwise_equal(
            sharded, {k: v.astype(mx.bfloat16) for k, v in plain.items()})
        saved.update({f"bf16.{name}.{k}": v for k, v in sharded.items()})

    log(rank, "7. A parameter group whose parameters one rank does not own")
    # 7. A parameter group whose parameters one rank does not own (rank 0 holds only
    # layers.1.weight): init must not fail there, and the result equals unsharded.
    factory = lambda: mlx_optim.SGD(learning_rate=5e-2, momentum=0.9,
                                    groups=[{"params": "layers.2.*", "learning_rate": 1e-3}])
    plain = train(make_model(), DataParallel(factory(), group), 3, rank, world)
    model = make_model()
    sharded_opt = ShardedOptimizer(factory(), group)
    sharded_opt.init(model.trainable_parameters())
    results["group_owned"] = sharded_opt.owned
    results["group_equal"] = bitwise_equal(plain, train(model, sharded_opt, 3, rank, world))

    log(rank, "8. Row-sparse gradients")
    # 8. Row-sparse gradients, a different number of rows per rank (none, on some steps):
    # both wrappers equal one process applying every rank's rows (values / 2), clipped.
    table = mx.random.normal((10, 4), key=mx.random.key(7))
    rows = [([1, 3, 1], [3, 7, 7, 2, 9]), ([], [2, 2]), ([], [])]  # (rank 0, rank 1) per step

    def sparse_grads(step, r):
        ids = rows[step][r]
        values = mx.random.normal((len(ids), 4), key=mx.random.key(10 * step + r))
        return {"emb": RowSparseGrad(mx.array(ids, mx.int32), values, 10),
                "w": mx.random.normal((4,), key=mx.random.key(50 + 10 * step + r))}

    ends, norms = {}, {}
    for wrapper in (DataParallel, ShardedOptimizer):
        params = {"emb": table, "w": mx.zeros(4)}
        opt = wrapper(mlx_optim.Adagrad(learning_rate=0.5), group, max_grad_norm=1.0)
        for step in range(len(rows)):
            params = opt.apply_gradients(sparse_grads(step, rank), params)
            mx.eval(params, opt.state)
            norms.setdefault(wrapper.__name__, []).append(opt.last_grad_norm.item())
        ends[wrapper.__name__] = params
    params, opt, expected_norms = {"emb": table, "w": mx.zeros(4)}, mlx_optim.Adagrad(learning_rate=0.5), []
    for step in range(len(rows)):
        parts = [sparse_grads(step, r) for r in range(world)]
        values = mx.concatenate([p["emb"].values for p in parts])
        mean = {"emb": RowSparseGrad(mx.concatenate([p["emb"].indices for p in parts]),
                                     values / world, 10),
                "w": sum((p["w"] for p in parts[1:]), parts[0]["w"]) / world}
        expected_norms.append(grad_norm({"emb": mean["emb"].to_dense(), "w": mean["w"]}).item())
        params = opt.apply_gradients(clip_grad_norm(mean, 1.0)[0], params)
        mx.eval(params, opt.state)
    results["sparse_dp_equal"] = bitwise_equal(ends["DataParallel"], params)
    results["sparse_sharded_equal"] = bitwise_equal(ends["ShardedOptimizer"], params)
    results["sparse_norms"] = norms
    results["sparse_expected_norms"] = expected_norms
    results["sparse_rows_moved"] = [i for i in range(10) if not mx.array_equal(
        ends["ShardedOptimizer"]["emb"][i], table[i]).item()]
    saved.update({f"sparse.{k}": v for k, v in ends["ShardedOptimizer"].items()})

    log(rank, "9. A parameter the optimizer refuses, owned by one rank")
    # 9. Muon refuses 1-D parameters: every rank must raise, in init and in a first update
    # without init, or the ranks that do not own one would wait in a collective.
    refusals = []
    for first_call in ("init", "apply_gradients"):
        model = make_model()
        sharded_opt = ShardedOptimizer(mlx_optim.Muon(learning_rate=0.02), group)
        try:
            if first_call == "init":
                sharded_opt.init(model.trainable_parameters())
            else:
                x, y = data(0)
                sharded_opt.update(model, grads_of(model, half(x, rank, world), half(y, rank, world)))
        except ValueError as error:
            refusals.append(str(error))
    results["muon_refusals"] = refusals

    log(rank, "10. A parameter replaced with another shape, owned by one rank")
    # 10. Only its owner holds state to refuse it: every rank must raise, before the
    # collectives, or the other would wait in one.
    params = {"a": mx.ones((4,)), "b": mx.ones((4,))}
    sharded_opt = ShardedOptimizer(mlx_optim.Adam(learning_rate=0.1), group)
    sharded_opt.init(params)
    params = {"a": mx.ones((5,)), "b": params["b"]}
    try:
        sharded_opt.apply_gradients({k: mx.full(v.shape, 0.1) for k, v in params.items()}, params)
        results["replaced_refusal"] = None
    except ValueError as error:
        results["replaced_refusal"] = str(error)

    log(rank, "done")
    mx.save_safetensors(os.path.join(out, f"rank{rank}.safetensors"), saved)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def reload(out):
    """One process resumes the 2-rank checkpoint; its result must equal the 2-rank run's."""
    group = mx.distributed.init()
    assert group.size() == 1
    two_ranks = mx.load(os.path.join(out, "rank0.safetensors"))
    results = {}
    for name in ("AdamW", "mlx.optimizers.Adam"):
        factory, _ = OPTIMIZERS[name]
        ckpt = os.path.join(out, "ckpt", name)
        model = make_model()
        model.update(tree_unflatten(list(mx.load(os.path.join(ckpt, "model.safetensors")).items())))
        opt = ShardedOptimizer(factory(), group)
        opt.init(model.trainable_parameters())
        opt.load(ckpt)
        for step in range(RESUME_AT, STEPS):
            x, y = data(step)
            opt.update(model, averaged_grads(model, x, y, 2))
            mx.eval(model.parameters(), opt.state)
        expected = {k.split(f"uninterrupted.{name}.")[1]: v for k, v in two_ranks.items()
                    if k.startswith(f"uninterrupted.{name}.")}
        results[f"reload_equal.{name}"] = bitwise_equal(expected, flat_params(model))
        results[f"reload_diff.{name}"] = max_diff(expected, flat_params(model))
        results[f"reload_owned.{name}"] = len(opt.owned)
    with open(os.path.join(out, "reload.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    # A hung collective shows where it hangs (the test kills the launch at 120 s).
    faulthandler.dump_traceback_later(float(os.environ.get("WORKER_DUMP_AFTER_S", 100)), exit=True)
    mode, out = sys.argv[1], sys.argv[2]
    {"ranks": ranks, "reload": reload}[mode](out)
