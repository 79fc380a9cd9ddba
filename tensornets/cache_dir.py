"""The one directory that holds tensornets' on-disk caches (the wisdom file, the converted SmolLM2)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX (Windows): writers go on without the lock
    fcntl = None

__all__ = ["CACHE_ENV", "cache_root", "exclusive_lock"]

#: Environment variable naming the cache directory.
CACHE_ENV = "TENSORNETS_CACHE"


def cache_root() -> Path:
    """``$TENSORNETS_CACHE`` if set, else ``$XDG_CACHE_HOME/tensornets`` (default ``~/.cache/tensornets``).

    A directory: :func:`tensornets.wisdom.wisdom_path` is ``<root>/wisdom.json`` and
    :func:`tensornets.models.default_cache_dir` is ``<root>/smollm2-135m``, so one setting moves both.
    """
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "tensornets"


@contextlib.contextmanager
def exclusive_lock(directory: Path) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``directory`` itself (created if missing; no lock file is left behind).

    Serializes the processes that write a cache in ``directory`` (two pytest workers, two jobs on one machine);
    the kernel drops the lock if the holder dies. Yields ``True`` while the lock is held, or ``False`` where the
    directory cannot be created or opened (a read-only location, where no cache can be written either) or the
    platform has no ``flock``, and the caller goes on without a lock.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        yield False
        return
    if fcntl is None:
        os.close(fd)
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)  # releases the lock
