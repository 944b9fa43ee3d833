"""The command line and the examples, as a new user meets them: `gpu-momentum demo` runs end
to end on the best backend present; every error is one line, `gpu-momentum <command>:
error: ...`, with exit status 2 and no traceback, naming the user's value or path."""

import hashlib
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

import gpu_momentum as gm
from gpu_momentum import cli
from gpu_momentum.backends import unavailable_reason
from gpu_momentum.bench import command
from harness import library_env, require
from test_readme import EXAMPLES, _printed

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_cli(*argv, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "gpu_momentum", *argv], cwd=cwd,
                          env=env or library_env(), capture_output=True, text=True)


def assert_one_line_error(done, command_name, *fragments):
    """Exit status 2, nothing on stdout, one line on stderr naming the command."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"gpu-momentum {command_name}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.slow  # the demo's own benchmark, in a child process
def test_demo_prints_the_example_and_a_throughput():
    out = subprocess.run([sys.executable, "-m", "gpu_momentum", "demo", "--steps", "2"],
                         env=library_env(), check=True, capture_output=True,
                         text=True).stdout
    assert _printed(EXAMPLES[0]) in out
    chosen, best = re.search(r"backend '(\S+)' \(available: \['(\S+?)'", out).groups()
    assert chosen == best
    assert "25,557,032 float32 elements" in out and "GB/s" in out


def test_demo_refuses_an_unknown_backend_in_one_line():
    assert_one_line_error(run_cli("demo", "--backend", "foo"), "demo",
                          "invalid choice: 'foo'", "'cpu'")


def test_demo_refuses_an_unavailable_backend_in_one_line():
    reason = unavailable_reason("cupy")
    if reason is None:
        pytest.skip("cupy is available here (a GPU): nothing to refuse")
    assert_one_line_error(run_cli("demo", "--backend", "cupy"), "demo",
                          "backend 'cupy' is not available", "available: ")


@pytest.mark.parametrize("steps", ["0", "-1", "two"])
def test_demo_steps_must_be_at_least_one(steps):
    assert_one_line_error(run_cli("demo", "--steps", steps), "demo",
                          f"argument --steps: invalid value '{steps}'")


def test_compile_names_the_extra_when_the_cuda_packages_are_missing(tmp_path):
    # A `cuda` package first on the path that cannot be imported, as on a machine
    # without the CUDA extra (cuda-bindings and cuda-pathfinder live in `cuda`).
    (tmp_path / "cuda").mkdir()
    (tmp_path / "cuda" / "__init__.py").write_text(
        "raise ImportError(\"No module named 'cuda.bindings'\", name='cuda.bindings')\n")
    env = library_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    done = run_cli("compile", "--out", str(tmp_path / "out"), env=env)
    assert_one_line_error(done, "compile", "CUDA compiler packages are missing",
                          'pip install -e ".[cuda13]"')
    assert not (tmp_path / "out").exists()


def test_a_missing_required_option_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["compile"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "gpu-momentum compile: error: the following arguments are required: --out "
        "(see gpu-momentum compile --help)"]


def bench_parser():
    parser = cli.OneLineErrorParser(prog="gpu-momentum bench")
    command.add_arguments(parser)
    return parser


def test_bench_help_offers_only_what_argparse_accepts():
    parser = bench_parser()
    assert "none" in parser.format_help()
    assert command.options_from(parser.parse_args(["--workloads", "none"])).workloads == ()
    assert command.options_from(parser.parse_args(["--workloads"])).workloads == ()
    with pytest.raises(cli.CommandError, match="--workloads none .* takes no others"):
        command.options_from(parser.parse_args(["--workloads", "none", "groups"]))


def test_bench_names_a_missing_output_folder_before_measuring(tmp_path, capsys):
    require("tqdm")
    missing = tmp_path / "missing" / "results.json"
    assert cli.main(["bench", "--json", str(missing), "--sizes", "10", "--workloads",
                     "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [
        f"gpu-momentum bench: error: cannot write {str(missing)!r}: folder "
        f"{str(missing.parent)!r} does not exist"]


def test_a_save_into_a_missing_folder_names_the_users_path(tmp_path):
    opt = gm.MomentumSGD(np.zeros(3), lr=0.1)
    path = tmp_path / "missing" / "run.ckpt.npz"
    with pytest.raises(FileNotFoundError) as error:
        opt.save(path)
    assert error.value.filename == str(path) and str(path) in str(error.value)
    assert ".tmp" not in str(error.value)
    assert not (tmp_path / "missing").exists()


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_bf16_example_writes_into_the_current_folder_never_over_committed_files(tmp_path):
    require("ml_dtypes")
    require("matplotlib")
    committed = ROOT / "docs" / "bf16_training.png"
    before = _sha256(committed)
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "bf16_training.py"),
                           "--steps", "2"], cwd=tmp_path, env=library_env(),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "bf16_training.png").read_bytes().startswith(b"\x89PNG")
    assert _sha256(committed) == before
    assert not (ROOT / "examples" / "bf16_training.png").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["--output", "missing/plot.png"], "cannot write 'missing/plot.png': folder"),
    (["--steps", "0"], "argument --steps: invalid value '0'"),
])
def test_bf16_example_refuses_bad_arguments_before_training(tmp_path, argv, fragment):
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "bf16_training.py"),
                           *argv], cwd=tmp_path, env=library_env(), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert fragment in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []
