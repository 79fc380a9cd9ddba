"""The packaged models and text (SmolLM2, MiniLM, the stdlib docs), re-exported from :mod:`tensornets.models`.

They live in the core so that ``adapters`` loads them without importing ``compress``; these names keep
``from compress.models import load_smollm2, token_slices`` working. See :mod:`tensornets.models`.
"""

from tensornets.models import (
    SMOLLM2_CACHE_ENV,
    default_cache_dir,
    load_gguf,
    load_minilm,
    load_smollm2,
    pydoc_text,
    smollm2_directory,
    special_tokens_added,
    token_slices,
)

__all__ = [
    "SMOLLM2_CACHE_ENV",
    "default_cache_dir",
    "load_gguf",
    "load_minilm",
    "load_smollm2",
    "pydoc_text",
    "smollm2_directory",
    "special_tokens_added",
    "token_slices",
]
