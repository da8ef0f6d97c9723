"""Data parallel and sharded optimizer state (mlx_optim.distributed).

The multi-rank checks start two local ranks with ``mlx.launch --backend ring -n 2``
(loopback only) running tests/distributed_worker.py once; the worker writes its results to
a temporary directory and the tests below assert on them. A single process then reloads
the 2-rank checkpoint (2 -> 1 ranks).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as mlx_optimizers
import numpy as np
import pytest
import torch

import mlx_optim
from mlx_optim.distributed import (
    DataParallel, ShardedOptimizer, _subtree, bucketed_all_sum, clip_grad_norm,
    partition_parameters, plan_buckets, state_bytes,
)

WORKER = Path(__file__).with_name("distributed_worker.py")
_VENV_LAUNCH = Path(sys.executable).parent / "mlx.launch"
# mlx.launch of the running interpreter's environment (a venv's bin), else from PATH.
LAUNCH = str(_VENV_LAUNCH) if _VENV_LAUNCH.exists() else shutil.which("mlx.launch") or "mlx.launch"
TIMEOUT_S = 120


def _run(cmd: list[str]) -> str:
    """Run ``cmd`` in its own process group; kill the whole group on timeout."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{cmd} timed out after {TIMEOUT_S} s:\n{output.decode()[-3000:]}")
    finally:
        try:  # no rank left behind, whatever happened
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, f"{cmd} failed:\n{output.decode()[-3000:]}"
    return output.decode()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Results of the 2-rank run and of the 1-rank reload: (per-rank JSON, arrays, reload JSON)."""
    out = tmp_path_factory.mktemp("distributed")
    _run([LAUNCH, "--backend", "ring", "-n", "2", sys.executable, str(WORKER), "ranks", str(out)])
    _run([sys.executable, str(WORKER), "reload", str(out)])
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    arrays = [mx.load(str(out / f"rank{r}.safetensors")) for r in range(2)]
    reload = json.loads((out / "reload.json").read_text())
    return results, arrays, reload


# ------------------------------------------------------------------ two ranks
def test_every_rank_ends_with_identical_parameters(runs):
    results, arrays, _ = runs
    assert [r["world"] for r in results] == [2, 2]
    assert set(arrays[0]) == set(arrays[1]) and len(arrays[0]) > 50
    for key in arrays[0]:
        assert mx.array_equal(arrays[0][key], arrays[1][key]).item(), key


@pytest.mark.parametrize("clip", ["None", "0.05"])
def test_data_parallel_equals_one_process_with_the_global_batch(runs, clip):
    results, _, _ = runs
    for r in results:
        assert r[f"dp_vs_single_clip{clip}"] < 1e-6
    if clip != "None":  # the clip really acted, on the averaged gradient's norm
        assert results[0]["dp_grad_norm"] > float(clip)


@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD", "Adafactor", "Muon", "mlx.optimizers.Adam"])
def test_sharded_equals_unsharded(runs, name):
    results, _, _ = runs
    for r in results:
        # Per-parameter math on the same averaged gradients: bitwise equal on CPU,
        # Muon's bf16 Newton-Schulz included (it is the same per-tensor computation).
        assert r[f"sharded_equal.{name}"], (name, r[f"sharded_diff.{name}"])
    owned = [set(r[f"owned.{name}"]) for r in results]
    assert owned[0] and owned[1] and not owned[0] & owned[1]  # each tensor has one owner


def test_sharded_state_bytes_are_about_half(runs):
    results, _, _ = runs
    for r in results:
        ratio = r["state_bytes_sharded"] / r["state_bytes_unsharded"]
        print(f"rank {r['rank']}: state bytes sharded {r['state_bytes_sharded']} / "
              f"unsharded {r['state_bytes_unsharded']} = {ratio:.3f}")
        assert 0.4 <= ratio <= 0.6
    # The shares add up to the whole (plus the per-rank copies of the scalar state).
    total = sum(r["state_bytes_sharded"] for r in results)
    assert results[0]["state_bytes_unsharded"] <= total <= results[0]["state_bytes_unsharded"] * 1.01


@pytest.mark.parametrize("kind", ["dp", "sharded"])
def test_compiled_step_equals_eager_and_traces_once(runs, kind):
    results, _, _ = runs
    for r in results:
        assert r[f"compiled_vs_eager.{kind}"] < 1e-6
        assert r[f"compiled_traces.{kind}"] == 1


@pytest.mark.parametrize("name", ["AdamW", "mlx.optimizers.Adam"])
def test_resume_from_sharded_checkpoint_is_exact(runs, name):
    results, _, _ = runs
    assert all(r[f"resume_equal.{name}"] for r in results)


@pytest.mark.parametrize("name", ["AdamW", "mlx.optimizers.Adam"])
def test_two_rank_checkpoint_reloads_on_one_rank_exactly(runs, name):
    _, _, reload = runs
    assert reload[f"reload_owned.{name}"] == 6  # the one rank now owns every parameter
    assert reload[f"reload_equal.{name}"], reload[f"reload_diff.{name}"]


@pytest.mark.parametrize("name", ["mlx.optimizers.Adam", "Adam"])
def test_sharded_bfloat16_parameters_with_float32_gradients(runs, name):
    # Every rank sends each parameter in its own dtype (the zeros of the non-owner used to
    # be bfloat16 and the owner's update float32, or the reverse: the sums mismatched).
    results, _, _ = runs
    for r in results:
        assert r[f"bf16_dtypes.{name}"] == ["mlx.core.bfloat16"]
        assert r[f"bf16_equal.{name}"]  # == unsharded (cast to bfloat16 for mlx's Adam)


def test_sharded_group_that_one_rank_does_not_own(runs):
    results, _, _ = runs
    assert results[0]["group_owned"] == ["layers.1.weight"]  # none of the group's layers.2.*
    assert all(r["group_equal"] for r in results)


def test_every_rank_refuses_a_parameter_its_optimizer_cannot_update(runs):
    results, _, _ = runs
    for r in results:  # both ranks, in init and in a first update: none left waiting
        assert len(r["muon_refusals"]) == 2, r["muon_refusals"]
        assert all("only supports 2D parameters" in m for m in r["muon_refusals"]), r["muon_refusals"]


def test_every_rank_refuses_a_parameter_replaced_with_another_shape(runs):
    results, _, _ = runs
    for r in results:  # not only the rank that owns it (and holds its state)
        assert "parameter 'a' has shape (5,), but it was partitioned" in r["replaced_refusal"]


def test_row_sparse_gradients_gather_every_ranks_rows(runs):
    results, _, _ = runs
    for r in results:
        assert r["sparse_dp_equal"] and r["sparse_sharded_equal"]
        assert r["sparse_rows_moved"] == [1, 2, 3, 7, 9]  # the rows either rank named
        for name in ("DataParallel", "ShardedOptimizer"):
            np.testing.assert_allclose(r["sparse_norms"][name], r["sparse_expected_norms"], rtol=1e-6)
        assert r["sparse_expected_norms"][0] > 1.0  # the clip acted


def test_example_trains_on_two_ranks_and_saves_shards(tmp_path):
    example = Path(__file__).parents[1] / "examples" / "train_data_parallel.py"
    output = _run([LAUNCH, "--backend", "ring", "-n", "2", sys.executable,
                   str(example), "--steps", "21", "--compile", "--checkpoint", str(tmp_path)])
    losses = [float(line.split()[-1]) for line in output.splitlines() if line.startswith("step")]
    assert len(losses) == 3 and losses[-1] < 0.7 * losses[0]  # rank 0 alone prints
    state = sorted(line for line in output.splitlines() if "bytes of sharded AdamW state" in line)
    assert [line.split(":")[0] for line in state] == ["rank 0/2", "rank 1/2"]
    assert sorted(os.listdir(tmp_path)) == [f"shard-0000{r}-of-00002.{ext}"
                                            for r in (0, 1) for ext in ("json", "safetensors")]


# ------------------------------------------------------------------ one process
def test_partition_is_greedy_largest_first_and_deterministic():
    sizes = {"a": 4, "b": 3, "c": 2, "d": 2, "e": 1}
    owner = partition_parameters(sizes, 2)
    assert owner == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 1}
    assert list(owner) == list(sizes)  # the parameters' order, not the sorting order
    assert partition_parameters(dict(reversed(sizes.items())), 2) == owner
    loads = [sum(s for p, s in sizes.items() if owner[p] == r) for r in range(2)]
    assert loads == [6, 6]
    assert set(partition_parameters(sizes, 1).values()) == {0}


def test_buckets_hold_one_dtype_in_order_up_to_the_cap():
    arrays = [mx.zeros(100), mx.zeros(100), mx.zeros(300), mx.zeros(10, mx.bfloat16),
              mx.zeros(50), mx.zeros(10, mx.bfloat16)]
    # 400 B, 400 B, 1200 B (over the cap: alone), 20 B bf16, 200 B, 20 B bf16
    assert plan_buckets(arrays, 1000) == [[0, 1], [2], [4], [3, 5]]
    assert plan_buckets(arrays, 10**6) == [[0, 1, 2, 4], [3, 5]]


def test_clip_grad_norm_matches_torch():
    rng = np.random.default_rng(0)
    grads = {"w": rng.normal(size=(5, 4)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
    for max_norm in (0.5, 100.0):
        ours, norm = clip_grad_norm({k: mx.array(v) for k, v in grads.items()}, max_norm)
        tensors = {k: torch.zeros(v.shape, requires_grad=True) for k, v in grads.items()}
        for k, t in tensors.items():
            t.grad = torch.tensor(grads[k])
        torch_norm = torch.nn.utils.clip_grad_norm_(list(tensors.values()), max_norm)
        assert abs(norm.item() - torch_norm.item()) < 1e-5
        for k, t in tensors.items():
            np.testing.assert_allclose(np.array(ours[k]), t.grad.numpy(), rtol=1e-6, atol=1e-7)


def test_clip_norm_of_float64_gradients_is_float64_as_torch():
    a = np.random.default_rng(0).standard_normal(1000) * 3.3
    p = torch.zeros(1000, dtype=torch.float64, requires_grad=True)
    p.grad = torch.tensor(a)
    torch_norm = torch.nn.utils.clip_grad_norm_([p], 1.0)
    dp = DataParallel(mlx_optim.SGD(learning_rate=1.0), max_grad_norm=1.0)
    with mx.stream(mx.cpu):  # float64 runs on the CPU
        clipped = dp.average_gradients({"w": mx.array(a, dtype=mx.float64)})
        mx.eval(clipped, dp.last_grad_norm)
    assert dp.last_grad_norm.dtype == mx.float64  # was float32: 102.05237579 vs 102.05236340
    assert dp.last_grad_norm.item() == pytest.approx(torch_norm.item(), rel=1e-14)
    np.testing.assert_allclose(np.array(clipped["w"]), p.grad.numpy(), rtol=1e-14)


def test_clip_grad_norm_counts_a_row_sparse_gradient_as_dense():
    sparse = mlx_optim.RowSparseGrad(mx.array([2, 0, 2]), mx.array([[3.0, 0.0], [0.0, 3.0], [1.0, 0.0]]), 5)
    clipped, norm = clip_grad_norm({"e": sparse, "b": mx.array([12.0])}, 1.0)
    assert norm.item() == pytest.approx(13.0)  # row 2 summed: (4, 0); row 0: (0, 3); 12
    np.testing.assert_allclose(np.array(clipped["e"].to_dense()),
                               np.array(sparse.to_dense()) / (13.0 + 1e-6), rtol=1e-6)
    np.testing.assert_allclose(np.array(clipped["b"]), [12.0 / (13.0 + 1e-6)], rtol=1e-6)


@pytest.mark.parametrize("wrapper", [DataParallel, ShardedOptimizer])
def test_wrappers_apply_row_sparse_gradients_and_refuse_other_leaves(wrapper):
    """World size 1: a RowSparseGrad is applied as by the plain optimizer (it used to be
    dropped: the table never moved); a leaf of another type raises before any change."""
    params = {"emb": mx.ones((4, 2)), "w": mx.ones((2,))}
    grads = {"emb": mlx_optim.RowSparseGrad(mx.array([1, 3, 1]), mx.full((3, 2), 0.5), 4),
             "w": mx.array([1.0, -2.0])}
    expected = mlx_optim.Adagrad(learning_rate=0.5).apply_gradients(grads, params)
    opt = wrapper(mlx_optim.Adagrad(learning_rate=0.5))
    got = opt.apply_gradients(grads, params)
    assert sorted(got) == ["emb", "w"]
    assert all(mx.array_equal(got[k], expected[k]).item() for k in params)
    assert np.array(got["emb"])[[0, 2]].tolist() == [[1.0, 1.0], [1.0, 1.0]]  # untouched rows
    fresh = wrapper(mlx_optim.Adagrad(learning_rate=0.5))
    with pytest.raises(TypeError, match="gradient for 'w' must be an mx.array or a RowSparseGrad"):
        fresh.apply_gradients({"w": np.ones(2)}, params)
    with pytest.raises(ValueError, match="index out of range"):
        fresh.apply_gradients({"emb": mlx_optim.RowSparseGrad(mx.array([4]), mx.ones((1, 2)), 4)}, params)
    assert fresh.optimizer.state["step"].item() == 0 and fresh.last_grad_norm is None


def test_sharded_checks_gradients_on_every_rank_before_any_collective():
    params = {"w": mx.ones((3, 2)), "emb": mx.ones((4, 2))}
    opt = ShardedOptimizer(mlx_optim.Adam(learning_rate=0.1))
    opt.init(params)
    with pytest.raises(ValueError, match=r"gradient for 'w' has shape \(2, 3\)"):
        opt.apply_gradients({"w": mx.ones((2, 3))}, params)
    with pytest.raises(ValueError, match="gradient for unknown parameter 'x'"):
        opt.apply_gradients({"x": mx.ones(1)}, params)
    # Adam takes no row-sparse gradient: refused by every rank, not only the owner.
    with pytest.raises(ValueError, match="Adam does not support row-sparse gradients"):
        opt.apply_gradients({"emb": mlx_optim.RowSparseGrad(mx.array([1]), mx.ones((1, 2)), 4)}, params)
    assert opt.optimizer.state["step"].item() == 0


def test_bucketed_all_sum_on_one_rank_is_identity_and_subtree_keeps_list_places():
    group = mx.distributed.init()
    assert group.size() == 1
    xs = [mx.ones((2, 3)), mx.arange(4)]
    assert all(a is b for a, b in zip(bucketed_all_sum(xs, group, bucket_bytes=8), xs))
    tree = {"layers": [{"w": mx.ones(2)}, {"w": mx.zeros(2), "b": mx.ones(1)}], "head": mx.ones(3)}
    sub = _subtree(tree, {"layers.1.b"})
    assert sub == {"layers": [{}, {"b": tree["layers"][1]["b"]}]}


def test_wrappers_on_one_rank_equal_the_plain_optimizer(tmp_path):
    """World size 1: the wrappers add nothing; save/load round-trips; bad input raises."""
    params = {"w": mx.ones((3, 2)), "b": mx.zeros(2)}
    grads = {"w": mx.full((3, 2), 0.5), "b": mx.array([1.0, -1.0])}
    plain = mlx_optim.Adam(learning_rate=0.1)
    expected = plain.apply_gradients(grads, params)
    for wrapper in (DataParallel, ShardedOptimizer):
        opt = wrapper(mlx_optim.Adam(learning_rate=0.1))
        got = opt.apply_gradients(grads, params)
        assert all(mx.array_equal(got[k], expected[k]).item() for k in params)
        assert state_bytes(opt.optimizer) == state_bytes(plain)
    sharded = ShardedOptimizer(mlx_optim.Adam(learning_rate=0.1))
    sharded.init(params)
    sharded.apply_gradients(grads, params)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "shard-00001-of-00002.json").write_text("{}")  # an older 2-rank save
    sharded.save(tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["shard-00000-of-00001.json",
                                                     "shard-00000-of-00001.safetensors"]
    fresh = ShardedOptimizer(mlx_optim.Adam(learning_rate=0.1))
    fresh.init(params)
    fresh.load(tmp_path / "ckpt")
    a, b = sharded.apply_gradients(grads, params), fresh.apply_gradients(grads, params)
    assert all(mx.array_equal(a[k], b[k]).item() for k in params)

    with pytest.raises(ValueError, match="Adam state, not SGD"):
        other = ShardedOptimizer(mlx_optim.SGD())
        other.init(params)
        other.load(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="no state for parameter"):
        more = ShardedOptimizer(mlx_optim.Adam(learning_rate=0.1))
        more.init({**params, "extra": mx.ones(1)})
        more.load(tmp_path / "ckpt")
    index_path = tmp_path / "ckpt" / "shard-00000-of-00001.json"
    index = json.loads(index_path.read_text())
    index_path.write_text(json.dumps({**index, "world_size": 2}))  # rank 1 of 2 is missing
    with pytest.raises(ValueError, match="do not form one checkpoint"):
        fresh.load(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="init"):
        ShardedOptimizer(mlx_optim.Adam()).load(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="max_grad_norm"):
        DataParallel(mlx_optim.Adam(), max_grad_norm=0.0)
    with pytest.raises(TypeError, match="optimizer"):
        DataParallel("adam")
    with pytest.raises(ValueError, match="not partitioned"):
        opt = ShardedOptimizer(mlx_optimizers.SGD(learning_rate=0.1))
        opt.init(params)
        opt.apply_gradients({**grads, "new": mx.ones(1)}, {**params, "new": mx.ones(1)})


def test_a_step_compiled_right_after_a_sharded_load_equals_eager(tmp_path):
    # The load rebuilds the step sets from the shards' values itself: rebuilding them at
    # the next step instead would read arrays while mx.compile traces.
    keys = iter(mx.random.split(mx.random.key(3), 12))
    start = {k: mx.random.normal((4, 3), key=next(keys)) for k in "abc"}
    grads = [{k: mx.random.normal((4, 3), key=next(keys)) for k in "abc"} for _ in range(3)]
    source = ShardedOptimizer(mlx_optim.Adam(learning_rate=0.1))
    source.init(start)
    params = {**start, **source.apply_gradients(grads[0], start)}
    source.save(tmp_path / "shards")
    expected = source.apply_gradients(grads[1], params)

    resumed = ShardedOptimizer(mlx_optim.Adam(learning_rate=0.1))
    resumed.init(params)
    resumed.load(tmp_path / "shards")
    state = [resumed.state]
    step = mx.compile(lambda g, p: resumed.apply_gradients(g, p), inputs=state, outputs=state)
    result = step(grads[1], params)
    mx.eval(result, resumed.state)
    for k in "abc":
        assert mx.array_equal(result[k], expected[k]).item(), k


def test_sharded_update_without_init_partitions_the_whole_model():
    # An embedding the first batch does not call has no gradient; it must still be
    # partitioned, or its first gradient later would be refused.
    import mlx.nn as nn

    model = nn.Module()
    model.a, model.b = nn.Embedding(10, 4), nn.Embedding(10, 4)
    loss_and_grad = mlx_optim.embedding_value_and_grad(
        model, lambda ids, both: (model.a(ids) + (model.b(ids) if both else 0)).sum())
    opt = ShardedOptimizer(mlx_optim.SparseAdam(learning_rate=0.1))
    for both in (False, True):
        opt.update(model, loss_and_grad(mx.array([1, 3]), both)[1])
    assert sorted(opt.owner) == ["a.weight", "b.weight"]
    assert opt.optimizer.state["param_state"]["b"]["weight"]["step"].item() == 1
