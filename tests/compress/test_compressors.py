"""The compressor registry: every method is one entry, and a new one is one ``register`` call."""

import dataclasses

import pytest
import torch
from torch import nn

from compress import CompressionConfig, collect_activation_stats, compress_model
from compress import compressors as registry
from compress.compressors import Compressor, LayerResult, get_compressor, register


def test_every_method_name_is_registered_with_its_kind():
    dense = {"rtn", "gptq", "2:4", "magnitude", "sparsegpt"}
    factorized = {"svd", "asvd", "whitened_svd", "tucker", "tt", "mpo", "btt", "cp"}
    assert set(registry.available_compressors()) == dense | factorized
    assert {n for n in dense | factorized if get_compressor(n).kind == "dense"} == dense
    assert {n for n in dense | factorized if get_compressor(n).needs_stats} == {"asvd", "whitened_svd", "gptq",
                                                                                 "sparsegpt"}
    assert {n for n in factorized if get_compressor(n).spectrum is not None} == {"svd", "asvd", "whitened_svd"}
    assert get_compressor("prune24") is get_compressor("2:4")
    assert CompressionConfig(method="prune24").method == "2:4"
    with pytest.raises(ValueError, match="method='nope' is not one of the registered compressors"):
        get_compressor("nope")


def test_a_new_compressor_is_one_register_call(monkeypatch):
    """A toy 'halve' method (W -> W / 2) runs through config, compress_model and the report."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_ALIASES", dict(registry._ALIASES))
    register(Compressor(
        name="halve", kind="dense", compress_layer=lambda job: LayerResult("half", weight=job.weight / 2),
        needs_stats=False, parameters=lambda module, config: module.weight.numel(),
        storage_bits=lambda shape, n, config: 16.0 * n, label=lambda config: "halve", aliases=("half",),
    ))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    stats = collect_activation_stats(model, [torch.randn(5, 8)], progress=False)
    report = compress_model(model, CompressionConfig(method="half"), stats, progress=False)
    assert torch.equal(report.model[0].weight, model[0].weight / 2)
    assert [r.ranks for r in report.layers] == ["half", "half"] and report.config.method == "halve"
    assert report.layers[0].rel_weight_error == pytest.approx(0.5)
    with pytest.raises(ValueError, match="'half' is already registered to 'halve'"):
        register(Compressor(name="other", kind="dense", compress_layer=None, needs_stats=False, parameters=None,
                            storage_bits=None, label=None, aliases=("half",)))
    with pytest.raises(ValueError, match="kind='sparse'"):
        register(Compressor(name="x", kind="sparse", compress_layer=None, needs_stats=False, parameters=None,
                            storage_bits=None, label=None))
    with pytest.raises(ValueError, match="exactly one of weight= .* and module="):
        LayerResult("both", weight=torch.zeros(1), module=nn.Identity())


@pytest.mark.parametrize(
    ("config", "bits_per_weight"),
    [
        (dict(method="rtn", bits=3, group_size=64), 3 + (16 + 3) / 64),  # zero points packed at 3 bits
        (dict(method="gptq", bits=4, group_size=32, symmetric=True), 4 + 16 / 32),
        (dict(method="2:4"), (16 + 2) / 2),
        (dict(method="magnitude", sparsity=0.75), 16 * 0.25 + 1),
        (dict(method="sparsegpt", pattern="2:4"), (16 + 2) / 2),
        (dict(method="sparsegpt", pattern="2:4", sparse_bits=4, group_size=64), (4 + 2) / 2 + (16 + 4) / 64),
        (dict(method="sparsegpt", sparsity=0.5, sparse_bits=3, group_size=128), 3 * 0.5 + 1 + (16 + 3) / 128),
        (dict(method="whitened_svd", keep=0.5), 16 * 0.5),
    ],
)
def test_storage_bits_per_weight(config, bits_per_weight):
    c = CompressionConfig(**config)
    shape = (256, 512)
    kept = {"2:4": 0.5, "magnitude": 0.25, "sparsegpt": 0.5, "whitened_svd": 0.5}.get(c.method, 1.0)
    n = int(kept * shape[0] * shape[1])
    assert c.compressor.storage_bits(shape, n, c) / (shape[0] * shape[1]) == pytest.approx(bits_per_weight)


def test_labels_describe_the_setting():
    label = lambda **kw: CompressionConfig(**kw).compressor.label(CompressionConfig(**kw))
    assert label(method="gptq", bits=3, group_size=64) == "gptq 3-bit, group 64, act-order"
    assert label(method="gptq", bits=4, group_size=None, act_order=False, symmetric=True) == (
        "gptq 4-bit, group per-row, symmetric")
    assert label(method="rtn", bits=3, group_size=64) == "rtn 3-bit, group 64"
    assert label(method="sparsegpt", pattern="2:4", sparse_bits=4, group_size=64) == "sparsegpt 2:4 + 4-bit, group 64"
    assert label(method="sparsegpt", sparsity=0.6) == "sparsegpt sparsity 0.6"
    assert label(method="2:4") == "2:4 pruning"
    assert label(method="whitened_svd", keep=0.8) == "whitened_svd, keep 0.8"


def test_every_built_in_declares_the_options_it_reads():
    # the CLI refuses a flag whose option the method never reads (--sparsity with rtn) from this declaration
    reads = {n: get_compressor(n).reads for n in registry.available_compressors()}
    assert all(r is not None and r <= registry.METHOD_OPTIONS for r in reads.values()), reads
    assert reads["rtn"] == {"bits", "group_size", "symmetric", "observer", "scale_dtype"}
    assert {"bits", "sparsity"}.isdisjoint(reads["whitened_svd"] | reads["2:4"])
    assert "sparse_bits" in reads["sparsegpt"] and "bits" not in reads["sparsegpt"]
    with pytest.raises(ValueError, match="names fields outside"):
        registry.register(dataclasses.replace(get_compressor("rtn"), name="rtn_typo", aliases=(),
                                              reads=frozenset({"bitz"})))
    assert get_compressor("sparsegpt").reads_only_with["group_size"] == "sparse_bits"
    with pytest.raises(ValueError, match="names options outside reads"):
        registry.register(dataclasses.replace(get_compressor("rtn"), name="rtn_conditional", aliases=(),
                                              reads_only_with={"sparsity": "sparse_bits"}))
