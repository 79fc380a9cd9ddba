"""Real models shared by the compression tests, loaded once per test session.

The session-scoped models are shared: a test that modifies weights or swaps layers must
work on ``smollm2_copy`` (a deep copy per test, ~0.5 s) so later tests see the dense model.
"""

from __future__ import annotations

import copy

import pytest

from compress.models import load_minilm, load_smollm2


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct, float32, eval mode. Read-only.

    Uses the default cache (``$TENSORNETS_CACHE`` or ``~/.cache/tensornets``): the first
    session on a machine converts the GGUF (~25 s), later ones load in ~2.5 s.
    """
    return load_smollm2()


@pytest.fixture
def smollm2_copy(smollm2):
    """``(model, tokenizer)`` with a private deep copy of the model, safe to modify."""
    model, tokenizer = smollm2
    return copy.deepcopy(model), tokenizer


@pytest.fixture(scope="session")
def minilm():
    """``(model, tokenizer)`` of the all-MiniLM-L6-v2 BERT encoder, float32, eval mode. Read-only."""
    return load_minilm()
