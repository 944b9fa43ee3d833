"""Every Python block of README.md and docs/*.md runs, and the README's first example prints
what the plain Python loop prints.

A block that needs a GPU is marked in the markdown with `<!-- gpu -->` on the line before
it, and is skipped with that reason where no GPU is. Blocks that import torch or ml_dtypes
skip naming the package where it is missing, and fail under CI=true (harness.require).
Blocks for MPI jobs (they import mpi4py) run under mpiexec in tests/test_distributed.py.
"""

import contextlib
import dataclasses
import io
import pathlib
import re

import pytest

from cuda_driver import cuda_device_count
from harness import require

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
GPU_MARK = "<!-- gpu -->"
# The packages a block may need, found by its imports; GPU packages need the mark.
OPTIONAL_PACKAGES = ("torch", "ml_dtypes")
GPU_PACKAGES = ("cupy", "numba.cuda")


@dataclasses.dataclass(frozen=True)
class Block:
    page: pathlib.Path
    line: int  # of the opening ```python
    code: str
    marked_gpu: bool

    @property
    def name(self):
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    def imports(self, package):
        return re.search(rf"^\s*(import|from)\s+{re.escape(package)}\b", self.code, re.M)


def blocks(page):
    """The ```python blocks of one markdown page, in order."""
    text = page.read_text()
    found = []
    for match in re.finditer(r"```python\n(.*?)```", text, re.S):
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        found.append(Block(page, text.count("\n", 0, match.start()) + 1, match.group(1),
                           before == GPU_MARK))
    return found


ALL_BLOCKS = [block for page in PAGES for block in blocks(page)]
README_BLOCKS = [block.code for block in blocks(README)]
# The README's examples that run in this process: the plain loop first, then the library.
EXAMPLES = [code for code in README_BLOCKS if "mpi4py" not in code]
# The same MPI example may stand on several pages; tests/test_distributed.py runs it.
MPI_EXAMPLES = list(dict.fromkeys(block.code for block in ALL_BLOCKS
                                  if block.imports("mpi4py")))
IN_PROCESS = [block for block in ALL_BLOCKS if not block.imports("mpi4py")]


def _printed(code, filename="README.md"):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, filename, "exec"), {})
    return out.getvalue()


def test_x_squared_example_prints_what_the_plain_loop_prints():
    plain, library = EXAMPLES[0], EXAMPLES[1]
    assert "gpu_momentum" not in plain and "MomentumSGD" in library
    expected = _printed(plain)
    assert len(expected.splitlines()) == 10
    assert _printed(library) == expected


@pytest.mark.parametrize("block", [
    pytest.param(block, id=block.name, marks=[pytest.mark.gpu] if block.marked_gpu else [])
    for block in IN_PROCESS])
def test_every_example_runs(block, tmp_path, monkeypatch):
    if block.marked_gpu:
        if cuda_device_count() == 0:
            pytest.skip(f"{block.name} needs a GPU ({GPU_MARK}) and the CUDA driver reports "
                        f"none")
        require("cupy")
    for package in OPTIONAL_PACKAGES:
        if block.imports(package):
            require(package)
    monkeypatch.chdir(tmp_path)  # examples may write files
    _printed(block.code, str(block.page))


def test_every_block_that_needs_a_gpu_is_marked():
    unmarked = [block.name for block in ALL_BLOCKS
                if any(block.imports(package) for package in GPU_PACKAGES)
                and not block.marked_gpu]
    assert not unmarked, f"mark these with {GPU_MARK} on the line before: {unmarked}"


def test_every_page_holds_python_blocks_and_the_mpi_example_is_one():
    assert len(PAGES) >= 9  # the README and the reference pages
    assert len(EXAMPLES) >= 4 and len(IN_PROCESS) > len(EXAMPLES)
    assert len(MPI_EXAMPLES) == 1, "MPI examples differ between pages: keep one"


def test_the_readme_test_command_is_what_ci_runs():
    command = ("python3 -m venv .venv && . .venv/bin/activate && pip install -r "
               "requirements-test.txt && python -m pytest")
    assert f"    {command}\n" in README.read_text()
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_the_readme_stays_an_onboarding():
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in text, f"the README links no {page.name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_relative_links_resolve(page):
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
        assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
