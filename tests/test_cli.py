"""The ``mlx-optim`` command: what compare, bench and verify write, and how they fail."""

from __future__ import annotations

import io
import json
import math
import pathlib
import struct
import subprocess
import sys
import tomllib

import mlx.core as mx
import numpy as np
import pytest

import mlx_optim
from mlx_optim.cli import main
from mlx_optim.cli.compare import build
from mlx_optim.cli.progress import Progress
from mlx_optim.cli.tasks import TASKS

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """main(argv) in process: (exit status, stdout, stderr), argparse's exits included."""
    try:
        status = main(argv)
    except SystemExit as exit:
        status = exit.code
    out, err = capsys.readouterr()
    return status, out, err


def png_size(path: pathlib.Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def state_nbytes(tree) -> int:
    """Bytes of the arrays in a state tree, walked here rather than with mlx's tree_flatten."""
    if isinstance(tree, dict):
        return sum(state_nbytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(state_nbytes(v) for v in tree)
    return np.asarray(tree).nbytes if isinstance(tree, mx.array) else 0


# --------------------------------------------------------------------------- compare

@pytest.fixture(scope="module")
def curve_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    status = main(["compare", "--task", "curve", "--optimizers", "SGD", "Adam", "LBFGS",
                   "--steps", "30", "--out", str(out)])
    return status, out, json.loads((out / "curve.json").read_text())


def test_compare_json_has_every_step_and_losses_fall(curve_run):
    status, _, report = curve_run
    assert status == 0
    assert [r["optimizer"] for r in report["results"]] == ["SGD", "Adam", "LBFGS"]
    for row in report["results"]:
        losses = row["losses"]
        assert row["steps"] == len(losses) == 30
        assert all(math.isfinite(v) for v in losses)
        assert losses[0] == pytest.approx(report["initial_loss"], rel=1e-5)  # same start for all
        assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), row["optimizer"]
        assert row["final_loss"] < report["initial_loss"]
        assert row["accuracy"] is None and row["val_loss"] is None  # a regression task
    sgd, adam, lbfgs = report["results"]
    assert sgd["evaluations"] == adam["evaluations"] == 30
    assert lbfgs["evaluations"] > 30  # line-search evaluations counted
    assert lbfgs["final_loss"] < adam["final_loss"]  # full-batch curve fitting is its ground


def test_compare_state_memory_is_the_sum_of_state_arrays(curve_run):
    _, _, report = curve_run
    task = TASKS["curve"](0)
    parameter_bytes = report["parameter_bytes"]
    assert parameter_bytes == 4 * (1 * 32 + 32 + 32 * 32 + 32 + 32 + 1)  # float32 MLP 1-32-32-1
    for row in report["results"][:2]:
        model = task.make_model()
        opt = build(row["optimizer"], "curve", 30, model)[0]
        opt.init(model.trainable_parameters())
        assert row["state_bytes"] == state_nbytes(opt.state)
    sgd, adam, _ = report["results"]
    # momentum buffer (SGD) and both moments (Adam) dominate; the rest are counters and scalars
    assert 0 < sgd["state_bytes"] - parameter_bytes < 200
    assert 0 < adam["state_bytes"] - 2 * parameter_bytes < 200


def test_compare_png_is_a_valid_image(curve_run):
    _, out, report = curve_run
    assert report["png"] == "curve.png"
    assert png_size(out / "curve.png") == (800, 450)


def test_compare_classification_reports_accuracy(tmp_path, capsys):
    status, out, err = run_cli(["compare", "--optimizers", "Adam", "--steps", "40", "--no-compile",
                                "--out", str(tmp_path)], capsys)
    assert status == 0 and err == ""  # no progress bar when stderr is not a terminal
    (row,) = json.loads((tmp_path / "digits.json").read_text())["results"]
    assert 0.3 < row["accuracy"] <= 1.0  # chance is 0.1
    assert row["val_loss"] < json.loads((tmp_path / "digits.json").read_text())["initial_loss"]
    assert "| Adam " in out and f"{row['accuracy']:.1%}" in out


def test_compare_without_matplotlib_still_writes_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    status, _, err = run_cli(["compare", "--task", "curve", "--optimizers", "SGD", "--steps", "3",
                              "--out", str(tmp_path)], capsys)
    assert status == 0
    assert err.count("\n") == 1 and "matplotlib is not installed" in err
    assert json.loads((tmp_path / "curve.json").read_text())["png"] is None
    assert not (tmp_path / "curve.png").exists()


def test_progress_bar_draws_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    progress = Progress(total=30, tasks=2, stream=stream)
    progress.update("Adam", 30, 0.25)
    progress.close()
    assert "[1/2] Adam" in stream.getvalue() and "30/30  loss 0.2500" in stream.getvalue()
    assert stream.getvalue().endswith("\r\x1b[K")


# ------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("argv, message", [
    (["compare", "--optimizers", "Adam", "Adamm"], "unknown optimizer 'Adamm'"),
    (["compare", "--task", "mnist"], "invalid choice: 'mnist'"),
    (["compare", "--steps", "-5"], "expected a positive integer, got -5"),
    (["compare", "--steps", "0"], "expected a positive integer, got 0"),
    (["compare", "--out", "{file}/sub"], "cannot write to --out"),
    (["compare", "--seed", "-1"], "expected a seed from 0 to 2**64 - 1, got -1"),
    (["compare", "--seed", str(2**64)], f"expected a seed from 0 to 2**64 - 1, got {2**64}"),
    (["compare", "--seed", "1.5"], "expected an integer seed, got '1.5'"),
    (["bench", "--only", "Adamm"], "unknown optimizer 'Adamm'"),
    (["bench", "--rounds", "0"], "expected a positive integer"),
    (["verify", "--only", "NotAnOptimizer"], "unknown optimizer or scheduler 'NotAnOptimizer'"),
    (["verify", "--dtypes", "float16"], "invalid choice: 'float16'"),
    (["verify", "--only", "StepLR", "--no-schedulers"], "nothing to check"),
    ([], "required: COMMAND"),
])
def test_bad_arguments_print_one_line_and_exit_2(argv, message, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    argv = [a.replace("{file}", str(tmp_path / "file")) for a in argv]
    status, out, err = run_cli(argv, capsys)
    assert status == 2
    assert out == "" and err.count("\n") == 1 and message in err and "Traceback" not in err


def test_compare_takes_the_largest_seed(tmp_path, capsys):
    status, out, err = run_cli(["compare", "--task", "curve", "--optimizers", "SGD", "--steps", "2",
                                "--seed", str(2**64 - 1), "--out", str(tmp_path)], capsys)
    assert status == 0 and "failed" not in out  # its batch key, seed + 1, wraps to 0
    assert json.loads((tmp_path / "curve.json").read_text())["seed"] == 2**64 - 1


@pytest.mark.parametrize("target, message", [
    ("{dir}", "Is a directory"),
    ("{file}/bench.json", "Not a directory"),
    ("{dir}/missing/bench.json", "No such file or directory"),
    ("{readonly}", "Permission denied"),
])
def test_bench_refuses_an_unwritable_json_before_measuring(target, message, tmp_path, capsys,
                                                           monkeypatch):
    import os

    from mlx_optim.cli import bench

    if target == "{readonly}" and os.geteuid() == 0:
        pytest.skip("root writes to read-only files")
    (tmp_path / "file").write_text("kept")
    (tmp_path / "readonly").write_text("kept")
    (tmp_path / "readonly").chmod(0o444)
    monkeypatch.setattr(bench, "measure", lambda *a, **k: pytest.fail("measured first"))
    target = target.format(dir=tmp_path, file=tmp_path / "file", readonly=tmp_path / "readonly")
    status, out, err = run_cli(["bench", "--only", "SGD", "--rounds", "1", "--steps", "2",
                                "--json", target], capsys)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and f"cannot write --json {target}: {message}" in err
    assert (tmp_path / "file").read_text() == "kept"


def test_bench_json_probe_keeps_a_file_and_leaves_no_new_one(tmp_path):
    from mlx_optim.cli.bench import writable_file

    (tmp_path / "old.json").write_text("kept")
    writable_file(str(tmp_path / "old.json"))
    assert (tmp_path / "old.json").read_text() == "kept"  # probed without truncating
    writable_file(str(tmp_path / "new.json"))
    assert not (tmp_path / "new.json").exists()


def test_the_installed_command_exits_2_without_traceback():
    result = subprocess.run([sys.executable, "-m", "mlx_optim", "compare", "--optimizers", "Nope"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("mlx-optim compare: error: unknown optimizer 'Nope'")
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_console_script_and_demo_target_point_at_the_cli():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["mlx-optim"] == "mlx_optim.cli:main"
    assert "matplotlib" in project["project"]["optional-dependencies"]["plot"]
    assert "matplotlib" in project["project"]["optional-dependencies"]["test"]
    demo = (ROOT / "Makefile").read_text().split("\ndemo:")[1].split("\n\n")[0]
    assert "mlx-optim compare" in demo


# ----------------------------------------------------------------------------- bench

def tree_size(width: int) -> int:
    """4 blocks (attention q, k, v, out; MLP up and down; two norms) and a final norm."""
    block = 4 * (width * width + width) + 2 * (4 * width * width) + 4 * width + width + 4 * width
    return 4 * block + 2 * width


def test_bench_width_scales_the_tree_for_this_run_only(tmp_path, capsys):
    from mlx_optim.cli import bench

    status, out, _ = run_cli(["bench", "--only", "Adam", "--rounds", "1", "--steps", "1",
                              "--width", "8", "--json", str(tmp_path / "bench.json")], capsys)
    assert status == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["parameters"] == tree_size(8) and report["width"] == 8
    assert out.startswith(f"{tree_size(8) / 1e6:.2f}M parameters in 66 tensors")
    assert bench.WIDTH == 256 and sum(math.prod(s) for s in bench.flat_shapes()) == tree_size(256)


def test_bench_measures_every_implementation_and_writes_json(tmp_path, capsys):
    status, out, _ = run_cli(["bench", "--only", "SGD", "--rounds", "1", "--steps", "2",
                              "--json", str(tmp_path / "bench.json")], capsys)
    assert status == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["parameters"] == tree_size(256) and report["rounds"] == 1
    ms = report["results"]["SGD"]["ms"]
    assert set(ms) == {"ours", "ours, one stream", "ours, constants", "mlx", "mlx, again",
                       "torch foreach", "torch fused"}
    assert all(0 < v < 10_000 for v in ms.values())
    row = next(line for line in out.splitlines() if line.startswith("| SGD"))
    cells = [cell.strip() for cell in row.split("|")[1:-1]]
    ratios, quartiles = report["results"]["SGD"]["ratios"], report["results"]["SGD"]["quartiles"]
    keys = ("ours / mlx", "ours, one stream / mlx", "ours, constants / mlx", "mlx, again / mlx",
            "ours / torch foreach", "ours / torch fused")
    assert cells[1] == f"{ms['ours']:.2f}" and cells[2:8] == [
        f"{ratios[k]:.2f}x ({quartiles[k][0]:.2f}-{quartiles[k][1]:.2f})" for k in keys]
    # One round: each ratio is that round's own, and so are both quartiles.
    assert ratios["ours / mlx"] == pytest.approx(ms["ours"] / ms["mlx"])
    assert ratios["mlx, again / mlx"] == pytest.approx(ms["mlx, again"] / ms["mlx"])
    assert quartiles["ours / mlx"] == [ratios["ours / mlx"]] * 2


def test_bench_quartiles_bound_the_middle_half_of_the_rounds():
    from mlx_optim.cli.bench import quartiles

    assert quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == [2.0, 4.0]
    assert quartiles([0.9, 1.1]) == pytest.approx([0.95, 1.05])


# ---------------------------------------------------------------------------- verify

def test_verify_passes_on_a_subset(capsys):
    from mlx_optim.parity import schedulers
    from mlx_optim.parity.cases import BY_NAME

    status, out, _ = run_cli(["verify", "--only", "SGD", "Adam", "StepLR", "--dtypes", "float32"],
                             capsys)
    assert status == 0, out
    configs = sum(len([c for c in BY_NAME[n].configs if c.desc not in BY_NAME[n].skips])
                  for n in ("SGD", "Adam"))
    step_lr = sum(case.name == "StepLR" for case in schedulers.CASES)
    assert f"{2 * (configs + step_lr)} checks, 0 failed" in out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if "(optimizer)" in line
            or "(scheduler)" in line}
    assert set(rows) == {"SGD (optimizer)", "Adam (optimizer)", "StepLR (scheduler)"}
    assert all(line.count(" ok") == 2 and "FAIL" not in line for line in rows.values())


def test_verify_fails_and_shows_an_injected_mismatch(capsys, monkeypatch):
    original = mlx_optim.SGD.update_fn

    def off_by_a_little(param, grad, state, **hyper):
        new_param, new_state = original(param, grad, state, **hyper)
        return new_param * (1 + 1e-4), new_state

    monkeypatch.setattr(mlx_optim.SGD, "update_fn", staticmethod(off_by_a_little))
    status, out, _ = run_cli(["verify", "--only", "SGD", "Adam", "--dtypes", "float64",
                              "--modes", "eager"], capsys)
    assert status == 1
    sgd = next(line for line in out.splitlines() if line.startswith("| SGD"))
    adam = next(line for line in out.splitlines() if line.startswith("| Adam"))
    assert "FAIL" in sgd and "ok" in adam
    assert "FAIL SGD [default] float64 eager: param" in out
    assert " 0 failed" not in out


def test_verify_without_torch_is_a_one_line_error(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    status, out, err = run_cli(["verify", "--only", "SGD"], capsys)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and "torch is not installed" in err
