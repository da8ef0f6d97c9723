"""Checkpoints: an optimizer's complete state as a dict, a safetensors file, or torch's format.

``opt.state_dict()`` returns a plain dict: the state tree (arrays, see ``_base``'s
docstring), each group's hyperparameter values as JSON-able Python values (a schedule
appears as ``{"schedule": True}``: functions are not saved, the optimizer you load into
must have a schedule in the same place), the optimizer's class name and a format version.
``opt.save(path)`` writes it as one safetensors file: the arrays as tensors, everything
else as JSON in the file's metadata (key ``"mlx_optim"``). float64 arrays, which
safetensors in MLX cannot hold, are stored as their uint64 bit patterns.

``opt.load_state_dict(sd)`` / ``opt.load(path)`` validate everything first: optimizer
type, format version, groups, their flags and values (checked as the constructor checks
them), the state's keys, shapes and dtypes (against the optimizer's own state where it
has one: call ``opt.init(params)`` before loading to check every parameter's slot; a
parameter the checkpoint lacks keeps its state here if it has never stepped here, as the
saving optimizer had not met it yet). Any mismatch, or a damaged file, raises
``ValueError`` naming what differs, and the optimizer is left exactly as it was.
Only then is the state swapped, **in place**: the same ``opt.state`` dict object receives
the loaded contents, so a step compiled with ``mx.compile(step, inputs=[opt.state],
outputs=[opt.state])`` keeps working after a load (it retraces once if the structure of
the state changed). A later ``opt.init(params)`` only fills parameters without state,
so loaded state is never re-initialised.

Example:
    >>> opt = mlx_optim.Adam(learning_rate=1e-3)
    >>> opt.init(model.trainable_parameters())
    >>> ...  # train
    >>> opt.save("opt.safetensors")
    >>> resumed = mlx_optim.Adam(learning_rate=1e-3)
    >>> resumed.init(model.trainable_parameters())
    >>> resumed.load("opt.safetensors")
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import mlx.core as mx

from ._base import (_Glob, _as_array, _lookup, _nonzero, _slots, copy_tree, insert_slot, is_schedule,
                    is_slot)
from ._validate import check, scalar_value

FORMAT = "mlx_optim.checkpoint"
VERSION = 1
METADATA_KEY = "mlx_optim"
_SCHEDULE = {"schedule": True}


# --------------------------------------------------------------------- in-memory form
def state_dict(opt: Any) -> dict:
    """The complete state of ``opt`` (one of ours, or :class:`~mlx_optim.LBFGS`).

    Arrays are shared with the optimizer, not copied: MLX arrays are values, and the
    optimizer replaces (never writes into) the arrays it holds.
    """
    from .lbfgs import LBFGS

    if isinstance(opt, LBFGS):
        return {"format": FORMAT, "version": VERSION, "optimizer": "LBFGS",
                "hyperparameters": {name: _jsonable(getattr(opt, name)) for name in _LBFGS_HYPER},
                "state": copy_tree(opt.state)}
    if opt._class_of is None:  # state replaced and not stepped since: derive the step sets
        opt._rebuild_step_classes()
    return {
        "format": FORMAT,
        "version": VERSION,
        "optimizer": type(opt).__name__,
        "groups": [{name: _jsonable(value) for name, value in values.items()}
                   for values in opt._group_values],
        "active": [dict(active) for active in opt._active],
        "constants": sorted(opt._constants),
        "step_class_of": dict(opt._class_of),
        "attached": [{"type": type(obj).__name__, "state": obj.state_dict()} for obj in opt.attached],
        "state": copy_tree(opt.state),
    }


def load_state_dict(opt: Any, sd: dict) -> None:
    """Replace ``opt``'s state by ``sd`` (from :func:`state_dict`), after checking all of it."""
    from .lbfgs import LBFGS

    if not isinstance(sd, dict):
        raise ValueError(f"a state dict must be a dict, got {type(sd).__name__}")
    for key in ("format", "version", "optimizer", "state"):
        if key not in sd:
            raise ValueError(f"not an mlx_optim optimizer state dict: it lacks {key!r}")
    if sd["format"] != FORMAT:
        raise ValueError(f"not an mlx_optim optimizer state dict (format {sd['format']!r})")
    if sd["version"] != VERSION:
        raise ValueError(f"checkpoint format version {sd['version']} is not supported "
                         f"(this mlx_optim reads version {VERSION})")
    name = type(opt).__name__
    if sd["optimizer"] != name:
        raise ValueError(f"the checkpoint holds the state of a {sd['optimizer']} optimizer, "
                         f"not of a {name}")
    if isinstance(opt, LBFGS):
        _load_lbfgs(opt, sd)
    else:
        attached = _check_attached(opt, sd.get("attached", []))
        _load_base(opt, sd)
        for obj, saved in zip(opt.attached, attached):
            obj.load_state_dict(saved["state"])


def _check_attached(opt: Any, saved: Any) -> list:
    """The saved states of the optimizer's attached schedulers, checked against them."""
    have = [type(obj).__name__ for obj in opt.attached]
    if not isinstance(saved, list) or not all(isinstance(s, dict) and "type" in s and "state" in s
                                              for s in saved):
        raise ValueError("the checkpoint's attached scheduler states are damaged")
    kept = [s["type"] for s in saved]
    if kept != have:
        raise ValueError(f"the checkpoint holds the state of attached scheduler(s) {kept}, "
                         f"this optimizer has {have} attached")
    for obj, s in zip(opt.attached, saved):
        if not isinstance(s["state"], dict) or set(s["state"]) != set(obj.state_dict()):
            raise ValueError(f"the checkpoint's {s['type']} state has keys "
                             f"{sorted(s['state']) if isinstance(s['state'], dict) else s['state']!r}, "
                             f"expected {sorted(obj.state_dict())}")
        check = getattr(obj, "check_state_dict", None)
        if check is not None:  # its load must not fail after the optimizer's state is swapped
            check(s["state"])
    return saved


# ----------------------------------------------------------------------------- files
def save(opt: Any, path: str | os.PathLike) -> None:
    """Write ``opt.state_dict()`` to ``path`` as a safetensors file (see the module doc).

    ``.safetensors`` is appended to ``path`` when it lacks it (as MLX does), also on load."""
    sd = state_dict(opt)
    arrays: dict[str, mx.array] = {}
    meta = {k: v for k, v in sd.items() if k != "state"}
    meta["state"] = _encode(sd["state"], arrays, "state")
    mx.save_safetensors(_file(path), arrays, metadata={METADATA_KEY: json.dumps(meta)})


def _file(path: str | os.PathLike) -> str:
    # mx.save_safetensors appends the suffix when it is missing; read the same file back.
    path = str(path)
    return path if path.endswith(".safetensors") else path + ".safetensors"


def read(path: str | os.PathLike) -> dict:
    """The state dict stored in a file written by :func:`save`; ``ValueError`` if damaged."""
    path = _file(path)
    try:
        arrays, metadata = mx.load(path, return_metadata=True)
    except Exception as error:  # truncated, corrupt, not safetensors at all
        raise ValueError(f"cannot read optimizer checkpoint {path!r} "
                         f"(damaged or truncated?): {error}") from None
    if METADATA_KEY not in metadata:
        raise ValueError(f"{path!r} is a safetensors file without mlx_optim metadata: "
                         "not an optimizer checkpoint")
    try:
        sd = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise ValueError(f"optimizer checkpoint {path!r} has damaged metadata: {error}") from None
    if not isinstance(sd, dict) or "state" not in sd:
        raise ValueError(f"optimizer checkpoint {path!r} has damaged metadata")
    used: set[str] = set()
    sd["state"] = _decode(sd["state"], arrays, used, path)
    extra = sorted(set(arrays) - used)
    if extra:
        raise ValueError(f"optimizer checkpoint {path!r} is damaged: arrays {extra[:5]} "
                         "are not part of its state")
    return sd


def load(opt: Any, path: str | os.PathLike) -> None:
    """Load a file written by :func:`save` into ``opt`` (validated, see the module doc)."""
    load_state_dict(opt, read(path))


# ----------------------------------------------------------------- tree (de)serialising
def _jsonable(value: Any) -> Any:
    """A hyperparameter as given, as a JSON value; a schedule as ``{"schedule": True}``."""
    if isinstance(value, mx.array):
        return value.item() if value.size == 1 else value.tolist()
    if callable(value):
        return dict(_SCHEDULE)
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def _encode(tree: Any, arrays: dict, path: str) -> Any:
    """JSON skeleton of ``tree``; its arrays go to ``arrays`` under readable, unique names."""
    if isinstance(tree, mx.array):
        name = path if path not in arrays else f"{path}#{len(arrays)}"
        if tree.dtype == mx.float64:  # not a safetensors dtype in MLX: keep the bits
            arrays[name] = tree.reshape(-1).view(mx.uint64).reshape(tree.shape)
            return {"array": name, "dtype": "float64"}
        arrays[name] = tree
        return {"array": name}
    if isinstance(tree, dict):
        for key in tree:
            if not isinstance(key, str):
                raise TypeError(f"cannot save state key {key!r} at {path!r}: keys must be strings")
        return {"dict": {k: _encode(v, arrays, f"{path}.{k}") for k, v in tree.items()}}
    if isinstance(tree, (list, tuple)):
        return {"list": [_encode(v, arrays, f"{path}.{i}") for i, v in enumerate(tree)]}
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return {"value": tree}
    raise TypeError(f"cannot save {type(tree).__name__} at {path!r} in an optimizer checkpoint")


# The metadata nodes _encode writes: their keys, and the type of each key's value.
_NODES = ({"array": str}, {"array": str, "dtype": str}, {"dict": dict}, {"list": list},
          {"value": (type(None), bool, int, float, str)})


def _decode(node: Any, arrays: dict, used: set, path: str) -> Any:
    def damaged(why: str) -> ValueError:
        return ValueError(f"optimizer checkpoint {path!r} is damaged: {why}")

    # A node of any other shape (edited or corrupted JSON) is damage, not a crash below.
    if not (isinstance(node, dict) and any(
            set(node) == set(kinds) and all(isinstance(node[k], t) for k, t in kinds.items())
            for kinds in _NODES)):
        raise damaged(f"unexpected metadata node {str(node)[:80]}")
    if "array" in node:
        name = node["array"]
        if name not in arrays:
            raise damaged(f"array {name!r} is missing")
        used.add(name)
        value = arrays[name]
        if "dtype" in node:  # only float64 is stored as other bits (see _encode)
            if node["dtype"] != "float64":
                raise damaged(f"array {name!r} has unknown stored dtype {node['dtype']!r}")
            if value.dtype != mx.uint64:
                raise damaged(f"array {name!r} should hold float64 bits")
            value = value.reshape(-1).view(mx.float64).reshape(value.shape)
        return value
    if "dict" in node:
        return {k: _decode(v, arrays, used, path) for k, v in node["dict"].items()}
    if "list" in node:
        return [_decode(v, arrays, used, path) for v in node["list"]]
    return node["value"]


# ------------------------------------------------------------- our base optimizers
def _describe(x: Any) -> str:
    if isinstance(x, mx.array):
        return f"array of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


def _check_like(saved: Any, current: Any, where: str, cast_floats: bool = False) -> Any:
    """``saved`` checked against ``current`` (same structure, keys, shapes, dtypes); returns it
    with new containers. ``cast_floats``: a float array may differ in dtype (hyperparameters:
    float64 on the CPU, float32 on the GPU) and is cast to ``current``'s."""
    if isinstance(current, mx.array):
        if not isinstance(saved, mx.array):
            raise ValueError(f"{where}: the checkpoint has {_describe(saved)}, expected {_describe(current)}")
        if saved.shape != current.shape:
            raise ValueError(f"{where}: the checkpoint has shape {tuple(saved.shape)}, "
                             f"this optimizer {tuple(current.shape)}")
        if saved.dtype != current.dtype:
            both_float = all(mx.issubdtype(d, mx.floating) for d in (saved.dtype, current.dtype))
            if not (cast_floats and both_float):
                raise ValueError(f"{where}: the checkpoint has dtype {saved.dtype}, "
                                 f"this optimizer {current.dtype}")
            saved = saved.astype(current.dtype)
        return saved
    if isinstance(current, dict):
        if not isinstance(saved, dict):
            raise ValueError(f"{where}: the checkpoint has {_describe(saved)}, expected a dict")
        _same_keys(saved, current, where)
        return {k: _check_like(saved[k], current[k], f"{where}[{k!r}]", cast_floats) for k in current}
    if isinstance(current, (list, tuple)):
        if not isinstance(saved, list) or len(saved) != len(current):
            raise ValueError(f"{where}: the checkpoint has {_describe(saved)} "
                             f"{'of length ' + str(len(saved)) if isinstance(saved, list) else ''}, "
                             f"this optimizer a list of length {len(current)}")
        return [_check_like(s, c, f"{where}[{i}]", cast_floats) for i, (s, c) in enumerate(zip(saved, current))]
    raise ValueError(f"{where}: unexpected {_describe(current)} in this optimizer's state")


def _same_keys(saved: dict, current: dict, where: str) -> None:
    missing, extra = sorted(set(current) - set(saved), key=str), sorted(set(saved) - set(current), key=str)
    if missing:
        raise ValueError(f"{where}: the checkpoint lacks key(s) {missing}")
    if extra:
        raise ValueError(f"{where}: the checkpoint has unexpected key(s) {extra}")


def _saved_slots(tree: Any, where: str, prefix: tuple = ()) -> list[tuple[tuple, dict]]:
    """(key path, slot) of a saved ``param_state`` tree, checking what each slot holds."""

    if is_slot(tree):
        for key, value in tree.items():
            if not isinstance(value, mx.array):
                raise ValueError(f"{where}: state {key!r} of parameter {_dot(prefix)!r} is "
                                 f"{_describe(value)}, not an array")
        step = tree["step"]
        if step.shape != () or step.dtype != mx.int32:
            raise ValueError(f"{where}: the step of parameter {_dot(prefix)!r} is {_describe(step)}, "
                             "expected a 0-d int32 array")
        return [(prefix, tree)]
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list):
        items = enumerate(tree)
    else:
        raise ValueError(f"{where}: unexpected {_describe(tree)} at {_dot(prefix)!r}")
    out = []
    for key, sub in items:
        out += _saved_slots(sub, where, prefix + (key,))
    return out


def _dot(keys: tuple) -> str:
    return ".".join(str(k) for k in keys)


def _hyper_arrays_as_ours(opt: Any, saved: dict, values: list[dict],
                          saved_constants: list) -> dict:
    """``saved`` with the hyperparameter arrays this optimizer holds: a checkpoint of an
    optimizer with other ``constants`` loads too (the groups' values, checked already,
    say what the checkpoint's constants were)."""
    saved = dict(saved)
    if isinstance(saved.get("param_groups"), list):
        saved["param_groups"] = [dict(g) if isinstance(g, dict) else g
                                 for g in saved["param_groups"]]
    for index, group in enumerate(values):
        if index == 0:
            target = saved
        elif isinstance(saved.get("param_groups"), list) and index - 1 < len(saved["param_groups"]):
            target = saved["param_groups"][index - 1]
        else:
            continue  # a malformed checkpoint: the structure checks below say so
        if not isinstance(target, dict):
            continue
        for name, value in group.items():
            if name in opt._constants:
                target.pop(name, None)
            elif name in saved_constants and name not in target and not opt._is_static(name, value):
                dtype = opt._scalar_dtype
                target[name] = ([_as_array(v, dtype) for v in value]
                                if isinstance(value, (tuple, list)) else _as_array(value, dtype))
    return saved


def _load_base(opt: Any, sd: dict) -> None:

    for key in ("groups", "active", "step_class_of"):
        if key not in sd:
            raise ValueError(f"not a state dict of an mlx_optim optimizer: it lacks {key!r}")
    name = type(opt).__name__
    groups, active, class_of = sd["groups"], sd["active"], sd["step_class_of"]
    if not (isinstance(groups, list) and all(isinstance(g, dict) for g in groups)
            and isinstance(active, list) and all(isinstance(a, dict) for a in active)
            and isinstance(class_of, dict)):
        raise ValueError("the checkpoint's groups, active terms or step_class_of are damaged "
                         "(expected lists of dicts and a dict)")
    # Groups: flags must agree (they fix the computation), numbers are taken from the file.
    if len(groups) != len(opt._group_values):
        raise ValueError(f"the checkpoint has {len(groups)} parameter group(s), this {name} "
                         f"{len(opt._group_values)}")
    new_values = [_loaded_group(opt, _group_name(index), saved, current)
                  for index, (saved, current) in enumerate(zip(groups, opt._group_values))]
    if active != [dict(a) for a in opt._active]:
        raise ValueError(f"the checkpoint's non-zero structural terms {sd['active']} differ from "
                         f"this optimizer's {opt._active} (e.g. weight_decay 0 in one and not the other)")

    # The state tree: everything but param_state and step_classes is shaped as ours.
    saved, current = sd["state"], opt.state
    if not isinstance(saved, dict):
        raise ValueError("the checkpoint's state is not a dict")
    saved_constants = sd.get("constants", [])  # absent from checkpoints older than constants
    if not (isinstance(saved_constants, list) and all(isinstance(n, str) for n in saved_constants)):
        raise ValueError(f"the checkpoint's constants {saved_constants!r} are not a list of names")
    saved = _hyper_arrays_as_ours(opt, saved, new_values, saved_constants)
    _same_keys(saved, current, "state")
    new_state = {}
    for key in current:
        if key in ("param_state", "step_classes"):
            continue
        new_state[key] = _check_like(saved[key], current[key], f"state[{key!r}]",
                                     cast_floats=key != "step")
    new_state = _value_arrays(opt, saved, new_state, new_values)
    slots = _saved_slots(saved["param_state"], "state['param_state']")
    current_slots = {keys: slot for keys, slot in _slots(current["param_state"])}
    fresh: dict = {}
    if current_slots:  # this optimizer knows its parameters: the checkpoint must match them
        saved_slots = dict(slots)
        fresh = _fresh_slots_kept(opt, current_slots, saved_slots)
        extra = sorted(_dot(k) for k in set(saved_slots) - set(current_slots))
        if extra:
            raise ValueError(f"the checkpoint has state for unknown parameter(s) {extra[:5]}")
        # In this optimizer's order, parameters and keys alike: a compiled step pairs state
        # leaves by position, so a checkpoint written in another order must not reorder them.
        slots = [(keys, _check_like(saved_slots[keys], slot, f"state of parameter {_dot(keys)!r}"))
                 for keys, slot in current_slots.items() if keys in saved_slots]

    classes = saved["step_classes"]
    if not isinstance(classes, list) or not all(
            isinstance(c, mx.array) and c.shape == () and c.dtype == mx.int32 for c in classes):
        raise ValueError("state['step_classes'] must be a list of 0-d int32 arrays")
    if not isinstance(class_of, dict) or set(class_of) != {_dot(k) for k, _ in slots}:
        raise ValueError("the checkpoint's step_class_of does not name exactly its parameters")
    for keys, slot in slots:
        cls = class_of[_dot(keys)]
        if not isinstance(cls, int) or not 0 <= cls < len(classes):
            raise ValueError(f"step class {cls!r} of parameter {_dot(keys)!r} is out of range")
        if slot["step"].item() != classes[cls].item():
            raise ValueError(f"the step of parameter {_dot(keys)!r} disagrees with its step class")
    if fresh:
        # Kept in a step set of their own (step 0, their own scalar state), in their place
        # in this optimizer's order; made anew once the loaded values are in (below).
        classes = [*classes, mx.array(0, dtype=mx.int32)]
        class_of = {**class_of, **{_dot(keys): len(classes) - 1 for keys in fresh}}
        loaded = dict(slots)
        slots = [(keys, loaded[keys] if keys in loaded else slot)
                 for keys, slot in current_slots.items()]

    new_classes, new_class_of = _loaded_step_classes(opt, [_dot(k) for k, _ in slots],
                                                     classes, class_of)

    # Everything checked: swap, in place (a compiled step holding opt.state sees the new values).
    param_state: dict = {}
    for keys, slot in slots:
        insert_slot(param_state, keys, {**slot, "step": new_classes[new_class_of[_dot(keys)]]})
    new_state["param_state"] = param_state
    new_state["step_classes"] = new_classes
    ordered = {key: new_state[key] for key in current}  # the same key order as before
    state = opt.state
    state.clear()
    state.update(ordered)
    opt._group_values[:] = new_values
    opt._class_of = new_class_of
    # Loaded state is checked against each parameter at its next step; fresh state fits.
    opt._slot_params = {path: opt._slot_params[path] for path in map(_dot, fresh)}
    for keys in fresh:  # from the loaded values, as the saving optimizer would make it
        shape, dtype = opt._slot_params[_dot(keys)]
        index = opt._group_cache.get(_dot(keys), 0)
        opt._slot(keys).update(opt._new_state(mx.zeros(shape, dtype), opt._hypers(index),
                                              opt._active[index]))


def _fresh_slots_kept(opt: Any, current_slots: dict, saved_slots: dict) -> dict:
    """This optimizer's slots that the checkpoint lacks. Its optimizer never met those
    parameters (a partial gradient tree, a save before ``init``), so a slot that has
    learned nothing here (step 0, made by ``init``) is kept; one stepped here would lose
    what it learned."""
    missing = {keys: slot for keys, slot in current_slots.items() if keys not in saved_slots}
    kept = sorted(_dot(k) for k, slot in missing.items()
                  if slot["step"].item() == 0 and _dot(k) in opt._slot_params)
    lost = sorted(_dot(k) for k in missing if _dot(k) not in kept)
    if lost:
        raise ValueError(f"the checkpoint has no state for parameter(s) {lost[:5]}, which "
                         "this optimizer has stepped (or loaded)")
    return missing


def _value_arrays(opt: Any, saved: dict, state: dict, values: list[dict]) -> dict:
    """``state`` (new dicts) with each number's array made from the checked value, as the
    constructor makes it (a checkpoint from the GPU holds float32 arrays, which widened to
    float64 would no longer equal their values); a schedule's array (its last value) stays.

    Raises ``ValueError`` unless the checkpoint's arrays (what its step read) hold its
    groups' values (what was checked): a damaged file can differ.
    """
    state = {**state}
    if "param_groups" in state:
        state["param_groups"] = [dict(g) for g in state["param_groups"]]
    for index, group in enumerate(values):
        stored = saved if index == 0 else saved["param_groups"][index - 1]
        target = state if index == 0 else state["param_groups"][index - 1]
        for name, value in group.items():
            if opt._is_static(name, value):
                continue
            many = isinstance(value, tuple)
            given, arrays = (value, stored[name]) if many else ((value,), (stored[name],))
            made = list(target[name]) if many else [target[name]]
            for i, (number, array) in enumerate(zip(given, arrays)):
                if is_schedule(number):
                    continue
                # Compared as Python numbers: no array op (float64 has none on the GPU).
                held, want = array.item(), _as_array(number, array.dtype).item()
                if held != want and not (math.isnan(held) and math.isnan(want)):
                    label = f"{name}[{i}]" if many else name
                    raise ValueError(f"{_group_name(index)}: {label} is {number!r} in the "
                                     f"checkpoint's groups but {held!r} in its state: "
                                     "the checkpoint is damaged")
                made[i] = _as_array(number, opt._scalar_dtype)
            target[name] = made if many else made[0]
    return state


def _group_name(index: int) -> str:
    return "default group" if index == 0 else f"group {index - 1}"


def _loaded_group(opt: Any, where: str, saved: dict, current: dict) -> dict:
    """One saved group's values as this optimizer will hold them, checked as its
    constructor checks values (a flag where ours has a flag, a number where ours has a
    number, then the rules): a damaged value would otherwise load and break the step."""
    _same_keys(saved, current, f"{where} hyperparameters")
    values = {}
    for key, value in current.items():
        stored = saved[key]
        if opt._is_static(key, value):
            try:  # a flag of ours must be a flag there (0 and 1 pass, as when built)
                opt._normalized({key: stored})
            except TypeError as error:
                raise ValueError(f"{where}: {error} (in the checkpoint)") from None
            if _jsonable(value) != stored:
                raise ValueError(f"{where}: {key} is {stored!r} in the checkpoint and "
                                 f"{_jsonable(value)!r} in this optimizer, which fixes it "
                                 f"when built (a flag or one of its constants): build it "
                                 f"with {key}={stored!r}")
            values[key] = value
        elif isinstance(value, (tuple, list)):  # betas: each element a number or a schedule
            if not (isinstance(stored, list) and len(stored) == len(value)):
                raise ValueError(f"{where}: {key} is {stored!r} in the checkpoint, expected "
                                 f"{len(value)} values")
            values[key] = tuple(_loaded_value(f"{where}: {key}[{i}]", v, s)
                                for i, (v, s) in enumerate(zip(value, stored)))
        else:
            values[key] = _loaded_value(f"{where}: {key}", value, stored)
    try:
        check(opt.rules, values)
        opt._validate_group(values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: the checkpoint's hyperparameters are invalid: {error}") from None
    return values


def _loaded_value(where: str, ours: Any, stored: Any) -> Any:
    """One saved hyperparameter value (or tuple element); a schedule stays this optimizer's."""
    if is_schedule(ours):
        if stored != _SCHEDULE:
            raise ValueError(f"{where} is a schedule in this optimizer but {stored!r} in the "
                             "checkpoint")
        return ours  # schedules are code: this optimizer's own is kept
    if stored == _SCHEDULE:
        raise ValueError(f"{where} is a schedule in the checkpoint; build this optimizer with "
                         "a schedule for it too")
    try:  # a number where ours is one: None, a string or a bool would pass for a flag
        scalar_value(where, stored)
    except (TypeError, ValueError):
        raise ValueError(f"{where} is {stored!r} in the checkpoint, not a number") from None
    return stored


def _loaded_step_classes(opt: Any, paths: list[str], classes: list, class_of: dict
                         ) -> tuple[list, dict]:
    """The step sets after a load, and which set each parameter is in.

    A step compiled before the load baked in which set each parameter reads, and retraces
    only when the number of sets changes. So the loaded sets are the coarsest that agree
    with the checkpoint's, with this optimizer's and with its groups (a set never spans
    groups: its members share scalar state): when that is this optimizer's own partition,
    its numbering is kept; otherwise there are more sets than before, and a compiled step
    retraces.
    """
    current = opt._class_of or {}
    parts: dict[tuple, list[str]] = {}
    for path in paths:
        parts.setdefault((class_of[path], current.get(path), opt._group_cache.get(path)),
                         []).append(path)
    unchanged = (all(path in current for path in paths)
                 and len(parts) == len(opt.state["step_classes"])
                 and len({current[path] for path in paths}) == len(parts))
    new_classes: list = [None] * len(parts) if unchanged else []
    new_class_of = {}
    for (saved_class, current_class, _), members in parts.items():
        if unchanged:
            index = current_class
            new_classes[index] = classes[saved_class]
        else:
            index = len(new_classes)
            new_classes.append(classes[saved_class])
        for path in members:
            new_class_of[path] = index
    return new_classes, new_class_of


# ----------------------------------------------------------------------------- LBFGS
_LBFGS_HYPER = ("learning_rate", "max_iter", "max_eval", "tolerance_grad", "tolerance_change",
                "history_size", "line_search_fn")
_LBFGS_SCALARS = {"func_evals": (int,), "n_iter": (int,), "H_diag": (float, int),
                  "t": (float, int, type(None)), "prev_loss": (float, int, type(None)),
                  "status": (str, type(None))}


def _load_lbfgs(opt: Any, sd: dict) -> None:
    from .lbfgs import LBFGS

    hyper, state = sd.get("hyperparameters"), sd["state"]
    if not isinstance(hyper, dict):
        raise ValueError("LBFGS checkpoint lacks its hyperparameters")
    _same_keys(hyper, {k: None for k in _LBFGS_HYPER}, "LBFGS hyperparameters")
    try:  # the constructor's own checks, on a throwaway instance
        LBFGS(**hyper)
    except (TypeError, ValueError) as error:
        raise ValueError(f"LBFGS checkpoint has invalid hyperparameters: {error}") from None
    if not isinstance(state, dict):
        raise ValueError("the checkpoint's LBFGS state is not a dict")
    _same_keys(state, opt.state, "LBFGS state")
    for key, types in _LBFGS_SCALARS.items():
        if isinstance(state[key], bool) or not isinstance(state[key], types):
            raise ValueError(f"LBFGS state[{key!r}] is {_describe(state[key])}, expected "
                             f"{' or '.join(t.__name__ for t in types)}")
    if not isinstance(state["ro"], list) or not all(isinstance(r, (float, int)) for r in state["ro"]):
        raise ValueError("LBFGS state['ro'] must be a list of numbers")
    vectors = [v for v in (state["d"], state["prev_flat_grad"]) if v is not None]
    for key in ("old_dirs", "old_stps"):
        if not isinstance(state[key], list) or len(state[key]) != len(state["ro"]):
            raise ValueError(f"LBFGS state[{key!r}] must be a list as long as state['ro']")
        vectors += state[key]
    current = [v for v in (opt.state["d"], opt.state["prev_flat_grad"]) if v is not None]
    for v in vectors:
        if not isinstance(v, mx.array) or v.ndim != 1:
            raise ValueError(f"LBFGS state holds {_describe(v)} where a 1-d array belongs")
        reference = current[0] if current else vectors[0]
        if v.shape != reference.shape or v.dtype != reference.dtype:
            raise ValueError(f"LBFGS state vector is {_describe(v)}, expected {_describe(reference)}")
    for key, value in hyper.items():
        setattr(opt, key, value)
    opt.state.clear()
    opt.state.update(copy_tree(state))


# ------------------------------------------------------------------------- torch interop
# torch's implementation switches: not hyperparameters, ignored on import.
_TORCH_ONLY = ("params", "foreach", "fused", "capturable", "differentiable", "initial_lr")


def _torch_name(name: str) -> str:
    return "lr" if name == "learning_rate" else name


def _from_torch_value(value: Any) -> Any:
    """A torch group value as a JSON value (tensors as numbers, tuples as lists)."""
    if hasattr(value, "detach"):  # a torch tensor (tensor lr)
        value = value.detach().cpu().reshape(-1).tolist()
        return value[0] if len(value) == 1 else value
    if isinstance(value, (tuple, list)):
        return [_from_torch_value(v) for v in value]
    return value


def load_torch_state_dict(opt: Any, torch_state_dict: Any, paths: list[str], parameters: Any) -> None:
    """Load a ``torch.optim`` optimizer's ``state_dict()`` into ``opt`` (validated, in place).

    Args:
        opt: one of ours, of the class matching torch's (``Adam`` for ``torch.optim.Adam``),
            built with the same flags (``amsgrad`` ...) and as many groups as torch has.
        torch_state_dict: ``torch_opt.state_dict()``, or the path of a file written by
            ``torch.save`` (read with ``weights_only=True``; torch is imported only then).
        paths: our dotted parameter path for each torch parameter id: ``paths[i]`` is the
            parameter torch numbers ``i`` (the order of ``torch_model.parameters()``).
        parameters: our parameter tree (e.g. ``model.trainable_parameters()``), for the
            shapes and dtypes of the state.

    torch's group values (``lr`` -> ``learning_rate``) replace ours; all torch parameters of
    one of our groups must share their values. torch's float ``step`` becomes our int32
    step; our global ``state["step"]`` (what schedules read) becomes the largest one.
    torch's SGD keeps no step: a parameter with a momentum buffer gets step 1 (our SGD only
    reads whether the first step is done), so set ``opt.state["step"]`` yourself if a
    schedule must continue from torch's step count.
    A parameter torch has no state for yet starts fresh, as in torch. State is made in
    ``opt.state_dtype`` where ``init`` would make it so, and float64 state arrives bit for
    bit. Schedulers attached to ``opt`` (``ReduceLROnPlateau``) keep their state: torch's
    state dict holds none.

    Example:
        >>> paths = [k for k, _ in tree_flatten(model.trainable_parameters())]
        >>> load_torch_state_dict(opt, torch_opt.state_dict(), paths, model.trainable_parameters())
    """
    import numpy as np

    if isinstance(torch_state_dict, (str, os.PathLike)):
        import torch

        torch_state_dict = torch.load(str(torch_state_dict), weights_only=True)
    if not isinstance(torch_state_dict, dict) or set(torch_state_dict) != {"state", "param_groups"}:
        raise ValueError("not a torch.optim state_dict: expected the keys 'state' and 'param_groups'")
    torch_state, torch_groups = torch_state_dict["state"], torch_state_dict["param_groups"]
    keys_of = [tuple(int(k) if k.isdigit() else k for k in p.split(".")) for p in paths]
    params = []
    for path, keys in zip(paths, keys_of):
        try:
            params.append(_lookup(parameters, keys))
        except KeyError:
            raise ValueError(f"paths names {path!r}, which is not in parameters") from None
    ids = sorted(i for g in torch_groups for i in g["params"])
    if ids != list(range(len(paths))):
        raise ValueError(f"torch's state dict numbers {len(ids)} parameters, paths names {len(paths)}")

    # Groups: ours are chosen by path; each must meet exactly one set of torch values.
    torch_values: dict[int, dict] = {}
    for group in torch_groups:
        values = {k: _from_torch_value(v) for k, v in group.items() if k not in _TORCH_ONLY}
        for i in group["params"]:
            index = opt._group_of(paths[i], params[i])
            if torch_values.setdefault(index, values) != values:
                raise ValueError(f"parameters of one of our groups ({paths[i]!r} ...) have different "
                                 "hyperparameters in torch's groups; select groups as torch's")
    groups = []
    for index, current in enumerate(opt._group_values):
        given = torch_values.get(index)
        values = {}
        for name, value in current.items():
            if given is None or (is_schedule(value) and not opt._is_static(name, value)):
                values[name] = _jsonable(value)  # a schedule of ours is kept
            elif _torch_name(name) not in given:
                if not opt._is_static(name, value):  # a flag torch fixes (Muon's decay) may be absent
                    raise ValueError(f"torch's param_groups lack {_torch_name(name)!r}")
                values[name] = _jsonable(value)
            else:
                values[name] = given[_torch_name(name)]
                if opt._is_static(name, value) and values[name] != _jsonable(value):
                    raise ValueError(f"{name} is {values[name]!r} in torch's group and {value!r} "
                                     f"in this optimizer; build it with {name}={values[name]!r}")
                if isinstance(value, tuple) and isinstance(values[name], list):
                    # torch's numbers, except where ours holds a schedule (betas=(f, 0.999))
                    values[name] = [_jsonable(v) if is_schedule(v) else t
                                    for v, t in zip(value, values[name])]
                if (name in opt.structural_zeros and not opt._active[index][name]
                        and _nonzero(name, values[name])):  # (a zero in an active term is fine)
                    where = _group_name(index)
                    raise ValueError(
                        f"{name} is {values[name]!r} in torch's group and 0 in {where} of this "
                        f"optimizer, whose step therefore has no {name} term: build it with a "
                        f"non-zero {name}, as torch's")
        # Checked before arrays are made of them (a 2-element lr tensor is a list here).
        _loaded_group(opt, _group_name(index), values, current)
        groups.append(values)

    def as_array(value: Any, stored: mx.array) -> mx.array:
        return stored if value == _SCHEDULE else _as_array(value, opt._scalar_dtype)

    def hyper_array(index: int, name: str) -> Any:
        value = groups[index][name]
        source = opt.state if index == 0 else opt.state["param_groups"][index - 1]
        if isinstance(value, list):
            return [as_array(v, s) for v, s in zip(value, source[name])]
        return as_array(value, source.get(name))

    def hypers(index: int) -> dict:
        return {name: (value if opt._is_static(name, value) else hyper_array(index, name))
                for name, value in opt._group_values[index].items()}

    param_state: dict = {}
    steps = []
    for i, (path, keys, param) in enumerate(zip(paths, keys_of, params)):
        index = opt._group_of(path, param)
        slot = {"step": mx.array(0, dtype=mx.int32),
                **opt._new_state(param, hypers(index), opt._active[index])}
        saved = {k: v for k, v in torch_state.get(i, torch_state.get(str(i), {})).items() if v is not None}
        if saved:  # torch's SGD keeps no step
            _same_keys({"step": None, **saved}, slot, f"torch's state of parameter {i} ({path!r})")
        for key, value in saved.items():
            array = _numpy_from_torch(value)
            if key == "step":
                slot["step"] = mx.array(int(array), dtype=mx.int32)
                continue
            if array.shape != slot[key].shape:
                raise ValueError(f"torch's state {key!r} of parameter {i} ({path!r}) has shape "
                                 f"{array.shape}, ours {tuple(slot[key].shape)}")
            # Made in the slot's dtype directly: mx.array of a float64 numpy array is float32.
            slot[key] = mx.array(array, dtype=slot[key].dtype)
        if saved and "step" not in saved:
            # torch's SGD counts no steps; a momentum buffer means the first step is done,
            # which is all our SGD reads from the step.
            slot["step"] = mx.array(1, dtype=mx.int32)
        steps.append(slot["step"].item())
        insert_slot(param_state, keys, slot)

    # One step array per set of slots whose step and scalar state are equal (see _base).
    classes, class_of, by_value = [], {}, {}
    for path, keys in zip(paths, keys_of):
        slot = _lookup(param_state, keys)
        scalars = tuple(sorted((k, v.item()) for k, v in slot.items() if v.ndim == 0))
        key = (opt._group_of(path, _lookup(parameters, keys)), scalars)
        if key not in by_value:
            by_value[key] = len(classes)
            classes.append(slot["step"])
        class_of[path] = by_value[key]

    state: dict = {}
    for name in opt.state:
        if name == "step":
            state[name] = mx.array(max(steps, default=0), dtype=opt.state["step"].dtype)
        elif name == "param_state":
            state[name] = param_state
        elif name == "step_classes":
            state[name] = classes
        elif name == "param_groups":
            state[name] = [{n: hyper_array(i + 1, n) for n in g} for i, g in enumerate(opt.state[name])]
        else:
            state[name] = hyper_array(0, name)
    # The optimizer's own state only: torch's state dict holds no attached scheduler, whose
    # state (a ReduceLROnPlateau's) stays as it is.
    _load_base(opt, {"groups": groups, "active": [dict(a) for a in opt._active],
                     "step_class_of": class_of, "state": state})


def to_torch_state_dict(opt: Any, paths: list[str], parameters: Any = None) -> dict:
    """``opt``'s state in ``torch.optim``'s ``state_dict`` format (torch imported here).

    Args:
        opt: one of ours.
        paths: our dotted parameter path for each torch parameter id (``paths[i]`` is id i).
        parameters: our parameter tree, needed only to place a parameter this optimizer has
            never seen (no state, never stepped) in a group chosen by a predicate.

    Returns a dict for ``torch_opt.load_state_dict``: per parameter its state as tensors
    (``step`` as a float tensor, as torch keeps it; a parameter never stepped has none, as
    in torch) and one torch group per group of ours that holds parameters
    (``learning_rate`` -> ``lr``; schedules give their current value).

    Example:
        >>> torch_opt.load_state_dict(to_torch_state_dict(opt, paths))
    """
    import torch

    state, members = {}, {}
    for i, path in enumerate(paths):
        keys = tuple(int(k) if k.isdigit() else k for k in path.split("."))
        members.setdefault(_export_group(opt, path, keys, parameters), []).append(i)
        try:
            slot = _lookup(opt.state["param_state"], keys)
        except (KeyError, TypeError):
            continue  # no state yet: torch starts it lazily too
        if not is_slot(slot) or slot["step"].item() == 0:
            continue  # never stepped: torch has no state for it (SGD's first step copies)
        state[i] = {k: torch.tensor(float(v.item())) if k == "step" else _torch_from_mlx(torch, v)
                    for k, v in slot.items()}
    groups = []
    for index in sorted(members):
        group = {}
        for name in opt._group_values[index]:
            value = opt._get_hyper(index, name)
            if isinstance(value, tuple):
                value = tuple(v.item() if isinstance(v, mx.array) else v for v in value)
            elif isinstance(value, mx.array):
                value = value.item()
            group[_torch_name(name)] = value
        groups.append({**group, "params": sorted(members[index])})
    return {"state": state, "param_groups": groups}


def _export_group(opt: Any, path: str, keys: tuple, parameters: Any) -> int:
    """The group of ``path`` without asking a predicate about anything but the parameter."""
    if path in opt._group_cache:
        return opt._group_cache[path]
    if parameters is not None:
        try:
            return opt._group_of(path, _lookup(parameters, keys))
        except KeyError:
            raise ValueError(f"paths names {path!r}, which is not in parameters") from None
    if any(sel is not None and not isinstance(sel, _Glob) for sel in opt._group_selectors):
        raise ValueError(f"the group of parameter {path!r} is not known to this optimizer (no "
                         "init or step has placed it since it was built or loaded) and a "
                         "predicate selects groups: pass parameters= so that it can be placed")
    hits = [i for i, sel in enumerate(opt._group_selectors) if sel and sel(path, None)]
    return hits[0] if hits else 0


def _numpy_from_torch(value: Any) -> Any:
    """A torch tensor (or number) as numpy; bfloat16, which numpy lacks, through float32."""
    import numpy as np

    if not hasattr(value, "detach"):
        return np.asarray(value)
    value = value.detach().cpu()
    if not value.dtype.is_floating_point or value.dtype.itemsize >= 4 or value.dtype.is_complex:
        return value.numpy()
    return value.float().numpy()  # float16 too: mx casts it back to the slot's dtype


def _torch_from_mlx(torch: Any, value: mx.array) -> Any:
    """An MLX array as a torch tensor of the same dtype (bfloat16 through float32)."""
    import numpy as np

    if value.dtype == mx.bfloat16:
        return torch.from_numpy(np.array(value.astype(mx.float32))).to(torch.bfloat16)
    return torch.from_numpy(np.array(value))
