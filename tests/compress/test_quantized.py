"""compress.quantized: bit-packed codes round-trip exactly and are compressed-tensors' ``weight_packed``."""

from __future__ import annotations

import pytest
import torch

from compress.export import pack_quantized_weight, regroup
from compress.quantized import PackedQuantizedWeight, QuantizedWeight


def _random_qweight(out_f: int, in_f: int, bits: int, group_size: int, symmetric: bool,
                    seed: int = 0) -> QuantizedWeight:
    """Codes and zero points drawn uniformly over the whole signed range (both ends included)."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1)
    codes = torch.randint(lo, hi, (out_f, in_f), generator=g, dtype=torch.int8)
    codes[0, 0], codes[-1, -1] = lo, hi - 1
    groups = (out_f, in_f // group_size)
    zero = torch.zeros(groups, dtype=torch.int8) if symmetric else torch.randint(lo, hi, groups, generator=g,
                                                                                    dtype=torch.int8)
    scale = torch.rand(groups, generator=g) + 0.01
    return QuantizedWeight(codes, scale, zero, bits, group_size, symmetric)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("in_f", [96, 100])  # 100 columns: the last word of each row is partly filled
def test_pack_unpack_round_trip(bits, in_f):
    qw = _random_qweight(7, in_f, bits, 4, symmetric=False, seed=bits)
    packed = qw.pack()
    assert packed.packed.dtype == torch.int32 and tuple(packed.packed.shape) == (7, -(-in_f * bits // 32))
    assert packed.shape == qw.shape and (packed.bits, packed.group_size, packed.symmetric) == (bits, 4, False)
    back = packed.unpack()
    assert back.codes.dtype == torch.int8 and torch.equal(back.codes, qw.codes)
    assert torch.equal(back.scale, qw.scale) and torch.equal(back.zero_point, qw.zero_point)
    assert torch.equal(packed.dequantize(), qw.dequantize())
    assert torch.equal(packed.dequantize(torch.bfloat16), qw.dequantize(torch.bfloat16))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_packed_is_what_the_exporter_writes(bits, symmetric):
    """The packed words are the checkpoint's ``weight_packed``: exporting packed or unpacked codes is identical."""
    qw = _random_qweight(40, 96, bits, 32, symmetric, seed=bits)
    assert torch.equal(qw.pack().packed, pack_quantized_weight(qw)["weight_packed"])
    from_packed, from_codes = pack_quantized_weight(qw.pack()), pack_quantized_weight(qw)
    assert sorted(from_packed) == sorted(from_codes)
    assert all(torch.equal(from_packed[k], from_codes[k]) for k in from_codes)
    # regrouping repeats scales and zero points and leaves the codes alone, packed or not
    assert torch.equal(regroup(qw.pack(), 16).dequantize(), regroup(qw, 16).dequantize())


def test_three_bit_codes_take_three_eighths_of_int8():
    qw = _random_qweight(576, 1536, 3, 64, symmetric=False)
    packed = qw.pack()
    assert packed.packed.numel() * 4 == qw.codes.numel() * 3 // 8
    assert packed.nbytes == packed.packed.numel() * 4 + qw.scale.numel() * 4 + qw.zero_point.numel()


def test_bad_packed_weights_name_the_field():
    qw = _random_qweight(8, 64, 3, 32, symmetric=False)
    p = qw.pack()
    with pytest.raises(TypeError, match="packed must be a \\(8, 6\\) int32"):
        PackedQuantizedWeight(p.packed[:, :5], p.scale, p.zero_point, 3, 32, False, (8, 64))
    with pytest.raises(TypeError, match="packed must be"):
        PackedQuantizedWeight(p.packed.to(torch.int64), p.scale, p.zero_point, 3, 32, False, (8, 64))
    with pytest.raises(ValueError, match="bits=9"):
        PackedQuantizedWeight(p.packed, p.scale, p.zero_point, 9, 32, False, (8, 64))
    with pytest.raises(ValueError, match="group_size=24"):
        PackedQuantizedWeight(p.packed, p.scale, p.zero_point, 3, 24, False, (8, 64))
    with pytest.raises(ValueError, match="scale"):
        PackedQuantizedWeight(p.packed, p.scale[:, :1], p.zero_point, 3, 32, False, (8, 64))
    with pytest.raises(TypeError, match="zero_point must be int8"):
        PackedQuantizedWeight(p.packed, p.scale, p.zero_point.int(), 3, 32, False, (8, 64))
