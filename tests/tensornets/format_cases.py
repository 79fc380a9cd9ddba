"""Shared cases for the format conformance suite (imported by the test modules)."""

from __future__ import annotations

import pytest
import torch

# (format, from_dense kwargs fixing the modes) for a (48, 60) matrix: every format, small enough
# for gradcheck, with more than one mode per side where the format allows it.
FORMAT_CASES = [
    ("lowrank", {}),
    ("tucker", {}),
    ("tucker", {"num_cores": 2}),
    ("tt", {"num_cores": 2}),
    ("mpo", {"num_cores": 2}),
    ("mpo", {"num_cores": 3}),
    ("btt", {}),
    ("cp", {"num_cores": 1}),
    ("cp", {"num_cores": 2}),
]
#: formats fitted by ALS (no error bound): below this relative error their error is ALS's
#: convergence noise, so it may rise by that much from one rank to the next
ALS_ERROR_FLOOR = {"cp": 1e-6}
CASE_IDS = [f"{f}-{kw.get('num_cores', 'default')}" for f, kw in FORMAT_CASES]
OUT, IN = 48, 60


@pytest.fixture(params=FORMAT_CASES, ids=CASE_IDS)
def format_case(request):
    return request.param


def low_rank_plus_noise(out: int, inp: int, rank: int, noise: float, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """A matrix with a decaying spectrum, like a trained weight."""
    gen = torch.Generator().manual_seed(seed)
    U = torch.randn(out, rank, generator=gen, dtype=dtype)
    V = torch.randn(rank, inp, generator=gen, dtype=dtype)
    return U @ V / rank**0.5 + noise * torch.randn(out, inp, generator=gen, dtype=dtype)


def full_rank(fmt: str, kwargs: dict, out: int = OUT, inp: int = IN) -> int:
    """The largest rank the format accepts for these shapes (lossless)."""
    import tensornets

    cls = tensornets.get_format(fmt)
    in_modes, out_modes = cls.resolve_modes(inp, out, kwargs.get("num_cores"), kwargs.get("modes"))
    return max(cls.full_ranks(in_modes, out_modes))
