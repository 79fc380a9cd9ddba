"""The one directory that holds tensornets' on-disk caches (the wisdom file, the converted SmolLM2)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV", "cache_root"]

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
