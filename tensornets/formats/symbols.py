"""Index letters for generated einsum equations (ATen's einsum accepts only a-z and A-Z)."""

from __future__ import annotations

import string

_LETTERS = string.ascii_letters


def letters(count: int) -> str:
    """The first ``count`` distinct einsum index letters."""
    if count > len(_LETTERS):
        raise ValueError(f"an einsum over {count} indices exceeds the {len(_LETTERS)} letters torch.einsum accepts; use fewer modes")
    return _LETTERS[:count]
