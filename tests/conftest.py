"""Shared fixtures."""

import pytest

import mlx_optim


@pytest.fixture(autouse=True)
def _restore_cpu_streams():
    """set_cpu_streams is process-wide: every test leaves the count as it found it."""
    count = mlx_optim.get_cpu_streams()
    yield
    mlx_optim.set_cpu_streams(count)
