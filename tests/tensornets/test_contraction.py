"""Contraction plans: planned once, cached, no path search in the forward, cheaper strategy chosen."""

from __future__ import annotations

import math

import opt_einsum
import pytest
import torch

import tensornets
from tensornets.contraction import _pairwise, batch_bucket, clear_plan_cache, plan_cache_info, plan_contraction
from format_cases import IN, OUT, low_rank_plus_noise
from tolerance import assert_close


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
    assert_close(fact(x), expected)
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
    assert_close(y_small, y_large[:1])


def test_mpo_strategy_follows_the_measured_order():
    # benchmarks/bench_layers.py, 4096^2, modes 8^4, forward on CPU: at r = 16 the split into two GEMMs is the
    # fastest at B = 1 and B = 512 on an AMD EPYC (0.21 / 63 ms vs einsum 0.31 / 103 ms and rebuild + GEMM 92 ms;
    # on the Intel Xeon of benchmarks/results/layers.md it ties rebuild + GEMM at B = 512);
    # at r = 32, B = 512 its hidden (B x 64 x r x 64) outweighs W and rebuild + GEMM wins.
    def mpo(rank):
        return tensornets.MPO.empty(4096, 4096, in_modes=(8, 8, 8, 8), out_modes=(8, 8, 8, 8), ranks=(rank,) * 3)

    r16, r32 = mpo(16), mpo(32)
    assert r16.strategy(1) == r16.strategy(512) == "split" and not r16.uses_rebuild(512)
    assert r32.strategy(512) == "rebuild" and r32.uses_rebuild(512)
    # the einsum plan has fewer FLOPs than rebuild + GEMM at B = 512, but more traffic: memory decides
    einsum = plan_contraction(r16._equations()[0], [(512, *r16.in_modes), *r16._core_shapes()])
    rebuild = r16._strategy_costs(512)["rebuild"]
    assert einsum.flops < rebuild[0] and einsum.traffic > rebuild[1]
    assert r16._contract_plan(512).split == 2  # the middle bond: L and R of 64 x 64 x 16


@pytest.mark.parametrize("modes", [((4, 3, 2), (2, 5, 3)), ((3, 4), (5, 2)), ((2, 2, 3, 2), (3, 2, 2, 2))])
def test_mpo_split_at_every_bond_equals_dense_and_gradcheck(modes):
    out_modes, in_modes = modes
    out_f, in_f = math.prod(out_modes), math.prod(in_modes)
    W = low_rank_plus_noise(out_f, in_f, 6, 0.5)
    fact = tensornets.decompose(W, "mpo", rank=3, modes=(out_modes, in_modes))
    x = torch.randn(5, in_f, dtype=torch.float64, requires_grad=True)
    expected = x @ fact.to_dense().T
    for m in range(1, len(out_modes)):
        plan = fact._split_plan(m, 8)  # a plan made for the bucket runs any batch up to it
        assert_close(fact._contract(x, plan), expected)
        params = tuple(fact.parameters())
        assert torch.autograd.gradcheck(lambda x, *p: fact._contract(x, plan), (x, *params), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("modes", [((4, 3), (5, 3)), ((6, 8), (10, 6))])
@pytest.mark.parametrize("batch", [1, 7])
def test_btt_both_layouts_equal_dense_and_gradcheck(modes, rank, batch):
    out_modes, in_modes = modes
    out_f, in_f = math.prod(out_modes), math.prod(in_modes)
    fact = tensornets.decompose(low_rank_plus_noise(out_f, in_f, 6, 0.5), "btt", rank=rank,
                                modes=(out_modes, in_modes))
    x = torch.randn(batch, in_f, dtype=torch.float64, requires_grad=True)
    expected = x @ fact.to_dense().T
    rows, columns = fact._contract_candidates(batch)
    assert (rows.label, columns.label) == ("contract", "contract@cols")
    for plan in (rows, columns):
        assert_close(fact._contract(x, plan), expected)
        params = tuple(fact.parameters())
        assert torch.autograd.gradcheck(lambda x, *p: fact._contract(x, plan), (x, *params), eps=1e-6, atol=1e-5)


def test_btt_layout_follows_the_measured_order():
    # BTT 4096^2, modes 64 x 64, forward on CPU (benchmarks/results/layers.md):
    # at r = 1 and 512 rows the rows layout spends half its time regrouping the hidden (runs of one element); the
    # columns layout has no regroup. At one row the columns layout's first product, a GEMM with one output column,
    # is the slower one.
    def btt(rank):
        return tensornets.BTT.empty(4096, 4096, in_modes=(64, 64), out_modes=(64, 64), ranks=(rank,))

    r1, r16 = btt(1), btt(16)
    assert r1._plan(1).label == "contract" and r1._plan(512).label == "contract@cols"
    # at r >= 16 the rows regroup copies whole cache lines: the layouts cost the same and the rows (first) win ties
    rows, columns = r16._contract_candidates(32)
    assert rows.traffic == columns.traffic and r16._plan(32).label == "contract"


def test_btt_rebuild_pays_for_its_copies():
    # BTT 1024^2, r = 32, 32 rows: rebuild + GEMM and the contraction cost the same FLOPs, but the rebuild also copies
    # W1 into the bmm's layout and permutes its (o0, a1, o1, a0) product; measured 1.47 ms vs 0.77 ms for the
    # contraction (benchmarks/results/layers.md). The formula must not rebuild here.
    fact = tensornets.BTT.empty(1024, 1024, in_modes=(32, 32), out_modes=(32, 32), ranks=(32,))
    rebuild, rows, _ = fact._candidates(32)
    assert rebuild.flops == rows.flops
    assert rebuild.traffic >= fact.num_parameters + 2 * fact.W1.numel() + 4 * 1024 * 1024
    assert fact._plan(32).label.startswith("contract")
    # at 512 rows the contraction's hidden is 16x larger while the rebuild's copies stay the same: rebuild wins
    assert fact._plan(512).label == "rebuild"


def test_plan_flops_match_opt_einsum():
    plan = plan_contraction("ab,bc,cd->ad", [(8, 16), (16, 4), (4, 32)])
    _, info = opt_einsum.contract_path("ab,bc,cd->ad", (8, 16), (16, 4), (4, 32), shapes=True, optimize="optimal")
    assert plan.flops == info.opt_cost
    # path (ab,bc)->ac then (ac,cd)->ad: reads 128 + 64, writes 32; reads 32 + 128, writes 256
    assert plan.path == (0, 1, 0, 1) and plan.traffic == 640
    a, b, c = torch.randn(8, 16), torch.randn(16, 4), torch.randn(4, 32)
    assert_close(plan(a, b, c), a @ b @ c)


@pytest.mark.parametrize("fmt,num_cores", [("tt", 4), ("tt", 5), ("tucker", 4), ("cp", 4), ("mpo", 4)])
def test_einsums_of_many_operands_equal_dense(fmt, num_cores):
    # 8+ operands plan with opt_einsum's "dp" search, whose paths hold single-operand steps (TT's end-core bonds of
    # size 1) that ATen's einsum does not take: TT at 4 cores failed in every forward
    torch.manual_seed(0)
    layer = tensornets.FactorizedLinear.create(256, 256, fmt, rank=4, num_cores=num_cores, dtype=torch.float64)
    W = layer.factorization.to_dense()
    for batch in (1, 3, 64):
        x = torch.randn(batch, 256, dtype=torch.float64, requires_grad=True)
        assert_close(layer(x), x @ W.T + layer.bias)
    (gx,) = torch.autograd.grad(layer(x).square().sum(), x)
    y = x @ W.T + layer.bias
    assert_close(gx, torch.autograd.grad(y.square().sum(), x)[0])


def test_single_operand_steps_become_pairwise_paths():
    # a random sample of equations with indices only one operand has: every opt_einsum search, planned as ATen runs it
    gen = torch.Generator().manual_seed(0)
    letters = "abcdefg"
    singles = 0
    for _ in range(60):
        n = int(torch.randint(3, 8, (), generator=gen))
        terms = ["".join(letters[int(i)] for i in torch.randperm(7, generator=gen)[: int(torch.randint(1, 4, (), generator=gen))])
                 for _ in range(n)]
        used = sorted(set("".join(terms)))
        equation = ",".join(terms) + "->" + "".join(used[: int(torch.randint(0, 3, (), generator=gen))])
        sizes = {c: int(torch.randint(1, 4, (), generator=gen)) for c in letters}
        ops = [torch.randn(*[sizes[c] for c in t], dtype=torch.float64, generator=gen) for t in terms]
        want = torch.as_tensor(opt_einsum.contract(equation, *[o.numpy() for o in ops]))
        for optimize in ("dp", "greedy", "optimal"):
            path, _ = opt_einsum.contract_path(equation, *ops, optimize=optimize)
            singles += sum(len(step) == 1 for step in path)
            flat = [i for pair in _pairwise(path, n) for i in pair]
            assert_close(torch._VF.einsum(equation, ops, path=flat), want, what=f"{equation} {optimize} {path}")
    assert singles > 20  # the sample exercises the relabelling


@pytest.mark.parametrize("batch", [1, 512])
def test_forward_and_backward_need_no_host_sync(format_case, batch):
    # Meta tensors carry shapes but no data: any .item(), bool(tensor) or data-dependent shape in
    # the forward or backward would raise here, so this is the CPU-side proof that the CUDA path
    # never synchronises with the host (what the planned strategy does is decided from shapes only).
    fmt, kw = format_case
    layer = tensornets.FactorizedLinear.create(IN, OUT, fmt, rank=3, generator=torch.Generator().manual_seed(0), **kw).to("meta")
    x = torch.randn(batch, IN, device="meta", requires_grad=True)
    y = layer(x)
    assert y.shape == (batch, OUT) and y.device.type == "meta"
    y.sum().backward()
    assert x.grad.shape == x.shape and all(p.grad is not None for p in layer.parameters())


@pytest.mark.parametrize("modes, ranks", [(((8, 8, 9), (8,)), (5, 5, 5)), (((4, 6), (3, 5)), (3, 7, 4)), (((2, 3, 4), (4, 3)), (2, 5, 6, 3))])
def test_tt_rebuild_at_every_bond_equals_the_einsum_over_all_cores(modes, ranks):
    out_modes, in_modes = modes
    tt = tensornets.TensorTrain.empty(math.prod(in_modes), math.prod(out_modes), in_modes=in_modes, out_modes=out_modes, ranks=ranks).double()
    for core in tt.parameters():
        torch.nn.init.normal_(core)
    plan = plan_contraction(tt._equations()[1], tt._core_shapes())
    expected = plan(*tt._cores()).reshape(tt.padded_out, tt.padded_in)
    chosen = tt._rebuild_split()
    costs = {}
    for split in range(1, len(ranks) + 1):
        assert_close(tt.dense_of(tt._cores(), split), expected)
        costs[split] = tt._sweep_cost(split)
    weight = tensornets.formats.base.traffic_weight("cpu")
    assert chosen == min(costs, key=lambda s: costs[s][0] + weight * costs[s][1])
    # other cores of the same shapes (LoRETTA-rep's rescaled ones) contract by the same rule
    scaled = [3.0 * core for core in tt._cores()]
    assert_close(tt.dense_of(scaled), plan(*scaled).reshape(tt.padded_out, tt.padded_in))
