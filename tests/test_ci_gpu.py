""".ci/gpu, the one device call that checks every GPU claim, without a GPU: valid bash,
its phases in the required order with time boxes that fit the 8-minute call, the summary
it writes, and how a phase's ending is told (passed, failed, timed out)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness import missing_tool

SCRIPT = Path(__file__).resolve().parent.parent / ".ci" / "gpu"
CALL_LIMIT_S = 8 * 60
PHASE = re.compile(r"^phase\s+(\S+)\s+(\d+)\s", re.MULTILINE)
# Each phase's name starts with one of these, in this order (set-up first, then what never
# ran on hardware, then the GPU-marked tests, then the benchmark).
ORDER = ("wheels", "install", "machine", "hardware-first", "overhead-rows", "gpu-tests",
         "benchmark")


def _bash():
    path = shutil.which("bash")
    if path is None:
        missing_tool("bash is not installed")
    return path


def _phases():
    return [(name, int(seconds)) for name, seconds in PHASE.findall(SCRIPT.read_text())]


def test_the_script_is_valid_bash():
    done = subprocess.run([_bash(), "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_phases_run_in_order_and_their_time_boxes_fit_one_call():
    phases = _phases()
    names = [name for name, _ in phases]
    ranks = [next(i for i, start in enumerate(ORDER) if name.startswith(start))
             for name in names]
    assert ranks == sorted(ranks), names
    assert set(ranks) == set(range(len(ORDER))), f"a phase is missing: {names}"
    assert len(set(names)) == len(names)
    total = sum(seconds for _, seconds in phases)
    # `timeout -k GRACE` lets a phase that ignores the signal run GRACE s past its box.
    grace = int(re.search(r"timeout -k (\d+) ", SCRIPT.read_text())[1])
    assert total + grace * len(phases) <= CALL_LIMIT_S, (total, phases)
    budget = int(re.search(r"^BUDGET_S=(\d+)$", SCRIPT.read_text(), re.MULTILINE)[1])
    assert total <= budget <= CALL_LIMIT_S


def test_hardware_first_tests_run_before_the_other_gpu_tests():
    text = SCRIPT.read_text()
    first = text.index("-m hardware_first")
    assert first < text.index('-m "gpu and not hardware_first"')
    assert "--workloads overhead" in text[first:text.index("phase gpu-tests")]


def test_a_dry_run_writes_a_summary_of_every_phase(tmp_path):
    done = subprocess.run([_bash(), str(SCRIPT), str(tmp_path)], capture_output=True,
                          text=True, timeout=60, env={"GPU_CI_DRY_RUN": "1",
                                                      "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    lines = (tmp_path / "summary.txt").read_text().splitlines()
    assert re.fullmatch(r"bash \.ci/gpu: \d+ s of a 480 s budget", lines[0])
    assert [line.split()[0] for line in lines[1:]] == [name for name, _ in _phases()]
    assert all("not run (dry run)" in line for line in lines[1:])


@pytest.mark.parametrize("command, status", [
    ("true", "passed"), ("false", "failed (exit status 1)"), ("sleep 5", "timed out")])
def test_a_phase_records_how_it_ended(tmp_path, command, status):
    """The script's own phase function, run on a stand-in command with a 1 s box."""
    text = SCRIPT.read_text()
    function = re.search(r"^phase\(\) \{\n.*?^\}\n", text, re.MULTILINE | re.DOTALL)[0]
    summary = tmp_path / "summary.txt"
    script = f"summary={summary}\n{function}\nphase stand-in 1 {command}\n"
    done = subprocess.run([_bash(), "-c", script], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    line = (tmp_path / "summary.txt.phases").read_text()
    assert re.fullmatch(rf"stand-in\s+{re.escape(status)}\s+\d+ s of +1 s\n", line), line
