"""The streaming safetensors writer: files every safetensors reader loads, bit for bit, written a tensor at a time."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from compress.safetensors_stream import DTYPE_NAMES, write_safetensors


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "b.lora_A.weight": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "a.lora_B.weight": torch.randn(5, 3, 1, 1, generator=g),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "half": torch.randn(7, generator=g).half(),  # 14 bytes: the next tensor starts unaligned, as the format allows
        "codes": torch.randint(-8, 8, (4, 6), generator=g, dtype=torch.int32),
        "empty": torch.zeros(0, 4),
        "mask": torch.rand(9, generator=g) > 0.5,
    }


def test_written_file_loads_bit_for_bit_with_its_metadata(tmp_path):
    tensors = _tensors()
    assert {t.dtype for t in tensors.values()} <= DTYPE_NAMES.keys()
    specs = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    file = tmp_path / "streamed.safetensors"
    write_safetensors(file, specs, iter(tensors.items()), metadata={"format": "pt"})
    loaded = load_file(file)
    assert loaded.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key
    with safe_open(str(file), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    header_length = int.from_bytes(file.read_bytes()[:8], "little")
    assert header_length % 8 == 0


def test_non_contiguous_tensors_are_written_as_their_values(tmp_path):
    t = torch.arange(12.0).reshape(3, 4).T  # (4, 3), not contiguous
    write_safetensors(tmp_path / "t.safetensors", {"t": (t.dtype, [4, 3])}, [("t", t)])  # a shape as a list too
    assert torch.equal(load_file(tmp_path / "t.safetensors")["t"], t)


def test_tensors_that_differ_from_the_specs_are_refused(tmp_path):
    t = torch.zeros(2, 3)
    file = tmp_path / "bad.safetensors"
    with pytest.raises(ValueError, match=r"tensor 'x' .* is not the next one of specs"):
        write_safetensors(file, {"x": (torch.float32, (3, 2))}, [("x", t)])
    with pytest.raises(ValueError, match=r"tensor 'y' .* is not the next one of specs"):
        write_safetensors(file, {"x": (torch.float32, (2, 3))}, [("y", t)])
    with pytest.raises(ValueError, match=r"tensor 'x' .* is not the next one of specs"):
        write_safetensors(file, {"x": (torch.float16, (2, 3))}, [("x", t)])
    with pytest.raises(ValueError, match=r"tensors \['z'\] .* were never yielded"):
        write_safetensors(file, {"x": (torch.float32, (2, 3)), "z": (torch.float32, (1,))}, [("x", t)])
    with pytest.raises(TypeError, match="complex64.* does not store"):
        write_safetensors(file, {"c": (torch.complex64, (1,))}, [])
    with pytest.raises(ValueError, match="cannot be named '__metadata__'"):
        write_safetensors(file, {"__metadata__": (torch.float32, (2, 3))}, [("__metadata__", t)])
    with pytest.raises(TypeError, match="metadata=.*strings to strings"):
        write_safetensors(file, {}, [], metadata={"rank": 4})
