"""The command line: `gpu-momentum demo` runs end to end on the best backend present."""

import subprocess
import sys

import gpu_momentum as gm
from test_readme import EXAMPLES, _printed


def test_demo_prints_the_example_and_a_throughput():
    out = subprocess.run([sys.executable, "-m", "gpu_momentum", "demo", "--steps", "2"],
                         check=True, capture_output=True, text=True).stdout
    assert _printed(EXAMPLES[0]) in out
    assert f"backend {gm.available_backends()[0]!r}" in out
    assert "25,557,032 float32 elements" in out and "GB/s" in out
