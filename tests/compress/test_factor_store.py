"""EoRA factors kept on disk: what is read back is what was written, and only what ``update`` added is resident."""

from __future__ import annotations

import re

import pytest
import torch

from compress.factor_store import OffloadedFactors


def test_offloaded_factors_read_back_what_was_written(tmp_path):
    g = torch.Generator().manual_seed(0)
    on_disk = {f"layers.0.{n}": (torch.randn(6, 2, generator=g).bfloat16(), torch.randn(2, 5, generator=g).bfloat16())
               for n in ("q", "k")}
    resident = {"layers.1.q": (torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g))}
    store = OffloadedFactors()
    store.write(tmp_path / "eora" / "layers.0.safetensors", on_disk)
    store.update(resident)
    assert list(store) == ["layers.0.q", "layers.0.k", "layers.1.q"] and len(store) == 3
    assert store.resident_nbytes == sum(B.nbytes + A.nbytes for B, A in resident.values())
    for name, (B, A) in {**on_disk, **resident}.items():
        got_B, got_A = store[name]
        assert got_B.dtype == B.dtype and torch.equal(got_B, B) and torch.equal(got_A, A), name
    with pytest.raises(KeyError):
        store["layers.2.q"]
    assert repr(store) == "OffloadedFactors(3 layers, 2 on disk)"


def test_a_rewritten_or_deleted_file_is_refused_not_read(tmp_path):
    g = torch.Generator().manual_seed(0)
    pair = (torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g))
    first, second = OffloadedFactors(), OffloadedFactors()
    first.write(tmp_path / "eora" / "block.safetensors", {"q": pair})
    # a second run into the same offload folder, at another rank
    second.write(tmp_path / "eora" / "block.safetensors", {"q": (torch.zeros(6, 3), torch.zeros(3, 5))})
    assert second["q"][0].shape == (6, 3)
    with pytest.raises(ValueError, match="another compress_blocks run wrote to the same offload folder"):
        first["q"]
    (tmp_path / "eora" / "block.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="keep the offload folder as long as"):
        second["q"]


@pytest.mark.parametrize("damage, match", [
    ("truncated", "is no longer a readable safetensors file"),
    ("emptied", "is no longer a readable safetensors file"),
    ("directory", "is no longer a readable safetensors file"),
    ("tensor-missing", "lacks or cannot read the EoRA factors of 'q'"),
])
def test_a_damaged_file_is_refused_naming_it_and_the_layer(tmp_path, damage, match):
    from safetensors import safe_open
    from safetensors.torch import save_file

    store, file = OffloadedFactors(), tmp_path / "eora" / "block.safetensors"
    store.write(file, {"q": (torch.ones(6, 2), torch.ones(2, 5))})
    if damage == "truncated":
        file.write_bytes(file.read_bytes()[:-8])
    elif damage == "emptied":
        file.write_bytes(b"")
    elif damage == "directory":
        file.unlink()
        file.mkdir()
    else:  # same run's token, one tensor gone
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata()
        save_file({"q.A": torch.ones(2, 5)}, str(file), metadata=metadata)
    with pytest.raises(ValueError, match=f"{re.escape(str(file))}.*{match}|{match}.*{re.escape(str(file))}"):
        store["q"]
