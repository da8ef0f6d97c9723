"""Data-parallel training and sharded optimizer state (ZeRO stage 1) on ``mx.distributed``.

Two wrappers around any optimizer (ours or ``mlx.optimizers``'), used like the optimizer:

- :class:`DataParallel`: each rank computes gradients on its part of the batch; ``update``
  averages them across ranks (flattened into buckets, one ``all_sum`` per bucket),
  optionally clips their global norm (torch's ``clip_grad_norm_``), then steps the
  optimizer. Every rank holds the whole optimizer state and ends with the same parameters.
- :class:`ShardedOptimizer`: the same, but each rank holds the state of a share of the
  parameters only (whole tensors, balanced by size) and updates only those; the new
  parameters are then summed across ranks (each contributes its share, zeros elsewhere),
  so every rank again holds all of them. Optimizer-state memory per rank falls to about
  1/N. The optimizers here are per-parameter, so the result is that of the unsharded run
  (Muon and Adafactor too: they work per tensor).

Sharded state is saved one file per rank (:meth:`ShardedOptimizer.save`): a safetensors file
and a JSON naming the parameters it holds and the world size. :meth:`ShardedOptimizer.load`
reads every shard file of a checkpoint and keeps the parameters this rank now owns, so a
checkpoint written by N ranks loads on M ranks.

Start the ranks with ``mlx.launch``, e.g.
``mlx.launch --backend ring -n 2 python examples/train_data_parallel.py``.

Example:
    >>> group = mx.distributed.init()
    >>> opt = ShardedOptimizer(mlx_optim.AdamW(learning_rate=1e-3), max_grad_norm=1.0)
    >>> opt.init(model.trainable_parameters())
    >>> loss, grads = nn.value_and_grad(model, loss_fn)(model, x_local, y_local)
    >>> opt.update(model, grads)   # parameters now equal on every rank
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import mlx.core as mx
import mlx.optimizers as mlx_optimizers
from mlx.utils import tree_flatten, tree_unflatten

from ._base import Optimizer, _slots, insert_slot
from .grad_utils import _check_leaves, clip_grad_norm  # torch's clipping, as max_grad_norm applies it
from .sparse import RowSparseGrad

DEFAULT_BUCKET_BYTES = 25 * 2**20  # torch DDP's default bucket_cap_mb
SHARD_FORMAT = "mlx_optim.sharded_checkpoint"
SHARD_VERSION = 1


# ------------------------------------------------------------------------ helpers
def _flat(tree: Any) -> dict[str, mx.array]:
    """``{dotted path: array}`` of a parameter tree, in tree order."""
    return {path: x for path, x in tree_flatten(tree) if isinstance(x, mx.array)}


def _arrays_of(grads: dict[str, Any]) -> list[mx.array]:
    """The arrays of ``grads``: a RowSparseGrad's indices and values."""
    return [a for g in grads.values()
            for a in ((g.indices, g.values) if isinstance(g, RowSparseGrad) else (g,))]


def _gather_rows(grads: dict[str, RowSparseGrad], group: mx.distributed.Group,
                after: list[mx.array] | None = None) -> dict[str, RowSparseGrad]:
    """Every rank's rows of each row-sparse gradient, concatenated in rank order, so all
    ranks hold the same rows (their sum is that of the ranks' dense gradients).

    Eager: the ranks' row counts may differ, so they are exchanged (and evaluated) first;
    each rank's rows are padded to the largest count for ``all_gather``, the padding
    dropped after. The collectives are chained after ``after`` as in :func:`bucketed_all_sum`.
    """
    if group.size() == 1 or not grads:
        return dict(grads)
    n, rank = group.size(), group.rank()
    counts = mx.zeros((len(grads), n), mx.int32)
    counts[:, rank] = mx.array([g.indices.size for g in grads.values()], mx.int32)
    if after:
        counts = mx.depends([counts], list(after))[0]
    summed = mx.distributed.all_sum(counts, group=group)
    counts, previous = summed.tolist(), [summed]  # evaluates every collective so far
    out = {}
    for (path, g), count in zip(grads.items(), counts):
        most = max(count)
        if most == 0:  # no rank has rows: nothing to gather
            out[path] = RowSparseGrad(mx.zeros((0,), mx.int64), g.values, g.num_rows)
            continue
        pad = most - g.indices.size
        # int64 indices on every rank, whatever each rank's ids' dtype: equal messages.
        indices = mx.pad(g.indices.astype(mx.int64), [(0, pad)])
        values = mx.pad(g.values, [(0, pad)] + [(0, 0)] * (g.values.ndim - 1))
        indices = mx.distributed.all_gather(mx.depends([indices], previous)[0], group=group)
        values = mx.distributed.all_gather(mx.depends([values], [indices])[0], group=group)
        previous = [values]
        keep = mx.array([r * most + i for r, c in enumerate(count) for i in range(c)])
        out[path] = RowSparseGrad(indices[keep], values[keep], g.num_rows)
    return out


def _subtree(tree: Any, keep: set[str], prefix: str = "") -> Any:
    """``tree`` with only the array leaves whose dotted path is in ``keep``.

    Lists keep their length (``{}`` marks a dropped place), so indices stay valid; both
    our optimizers and ``mlx.optimizers`` treat ``{}`` as "no parameters here".
    """
    if isinstance(tree, dict):
        kept = {k: _subtree(sub, keep, f"{prefix}{k}.") for k, sub in tree.items()}
        return {k: sub for k, sub in kept.items() if sub is not None and sub != {}}
    if isinstance(tree, (list, tuple)):
        kept = [_subtree(sub, keep, f"{prefix}{i}.") for i, sub in enumerate(tree)]
        return [{} if sub is None else sub for sub in kept]
    return tree if isinstance(tree, mx.array) and prefix[:-1] in keep else None


def plan_buckets(arrays: list[mx.array], bucket_bytes: int) -> list[list[int]]:
    """Indices of ``arrays`` grouped into buckets: one dtype each, in order, at most
    ``bucket_bytes`` (an array larger than that is a bucket of its own)."""
    buckets: list[list[int]] = []
    open_bucket: dict[mx.Dtype, tuple[list[int], int]] = {}  # dtype -> (indices, bytes)
    for i, x in enumerate(arrays):
        indices, size = open_bucket.get(x.dtype, ([], 0))
        if indices and size + x.nbytes > bucket_bytes:
            buckets.append(indices)
            indices, size = [], 0
        open_bucket[x.dtype] = (indices + [i], size + x.nbytes)
    buckets.extend(indices for indices, _ in open_bucket.values())
    return buckets


def bucketed_all_sum(arrays: list[mx.array], group: mx.distributed.Group,
                     bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                     after: list[mx.array] | None = None) -> list[mx.array]:
    """The sum across ranks of each array, with one ``all_sum`` per bucket.

    Arrays of one dtype are flattened and concatenated into buckets of at most
    ``bucket_bytes`` (an array larger than that is a bucket of its own): few large
    messages cost less than many small ones.

    The collectives are chained (each bucket's input depends on the previous sum, the
    first on ``after``), so every rank runs them in the same order and runs all of them
    when it evaluates any result that needs the last. Otherwise MLX's lazy graph could
    order independent all_sums differently per rank, or skip one whose result a rank
    does not use (a sharded rank ignores the gradients of parameters it does not own),
    and the ranks would pair up different messages and hang.

    Args:
        arrays: the arrays to sum, the same shapes and order on every rank.
        group: the ranks to sum over.
        bucket_bytes: the size cap of one bucket.
        after: arrays the first all_sum must wait for (an earlier collective's results).

    Example:
        >>> summed = bucketed_all_sum([mx.ones((2, 3)), mx.ones(4)], mx.distributed.init())
    """
    if group.size() == 1:
        return list(arrays)
    out: list[mx.array | None] = [None] * len(arrays)
    previous = list(after or [])
    for indices in plan_buckets(arrays, bucket_bytes):
        flat = mx.concatenate([arrays[i].reshape(-1) for i in indices])
        if previous:
            flat = mx.depends([flat], previous)[0]
        summed = mx.distributed.all_sum(flat, group=group)
        previous = [summed]
        offset = 0
        for i in indices:
            size = arrays[i].size
            out[i] = summed[offset:offset + size].reshape(arrays[i].shape)
            offset += size
    return out


def partition_parameters(sizes: dict[str, int], world_size: int) -> dict[str, int]:
    """Assign whole parameters to ranks, balancing their total sizes.

    Greedy, largest first: each parameter goes to the rank with the smallest total so far.
    Ties are broken by path and by rank number, so every rank computes the same answer.

    Args:
        sizes: ``{dotted path: size}`` (bytes or elements).
        world_size: the number of ranks.

    Example:
        >>> partition_parameters({"a": 4, "b": 3, "c": 2}, 2)
        {'a': 0, 'b': 1, 'c': 1}
    """
    totals = [0] * world_size
    owner = {}
    for path in sorted(sizes, key=lambda p: (-sizes[p], p)):
        rank = min(range(world_size), key=lambda r: (totals[r], r))
        owner[path] = rank
        totals[rank] += sizes[path]
    return {path: owner[path] for path in sizes}


def state_bytes(optimizer: Any) -> int:
    """Bytes of every array in an optimizer's state (the per-rank memory it holds)."""
    seen, total = set(), 0
    for _, x in tree_flatten(optimizer.state):
        if isinstance(x, mx.array) and id(x) not in seen:  # step arrays may be shared
            seen.add(id(x))
            total += x.nbytes
    return total


def _is_ours(optimizer: Any) -> bool:
    return isinstance(optimizer, Optimizer)


# ---------------------------------------------------------------------- wrappers
class DataParallel:
    """Data-parallel training with any optimizer: gradients averaged across ranks.

    Each rank computes gradients on its part of the global batch (its loss a mean over its
    part); ``update`` sums them across ranks and divides by the number of ranks (for
    equal parts: the gradient of the mean loss over the global batch), optionally clips
    their global norm, and steps the optimizer. Ranks that start from equal parameters
    stay equal. ``state`` is the optimizer's, so the ``mx.compile(step, inputs=state,
    outputs=state)`` idiom works (``all_sum`` compiles); call ``init`` before compiling.

    A :class:`~mlx_optim.RowSparseGrad` (from :func:`~mlx_optim.embedding_value_and_grad`)
    is averaged by gathering every rank's rows (values divided by the number of ranks), so
    every rank applies the same rows; this step is eager (the row counts are exchanged
    first), as the optimizers' row-sparse step is.

    Args:
        optimizer: one of ours or an ``mlx.optimizers`` optimizer.
        group: the ranks (default: ``mx.distributed.init()``).
        bucket_bytes: size cap of one communication bucket. Default: 25 MiB.
        max_grad_norm: clip the averaged gradient's global L2 norm to this (torch's
            ``clip_grad_norm_``); ``None``: no clipping.

    Example:
        >>> opt = DataParallel(mlx_optim.Adam(learning_rate=1e-3), max_grad_norm=1.0)
        >>> loss, grads = nn.value_and_grad(model, loss_fn)(model, x_local, y_local)
        >>> opt.update(model, grads)
        >>> opt.last_grad_norm  # the norm before clipping, when clipping

    Every rank must call ``update`` and evaluate its results (``mx.eval(model.parameters(),
    opt.state)``): MLX runs a collective only when a rank evaluates something that needs it.
    ``last_grad_norm`` is for eager steps; a compiled step should return the norm instead.
    """

    def __init__(self, optimizer: Any, group: mx.distributed.Group | None = None, *,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, max_grad_norm: float | None = None):
        if not isinstance(optimizer, mlx_optimizers.Optimizer):
            raise TypeError(f"optimizer must be an mlx_optim or mlx.optimizers optimizer, "
                            f"got {type(optimizer).__name__}")
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm}")
        self.optimizer = optimizer
        self.group = group if group is not None else mx.distributed.init()
        self.bucket_bytes = bucket_bytes
        self.max_grad_norm = max_grad_norm
        self.last_grad_norm: mx.array | None = None

    @property
    def rank(self) -> int:
        return self.group.rank()

    @property
    def world_size(self) -> int:
        return self.group.size()

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @property
    def learning_rate(self) -> Any:
        return self.optimizer.learning_rate

    def init(self, parameters: Any) -> None:
        """Create the optimizer's state (before ``mx.compile``)."""
        self.optimizer.init(parameters)

    def average_gradients(self, gradients: Any) -> Any:
        """The mean of ``gradients`` across ranks (then clipped, if ``max_grad_norm``)."""
        return tree_unflatten(list(self._average(gradients).items()))

    def _average(self, gradients: Any) -> dict[str, Any]:
        flat = dict(_check_leaves(gradients))
        dense = {k: g for k, g in flat.items() if isinstance(g, mx.array)}
        summed = dict(zip(dense, bucketed_all_sum(list(dense.values()), self.group,
                                                  self.bucket_bytes)))
        # Row-sparse gradients: every rank's rows, so all ranks apply the same ones.
        sparse = {k: g for k, g in flat.items() if isinstance(g, RowSparseGrad)}
        summed.update(_gather_rows(sparse, self.group, after=list(summed.values())))
        for g in summed.values():
            if isinstance(g, RowSparseGrad):
                g.check_indices()  # the gathered rows: every rank raises alike
        n = self.world_size
        averaged = {}
        for k in flat:
            s = summed[k]
            if n > 1 and isinstance(s, RowSparseGrad):
                s = RowSparseGrad(s.indices, (s.values / n).astype(s.dtype), s.num_rows)
            elif n > 1:
                s = (s / n).astype(s.dtype)
            averaged[k] = s
        if self.max_grad_norm is not None:
            # Every rank holds the same averaged gradient: the norm needs no communication.
            averaged, self.last_grad_norm = clip_grad_norm(averaged, self.max_grad_norm)
        return averaged

    def apply_gradients(self, gradients: Any, parameters: Any) -> Any:
        """Average ``gradients`` across ranks and apply them; returns updated parameters."""
        return self.optimizer.apply_gradients(self.average_gradients(gradients), parameters)

    def update(self, model: Any, gradients: Any) -> None:
        """``model.update(self.apply_gradients(gradients, model))``, as mlx.optimizers."""
        model.update(self.apply_gradients(gradients, model))


class ShardedOptimizer(DataParallel):
    """ZeRO stage 1: data parallel, each rank holding the optimizer state of its share.

    Parameters are assigned to ranks whole, balanced by size (:func:`partition_parameters`,
    on the parameters given to ``init``, or else the model's trainable parameters at the
    first ``update``, or those the first gradients are for).
    ``update`` averages (and clips) the gradients as :class:`DataParallel`, steps the
    wrapped optimizer on this rank's parameters only, then sums the new parameters across
    ranks in buckets, each rank contributing its own and zeros for the rest (``x + 0 ==
    x``: exact), so all ranks end with all parameters. Optimizer state per rank is about
    1/N of the whole; the parameters equal those of an unsharded run. Each parameter keeps
    its dtype: an optimizer's result of another dtype (``mlx.optimizers``' Adam gives
    float32 for a bfloat16 parameter with float32 gradients) is cast back to it.
    Row-sparse gradients work as in :class:`DataParallel`; the new table is then summed
    across ranks in full, like any parameter.

    Args:
        optimizer: one of ours or an ``mlx.optimizers`` optimizer, per-parameter (every
            optimizer here except LBFGS).
        group, bucket_bytes, max_grad_norm: as :class:`DataParallel`.

    Example:
        >>> opt = ShardedOptimizer(mlx_optim.Adam(learning_rate=1e-3))
        >>> opt.init(model.trainable_parameters())
        >>> opt.update(model, grads)
        >>> opt.save("ckpt/opt")          # one shard file per rank
        >>> opt.load("ckpt/opt")          # on any number of ranks
    """

    def __init__(self, optimizer: Any, group: mx.distributed.Group | None = None, **kwargs):
        super().__init__(optimizer, group, **kwargs)
        self.owner: dict[str, int] | None = None  # dotted path -> rank
        self._shapes: dict[str, tuple[tuple[int, ...], mx.Dtype]] = {}

    @property
    def owned(self) -> list[str]:
        """The dotted paths of the parameters whose state this rank holds."""
        self._need_partition()
        return [p for p, r in self.owner.items() if r == self.rank]

    def _need_partition(self) -> None:
        if self.owner is None:
            raise ValueError("the parameters are not partitioned yet: call init(parameters) "
                             "or update once first")

    def _partition(self, parameters: dict[str, mx.array]) -> None:
        """Assign the parameters ``{dotted path: array}`` to ranks (once)."""
        if self.owner is not None:
            return
        self._shapes = {k: (tuple(x.shape), x.dtype) for k, x in parameters.items()}
        self.owner = partition_parameters({k: x.nbytes for k, x in parameters.items()},
                                          self.world_size)

    def update(self, model: Any, gradients: Any) -> None:
        """As :meth:`DataParallel.update`. Without ``init``, the partition covers the model's
        trainable parameters, not only this first gradient tree's (an embedding a batch does
        not call has no gradient, and could never be stepped later)."""
        if self.owner is None:
            self._partition(_flat(model.trainable_parameters()))
        super().update(model, gradients)

    def init(self, parameters: Any) -> None:
        """Partition ``parameters`` across ranks and create this rank's share of the state."""
        if self.owner is None and hasattr(self.optimizer, "check_groups_select"):
            # On the whole tree, on every rank: a group may select only other ranks' parameters.
            self.optimizer.check_groups_select(parameters)
        self._check_parameters(_flat(parameters))
        self._partition(_flat(parameters))
        share = _subtree(parameters, set(self.owned))
        # Our optimizers' init would check the groups against this rank's share alone.
        getattr(self.optimizer, "_init_slots", self.optimizer.init)(share)

    def _check_parameters(self, parameters: dict[str, mx.array]) -> None:
        """Our optimizer's refusals (Muon: not 2-D) on every rank, not only the owner's: a
        rank raising alone would leave the others waiting in a collective."""
        if _is_ours(self.optimizer):
            for path, param in parameters.items():
                self.optimizer._check_parameter(path, param)

    def apply_gradients(self, gradients: Any, parameters: Any) -> Any:
        grads, params = dict(_check_leaves(gradients)), _flat(parameters)
        # Checks every rank makes alike, before any collective: one rank raising alone would
        # leave the others waiting in the all_sums.
        for path, g in grads.items():
            if path not in params:
                raise ValueError(f"gradient for unknown parameter {path!r}")
            if tuple(g.shape) != tuple(params[path].shape):
                raise ValueError(f"gradient for {path!r} has shape {tuple(g.shape)}, "
                                 f"the parameter has shape {tuple(params[path].shape)}")
        self._check_parameters({p: params[p] for p in grads})
        self._partition({p: params[p] for p in grads})
        unknown = sorted(set(grads) - set(self.owner))
        if unknown:
            raise ValueError(f"gradient for parameter(s) {unknown[:5]} that were not "
                             "partitioned (the tree given to init)")
        for path in grads:  # a replaced parameter: only its owner has state to refuse it
            if tuple(params[path].shape) != self._shapes[path][0]:
                raise ValueError(f"parameter {path!r} has shape {tuple(params[path].shape)}, but "
                                 f"it was partitioned (and its state made) with shape "
                                 f"{self._shapes[path][0]}: build a new optimizer for it")
        averaged = self._average(gradients)
        if _is_ours(self.optimizer):  # its checks (row-sparse support...) on every rank
            self.optimizer._check_gradients(tree_unflatten(list(averaged.items())), parameters)
        mine = {p for p in averaged if self.owner[p] == self.rank}
        own_grads = tree_unflatten([(p, g) for p, g in averaged.items() if p in mine]) or {}
        # Called even when this rank owns nothing, so its step count (schedules) advances.
        updated = _flat(self.optimizer.apply_gradients(own_grads, parameters))
        # Each rank sends every parameter in the parameter's own shape and dtype (the
        # owner its update, cast back: mlx.optimizers may return another dtype), so the
        # ranks' buckets match.
        contributions = [updated[p].astype(params[p].dtype) if p in mine
                         else mx.zeros(params[p].shape, params[p].dtype) for p in averaged]
        # After every gradient collective: also those whose results this rank does not use.
        gathered = bucketed_all_sum(contributions, self.group, self.bucket_bytes,
                                    after=_arrays_of(averaged))
        return tree_unflatten(list(zip(averaged, gathered)))

    # -------------------------------------------------------------- checkpoints
    def _shard_name(self, rank: int, world_size: int) -> str:
        return f"shard-{rank:05d}-of-{world_size:05d}"

    def _barrier(self) -> None:
        if self.world_size > 1:
            mx.eval(mx.distributed.all_sum(mx.array(1.0), group=self.group))

    def save(self, directory: str | os.PathLike) -> None:
        """Write this rank's shard into ``directory``; every rank calls it.

        Files: ``shard-RRRRR-of-WWWWW.safetensors`` (the optimizer state of this rank's
        parameters; for our optimizers the format of :mod:`mlx_optim.checkpoint`) and
        ``shard-RRRRR-of-WWWWW.json`` (world size, rank, the parameters it holds). Shards
        of another world size left in ``directory`` are removed first, and ``save``
        returns once every rank's shard is written (so a ``load`` may follow at once).
        On several machines, ``directory`` must be storage they share.
        """
        self._need_partition()
        directory = str(directory)
        os.makedirs(directory, exist_ok=True)
        if self.rank == 0:  # an older checkpoint of another world size would be mixed in
            for path in glob.glob(os.path.join(directory, "shard-*-of-*.*")):
                if not os.path.basename(path).split(".")[0].endswith(f"-of-{self.world_size:05d}"):
                    os.remove(path)
        self._barrier()
        base = os.path.join(directory, self._shard_name(self.rank, self.world_size))
        if _is_ours(self.optimizer):
            self.optimizer.save(base + ".safetensors")
        else:
            mx.save_safetensors(base + ".safetensors", _flat(self.optimizer.state))
        index = {"format": SHARD_FORMAT, "version": SHARD_VERSION,
                 "optimizer": type(self.optimizer).__name__, "world_size": self.world_size,
                 "rank": self.rank, "owned": self.owned,
                 "shapes": {p: list(self._shapes[p][0]) for p in self.owned}}
        with open(base + ".json", "w") as f:
            json.dump(index, f, indent=1)
        self._barrier()

    def load(self, directory: str | os.PathLike) -> None:
        """Load this rank's share from the shards in ``directory``, written by any number
        of ranks: the state of each parameter this rank now owns is read from the shard
        that held it. Call ``init(parameters)`` first (it fixes the partition).

        Raises ``ValueError`` when shards are missing, disagree, or lack a parameter.
        """
        self._need_partition()
        indexes = _read_indexes(str(directory), type(self.optimizer).__name__)
        holder = {}
        for rank, index in enumerate(indexes):
            for path in index["owned"]:
                holder[path] = rank
        missing = sorted(set(self.owner) - set(holder))
        if missing:
            raise ValueError(f"the checkpoint in {directory!r} has no state for parameter(s) "
                             f"{missing[:5]}")
        for path, rank in holder.items():
            saved = tuple(indexes[rank]["shapes"].get(path, ()))
            if path in self._shapes and saved != self._shapes[path][0]:
                raise ValueError(f"parameter {path!r} has shape {saved} in the checkpoint and "
                                 f"{self._shapes[path][0]} here")
        world = len(indexes)
        files = {r: os.path.join(str(directory), self._shard_name(r, world) + ".safetensors")
                 for r in range(world)}
        mine = self.owned
        needed = sorted({0} | {holder[p] for p in mine})
        if _is_ours(self.optimizer):
            self._load_ours(files, needed, holder, mine)
        else:
            self._load_mlx(files, needed, holder, mine)

    def _load_ours(self, files, needed, holder, mine) -> None:
        from . import checkpoint

        shards = {r: checkpoint.read(files[r]) for r in needed}
        slots = {}
        for r in needed:
            for keys, slot in _slots(shards[r]["state"]["param_state"]):
                path = ".".join(str(k) for k in keys)
                if path in mine and holder[path] == r:
                    slots[path] = (keys, slot)
        # Slots from several shards: step sets from their values (as the optimizer
        # rebuilds them), so that the load keeps a step compiled before it right.
        param_state: dict = {}
        classes, class_of, by_key = [], {}, {}
        for path in mine:
            keys, slot = slots[path]
            key = self.optimizer._step_set_key(path, slot)
            if key not in by_key:
                by_key[key] = len(classes)
                classes.append(slot["step"])
            class_of[path] = by_key[key]
            insert_slot(param_state, keys, dict(slot))
        merged = dict(shards[0])
        merged["state"] = {**shards[0]["state"], "param_state": param_state,
                           "step_classes": classes}
        merged["step_class_of"] = class_of
        checkpoint.load_state_dict(self.optimizer, merged)

    def _load_mlx(self, files, needed, holder, mine) -> None:
        owners = set(holder)
        arrays: dict[str, mx.array] = {}
        for r in needed:
            shard = mx.load(files[r])
            for key, value in shard.items():
                path = next((p for p in owners if key.startswith(p + ".")), None)
                if path is None:  # global entries (step, learning_rate): from shard 0
                    if r == 0:
                        arrays[key] = value
                elif path in mine and holder[path] == r:
                    arrays[key] = value
        self.optimizer.state = tree_unflatten(list(arrays.items()))


def _read_indexes(directory: str, optimizer_name: str) -> list[dict]:
    paths = sorted(glob.glob(os.path.join(directory, "shard-*-of-*.json")))
    if not paths:
        raise ValueError(f"no sharded optimizer checkpoint in {directory!r}")
    indexes = []
    for path in paths:
        with open(path) as f:
            try:
                indexes.append(json.load(f))
            except json.JSONDecodeError as error:
                raise ValueError(f"damaged shard index {path!r}: {error}") from None
    for index in indexes:
        if index.get("format") != SHARD_FORMAT or index.get("version") != SHARD_VERSION:
            raise ValueError(f"{directory!r} holds a shard index of another format or version")
        if index["optimizer"] != optimizer_name:
            raise ValueError(f"the checkpoint holds {index['optimizer']} state, not {optimizer_name}")
    worlds = {index["world_size"] for index in indexes}
    ranks = sorted(index["rank"] for index in indexes)
    if len(worlds) != 1 or ranks != list(range(worlds.pop())):
        raise ValueError(f"the shards in {directory!r} do not form one checkpoint "
                         f"(ranks {ranks} of world sizes {sorted({i['world_size'] for i in indexes})})")
    return sorted(indexes, key=lambda index: index["rank"])


