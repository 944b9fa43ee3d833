"""The command line: `gpu-momentum demo` runs end to end on the best backend present."""

import re
import subprocess
import sys

from harness import library_env
from test_readme import EXAMPLES, _printed


def test_demo_prints_the_example_and_a_throughput():
    out = subprocess.run([sys.executable, "-m", "gpu_momentum", "demo", "--steps", "2"],
                         env=library_env(), check=True, capture_output=True,
                         text=True).stdout
    assert _printed(EXAMPLES[0]) in out
    chosen, best = re.search(r"backend '(\S+)' \(available: \['(\S+?)'", out).groups()
    assert chosen == best
    assert "25,557,032 float32 elements" in out and "GB/s" in out
