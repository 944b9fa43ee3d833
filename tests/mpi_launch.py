"""Starting `mpiexec -n N python -m mpi4py SCRIPT ...` from a test.

- mpiexec is the one next to the interpreter (the mpich wheel's, in the venv's bin/),
  else the one on PATH. Where it or mpi4py is missing: a skip with the reason, a failure
  in CI (harness.missing_tool).
- `python -m mpi4py` makes an uncaught exception on one rank call MPI_Abort: the job ends
  at once instead of the other ranks waiting in a collective.
- The ranks get the library's environment (harness.library_env: no CUDA simulator), one
  Numba and one OpenMP thread each (N ranks share this machine's cores) and the test
  session's NUMBA_CACHE_DIR, so kernels compiled once are loaded by every rank after.
- Past the timeout: SIGTERM to mpiexec (hydra forwards it and reaps its ranks), then
  SIGKILL; the test fails with the job's output.
"""

import functools
import os
import shutil
import signal
import subprocess
import sys

from harness import library_env, missing_tool

HERE = os.path.dirname(os.path.abspath(__file__))


def find_mpiexec():
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.access(beside, os.X_OK) else shutil.which("mpiexec")


@functools.cache
def mpi_unavailable_reason():
    """None when mpiexec and mpi4py work here, else why not (probed in a child process:
    this one never initialises MPI)."""
    if find_mpiexec() is None:
        return ("no mpiexec next to the interpreter or on PATH (pip install "
                "\"gpu-momentum[mpi]\" brings the mpich wheel's)")
    probe = subprocess.run([sys.executable, "-c", "from mpi4py import MPI"],
                           capture_output=True, text=True, timeout=120, env=library_env())
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return f"mpi4py cannot load an MPI library ({last})"
    return None


def require_mpi():
    reason = mpi_unavailable_reason()
    if reason is not None:
        missing_tool(reason)


def rank_env(**extra):
    env = library_env()
    env.update(NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               **extra)
    return env


def run_mpi(ranks, script, *args, timeout=300, env=None, cwd=None):
    """Runs `script` (a path, or a name in tests/) on `ranks` ranks; returns the
    CompletedProcess, or fails the test with the job's output when it exits nonzero or
    runs past `timeout`."""
    command = [find_mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpi4py",
               os.path.join(HERE, script), *map(str, args)]
    return run_command(command, timeout, env, cwd)


def run_command(command, timeout=300, env=None, cwd=None):
    """Runs `command` (an mpiexec job, or what starts one) as run_mpi does."""
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=env or rank_env(), cwd=cwd)
    try:
        out, err = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        job.send_signal(signal.SIGTERM)
        try:
            out, err = job.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            job.kill()
            out, err = job.communicate()
        raise AssertionError(f"{' '.join(command)} ran past {timeout} s\n--- stdout\n"
                             f"{out[-4000:]}\n--- stderr\n{err[-4000:]}") from None
    if job.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {job.returncode}\n--- stdout\n"
                             f"{out[-4000:]}\n--- stderr\n{err[-6000:]}")
    return subprocess.CompletedProcess(command, job.returncode, out, err)
