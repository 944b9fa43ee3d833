"""The README's examples run, and the first one prints what the plain Python loop prints."""

import contextlib
import io
import pathlib
import re

README = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
# Examples for MPI jobs run under mpiexec (tests/test_distributed.py), not in this process.
EXAMPLES = [code for code in BLOCKS if "mpi4py" not in code]
MPI_EXAMPLES = [code for code in BLOCKS if "mpi4py" in code]


def _printed(code):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    return out.getvalue()


def test_x_squared_example_prints_what_the_plain_loop_prints():
    plain, library = EXAMPLES[0], EXAMPLES[1]
    assert "gpu_momentum" not in plain and "MomentumSGD" in library
    expected = _printed(plain)
    assert len(expected.splitlines()) == 10
    assert _printed(library) == expected


def test_every_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples may write files
    for code in EXAMPLES:
        _printed(code)
