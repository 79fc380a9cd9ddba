"""save -> load round trips every tensor bitwise and rebuilds the structure."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from torch import nn

import tensornets
from tensornets import FactorizedConv2d, FactorizedLinear
from format_cases import IN, OUT, low_rank_plus_noise


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_factorization_round_trip(tmp_path, format_case, dtype):
    fmt, kw = format_case
    fact = tensornets.decompose(low_rank_plus_noise(OUT, IN, 6, 0.3, dtype=torch.float32).to(dtype), fmt, rank=3, **kw)
    tensornets.save(fact, tmp_path / "f.safetensors")
    loaded = tensornets.load(tmp_path / "f.safetensors")
    assert type(loaded) is type(fact) and loaded.spec() == fact.spec()
    _assert_same_state(fact, loaded)
    x = torch.randn(4, IN, dtype=dtype)
    assert torch.equal(loaded(x), fact(x))


def test_linear_and_conv_round_trip(tmp_path):
    torch.manual_seed(0)
    linear = FactorizedLinear.from_linear(nn.Linear(IN, OUT), "mpo", rank=3, num_cores=2, pad=False)
    conv = FactorizedConv2d.from_conv(nn.Conv2d(4, 8, 3, stride=2, padding=1), rank=(3, 2))
    for name, module in (("lin", linear), ("conv", conv)):
        path = tmp_path / f"{name}.safetensors"
        tensornets.save(module, path)
        loaded = tensornets.load(path)
        _assert_same_state(module, loaded)
        assert loaded.spec() == module.spec()


@pytest.mark.parametrize("fmt", ["lowrank", "tucker", "tt", "mpo", "btt", "cp", "conv-tucker"])
def test_loaded_layer_computes_bitwise_the_outputs_of_the_saved_one(tmp_path, fmt):
    # safetensors' tensors start anywhere in the file's buffer; on memory that is not 64-byte aligned BLAS / einsum
    # took other kernels, and a loaded Tucker or TT layer's outputs differed in the last bit
    generator = torch.Generator().manual_seed(0)
    if fmt == "conv-tucker":
        layer = FactorizedConv2d.create(8, 12, 3, rank=4, padding=1, padding_mode="reflect", generator=generator)
        x = torch.randn(2, 8, 9, 9, generator=generator)
    else:
        layer = FactorizedLinear.create(64, 48, fmt, rank=4, generator=generator)
        x = torch.randn(5, 64, generator=generator)
    with torch.no_grad():
        layer.bias.normal_(generator=generator)
    tensornets.save(layer, tmp_path / "layer.safetensors")
    loaded = tensornets.load(tmp_path / "layer.safetensors")
    assert all(p.data_ptr() % 64 == 0 for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(loaded(x), layer(x))


def test_each_tensor_keeps_its_saved_dtype(tmp_path):
    # a float64 bias next to float32 cores (a user's mixed-precision edit) comes back as saved
    torch.manual_seed(0)
    linear = FactorizedLinear.from_linear(nn.Linear(IN, OUT), "tt", rank=3, num_cores=2, pad=False)
    linear.bias = nn.Parameter(torch.randn(OUT, dtype=torch.float64))
    tensornets.save(linear, tmp_path / "mixed.safetensors")
    loaded = tensornets.load(tmp_path / "mixed.safetensors")
    _assert_same_state(linear, loaded)
    assert all(p.requires_grad for p in loaded.parameters())


def test_manifest_is_json_and_no_pickle(tmp_path):
    fact = tensornets.decompose(low_rank_plus_noise(OUT, IN, 6, 0.3), "btt", rank=2)
    path = tmp_path / "b.safetensors"
    tensornets.save(fact, path)
    with safe_open(str(path), framework="pt") as f:
        manifest = json.loads(f.metadata()["tensornets"])
    assert manifest["kind"] == "factorization" and manifest["spec"]["format"] == "btt"


def _with_manifest(path, edit) -> None:
    """Rewrite the tensornets manifest in ``path``'s header with ``edit(manifest)`` (a str: the raw text)."""
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata()["tensornets"]
    manifest = edit(json.loads(raw))
    save_file(load_file(str(path)), str(path),
              metadata={"tensornets": manifest if isinstance(manifest, str) else json.dumps(manifest)})


def _claim_huge_ranks(manifest):
    manifest["spec"]["factorization"]["ranks"] = [10**9]  # U would be (48, 10**9): 192 GB of float32
    return manifest


def _claim_no_features(manifest):
    manifest["spec"]["factorization"]["in_features"] = 0
    return manifest


@pytest.mark.parametrize("edit, match", [
    (_claim_huge_ranks, "its tensors do not fit the module its manifest describes .*size mismatch"),
    (_claim_no_features, r"describes no module .*in_features=0 and out_features=48 must be >= 1"),
    (lambda manifest: "[" * 100_000, "its tensornets manifest is not valid JSON"),
])
def test_a_damaged_or_hostile_manifest_is_refused_before_anything_of_its_size_is_allocated(tmp_path, edit, match):
    path = tmp_path / "l.safetensors"
    tensornets.save(FactorizedLinear.create(64, 48, "lowrank", rank=4), path)
    _with_manifest(path, edit)
    with pytest.raises(ValueError, match=match):
        tensornets.load(path)


def test_load_rejects_foreign_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="no tensornets manifest"):
        tensornets.load(tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tensornets.load(tmp_path / "missing.safetensors")
    with pytest.raises(TypeError, match="cannot save a Linear"):
        tensornets.save(nn.Linear(2, 2), tmp_path / "y.safetensors")


@pytest.mark.parametrize("device,match", [
    ("meta", "device='meta': meta holds no values; load on 'cpu'"),
    ("tpu", "device='tpu' is not a torch device"),
    # torch keeps an index in 8 bits: cuda:4096 was cuda:0, and loaded there on a one-GPU machine
    ("cuda:4096", r"device='cuda:4096': device index 4096 is out of range \(.* would use cuda:0 instead\)"),
    ("cpu:300", r"device='cpu:300': device index 300 is out of range \(.* would use cpu:44 instead\)"),
    (3.5, "device=3.5 is not a torch device"),
])
def test_load_names_a_bad_device_not_the_file(tmp_path, device, match):
    path = tmp_path / "l.safetensors"
    tensornets.save(tensornets.decompose(low_rank_plus_noise(OUT, IN, 6, 0.3), "lowrank", rank=2), path)
    with pytest.raises(ValueError, match=match) as info:
        tensornets.load(path, device=device)
    assert "corrupt" not in str(info.value)
    assert isinstance(tensornets.load(path, device=torch.device("cpu")), tensornets.LowRank)


def _rewrite(path, edit_tensors=None, edit_manifest=None) -> None:
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata()["tensornets"]
    tensors = load_file(str(path))
    if edit_tensors:
        edit_tensors(tensors)
    if edit_manifest:
        raw = edit_manifest(raw)
    save_file(tensors, str(path), metadata={"tensornets": raw})


@pytest.mark.parametrize("damage,match", [
    (lambda p: p.write_bytes(p.read_bytes()[:200]), "is not a readable safetensors file .* corrupt or truncated"),
    (lambda p: _rewrite(p, edit_manifest=lambda raw: "{not json"), "manifest is not valid JSON"),
    (lambda p: _rewrite(p, edit_manifest=lambda raw: "[1, 2]"), "manifest is not a JSON object"),
    (lambda p: _rewrite(p, edit_manifest=lambda raw: json.dumps({"version": 1})), "describes no module .*'kind'"),
    (lambda p: _rewrite(p, edit_tensors=lambda t: t.update(stray=torch.zeros(1))), "do not fit .*stray"),
    (lambda p: _rewrite(p, edit_tensors=lambda t: t.update(
        {k: torch.zeros(1) for k in list(t)[:1]})), "do not fit .*size mismatch"),
    (lambda p: _rewrite(p, edit_tensors=lambda t: t.update(
        {k: t[k].float() for k in list(t)[:1]})), r"cores mix dtypes \['torch.float32', 'torch.float64'\]"),
    (lambda p: _rewrite(p, edit_tensors=lambda t: t.update(
        {k: v.to(torch.int32) for k, v in t.items()})), "are not floating point"),
], ids=["truncated", "not-json", "not-object", "no-kind", "extra-tensor", "wrong-shape", "mixed-dtypes", "int"])
def test_damaged_files_name_the_file(tmp_path, damage, match):
    path = tmp_path / "f.safetensors"
    tensornets.save(tensornets.decompose(low_rank_plus_noise(OUT, IN, 6, 0.3), "tt", rank=3, num_cores=2), path)
    damage(path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + match):
        tensornets.load(path)
    with pytest.raises(FileNotFoundError, match="is a directory"):
        tensornets.load(tmp_path)


def test_compiled_layers_save_as_their_module_and_meta_layers_are_refused(tmp_path):
    torch.manual_seed(0)
    layer = FactorizedLinear.create(IN, OUT, "lowrank", rank=3)
    tensornets.save(torch.compile(layer), tmp_path / "compiled.safetensors")
    loaded = tensornets.load(tmp_path / "compiled.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), layer.state_dict().values()))
    with pytest.raises(ValueError, match="meta device"):
        tensornets.save(layer.to("meta"), tmp_path / "meta.safetensors")


def test_save_names_a_path_it_cannot_write(tmp_path):
    fact = tensornets.decompose(low_rank_plus_noise(OUT, IN, 6, 0.3), "tt", rank=3, num_cores=2)
    with pytest.raises(TypeError, match="path=None: pass the .safetensors file"):
        tensornets.save(fact, None)
    with pytest.raises(ValueError, match="is a directory; pass a file path"):
        tensornets.save(fact, tmp_path)
    with pytest.raises(ValueError, match="does not exist; create it first"):
        tensornets.save(fact, tmp_path / "missing" / "f.safetensors")


def test_save_and_load_expand_a_home_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    fact = tensornets.decompose(low_rank_plus_noise(OUT, IN, 6, 0.3), "tt", rank=3, num_cores=2)
    tensornets.save(fact, "~/f.safetensors")
    assert (tmp_path / "f.safetensors").is_file()
    assert torch.equal(tensornets.load("~/f.safetensors").to_dense(), fact.to_dense())


def test_a_conv_of_numpy_int_geometry_saves(tmp_path):
    import numpy as np

    conv = tensornets.FactorizedConv2d(np.int64(4), np.int64(6), np.int64(3), rank=2, stride=np.int64(1))
    tensornets.save(conv, tmp_path / "c.safetensors")  # a numpy int in the spec failed json.dumps
    assert tensornets.load(tmp_path / "c.safetensors").kernel_size == (3, 3)
