"""Every ``notebooks/*.ipynb`` runs top to bottom on a fresh kernel, and is committed executed.

How each notebook is executed here:

- on an in-memory copy of the committed file, its outputs cleared first (the file is never written back), with
  ``nbclient``;
- on the kernel and environment of ``make notebooks`` (``notebooks/execute.py``): a kernelspec starting the
  interpreter that runs pytest, an IPython dir holding only the figure settings, the repository root on
  ``PYTHONPATH``, one OpenMP thread unless ``OMP_NUM_THREADS`` is set; plus ``TENSORNETS_CI=1``, which notebooks
  read to pick smaller sizes and fewer repetitions (cells are never skipped), and matplotlib's ``Agg`` backend (no
  figures are kept);
- under a wall-clock limit per notebook: ``DEFAULT_TIMEOUT_S``, or the notebook's own
  ``metadata["tensornets"]["timeout_s"]``.

The committed files hold the outputs of ``make notebooks`` (full settings); :func:`test_notebook_committed_executed`
checks that they are complete and that the code that produced them is the committed code.

A new notebook needs no change here: it is found by the glob.
"""

from __future__ import annotations

import base64
import importlib.util
import math
import struct
import sys
import time
from pathlib import Path
from types import ModuleType

import nbformat
import pytest
from nbclient.exceptions import CellTimeoutError

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
DEFAULT_TIMEOUT_S = 300
# Appended to the in-memory copy only: proves the kernel runs the interpreter running pytest.
PROBE = "import sys; print(sys.executable, end='')"


def _load_runner() -> ModuleType:
    """``notebooks/execute.py``, the runner of ``make notebooks`` (a script, not an installed module)."""
    spec = importlib.util.spec_from_file_location("notebooks_execute", REPO / "notebooks" / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


runner = _load_runner()


def _ids(path: Path) -> str:
    return path.name


@pytest.fixture(scope="session")
def kernel_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The kernelspec and IPython dir of :func:`runner.write_kernel_files`, once per session."""
    root = tmp_path_factory.mktemp("kernel")
    runner.write_kernel_files(root)
    return root


@pytest.fixture
def kernel_env(monkeypatch: pytest.MonkeyPatch, kernel_root: Path) -> None:
    """Environment the kernel inherits (the monkeypatch is undone after each test)."""
    for key, value in runner.kernel_environment(kernel_root, ci=True, matplotlib_backend="Agg").items():
        monkeypatch.setenv(key, value)


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
    runner.clear_outputs(nb)
    timeout_s = float(nb.metadata.get("tensornets", {}).get("timeout_s", DEFAULT_TIMEOUT_S))
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    start = time.monotonic()
    client = runner.notebook_client(
        nb,
        path,
        # Each cell may use what is left of the notebook's budget, so the whole notebook is bounded.
        timeout_func=lambda cell: max(1, math.ceil(start + timeout_s - time.monotonic())),
        record_timing=True,  # for the timeout message (_running_cell)
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


def _assert_executed(path: Path) -> None:
    """``path`` holds one complete run of its own code cells, as ``make notebooks`` writes it."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    rerun = f"rerun `make notebooks` (or `python notebooks/execute.py {path}`) and commit the result"
    executed = nb.metadata.get("tensornets", {}).get("executed")
    assert executed is not None, f"{path.name} was not written by `make notebooks`: {rerun}"
    assert executed["code_sha256"] == runner.code_digest(nb), (
        f"{path.name}: the code cells changed since the outputs were produced; {rerun}"
    )
    code = [cell for cell in nb.cells if cell.cell_type == "code" and cell.source.strip()]  # nbclient skips empty ones
    counts = [cell.execution_count for cell in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{path.name}: execution counts {counts} are not one top-to-bottom run on a fresh kernel; {rerun}"
    )
    errors = [i for i, cell in enumerate(nb.cells) if any(o.output_type == "error" for o in cell.get("outputs", []))]
    assert not errors, f"{path.name}: cells {errors} hold errors; fix them and {rerun}"
    timed = [i for i, cell in enumerate(nb.cells) if "execution" in cell.metadata]
    assert not timed, f"{path.name}: cells {timed} hold execution timestamps (every rerun would change them); {rerun}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_notebook_committed_executed(path: Path) -> None:
    _assert_executed(path)


def test_make_notebooks_writes_outputs_and_figures(
    tmp_path: Path, kernel_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``execute_in_place`` on a small notebook: outputs and a PNG figure written back, the committed metadata
    kept, full settings (``TENSORNETS_CI`` unset in the kernel), the result passes the committed-file check, and
    a rerun writes the same bytes (no timestamps, a reproducible PNG)."""
    for key, value in runner.kernel_environment(kernel_root, ci=False).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("TENSORNETS_CI", raising=False)  # as main leaves it
    monkeypatch.delenv("MPLBACKEND", raising=False)
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}})
    nb.cells = [
        nbformat.v4.new_markdown_cell("# tiny"),
        nbformat.v4.new_code_cell("import os\nprint(os.environ.get('TENSORNETS_CI') == '1')"),
        nbformat.v4.new_code_cell("import matplotlib.pyplot as plt\nplt.plot([0, 1], [1, 0]);"),
    ]
    path = tmp_path / "tiny.ipynb"
    path.write_text(nbformat.writes(nb))
    runner.execute_in_place(path)
    _assert_executed(path)
    first = path.read_bytes()
    runner.execute_in_place(path)
    assert path.read_bytes() == first, "a rerun changed the notebook"
    done = nbformat.read(path, as_version=4)
    assert done.cells[1].outputs[0].text == "False\n"
    png = [base64.b64decode(o.data["image/png"]) for o in done.cells[2].outputs if "image/png" in o.get("data", {})]
    assert len(png) == 1, "the figure is written as one PNG"
    width, height = struct.unpack(">II", png[0][16:24])  # the PNG header's IHDR chunk
    assert width <= 6.4 * runner.FIGURE_DPI and height <= 4.8 * runner.FIGURE_DPI, "6.4x4.8 in at FIGURE_DPI"
    assert done.metadata.kernelspec == nb.metadata.kernelspec and "language_info" not in done.metadata
