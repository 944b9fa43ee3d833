"""`one_thread`: an autouse, module-scoped fixture that runs torch and Numba on one thread
each while a module's tests run. Imported by the torch test modules whose models are tiny:
on a small shared machine the idle workers of one OpenMP runtime, spinning after a
parallel region, slow the other's work down tenfold or more (slower, never wrong:
README, With PyTorch)."""

import numba
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    yield
    torch.set_num_threads(threads[0])
    numba.set_num_threads(threads[1])
