"""The checkpoint methods every optimizer has; the substance is in ``checkpoint.py``
(imported when called: it imports the optimizers)."""

from __future__ import annotations


class Checkpointable:
    def state_dict(self) -> dict:
        """The complete state: arrays, hyperparameters, flags, type and format version."""
        from .checkpoint import state_dict
        return state_dict(self)

    def load_state_dict(self, state_dict: dict) -> None:
        """Validate ``state_dict`` fully, then load it (``ValueError`` on any mismatch,
        leaving the optimizer as it was)."""
        from .checkpoint import load_state_dict
        load_state_dict(self, state_dict)

    def save(self, path) -> None:
        """Write the state to a ``.safetensors`` file (see :mod:`mlx_optim.checkpoint`)."""
        from .checkpoint import save
        save(self, path)

    def load(self, path) -> None:
        """Load a file written by :meth:`save`, validated first (``ValueError`` on mismatch)."""
        from .checkpoint import load
        load(self, path)
