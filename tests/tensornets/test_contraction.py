"""Contraction plans: planned once, cached, no path search in the forward, cheaper strategy chosen."""

from __future__ import annotations

import opt_einsum
import pytest
import torch

import tensornets
from tensornets.contraction import batch_bucket, clear_plan_cache, plan_cache_info, plan_contraction
from format_cases import IN, OUT, low_rank_plus_noise


def _fresh_mpo(rank: int = 4, size: int = 256, num_cores: int = 4):
    W = low_rank_plus_noise(size, size, 8, 0.1, dtype=torch.float32)
    return tensornets.decompose(W, "mpo", rank=rank, num_cores=num_cores)


def test_plan_is_made_once_then_hit():
    clear_plan_cache()
    mpo = _fresh_mpo()
    x = torch.randn(3, 256)
    mpo(x)
    misses = plan_cache_info().misses
    for _ in range(5):
        mpo(x)
    assert plan_cache_info().misses == misses
    # a second layer of the same structure reuses the process-wide plan
    _fresh_mpo()(x)
    assert plan_cache_info().misses == misses


def test_forward_never_searches_a_path(monkeypatch, format_case):
    fmt, kw = format_case
    fact = tensornets.decompose(low_rank_plus_noise(OUT, IN, 6, 0.3), fmt, rank=3, **kw)
    x = torch.randn(5, IN, dtype=torch.float64)
    expected = fact(x)  # plans for this bucket

    def no_search(*args, **kwargs):
        raise AssertionError("path search in the forward pass")

    monkeypatch.setattr(opt_einsum, "contract_path", no_search)
    monkeypatch.setattr(torch.backends.opt_einsum, "enabled", False)  # torch.einsum would otherwise search
    torch.testing.assert_close(fact(x), expected)
    fact(x[:4] if batch_bucket(4) == batch_bucket(5) else x).sum().backward()  # backward searches nothing either


def test_ragged_batches_share_buckets():
    assert [batch_bucket(b) for b in (1, 2, 3, 4, 5, 8, 9, 513)] == [1, 2, 4, 4, 8, 8, 16, 1024]
    with pytest.raises(ValueError, match="batch must be >= 1"):
        batch_bucket(0)


def test_switching_batch_size_picks_the_cheaper_strategy(monkeypatch):
    # a high-rank low-rank map: two skinny GEMMs cost more per row than one dense GEMM
    W = low_rank_plus_noise(256, 256, 8, 0.1, dtype=torch.float32)
    fact = tensornets.decompose(W, "lowrank", rank=200)
    small, large = 1, 4096
    assert fact._strategy_costs(small)["contract"][0] < fact._strategy_costs(small)["rebuild"][0]
    assert fact._strategy_costs(large)["contract"][0] > fact._strategy_costs(large)["rebuild"][0]
    assert not fact.uses_rebuild(small) and fact.uses_rebuild(large)

    calls = {"dense": 0, "contract": 0}
    dense, contract = fact._dense, fact._contract

    def spy_dense():
        calls["dense"] += 1
        return dense()

    def spy_contract(x, plan):
        calls["contract"] += 1
        return contract(x, plan)

    monkeypatch.setattr(fact, "_dense", spy_dense)
    monkeypatch.setattr(fact, "_contract", spy_contract)
    x = torch.randn(large, 256)
    y_large = fact(x)
    assert calls == {"dense": 1, "contract": 0}
    y_small = fact(x[:1])
    assert calls == {"dense": 1, "contract": 1}
    torch.testing.assert_close(y_small, y_large[:1], rtol=1e-4, atol=1e-4)


def test_mpo_contracts_small_batches_and_rebuilds_large_ones():
    # At B = 512 the best einsum path has half the FLOPs of rebuild + GEMM, but its
    # intermediates (B x 64 x 64 x r) outweigh W: the memory term of the cost model decides.
    mpo = tensornets.MPO.empty(4096, 4096, in_modes=(8, 8, 8, 8), out_modes=(8, 8, 8, 8), ranks=(16, 16, 16))
    costs = mpo._strategy_costs(512)
    assert costs["contract"][0] < costs["rebuild"][0] and costs["contract"][1] > costs["rebuild"][1]
    assert not mpo.uses_rebuild(1) and not mpo.uses_rebuild(32) and mpo.uses_rebuild(512)


def test_plan_flops_match_opt_einsum():
    plan = plan_contraction("ab,bc,cd->ad", [(8, 16), (16, 4), (4, 32)])
    _, info = opt_einsum.contract_path("ab,bc,cd->ad", (8, 16), (16, 4), (4, 32), shapes=True, optimize="optimal")
    assert plan.flops == info.opt_cost
    # path (ab,bc)->ac then (ac,cd)->ad: reads 128 + 64, writes 32; reads 32 + 128, writes 256
    assert plan.path == (0, 1, 0, 1) and plan.traffic == 640
    a, b, c = torch.randn(8, 16), torch.randn(16, 4), torch.randn(4, 32)
    torch.testing.assert_close(plan(a, b, c), a @ b @ c)
