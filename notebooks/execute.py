"""Execute the notebooks on a fresh kernel: ``make notebooks`` (full settings, outputs written back) and the tests.

``python notebooks/execute.py [NOTEBOOK ...]`` (default: every ``notebooks/*.ipynb``) runs each notebook top to
bottom with the full settings and writes it back in place with its outputs and figures. What a rerun would change
for no reason is left out, so that the diff of a rerun shows only changed results:

- no per-cell execution timestamps (``record_timing=False``) and no ``language_info`` from the kernel: the
  notebook's metadata is written back as it was read;
- figures are PNG at ``FIGURE_DPI`` (matplotlib's PNG metadata holds no date);
- the notebooks seed themselves, and the kernel runs one OpenMP thread unless ``OMP_NUM_THREADS`` is set (the
  summation order, hence the printed digits, depends on the thread count).

The notebook's ``metadata["tensornets"]["executed"]`` records the settings and :func:`code_digest` of the code
that produced the outputs; ``tests/notebooks`` checks that the committed code still has that digest, so outputs
can never silently describe other code (markdown edits do not invalidate them).

The tests use the same kernel and environment (:func:`kernel_environment`) with ``TENSORNETS_CI=1``, on an
in-memory copy whose outputs are cleared first (:func:`clear_outputs`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from ipykernel.kernelspec import write_kernel_spec
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parent
REPO = NOTEBOOK_DIR.parent
KERNEL_NAME = "tensornets-notebooks"
FIGURE_DPI = 80
# The kernel reads this from its IPython profile: inline figures as PNG at a modest resolution.
_KERNEL_CONFIG = f"""c.InlineBackend.figure_formats = {{"png"}}
c.InlineBackend.print_figure_kwargs = {{"bbox_inches": "tight", "dpi": {FIGURE_DPI}}}
"""


def code_digest(nb: nbformat.NotebookNode) -> str:
    """SHA-256 of the notebook's code cells' sources, in order (what decides the outputs; markdown does not)."""
    sources = [cell.source for cell in nb.cells if cell.cell_type == "code"]
    return hashlib.sha256(json.dumps(sources).encode()).hexdigest()


def clear_outputs(nb: nbformat.NotebookNode) -> None:
    """Drop every code cell's outputs, execution count and execution timestamps, in place."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
            cell.metadata.pop("execution", None)


def write_kernel_files(root: Path) -> None:
    """Under ``root``: a Jupyter data dir whose one kernelspec starts ``sys.executable``, and an IPython dir.

    The kernelspec is found through ``JUPYTER_PATH`` (set by :func:`kernel_environment`), before any user-level
    ``python3`` kernelspec that might point at another interpreter. The IPython dir holds no user profile or startup
    file, only the figure settings.
    """
    write_kernel_spec(root / "jupyter" / "kernels" / KERNEL_NAME, overrides={"display_name": "tensornets notebooks"})
    profile = root / "ipython" / "profile_default"
    profile.mkdir(parents=True, exist_ok=True)
    (profile / "ipython_kernel_config.py").write_text(_KERNEL_CONFIG)


def kernel_environment(root: Path, *, ci: bool, matplotlib_backend: str | None = None) -> dict[str, str]:
    """Environment variables the kernel must inherit (set them in this process before executing).

    ``root`` is the directory given to :func:`write_kernel_files`. ``ci=True`` sets ``TENSORNETS_CI=1``, which the
    notebooks read to pick smaller sizes and fewer repetitions (cells are never skipped).
    ``matplotlib_backend`` (e.g. ``"Agg"`` in tests, where figures are not kept) overrides the inline backend.
    """
    env = {
        "JUPYTER_PATH": os.pathsep.join(filter(None, [str(root / "jupyter"), os.environ.get("JUPYTER_PATH")])),
        "IPYTHONDIR": str(root / "ipython"),
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",  # silences the debugger's frozen-modules warning
        # transformers' "Loading weights" bars print a speed that changes every run (and nothing else)
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        # On a loaded 2-core machine, 2-thread OpenMP regions stall waiting for a descheduled thread:
        # notebook 01 took 250 s with 2 threads and 23 s with 1 (load average 11). One thread keeps
        # the runtime predictable and the printed digits reproducible; export OMP_NUM_THREADS to choose otherwise.
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    if ci:
        env["TENSORNETS_CI"] = "1"
    if matplotlib_backend is not None:
        env["MPLBACKEND"] = matplotlib_backend
    return env


def notebook_client(nb: nbformat.NotebookNode, path: Path, **kwargs: object) -> NotebookClient:
    """A client running ``nb`` on the :data:`KERNEL_NAME` kernel with ``path``'s directory as working directory."""
    return NotebookClient(
        nb, kernel_name=KERNEL_NAME, startup_timeout=120, resources={"metadata": {"path": str(path.parent)}}, **kwargs
    )


def execute_in_place(path: Path) -> float:
    """Run the notebook at ``path`` with the full settings and write it back with its outputs; returns seconds.

    The kernel environment must be set (see :func:`main`). The notebook is written only if every cell succeeded,
    and whole: edits made to the file while it runs are overwritten.
    """
    nb = nbformat.read(path, as_version=4)
    metadata = json.loads(json.dumps(nb.metadata))  # nbclient adds language_info; keep the committed metadata
    clear_outputs(nb)
    start = time.monotonic()
    code_cells = sum(cell.cell_type == "code" for cell in nb.cells)

    def progress(cell: nbformat.NotebookNode, **_: object) -> None:  # full runs take minutes: say where they are
        elapsed = time.monotonic() - start
        print(f"{path.name}: code cell {cell.execution_count}/{code_cells} done ({elapsed:.0f} s)", flush=True)

    notebook_client(nb, path, timeout=None, record_timing=False, on_cell_executed=progress).execute()
    elapsed = time.monotonic() - start
    metadata.setdefault("tensornets", {})["executed"] = {"settings": "full", "code_sha256": code_digest(nb)}
    nb.metadata = nbformat.from_dict(metadata)
    nbformat.validate(nb)
    path.write_text(nbformat.writes(nb) + "\n")
    return elapsed


def main(argv: list[str]) -> int:
    paths = [Path(p).resolve() for p in argv] or sorted(NOTEBOOK_DIR.glob("*.ipynb"))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"no such notebook: {', '.join(missing)}")
    with tempfile.TemporaryDirectory(prefix="tensornets-notebooks-") as tmp:
        write_kernel_files(Path(tmp))
        os.environ.update(kernel_environment(Path(tmp), ci=False))
        os.environ.pop("TENSORNETS_CI", None)  # full settings
        os.environ.pop("MPLBACKEND", None)  # the inline backend keeps the figures
        for path in paths:
            print(f"{path.name}: executing with the full settings ...", flush=True)
            print(f"{path.name}: written with outputs ({execute_in_place(path):.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
