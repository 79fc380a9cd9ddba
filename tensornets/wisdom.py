"""Wisdom: measured plan choices remembered on disk, per machine and torch version (FFTW style).

``strategy="measure"`` (:mod:`tensornets.plans`) times each candidate plan of a layer once per
(format, shapes, batch bucket, device, dtype) and stores the winner here, so the next process on
the same machine skips the measurement.

File: ``wisdom.json`` in the cache directory (:func:`tensornets.cache_dir.cache_root`:
``$TENSORNETS_CACHE``, else ``$XDG_CACHE_HOME/tensornets``, i.e. ``~/.cache/tensornets``)::

    {"version": 1,
     "machines": {"<machine key>": {"<entry key>": {"plan": "split@2", "seconds": {"rebuild": 0.0021, ...}}}}}

- The machine key (:func:`machine_key`) holds the platform, CPU model, torch thread count and
  torch version: a measurement never travels to another machine, thread setting or torch.
- The entry key (:func:`entry_key`) holds the format, modes, ranks, batch bucket, device (with the
  GPU's name) and dtype, and whether forward + backward was measured (``|grad``: the plans of training).
- Writes are atomic (a temporary file in the same directory, then ``os.replace``): a crash or a
  concurrent reader never sees half a file. A writer holds a lock on the directory while it
  re-reads the file, adds its entry and replaces the file, so concurrent processes keep each
  other's entries.
- A file that cannot be read or parsed gives a warning and is ignored (it is replaced at the next
  write). A location that cannot be written (a read-only container, an unwritable home) gives one
  warning: measurements are then remembered by this process only.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from .cache_dir import CACHE_ENV, cache_root, exclusive_lock

__all__ = ["wisdom_path", "machine_key", "entry_key", "lookup", "record", "forget"]

VERSION = 1
_loaded: dict[Path, dict[str, Any]] = {}  # path -> parsed file, read once per process
_unwritable: set[Path] = set()  # files a write failed for (warned once)


def wisdom_path() -> Path:
    """Where the wisdom lives: ``$TENSORNETS_CACHE/wisdom.json``, default ``~/.cache/tensornets/wisdom.json``."""
    return cache_root() / "wisdom.json"


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere); part of the wisdom key."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown-cpu"


def machine_key() -> str:
    """``"<system>-<arch>|<CPU model>|threads=<n>|torch=<version>"`` for this process."""
    return f"{platform.system()}-{platform.machine()}|{cpu_model()}|threads={torch.get_num_threads()}|torch={torch.__version__}"


def entry_key(
    format_name: str,
    out_modes: tuple[int, ...],
    in_modes: tuple[int, ...],
    ranks: tuple[int, ...],
    bucket: int,
    device: torch.device,
    dtype: torch.dtype,
    grad: bool = False,
) -> str:
    """The key of one measurement: format, shapes, batch bucket, device (GPU name included) and dtype, and
    ``|grad`` for a measurement of forward + backward (the plans of training)."""
    dev = device.type
    if device.type == "cuda":
        dev = f"cuda:{torch.cuda.get_device_name(device)}"
    key = f"{format_name}|out={list(out_modes)}|in={list(in_modes)}|ranks={list(ranks)}|B={bucket}|{dev}|{str(dtype).removeprefix('torch.')}"
    return key + "|grad" if grad else key


def _read(path: Path, warn: bool = True) -> dict[str, Any]:
    """The parsed file, from memory after the first read; an unreadable file reads as empty (``warn``: say so)."""
    if path in _loaded:
        return _loaded[path]
    data: dict[str, Any] = {"version": VERSION, "machines": {}}
    try:  # exists() inside: it raises PermissionError for a file in a directory this user cannot search
        if path.exists():
            parsed = json.loads(path.read_text())
            if not (isinstance(parsed, dict) and parsed.get("version") == VERSION and isinstance(parsed.get("machines"), dict)
                    and all(isinstance(entries, dict) for entries in parsed["machines"].values())):
                raise ValueError(f"expected {{'version': {VERSION}, 'machines': {{machine: {{entry: {{...}}}}}}}}")
            data = parsed
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested thousands deep
        if warn:
            warnings.warn(
                f"tensornets wisdom file {path} is unreadable ({exc}); ignoring it (it is rewritten at the next "
                f"measurement). Delete it or set TENSORNETS_CACHE to another directory to silence this.",
                RuntimeWarning,
                stacklevel=3,
            )
    _loaded[path] = data
    return data


def lookup(key: str) -> dict[str, Any] | None:
    """The stored measurement for ``key`` on this machine (``{"plan": label, "seconds": {...}}``), or None."""
    entry = _read(wisdom_path())["machines"].get(machine_key(), {}).get(key)
    return entry if isinstance(entry, dict) and isinstance(entry.get("plan"), str) else None


def record(key: str, plan: str, seconds: dict[str, float]) -> None:
    """Store that ``plan`` won the measurement ``key`` (``seconds``: time per candidate) and write the file atomically.

    Under the directory lock the file is read again first: entries other processes recorded since this
    one last read it are kept.
    """
    path = wisdom_path()
    entry = {"plan": plan, "seconds": seconds}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(path.parent) as locked:
            # Read again (other processes may have written since); warn only if this process has not read it yet.
            read_before = _loaded.pop(path, None) is not None
            data = _read(path, warn=not read_before)
            data["machines"].setdefault(machine_key(), {})[key] = entry
            _write(path, data)
            if locked:  # no writer is mid-write: a temporary file left is a killed writer's
                for stale in path.parent.glob(".wisdom-*.json"):
                    stale.unlink(missing_ok=True)
    except OSError as exc:
        # A measurement must not fail a forward: keep it for this process, say once that it is not saved.
        _read(path, warn=False)["machines"].setdefault(machine_key(), {})[key] = entry
        if path not in _unwritable:
            _unwritable.add(path)
            warnings.warn(f"tensornets cannot write its wisdom file {path} ({exc}); measured plans are remembered by "
                          f"this process only. Set {CACHE_ENV} to a writable directory to keep them.", RuntimeWarning,
                          stacklevel=3)


def _write(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` with ``data`` atomically (a temporary file in its directory, then ``os.replace``)."""
    fd, tmp = tempfile.mkstemp(prefix=".wisdom-", suffix=".json", dir=path.parent)
    try:
        # mkstemp creates the file 0600; give it the mode any new file gets (0666 less the umask), so that a cache
        # directory shared by several users stays readable to them
        if hasattr(os, "fchmod"):  # POSIX only
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def forget() -> None:
    """Drop what this process has read (the next lookup reads the file again); the file is untouched."""
    _loaded.clear()
    _unwritable.clear()
