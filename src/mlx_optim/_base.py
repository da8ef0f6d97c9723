"""The base class: every concern shared by the optimizers, written once.

Data flows one way: ``apply_gradients`` checks the gradient tree, evaluates schedules,
then for each parameter (on the stream ``_streams_for`` gives it) negates the gradient
(``maximize``), applies L2 or decoupled weight decay, advances the parameter's own step
counter and calls the optimizer's pure ``update_fn``. Each optimizer file only declares its
hyperparameters, its validation rules, its state (``init_state``) and that one function.

State layout (all arrays, created eagerly, so ``mx.compile`` traces once and
``mx.save_safetensors`` works)::

    state["step"]                 global step (uint64), what schedules are evaluated at
    state[<hyperparameter>]       the default group's values, e.g. state["learning_rate"]
    state["param_groups"]         one dict of values per extra group (when groups are given)
    state["param_state"]          a tree mirroring the parameters; each leaf is a dict
                                  {"step": int32, <torch's state names>: arrays}
    state["step_classes"]         one int32 step array per set of parameters whose steps
                                  are known to be equal; their slots share that array

Sharing steps is for speed: each parameter keeps its own counter (torch's semantics: a
parameter missing from a gradient tree does not advance), but parameters that have
always been stepped together hold one array, so scalar work that depends on the step
(bias corrections...) is traced once per set instead of once per parameter (measured:
a third of an Adam step over 66 tensors). A set splits, Python-side, when a gradient tree
holds only some of it, or when its members fall in different groups (a loaded set may
span groups selected anew); the split appends to ``step_classes``, which changes the
state's structure, so a step compiled before the split retraces instead of running stale.
A 0-d entry of a tensor's state (ASGD's ``eta``) is equal across a set and read once per
set; a 0-d parameter's state is its own.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import inspect
import numbers
import os
from collections.abc import MutableMapping
from typing import Any, Callable, Iterator, Sequence

import mlx.core as mx
import mlx.optimizers as mlx_optim

from ._checkpointable import Checkpointable
from ._math import OWN_KERNEL, cast, scalar_dtype
from ._validate import Rule, check, scalar_value
from .sparse import RowSparseGrad

# Values of these types are structural switches (they change the traced computation);
# every other hyperparameter is held as an array in the state.
_STATIC_TYPES = (bool, str, type(None))
# Handled by the base itself, never passed to an optimizer's update function.
_BASE_KEYS = ("maximize", "weight_decay", "decoupled_weight_decay")
_RESERVED = ("step", "param_groups", "param_state", "step_classes")


def _is_static(value: Any) -> bool:
    return isinstance(value, _STATIC_TYPES) or (
        isinstance(value, tuple) and any(isinstance(v, _STATIC_TYPES) for v in value)
    )


def is_schedule(value: Any) -> bool:
    """Whether a hyperparameter value is a schedule (a function of the step)."""
    return callable(value) and not isinstance(value, mx.array)


def _leaves(tree: Any, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """(key path, leaf) pairs of a parameter or gradient tree, in a fixed order."""
    if isinstance(tree, dict):
        for key, sub in tree.items():
            yield from _leaves(sub, prefix + (key,))
    elif isinstance(tree, (list, tuple)):
        for i, sub in enumerate(tree):
            yield from _leaves(sub, prefix + (i,))
    else:
        yield prefix, tree


def _rebuild(tree: Any, values: Iterator[Any]) -> Any:
    """``tree``'s structure with its leaves replaced, in ``_leaves`` order, by ``values``."""
    if isinstance(tree, dict):
        return {k: _rebuild(v, values) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_rebuild(v, values) for v in tree)
    return next(values)


def _lookup(tree: Any, keys: tuple) -> Any:
    for key in keys:
        if isinstance(tree, dict):
            if key not in tree:
                raise KeyError(key)
        elif isinstance(tree, (list, tuple)):
            if not isinstance(key, int) or key >= len(tree):
                raise KeyError(key)
        else:
            raise KeyError(key)
        tree = tree[key]
    return tree


def _dotted(keys: tuple) -> str:
    return ".".join(str(k) for k in keys)


def _cast(x: mx.array, dtype: mx.Dtype) -> mx.array:
    return x if x.dtype == dtype else x.astype(dtype)


def copy_tree(tree: Any) -> Any:
    """New dicts and lists (tuples become lists), the same leaves: arrays are immutable, so
    the copy does not change with the optimizer."""
    if isinstance(tree, dict):
        return {k: copy_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [copy_tree(v) for v in tree]
    return tree


def _as_python(value: Any) -> Any:
    """numpy scalars (``np.float32(1e-3)``, ``np.bool_``) as the Python values they hold, in
    tuples too: they then compare, print and save (JSON) as the user's numbers do."""
    if isinstance(value, (tuple, list)):
        return type(value)(_as_python(v) for v in value)
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return value.item()  # (numpy is not imported: mlx_optim does not need it)
    return value


def _check_floating(path: str, param: mx.array) -> None:
    """Only real floating-point parameters are optimized (torch cannot put an integer
    tensor in an optimizer; a complex one it treats as pairs of reals, which we do not)."""
    if not mx.issubdtype(param.dtype, mx.floating):
        raise ValueError(
            f"parameter {path!r} has dtype {param.dtype}; these optimizers update real "
            "floating-point parameters (float16, bfloat16, float32, float64) only: freeze it "
            "(e.g. model.freeze(keys=[...])) or leave it out of the gradients")


def _compute_dtype(dtype: mx.Dtype) -> mx.Dtype:
    # Low-precision parameters are updated in float32 and rounded once, as torch's
    # CPU kernels compute bf16/fp16 arithmetic in float32.
    return dtype if dtype in (mx.float32, mx.float64) else mx.float32


def _as_array(value: Any, dtype: mx.Dtype) -> mx.array:
    if isinstance(value, mx.array):
        return value.reshape(()).astype(dtype)
    return mx.array(value, dtype=dtype)


class ParamGroup(MutableMapping):
    """A live, torch-like view of one parameter group's hyperparameters.

    ``opt.param_groups[i]["learning_rate"]`` reads the current value; assigning a number
    changes it, also inside a compiled step. A schedule is part of the traced step: it can
    be assigned (or replaced by a number) only before the first step.
    """

    def __init__(self, optimizer: "Optimizer", index: int):
        self._opt, self._index = optimizer, index

    def __getitem__(self, name: str) -> Any:
        return self._opt._get_hyper(self._index, name)

    def __setitem__(self, name: str, value: Any) -> None:
        self._opt._set_hyper(self._index, name, value)

    def __delitem__(self, name: str) -> None:
        raise TypeError("hyperparameters cannot be deleted")

    def __iter__(self):
        return iter(self._opt._group_values[self._index])

    def __len__(self) -> int:
        return len(self._opt._group_values[self._index])

    def __repr__(self) -> str:
        return f"ParamGroup({self._index}, {dict(self)})"


class Optimizer(Checkpointable, mlx_optim.Optimizer):
    """Base class of the torch-parity optimizers.

    Subclasses set ``rules`` (validation, see ``_validate``), ``update_fn`` (the pure
    update: ``update_fn(param, grad, state, **hyperparameters) -> (param, state)``) and
    ``init_state(param, hyper, active) -> dict``, and call ``super().__init__`` with
    their hyperparameters in torch's names (``learning_rate`` for ``lr``).

    Args shared by every optimizer:
        groups: extra parameter groups, torch's ``param_groups`` selected by path. Each is
            a dict with ``"params"`` (a glob on the dotted parameter path such as
            ``"*.bias"``, a list of globs, or a predicate ``(path, array) -> bool``) and any
            hyperparameters to override; parameters no group selects use the defaults.
        maximize: ascend instead of descend.
        constants: names of numeric hyperparameters (``"momentum"``, ``"betas"``, ``"eps"``
            ...) compiled into the step as constants instead of held as arrays. They can
            never change afterwards (assigning one raises, a schedule is refused); a
            compiled kernel then reads a literal instead of an input, which can be a little
            faster on MLX's CPU backend (README, Speed).
    """

    rules: tuple[Rule, ...] = ()
    update_fn: Callable[..., tuple[mx.array, dict]]
    # Numeric hyperparameters that fix the computation's structure (Muon's ns_steps): held
    # as Python values like flags, so, like a flag, one cannot change after the first step.
    static_hyperparameters: tuple[str, ...] = ()
    # True when update_fn applies weight decay itself, because the decay must come at a
    # particular point of its math (Adafactor reads the parameter's RMS before decaying).
    # It then receives ``weight_decay``: an array, or None when the group's is zero.
    own_weight_decay: bool = False
    # Each parameter's scalar casts inside its own compiled kernel (see _math.cast), so
    # g++ can vectorize the kernel's loop (SGD). Only for shallow updates: mx.compile
    # splits a deeper one (depth 11) and the casts become nodes of every parameter's own
    # (a property where it depends on the configuration, as in RMSprop;
    # tests/test_compile.py checks that it never adds nodes).
    casts_in_kernel: bool = False
    # The dtype of state arrays that would otherwise take the parameter's dtype; set it
    # (``opt.state_dtype = mx.float32``) before the state is created to keep bfloat16 or
    # float16 parameters' moments in float32. None: the parameter's dtype, as torch.
    state_dtype: mx.Dtype | None = None
    # Row-sparse gradients (RowSparseGrad) accepted: update_fn then runs on the gathered
    # rows of the parameter and of every state array shaped like it.
    row_sparse: bool = False
    # torch's lazy (SparseAdam) semantics for dense gradients too: a row whose gradient is
    # all zero leaves the parameter and its state rows as they were.
    lazy_rows: bool = False
    # Hyperparameters whose being zero removes work from the step (weight decay, SGD's
    # momentum buffer). Whether each is zero is fixed when the optimizer is built, so a
    # compiled step keeps one structure.
    structural_zeros: tuple[str, ...] = ("weight_decay",)

    def __init__(self, hyperparameters: dict[str, Any], groups: Sequence[dict] | None = None,
                 constants: Sequence[str] = ()):
        super().__init__()
        self._scalar_dtype = scalar_dtype()
        self._defaults = dict(hyperparameters)
        self._group_values: list[dict[str, Any]] = []  # as given: numbers, tuples, callables
        self._active: list[dict[str, bool]] = []  # per group: structural_zeros that are non-zero
        self._group_selectors: list[Any] = [None]
        self._schedules: dict[tuple[int, str, int | None], Callable] = {}
        self._group_cache: dict[str, int] = {}
        # Stateful companions saved in this optimizer's checkpoints (ReduceLROnPlateau
        # appends itself); they need ``state_dict()`` / ``load_state_dict()``.
        self.attached: list[Any] = []
        self._constants = self._check_constants(constants, groups)
        for name in self._defaults:
            if name in _RESERVED:
                raise ValueError(f"{name!r} is reserved and cannot be a hyperparameter")
        self._add_group(self._defaults)
        for i, group in enumerate(groups or ()):
            group = dict(group)
            if "params" not in group:
                raise ValueError(f"groups[{i}] needs a 'params' selector (glob, list of globs or predicate)")
            selector = group.pop("params")
            unknown = sorted(set(group) - set(self._defaults))
            if unknown:
                raise ValueError(
                    f"groups[{i}] sets unknown hyperparameter(s) {unknown}; "
                    f"{type(self).__name__} has {sorted(self._defaults)}"
                )
            self._group_selectors.append(_selector(selector, i))
            self._add_group({**self._defaults, **group})
        self._state["param_state"] = {}
        self._state["step_classes"] = []
        self._class_of: dict[str, int] | None = {}  # dotted path -> index in step_classes
        # dotted path -> (shape, dtype) of the parameter its state was made or checked for
        self._slot_params: dict[str, tuple] = {}
        self._in_transaction = False  # see transaction()
        if len(self._group_values) > 1:
            self._state["param_groups"] = [{} for _ in self._group_values[1:]]
        for index, values in enumerate(self._group_values):
            for name, value in values.items():
                if not self._is_static(name, value):
                    self._store(index, name, value)

    # ----------------------------------------------------------------- hyperparameters
    def _add_group(self, values: dict[str, Any]) -> None:
        values = self._normalized(values)
        self._check_not_none(values)
        check(self.rules, values)
        self._validate_group(values)
        values = dict(values)
        for name in self._constants:  # Python numbers, so that a step compiles them in
            value = values[name]
            values[name] = (tuple(scalar_value(name, v) for v in value)
                            if isinstance(value, (tuple, list)) else scalar_value(name, value))
        self._group_values.append(values)
        self._active.append(
            {name: _nonzero(name, values[name]) for name in self.structural_zeros if name in values}
        )

    def _validate_group(self, values: dict[str, Any]) -> None:
        """Checks that involve several arguments (e.g. SGD's nesterov); override."""

    def _normalized(self, values: dict[str, Any]) -> dict[str, Any]:
        """numpy scalars as Python values, and flags (a ``bool`` default in the signature)
        as bools: 0 and 1 are accepted as torch accepts them; anything else raises, instead
        of passing for a number."""
        defaults = _signature_defaults(type(self))
        values = {name: _as_python(value) for name, value in values.items()}
        for name, value in values.items():
            if isinstance(defaults.get(name), bool) and not isinstance(value, bool):
                if not isinstance(value, numbers.Integral) or value not in (0, 1):
                    raise TypeError(f"{name} is a flag: it must be True or False, got {value!r}")
                values[name] = bool(value)
        return values

    def _check_not_none(self, values: dict[str, Any]) -> None:
        """``None`` where the signature's default is a number: torch's ``TypeError``, named
        (``None`` would otherwise pass for a flag and fail inside the first step)."""
        defaults = _signature_defaults(type(self))
        for name, value in values.items():
            default = defaults.get(name)
            if isinstance(default, tuple):  # Adafactor's eps=(None, 1e-3): element-wise
                pairs = [(f"{name}[{i}]", v, d) for i, (v, d) in enumerate(zip(value, default))
                         ] if isinstance(value, (tuple, list)) else []
            else:
                pairs = [(name, value, default)]
            for where, v, d in pairs:
                if v is None and not _is_static(d):
                    raise TypeError(f"{where} must be a number, an mx.array scalar or a "
                                    "schedule, got None")

    def _check_constants(self, constants: Sequence[str], groups: Sequence[dict] | None
                         ) -> frozenset[str]:
        names = (constants,) if isinstance(constants, str) else tuple(constants)
        sources = [("the default group", self._defaults)]
        sources += [(f"groups[{i}]", dict(g)) for i, g in enumerate(groups or ())]
        for name in names:
            if name not in self._defaults:
                raise ValueError(f"constants: {type(self).__name__} has no hyperparameter "
                                 f"{name!r}; it has {sorted(self._defaults)}")
            if self._is_static(name, self._defaults[name]):
                raise ValueError(f"constants: {name} is a flag, fixed when the optimizer is "
                                 "built anyway")
            for where, group in sources:
                value = group.get(name)
                for v in value if isinstance(value, (tuple, list)) else (value,):
                    if is_schedule(v):
                        raise ValueError(f"constants: {name} is a schedule in {where}; "
                                         "a constant cannot change")
        return frozenset(names)

    def _is_static(self, name: str, value: Any) -> bool:
        return (name in self.static_hyperparameters or _is_static(value)
                or name in self.__dict__.get("_constants", ()))

    def _store(self, index: int, name: str, value: Any) -> None:
        """Write an array hyperparameter (or register its schedule) into the state."""
        target = self._state if index == 0 else self._state["param_groups"][index - 1]
        if isinstance(value, (tuple, list)):
            target[name] = [self._store_one(index, name, i, v) for i, v in enumerate(value)]
        else:
            target[name] = self._store_one(index, name, None, value)

    def _store_one(self, index: int, name: str, element: int | None, value: Any) -> mx.array:
        key = (index, name, element)
        if is_schedule(value):
            self._schedules[key] = value
            return _as_array(value(self._state["step"]), self._scalar_dtype)
        self._schedules.pop(key, None)
        return _as_array(value, self._scalar_dtype)

    def _get_hyper(self, index: int, name: str) -> Any:
        value = self._group_values[index][name]
        if self._is_static(name, value):
            return value
        source = self._state if index == 0 else self._state["param_groups"][index - 1]
        stored = source[name]
        return tuple(stored) if isinstance(stored, list) else stored

    def _set_hyper(self, index: int, name: str, value: Any) -> None:
        values = self._group_values[index]
        if name not in values:
            raise KeyError(f"{type(self).__name__} has no hyperparameter {name!r}")
        if name in self._constants:
            raise ValueError(f"{name} is one of this optimizer's constants (compiled into its "
                             "step); build a new optimizer to change it")
        old = values[name]
        value = self._normalized({name: value})[name]
        if _is_static(old) != _is_static(value):
            raise TypeError(f"{name} must stay a {'flag' if _is_static(old) else 'number or schedule'}")
        stepped = self._state["step"].item() > 0
        if stepped and self._is_static(name, old) and not _same_static(old, value):
            raise ValueError(
                f"{name} fixes the computation a compiled step traced (a flag or a Python "
                f"value), so it cannot change after the first step; build the optimizer "
                f"with {name}={value!r}")
        if _swaps_schedule(old, value) and stepped:
            raise ValueError(
                f"{name}: a schedule is traced into a compiled step, so none can be set, replaced "
                "or removed after the first step (a step compiled earlier would keep the old "
                "one); build the optimizer with the schedule (SequentialLR switches schedules "
                "at a milestone)")
        if name in self.structural_zeros and not self._active[index][name] and _nonzero(name, value):
            raise ValueError(
                f"{name} was 0 when this optimizer was built, so its step has no {name} "
                f"term; build it with a non-zero {name} to change it later"
            )
        candidate = {**values, name: value}
        check(self.rules, candidate)
        self._validate_group(candidate)
        values[name] = value
        if not self._is_static(name, value):
            self._store(index, name, value)

    @property
    def param_groups(self) -> list[ParamGroup]:
        """torch-like views of the groups; index 0 holds the defaults."""
        return [ParamGroup(self, i) for i in range(len(self._group_values))]

    @property
    def learning_rate(self) -> mx.array | float:
        return self._get_hyper(0, "learning_rate")  # a float when it is one of ``constants``

    @learning_rate.setter
    def learning_rate(self, value) -> None:  # the default group's, as mlx.optimizers
        self._set_hyper(0, "learning_rate", value)

    def __getattr__(self, name: str) -> Any:
        # opt.momentum, opt.betas, opt.amsgrad ...: the default group's values.
        defaults = self.__dict__.get("_defaults")
        if defaults is not None and name in defaults:
            return self._get_hyper(0, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        # opt.momentum = 0.8 changes the default group's value (validated), as
        # opt.learning_rate = ... does, instead of hiding it behind a plain attribute.
        defaults = self.__dict__.get("_defaults")
        if defaults is not None and name in defaults:
            self._set_hyper(0, name, value)
        else:
            super().__setattr__(name, value)

    # ----------------------------------------------------------------------- groups
    def _group_of(self, path: str, param: mx.array) -> int:
        if path not in self._group_cache:
            hits = [i for i, sel in enumerate(self._group_selectors) if sel and sel(path, param)]
            if len(hits) > 1:
                raise ValueError(
                    f"some parameters appear in more than one parameter group: {path!r} "
                    f"is selected by groups {[h - 1 for h in hits]}"
                )
            self._group_cache[path] = hits[0] if hits else 0
        return self._group_cache[path]

    # ------------------------------------------------------------------------ state
    def init_state(self, param: mx.array, hyper: dict[str, Any], active: dict[str, bool]) -> dict[str, mx.array]:
        """The optimizer's per-parameter state (torch's names), besides ``step``.

        ``hyper`` holds the group's current values, ``active`` which
        ``structural_zeros`` are non-zero for it.
        """
        return {}

    def init(self, parameters: dict) -> None:
        """Create the state of every parameter in ``parameters`` that has none yet.

        Call it before ``mx.compile`` so the compiled step sees the complete state.
        Existing (e.g. loaded) state is never re-initialised. The first call checks that
        each group selects some parameter of ``parameters`` (a selector that matches
        nothing is a typo), before anything is created.
        """
        if not self._initialized:
            self.check_groups_select(parameters)
        self._init_slots(parameters)

    def check_groups_select(self, parameters: dict) -> None:
        """Raise ``ValueError`` if a group selects no parameter of ``parameters``.

        Only asks the selectors: ``parameters`` may hold arrays this optimizer never
        updates (a model's frozen ones), where two groups may well overlap."""
        if len(self._group_selectors) == 1:
            return
        used = {i for keys, p in _leaves(parameters) if isinstance(p, mx.array)
                for i, select in enumerate(self._group_selectors) if select and select(_dotted(keys), p)}
        unused = [i - 1 for i in range(1, len(self._group_selectors)) if i not in used]
        if unused:
            raise ValueError(f"groups {unused} select no parameter; check their 'params' selectors")

    def _init_slots(self, parameters: dict) -> None:
        """``init`` without the groups' check: the state of parameters that have none."""
        created = []
        for keys, param in _leaves(parameters):
            # Integer arrays (a quantized model's frozen weights) are never optimized: the
            # gradient check refuses them with advice, here they are only passed over.
            if not isinstance(param, mx.array) or not mx.issubdtype(param.dtype, mx.floating):
                continue
            slot = self._slot(keys)
            if slot is None:
                created.append((keys, param))
            else:
                self._check_slot_fits(_dotted(keys), slot, param)
        for keys, param in created:  # every check before any state is created
            self._check_parameter(_dotted(keys), param)
            self._group_of(_dotted(keys), param)  # raises if two groups select it
        if created and self._class_of is None:
            self._rebuild_step_classes()
        new_classes: dict[tuple, int] = {}
        for keys, param in created:
            path = _dotted(keys)
            index = self._group_of(path, param)
            cls = new_classes.get((index, param.dtype))
            if cls is None:
                cls = new_classes[(index, param.dtype)] = self._new_step_class(mx.array(0, dtype=mx.int32))
            self._class_of[path] = cls
            slot = {"step": self._state["step_classes"][cls],
                    **self._new_state(param, self._hypers(index), self._active[index])}
            self._put_slot(keys, slot)
            self._slot_params[path] = (param.shape, param.dtype)
        self._initialized = True

    def _new_state(self, param: mx.array, hyper: dict[str, Any], active: dict[str, bool]
                   ) -> dict[str, mx.array]:
        """``init_state``, in ``state_dtype`` where that is set (e.g. float32 moments for
        bfloat16 weights)."""
        state = self.init_state(param, hyper, active)
        if self.state_dtype is None:
            return state
        return {k: v.astype(self.state_dtype) if v.dtype == param.dtype else v
                for k, v in state.items()}

    # ----------------------------------------------------------------- shared steps
    def _new_step_class(self, step: mx.array) -> int:
        self._state["step_classes"].append(step)
        return len(self._state["step_classes"]) - 1

    def _split_step_classes(self, stepped: dict[str, int]) -> None:
        """Parameters stepped now (path -> group) leave a set whose other members are not
        stepped now, or are in another group: members of a set share scalar state, which
        may depend on the group's values (a loaded set may span groups selected anew)."""
        members: dict[int, dict[int | None, list[str]]] = {}
        for path, cls in self._class_of.items():
            members.setdefault(cls, {}).setdefault(stepped.get(path), []).append(path)
        for cls, parts in members.items():
            for paths in list(parts.values())[1:]:  # the first part keeps the set
                new = self._new_step_class(self._state["step_classes"][cls])
                for path in paths:
                    self._class_of[path] = new

    def _rebuild_step_classes(self) -> None:
        """After the state was replaced (loaded): sets from the values themselves.

        Slots whose step and scalar state are equal, in the same group and dtype, share.
        """
        self._class_of, by_value = {}, {}
        self._state["step_classes"] = []
        for keys, slot in _slots(self._state["param_state"]):
            path = _dotted(keys)
            key = self._step_set_key(path, slot)
            if key not in by_value:
                by_value[key] = self._new_step_class(slot["step"])
            self._class_of[path] = by_value[key]
            slot["step"] = self._state["step_classes"][by_value[key]]

    def _step_set_key(self, path: str, slot: dict) -> tuple:
        """Slots with equal keys may share a step set: equal step and 0-d state, one group
        (a parameter whose group is not known yet is alone) and one dtype."""
        scalars = tuple(sorted((k, v.item()) for k, v in slot.items() if v.ndim == 0))
        big = next((v for v in slot.values() if v.ndim), slot["step"])
        return self._group_cache.get(path, path), str(big.dtype), scalars

    @property
    def state(self) -> dict:
        return self._state

    @state.setter
    def state(self, state: dict) -> None:
        self._initialized = False
        self._state = state
        self._slot_params = {}
        self._class_of = None  # rebuilt from the values at the next step

    def _check_parameter(self, path: str, param: mx.array) -> None:
        """Raise ``ValueError`` for a parameter this optimizer cannot update (Muon: not 2-D)."""

    def _slot(self, keys: tuple) -> dict | None:
        try:
            slot = _lookup(self._state["param_state"], keys)
        except (KeyError, TypeError):
            return None
        return slot if is_slot(slot) else None

    def _put_slot(self, keys: tuple, slot: dict) -> None:
        insert_slot(self._state["param_state"], keys, slot)

    def _hypers(self, index: int) -> dict[str, Any]:
        """The group's current values: scalar arrays (``scalar_dtype``) and flags.

        Update functions compute scalar coefficients in this precision, as torch does
        in Python floats, and cast them to the parameter's dtype where they meet it.
        """
        return {name: self._get_hyper(index, name) for name in self._group_values[index]}

    # ------------------------------------------------------------------------- step
    def _check_gradients(self, gradients: Any, parameters: Any) -> list:
        """Pair each gradient with its parameter; raise before anything changes."""
        if isinstance(gradients, mx.array) or not isinstance(gradients, (dict, list, tuple)):
            raise ValueError("gradients must be a tree (dict or list) of arrays, as parameters are")
        pairs = []
        for keys, grad in _leaves(gradients):
            path = _dotted(keys)
            try:
                param = _lookup(parameters, keys)
            except KeyError:
                raise ValueError(f"gradient for unknown parameter {path!r}") from None
            if not isinstance(param, mx.array):
                raise ValueError(f"gradient for {path!r}, which is not a parameter array")
            _check_floating(path, param)
            self._check_gradient(path, grad, param)
            slot = self._slot(keys)
            if slot is not None:
                self._check_slot_fits(path, slot, param)
            pairs.append((keys, grad, param))
        return pairs

    def _check_slot_fits(self, path: str, slot: dict, param: mx.array) -> None:
        """Raise ``ValueError`` if a parameter's existing state (made for another shape, or
        loaded) is not the state this optimizer would make for it. Checked once per shape."""
        if self._slot_params.get(path, ((),))[0] == param.shape:
            return
        index = self._group_of(path, param)
        expected = self._new_state(param, self._hypers(index), self._active[index])
        have = {k: tuple(v.shape) for k, v in slot.items() if k != "step"}
        want = {k: tuple(v.shape) for k, v in expected.items()}
        if have != want:
            raise ValueError(
                f"parameter {path!r} has shape {tuple(param.shape)}, but its optimizer state "
                f"{have} does not fit it (it needs {want}): the state was made for another "
                "parameter, or the parameter was replaced; build a new optimizer for the new "
                "parameter (or load state that matches it)")
        self._slot_params[path] = (param.shape, param.dtype)

    def _check_gradient(self, path: str, grad: Any, param: mx.array) -> None:
        if isinstance(grad, RowSparseGrad):
            if not self.row_sparse:
                raise ValueError(f"{type(self).__name__} does not support row-sparse gradients "
                                 f"(gradient for {path!r}); pass a dense mx.array")
            grad.check_indices()
            # Decay would touch every row, which a row-sparse step must not (torch's words).
            index = self._group_of(path, param)
            if (self._active[index].get("weight_decay", False)
                    and scalar_value("weight_decay", self._get_hyper(index, "weight_decay")) != 0):
                raise ValueError(f"weight_decay option is not compatible with sparse gradients "
                                 f"(gradient for {path!r}; build with weight_decay=0)")
        elif not isinstance(grad, mx.array):
            raise ValueError(f"gradient for {path!r} must be an mx.array, got {type(grad).__name__}")
        if not mx.issubdtype(grad.dtype, mx.floating):
            raise ValueError(f"gradient for {path!r} has dtype {grad.dtype}; gradients must be "
                             "real floating-point arrays")
        if grad.shape != param.shape:
            raise ValueError(
                f"gradient for {path!r} has shape {tuple(grad.shape)}, "
                f"the parameter has shape {tuple(param.shape)}"
            )

    def apply_gradients(self, gradients: dict, parameters: dict) -> dict:
        """Apply ``gradients`` to ``parameters`` and return the updated parameters.

        ``parameters`` may be a superset of ``gradients`` (e.g. a model); the result has
        the structure of ``gradients``. A gradient whose path or shape matches no
        parameter raises ``ValueError`` before any parameter or state changes.
        """
        pairs = self._check_gradients(gradients, parameters)
        if not self._initialized:
            self.check_groups_select(parameters)  # the parameters, as the gradients may be partial
        # What remains can still raise (a schedule, an update function given a value it
        # cannot use): then the optimizer is put back as it was.
        with self.transaction():
            return self._step(gradients, pairs)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Put the optimizer back as it was if the block raises (eagerly: while
        ``mx.compile`` traces, the state holds MLX's placeholders). Inside another
        transaction (SkipNonFinite's around the step) the outer one's snapshot serves."""
        if self._in_transaction:
            yield
            return
        saved = (copy_tree(self._state), None if self._class_of is None else dict(self._class_of),
                 dict(self._slot_params), self._initialized)
        self._in_transaction = True
        try:
            yield
        except BaseException:
            state, self._class_of, self._slot_params, self._initialized = saved
            self._state.clear()
            self._state.update(state)  # in place: a compiled step holds this dict
            raise
        finally:
            self._in_transaction = False

    def _step(self, gradients: Any, pairs: list) -> Any:
        """The step itself, on checked ``pairs``, inside ``apply_gradients``' transaction."""
        missing = [(k, p) for k, _, p in pairs if self._slot(k) is None]
        if missing:
            self._init_slots(_rebuild_missing(missing))  # a gradient tree may be partial
        if self._class_of is None:
            self._rebuild_step_classes()
        paths = [_dotted(keys) for keys, _, _ in pairs]
        self._split_step_classes({path: self._group_of(path, param)
                                  for path, (_, _, param) in zip(paths, pairs)})
        classes = self._state["step_classes"]
        for cls in {self._class_of[path] for path in paths}:
            classes[cls] = classes[cls] + 1
        step = self._state["step"]
        for (index, name, element), schedule in self._schedules.items():
            target = self._state if index == 0 else self._state["param_groups"][index - 1]
            value = _as_array(schedule(step), self._scalar_dtype)
            if element is None:
                target[name] = value
            else:
                target[name][element] = value
        self._state["step"] = step + 1
        slots = [self._slot(keys) for keys, _, _ in pairs]
        own_casts = self._traced_classes(slots, paths) if self.casts_in_kernel else set()
        updated, shared_scalars = [], {}
        streams = self._streams_for([(grad, param) for _, grad, param in pairs])
        for (keys, grad, param), path, slot, stream in zip(pairs, paths, slots, streams):
            cls = self._class_of[path]
            token = OWN_KERNEL.set(cls in own_casts)
            slot["step"] = classes[cls]
            index = self._group_of(path, param)
            try:
                with mx.stream(stream):
                    updated.append(self._apply_one(grad, param, slot, index,
                                                   shared_scalars.setdefault(cls, {})))
            finally:
                OWN_KERNEL.reset(token)
        return _rebuild(gradients, iter(updated))

    def _streams_for(self, pairs: list) -> list:
        """The stream of each (gradient, parameter) update. On the CPU, a step with at least
        two ``ELEMENTS_PER_STREAM`` of dense update uses one stream per that many, at most
        ``get_cpu_streams()``: the largest update first, each onto the stream with the fewest
        elements so far. Row-sparse updates (eager gathers, see ``_apply_rows``), smaller
        steps and other devices stay on the current stream."""
        current = mx.default_stream(mx.default_device())
        if mx.default_device() != mx.cpu:
            return [current] * len(pairs)
        dense = [i for i, (grad, _) in enumerate(pairs) if not isinstance(grad, RowSparseGrad)]
        count = min(_cpu_streams, sum(pairs[i][1].size for i in dense) // ELEMENTS_PER_STREAM)
        chosen = [current] * len(pairs)
        if count <= 1:
            return chosen
        streams = [current, *_extra_cpu_streams(count - 1)]
        load = [0] * count
        for i in sorted(dense, key=lambda i: -pairs[i][1].size):
            k = load.index(min(load))
            load[k] += pairs[i][1].size
            chosen[i] = streams[k]
        return chosen

    def _traced_classes(self, slots: list, paths: list[str]) -> set[int]:
        """The step sets of several parameters being traced by ``mx.compile``: there every
        state leaf is its own placeholder, so their slots hold distinct step objects
        (eagerly they share one). Their casts are made each kernel's own (``_math.cast``)."""
        first, traced = {}, set()
        for slot, path in zip(slots, paths):
            cls = self._class_of[path]
            if first.setdefault(cls, slot["step"]) is not slot["step"]:
                traced.add(cls)
        return traced

    def _apply_one(self, grad: Any, param: mx.array, slot: dict, index: int, shared: dict) -> mx.array:
        """One parameter's step. ``slot["step"]`` is already advanced. ``shared`` holds the
        scalar (0-d) state, old and new, of the first parameter of the same step set:
        equal to this one's by construction, so it is reused rather than traced again."""
        if isinstance(grad, RowSparseGrad):
            return self._apply_rows(grad, param, slot, index)
        hyper = self._hypers(index)
        cdt = _compute_dtype(param.dtype)
        p = _cast(param, cdt)
        g = self._prepare_gradient(grad, cdt)
        if hyper.get("maximize", False):
            g = -g
        decay = self._active[index].get("weight_decay", False)
        if decay and not self.own_weight_decay:
            wd = hyper["weight_decay"]
            if hyper.get("decoupled_weight_decay", False):
                p = p * cast(1 - hyper["learning_rate"] * wd, p)
            else:
                g = g + cast(wd, p, shared=True) * p
        # bf16/fp16 state is updated in float32 too; float32/float64 state as it is.
        old_scalars, new_scalars = shared.setdefault("old", {}), shared.setdefault("new", {})
        # A 0-d entry of a tensor's state is per set (ASGD's eta, NAdam's mu_product); a 0-d
        # parameter's state is 0-d throughout and its own.
        share = param.ndim > 0
        state = {}
        for key, value in slot.items():
            if share and value.ndim == 0 and key != "step":
                value = old_scalars.setdefault(key, value)  # one input per set: traced once
            floating = mx.issubdtype(value.dtype, mx.floating)
            state[key] = _cast(value, _compute_dtype(value.dtype)) if floating else value
        new_p, new_state = self.update_fn(p, g, state, **self._update_kwargs(hyper, index, decay))
        if self.lazy_rows:
            touched = _touched_rows(g)
            new_p = mx.where(touched, new_p, p)
            new_state = {k: mx.where(touched, v, state[k]) if _is_table(k, v, p) else v
                         for k, v in new_state.items()}
        for key, value in new_state.items():
            if key == "step":
                continue
            if share and value.ndim == 0 and slot[key].ndim == 0:
                value = new_scalars.setdefault(key, value)
            slot[key] = _cast(value, slot[key].dtype)
        return _cast(new_p, param.dtype)

    def _update_kwargs(self, hyper: dict, index: int, decay: bool) -> dict:
        """update_fn's keyword arguments: a structural zero that is zero arrives as None,
        so the update function leaves its term out of the traced computation."""
        active = self._active[index]
        kwargs = {k: (v if active.get(k, True) else None)
                  for k, v in hyper.items() if k not in _BASE_KEYS}
        if self.own_weight_decay:
            kwargs["weight_decay"] = hyper["weight_decay"] if decay else None
        return kwargs

    def _apply_rows(self, grad: RowSparseGrad, param: mx.array, slot: dict, index: int) -> mx.array:
        """update_fn on the rows ``grad`` touches; its cost grows with those rows only.

        Eager: the rows are gathered, updated and evaluated, then written into new handles
        of the tables. The old tables are then referenced by those writes alone, so MLX
        reuses their buffers instead of copying the whole table (DESIGN.md, section 7).
        An empty gradient still counts a step (``slot["step"]`` has advanced), as in torch.
        """
        hyper = self._hypers(index)
        grad = grad.coalesce()  # the update is non-linear: duplicate rows are summed first
        if grad.indices.size == 0:
            return param
        rows = grad.indices
        cdt = _compute_dtype(param.dtype)
        g = _cast(grad.values, cdt)
        if hyper.get("maximize", False):
            g = -g
        tables = [k for k, v in slot.items() if _is_table(k, v, param)]
        state = {k: slot[k][rows] if k in tables else v for k, v in slot.items()}
        state = {k: _cast(v, _compute_dtype(v.dtype)) if mx.issubdtype(v.dtype, mx.floating) else v
                 for k, v in state.items()}
        new_rows, new_state = self.update_fn(_cast(param[rows], cdt), g, state,
                                             **self._update_kwargs(hyper, index, False))
        new_rows = _cast(new_rows, param.dtype)
        new_state = {k: _cast(new_state[k], slot[k].dtype) for k in tables}
        mx.eval(new_rows, new_state)  # detach the new rows from the old tables
        for key in tables:
            slot[key] = _write_rows(slot[key], rows, new_state[key])
        return _write_rows(param, rows, new_rows)

    def _prepare_gradient(self, grad: Any, dtype: mx.Dtype) -> mx.array:
        return _cast(grad, dtype)

    # mlx.optimizers.Optimizer hooks that this design replaces
    def init_single(self, parameter, state):  # pragma: no cover - not used
        raise NotImplementedError("mlx_optim optimizers initialise state in init()")

    def apply_single(self, gradient, parameter, state):  # pragma: no cover - not used
        raise NotImplementedError("mlx_optim optimizers update in apply_gradients()")


# A step uses one CPU stream per this many elements of update (a second one from 2^21,
# about 2.1M): on 2 idle cores a second stream cost 10-28% of a step at 0.2-0.8M elements,
# broke even at 1.8M and saved 3-20% from 3.2M (benchmarks/streams.py, results/streams.md).
ELEMENTS_PER_STREAM = 1 << 20
_CPU_STREAMS: list = []  # made once: each stream is a thread, shared by every optimizer


def _usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


_cpu_streams = min(_usable_cpus(), 4)


def set_cpu_streams(count: int) -> None:
    """Set how many CPU streams a step may spread its parameters' updates over,
    process-wide (as ``torch.set_num_threads``); ``get_cpu_streams()`` reads it.

    A stream of MLX's CPU backend is one thread running one kernel at a time, so on a
    multi-core CPU the updates of different tensors can run side by side; each update is
    unchanged, so the results are the same bit for bit. A stream costs synchronisation, so
    a step uses one per ``ELEMENTS_PER_STREAM`` (about a million) elements of update at
    most: small models stay on one. It pays only on otherwise idle cores: with several
    processes on one machine (ranks of ``mx.distributed`` on one host), give each its share,
    or 1. Default: the CPUs this process may use, at most 4. 1 keeps every update on the
    current stream. Only when the default device is the CPU; a step is planned when it is
    traced, so a compiled step keeps the streams it was traced with. Each extra stream is a
    thread that lives as long as the process.
    """
    global _cpu_streams
    if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 1:
        raise ValueError(f"set_cpu_streams: count must be a positive integer, got {count!r}")
    _cpu_streams = int(count)


def get_cpu_streams() -> int:
    """The count ``set_cpu_streams`` set (by default the usable CPUs, at most 4)."""
    return _cpu_streams


def _extra_cpu_streams(count: int) -> list:
    """``count`` CPU streams besides the default one."""
    while len(_CPU_STREAMS) < count:
        _CPU_STREAMS.append(mx.new_stream(mx.cpu))
    return _CPU_STREAMS[:count]


def array_hyperparameters(opt: Optimizer) -> tuple[str, ...]:
    """The hyperparameters ``opt`` holds as arrays: those its ``constants`` may name."""
    return tuple(name for name, value in opt._group_values[0].items()
                 if not opt._is_static(name, value))


def is_slot(node: Any) -> bool:
    """Whether a node of ``state["param_state"]`` is one parameter's state dict.

    Mirror nodes hold dicts and lists only; a slot holds its ``step`` array.
    """
    return isinstance(node, dict) and isinstance(node.get("step"), mx.array)


def _is_table(key: str, value: mx.array, param: mx.array) -> bool:
    """A state array with one entry per parameter element, so one row per row."""
    return key != "step" and value.shape == param.shape


def _touched_rows(grad: mx.array) -> mx.array:
    """Whether each row (first axis) of ``grad`` has a non-zero, broadcastable to ``grad``."""
    if grad.ndim < 2:
        return grad != 0
    return mx.any(grad != 0, axis=tuple(range(1, grad.ndim)), keepdims=True)


def _write_rows(table: mx.array, rows: mx.array, values: mx.array) -> mx.array:
    out = mx.array(table)  # a new handle: the caller's array is never written into
    out[rows] = values
    return out


def insert_slot(root: dict, keys: tuple, slot: dict) -> None:
    """Put ``slot`` at ``keys`` in a ``param_state`` tree, growing it (lists for int keys;
    ``{}`` marks an empty place in a list)."""
    node = root
    for key, next_key in zip(keys[:-1], keys[1:]):
        if isinstance(node, list):
            node.extend({} for _ in range(key + 1 - len(node)))
            if not node[key]:
                node[key] = [] if isinstance(next_key, int) else {}
        elif key not in node:
            node[key] = [] if isinstance(next_key, int) else {}
        node = node[key]
    if isinstance(node, list):
        node.extend({} for _ in range(keys[-1] + 1 - len(node)))
    node[keys[-1]] = slot


def _slots(tree: Any, prefix: tuple = ()) -> Iterator[tuple[tuple, dict]]:
    """(key path, slot) for every parameter's state in a ``param_state`` tree."""
    if is_slot(tree):
        yield prefix, tree
    elif isinstance(tree, dict):
        for key, sub in tree.items():
            yield from _slots(sub, prefix + (key,))
    elif isinstance(tree, list):
        for i, sub in enumerate(tree):
            yield from _slots(sub, prefix + (i,))


def map_slots(fn: Callable[[dict], Any], tree: Any) -> Any:
    """``fn`` of every parameter's state, in the parameters' tree structure."""
    if is_slot(tree):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: map_slots(fn, v) for k, v in tree.items() if v}
    if isinstance(tree, list):
        return [map_slots(fn, v) if v else {} for v in tree]
    return tree


def _same_static(old: Any, new: Any) -> bool:
    """Whether a flag or Python value is unchanged (tuples compared as tuples)."""
    as_tuple = lambda v: tuple(v) if isinstance(v, (tuple, list)) else v
    return as_tuple(old) == as_tuple(new)


def _swaps_schedule(old: Any, new: Any) -> bool:
    """Whether assigning ``new`` over ``old`` adds, replaces or removes a schedule."""
    pairs = zip(old, new) if isinstance(old, tuple) and isinstance(new, (tuple, list)) else [(old, new)]
    return any((is_schedule(o) or is_schedule(n)) and o is not n for o, n in pairs)


@functools.cache
def _signature_defaults(cls: type) -> dict[str, Any]:
    """The default value of each keyword of ``cls.__init__``."""
    return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _nonzero(name: str, value: Any) -> bool:
    return callable(value) or scalar_value(name, value) != 0.0


class _Glob:
    """A group selector from globs on the dotted path: it never looks at the array."""

    def __init__(self, patterns: list[str]):
        self.patterns = patterns

    def __call__(self, path: str, _param: Any) -> bool:
        return any(fnmatch.fnmatchcase(path, p) for p in self.patterns)


def _selector(spec: Any, i: int) -> Callable[[str, mx.array], bool]:
    if callable(spec):
        return spec
    patterns = [spec] if isinstance(spec, str) else list(spec)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"groups[{i}]['params'] must be a glob, a list of globs or a predicate")
    return _Glob(patterns)


def _rebuild_missing(pairs: list) -> dict:
    """A small tree holding just ``pairs`` (key path, parameter), for ``init``."""
    root: dict = {}
    for keys, param in pairs:
        node = root
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = param
    return root
