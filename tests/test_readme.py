"""The README's Python examples run as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    source = BLOCKS[index]
    if "steps_per_epoch" in source:  # a fragment continuing the example before it
        source = "from mlx_optim import SGD, StepLR\nsteps_per_epoch = 100\n" + source
    exec(compile(source, f"README block {index}", "exec"), {})
