"""Every ``notebooks/*.ipynb`` runs top to bottom on a fresh kernel.

How each notebook is executed:

- on an in-memory copy (the committed file is never written back), with ``nbclient``;
- in a kernel started from the interpreter that runs pytest (a kernelspec written to a temporary
  directory, so a user-level ``python3`` kernelspec pointing at another Python cannot be picked up);
- with ``TENSORNETS_CI=1``, which notebooks read to pick smaller sizes and fewer repetitions (cells
  are never skipped), matplotlib's ``Agg`` backend, the repository root on ``PYTHONPATH``, and one
  OpenMP thread unless ``OMP_NUM_THREADS`` is set (see :func:`kernel_env`);
- under a wall-clock limit per notebook: ``DEFAULT_TIMEOUT_S``, or the notebook's own
  ``metadata["tensornets"]["timeout_s"]``.

A new notebook needs no change here: it is found by the glob.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from nbclient import NotebookClient
from nbclient.exceptions import CellTimeoutError

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
DEFAULT_TIMEOUT_S = 300
KERNEL_NAME = "tensornets-pytest"
# Appended to the in-memory copy only: proves the kernel runs the interpreter running pytest.
PROBE = "import sys; print(sys.executable, end='')"


def _ids(path: Path) -> str:
    return path.name


@pytest.fixture(scope="session")
def kernels_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Jupyter data dir holding one kernelspec whose argv starts with ``sys.executable``."""
    root = tmp_path_factory.mktemp("jupyter")
    write_kernel_spec(root / "kernels" / KERNEL_NAME, overrides={"display_name": "tensornets tests"})
    return root


@pytest.fixture
def kernel_env(monkeypatch: pytest.MonkeyPatch, kernels_dir: Path, tmp_path: Path) -> None:
    """Environment the kernel inherits (the monkeypatch is undone after each test)."""
    monkeypatch.setenv("JUPYTER_PATH", str(kernels_dir))  # searched before the user's and the env's kernels
    monkeypatch.setenv("TENSORNETS_CI", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))  # no user profile or startup files
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # silences the debugger's frozen-modules warning
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    # On a loaded 2-core machine, 2-thread OpenMP regions stall waiting for a descheduled thread:
    # notebook 01 took 250 s with 2 threads and 23 s with 1 (load average 11). One thread keeps
    # the runtime predictable; export OMP_NUM_THREADS to choose otherwise.
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))


def _running_cell(nb: nbformat.NotebookNode) -> str:
    """Index and first line of the cell that had started but not finished (for timeout messages)."""
    for index, cell in enumerate(nb.cells):
        timing = cell.get("metadata", {}).get("execution", {})
        if "iopub.execute_input" in timing and "shell.execute_reply" not in timing:
            return f"cell {index}: {cell.source.splitlines()[0] if cell.source else ''!r}"
    return "unknown cell"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_notebook_runs(path: Path, kernel_env: None) -> None:
    nb = nbformat.read(path, as_version=4)
    timeout_s = float(nb.metadata.get("tensornets", {}).get("timeout_s", DEFAULT_TIMEOUT_S))
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    start = time.monotonic()
    client = NotebookClient(
        nb,
        kernel_name=KERNEL_NAME,
        # Each cell may use what is left of the notebook's budget, so the whole notebook is bounded.
        timeout_func=lambda cell: max(1, math.ceil(start + timeout_s - time.monotonic())),
        startup_timeout=120,
        record_timing=True,
        resources={"metadata": {"path": str(path.parent)}},
    )
    try:
        client.execute()
    except CellTimeoutError:
        pytest.fail(
            f"{path.name} did not finish within timeout_s={timeout_s:g} (stuck in {_running_cell(nb)}); "
            f"make it lighter when TENSORNETS_CI=1, or raise metadata['tensornets']['timeout_s'] in the notebook"
        )
    elapsed = time.monotonic() - start
    probe = "".join(out.get("text", "") for out in nb.cells[-1].outputs)
    assert Path(probe) == Path(sys.executable), f"{path.name} ran on {probe!r}, not on pytest's {sys.executable!r}"
    print(f"{path.name}: {elapsed:.1f} s")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_notebook_committed_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code" and (cell.outputs or cell.execution_count)]
    assert not dirty, (
        f"{path.name} has outputs in cells {dirty}; clear them before committing (Jupyter: "
        f"'Clear All Outputs', or `jupyter nbconvert --clear-output --inplace {path.relative_to(REPO)}`)"
    )
