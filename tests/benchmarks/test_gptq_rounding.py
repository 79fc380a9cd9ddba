"""benchmarks/bench_gptq_rounding.py: a calibration order is a permutation, and it moves the statistics by rounding only."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_gptq_rounding as bench  # noqa: E402
from compress import collect_activation_stats  # noqa: E402


def _windows(n: int = 8, seq_len: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 64, (1, seq_len), generator=g) for _ in range(n)]


def test_order_zero_is_the_given_order_and_others_are_seeded_permutations():
    windows = _windows()
    assert all(a is b for a, b in zip(bench.permuted(windows, 0), windows))
    for order in (1, 2, 3):
        got = bench.permuted(windows, order)
        again = bench.permuted(windows, order)
        assert [id(w) for w in got] == [id(w) for w in again]  # seeded: the same order every run
        assert sorted(map(id, got)) == sorted(map(id, windows))  # a permutation: every window once
    assert [id(w) for w in bench.permuted(windows, 1)] != [id(w) for w in windows]


def test_a_permuted_order_changes_the_statistics_by_float32_rounding_only():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg).eval()
    windows = _windows()
    ref = collect_activation_stats(model, windows, progress=False)
    for order in (1, 2):
        got = collect_activation_stats(model, bench.permuted(windows, order), progress=False)
        assert list(got) == list(ref)
        for name in ref:
            a, b = got[name].gram.double(), ref[name].gram.double()
            assert got[name].count == ref[name].count
            # a sum of the same 8 terms in another order: within a few float32 ulps of the total
            assert (a - b).norm() <= 1e-5 * b.norm(), name
