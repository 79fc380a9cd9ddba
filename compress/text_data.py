"""Read a user's calibration or evaluation text from local files with ``datasets``' packaged loaders (never the hub).

Accepted: a text file (``.txt``, ``.text``, ``.md``: one document per file, newlines kept), a JSON Lines / JSON file
(``.jsonl``, ``.json``) or a Parquet file (``.parquet``) with a text column, or a directory holding any of them
(searched recursively, files in sorted path order). The text column is ``"text"`` when present, else the only
string column. Every error names the command-line flag the path came from.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

__all__ = ["DATA_SUFFIXES", "load_texts"]

#: file suffix -> the ``datasets`` packaged builder that reads it
DATA_SUFFIXES = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json",
                 ".parquet": "parquet"}


def _files(path: Path, flag: str) -> list[Path]:
    if path.is_file():
        if path.suffix.lower() not in DATA_SUFFIXES:
            raise ValueError(f"{flag} {str(path)!r}: unsupported file type {path.suffix!r}; pass a "
                             f"{', '.join(DATA_SUFFIXES)} file or a directory of them")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        found = [p for p in files if p.suffix.lower() in DATA_SUFFIXES]
        if not found:
            raise ValueError(f"{flag} {str(path)!r}: the directory holds no {', '.join(DATA_SUFFIXES)} file")
        # hidden files of other types (.DS_Store, .gitignore) are not worth a word
        skipped = [p for p in files if p.suffix.lower() not in DATA_SUFFIXES and not p.name.startswith(".")]
        if skipped:
            warnings.warn(f"{flag} {str(path)!r}: {len(skipped)} file(s) of other types are not read (e.g. "
                          f"{[str(p.relative_to(path)) for p in skipped[:3]]}); readable: {', '.join(DATA_SUFFIXES)}",
                          UserWarning, stacklevel=3)
        return found
    raise ValueError(f"{flag} {str(path)!r}: no such file or directory")


def _column(dataset, file: Path, flag: str) -> str:
    from datasets import Value

    if "text" in dataset.column_names:
        return "text"
    strings = [n for n, f in dataset.features.items() if isinstance(f, Value) and f.dtype in ("string", "large_string")]
    if len(strings) == 1:
        return strings[0]
    raise ValueError(f"{flag} {str(file)!r}: no text column (columns: {dataset.column_names}); store the text in a "
                     "column named 'text'")


def _documents(files: list[Path], builder: str, flag: str) -> list[str]:
    """The non-empty documents of ``files`` (all read by ``builder``), read in one ``load_dataset`` call.

    The error names ``files[0]``: :func:`load_texts` passes several files only where it retries them one by one,
    and it is for that retry that ``datasets``' own error log is silenced while several files are read.
    """
    from datasets import load_dataset
    from datasets.utils import logging as datasets_logging

    file = files[0]
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    verbosity = datasets_logging.get_verbosity()
    if len(files) > 1:
        datasets_logging.set_verbosity(datasets_logging.CRITICAL)
    try:
        dataset = load_dataset(builder, data_files=[str(f) for f in files], split="train", **kwargs)
    except Exception as err:  # noqa: BLE001 - any parse failure: report it against the flag
        raise ValueError(f"{flag} {str(file)!r}: could not be read as {builder} ({type(err).__name__}: "
                         f"{err})") from None
    finally:
        datasets_logging.set_verbosity(verbosity)
    if dataset.num_rows == 0:
        return []
    column = _column(dataset, file, flag)
    values = dataset[column]
    if not any(isinstance(t, str) for t in values) and any(t is not None for t in values):
        kind = type(next(t for t in values if t is not None)).__name__
        raise ValueError(f"{flag} {str(file)!r}: column {column!r} holds no strings ({kind} values); store "
                         "the documents as text")
    return [t for t in values if isinstance(t, str) and t.strip()]


def _runs(files: list[Path]) -> list[tuple[str, list[Path]]]:
    """Consecutive files of one ``datasets`` builder, in order, empty files left out (they hold no text, and
    ``datasets``' json reader fails on them)."""
    runs: list[tuple[str, list[Path]]] = []
    for file in files:
        if file.stat().st_size == 0:
            continue
        builder = DATA_SUFFIXES[file.suffix.lower()]
        if runs and runs[-1][0] == builder:
            runs[-1][1].append(file)
        else:
            runs.append((builder, [file]))
    return runs


def load_texts(path: str | os.PathLike, flag: str = "--calib-data") -> list[str]:
    """The documents of ``path``, in file order, then row order: one string per text file or per row.

    Consecutive files of one type are read in one ``load_dataset`` call, since each call has a fixed cost of a
    fraction of a second that a directory of many small files would pay per file. Where such a call fails (files whose columns differ, a file that
    does not parse), the files are read one by one, so each keeps its own text column and an error names its file.

    Parameters:
        path: a ``.txt`` / ``.text`` / ``.md``, ``.jsonl`` / ``.json`` or ``.parquet`` file, or a directory of them.
        flag: the command-line flag (or argument name) ``path`` came from, quoted in every error.

    Returns:
        The non-empty documents (empty strings and nulls dropped).

    Raises:
        ValueError: unsupported file type, missing path, a JSON / Parquet file without a text column, or no text
            at all.
    """
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

    files = _files(Path(path).expanduser(), flag)
    texts: list[str] = []
    bars = is_progress_bar_enabled()
    disable_progress_bar()
    try:
        for builder, run in _runs(files):
            try:
                texts.extend(_documents(run, builder, flag))
            except ValueError:
                if len(run) == 1:
                    raise
                for file in run:
                    texts.extend(_documents([file], builder, flag))
    finally:
        if bars:
            enable_progress_bar()
    if not texts:
        raise ValueError(f"{flag} {str(path)!r}: holds no text (every document is empty); pass a file with text")
    return texts
