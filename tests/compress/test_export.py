"""compress.export: Hugging Face directories with compressed-tensors ``pack-quantized`` weights.

The codes are built here by an independent round-to-nearest (``_rtn``) so the tests depend only on
:class:`compress.quantized.QuantizedWeight`, not on any quantizer of the package. Reloading is checked in a fresh
Python process that never imports ``tensornets`` / ``compress`` / ``adapters``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_hf import bos_tokenizer, tiny_llama
from tolerance import assert_close, relative_error
from torch import nn

from compress.export import pack_quantized_weight, quantization_config, save_hf_directory
from compress.models import pydoc_text
from compress.quantized import QuantizedWeight


def _rtn(W: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> QuantizedWeight:
    """Round-to-nearest in the signed compressed-tensors convention (test-local reference quantizer)."""
    out_f, in_f = W.shape
    Wg = W.detach().float().reshape(out_f, -1, group_size)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if symmetric:
        s = Wg.abs().amax(-1) / qmax
        z = torch.zeros_like(s)
    else:
        lo, hi = Wg.amin(-1), Wg.amax(-1)
        s = (hi - lo) / (qmax - qmin)
        z = torch.clamp(torch.round(qmin - lo / s), qmin, qmax)
    q = torch.clamp(torch.round(Wg / s.unsqueeze(-1)) + z.unsqueeze(-1), qmin, qmax)
    return QuantizedWeight(q.reshape(out_f, in_f).to(torch.int8), s, z.to(torch.int8), bits, group_size, symmetric)


def _quantize_model(model: nn.Module, bits: int = 3, group_size: int = 32, symmetric: bool = False,
                    skip: tuple[str, ...] = ("lm_head",)) -> dict[str, QuantizedWeight]:
    """Quantize every linear but ``skip`` in place (weights = the dequantized codes); return the codes."""
    quantized = {}
    for name, module in model.named_modules():
        if type(module) is nn.Linear and name not in skip:
            quantized[name] = _rtn(module.weight, bits, group_size, symmetric)
            with torch.no_grad():
                module.weight.copy_(quantized[name].dequantize())
    return quantized


def _ct_dequantized(qw: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """``s (q − z)`` in compressed-tensors' order and dtype: ``(q.to(dtype) − z.to(dtype)) · s.to(dtype)``."""
    out_f, in_f = qw.shape
    q = qw.codes.to(dtype).reshape(out_f, -1, qw.group_size)
    return ((q - qw.zero_point.to(dtype).unsqueeze(-1)) * qw.scale.to(dtype).unsqueeze(-1)).reshape(out_f, in_f)


# --------------------------------------------------------------------------------------------- packing
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [False, True])
def test_pack_equals_compressed_tensors_compressor(bits, symmetric):
    """Our packing of the codes equals compressed-tensors' own compressor quantizing the dequantized weight."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    torch.manual_seed(bits)
    qw = _rtn(torch.randn(40, 96), bits, 32, symmetric)
    ours = pack_quantized_weight(qw, torch.float32)
    args = QuantizationArgs(num_bits=bits, symmetric=symmetric, strategy="group", group_size=32)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    state = {"weight": qw.dequantize(), "weight_scale": qw.scale}
    if not symmetric:
        state["weight_zero_point"] = qw.zero_point
    theirs = PackedQuantizationCompressor.compress(state, scheme)
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    back = PackedQuantizationCompressor.decompress(ours, scheme)["weight"]
    assert torch.equal(back, qw.dequantize())


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_packed_bytes_follow_the_bits(bits, group_size):
    """Codes, 16-bit scales, zero points and shape take at most (bits + 1) / 16 of the 16-bit weight."""
    qw = _rtn(torch.randn(96, 384), bits, group_size, symmetric=False)
    tensors = pack_quantized_weight(qw, torch.bfloat16)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert nbytes <= (bits + 1) / 16 * 2 * qw.codes.numel()
    assert tensors["weight_packed"].shape == (96, -(-384 * bits // 32))


@pytest.mark.parametrize("symmetric", [False, True])
def test_offloaded_codes_pack_to_placeholders_of_the_written_tensors(symmetric):
    """Codes written to disk beside an offloaded layer (meta tensors in memory): the exporter's placeholders have the
    shapes and dtypes that packing the real codes gives, hold no bytes, and cannot be regrouped."""
    import dataclasses

    from compress.export import regroup

    packed = _rtn(torch.randn(40, 96), 3, 32, symmetric).pack()
    offloaded = dataclasses.replace(packed, packed=packed.packed.to("meta"), scale=packed.scale.to("meta"),
                                    zero_point=packed.zero_point.to("meta"))
    assert offloaded.offloaded and offloaded.nbytes == 0 and not packed.offloaded and packed.nbytes > 0
    real, placeholders = pack_quantized_weight(packed, torch.float32), pack_quantized_weight(offloaded, torch.float32)
    assert sorted(real) == sorted(placeholders)
    for key, tensor in real.items():
        assert (placeholders[key].shape, placeholders[key].dtype) == (tensor.shape, tensor.dtype), key
    assert torch.equal(placeholders["weight_shape"], real["weight_shape"])
    with pytest.raises(ValueError, match="its codes were written to disk in their own groups"):
        regroup(offloaded, 16)


def test_pack_rejects_bad_input():
    qw = _rtn(torch.randn(8, 32), 4, 32, False)
    with pytest.raises(TypeError, match="QuantizedWeight"):
        pack_quantized_weight(torch.zeros(8, 32, dtype=torch.int8))
    with pytest.raises(TypeError, match="scale_dtype"):
        pack_quantized_weight(qw, torch.int8)


def test_quantization_config_groups():
    one = {"a": _rtn(torch.randn(8, 32), 4, 32, False), "b": _rtn(torch.randn(8, 32), 4, 32, False)}
    cfg = quantization_config(one, ["a", "b", "lm_head"])
    assert cfg.format == "pack-quantized" and cfg.ignore == ["lm_head"]
    (group,) = cfg.config_groups.values()
    assert group.targets == ["Linear"] and group.weights.num_bits == 4 and not group.weights.symmetric
    mixed = {**one, "c": _rtn(torch.randn(8, 64), 3, 64, True)}
    cfg = quantization_config(mixed, ["a", "b", "c", "lm_head"])
    assert sorted(tuple(g.targets) for g in cfg.config_groups.values()) == [("a", "b"), ("c",)]
    with pytest.raises(ValueError, match="quantized is empty"):
        quantization_config({}, ["a"])


# --------------------------------------------------------------------------------------------- directories
def test_directory_layout_tied_embeddings_and_config(tmp_path):
    model = tiny_llama()
    quantized = _quantize_model(model, bits=3, group_size=32)
    report = save_hf_directory(model, tmp_path, tokenizer=bos_tokenizer(), quantized=quantized)
    names = set(report.files)
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] is True
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == ["lm_head"] and qc["dequantize"] is True
    (group,) = qc["config_groups"].values()
    assert group["weights"] == {**group["weights"], "num_bits": 3, "group_size": 32, "symmetric": False,
                                "strategy": "group", "type": "int"}
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    assert "lm_head.weight" not in keys  # tied: stored once
    for name in quantized:
        assert f"{name}.weight" not in keys
        assert {f"{name}.{s}" for s in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")} <= keys
    assert len(report.packed) == len(quantized) == 14
    assert all(p.ratio <= (3 + 1) / 16 for p in report.packed)
    # the caller's model is untouched: config, dtype and weights
    assert model.config.dtype in (None, torch.float32, "float32") and model.dtype == torch.float32
    assert not hasattr(model.config, "quantization_config")


@pytest.mark.parametrize("bits,group_size,symmetric,sizes", [(3, 32, False, {}), (4, 16, True, {}),
                                                              (2, None, False, {}),
                                                              (3, None, False, dict(hidden=48, intermediate=100))])
def test_the_reports_storage_is_what_the_export_writes(tmp_path, bits, group_size, symmetric, sizes):
    # the last: rows of 100 3-bit codes and columns of 100 3-bit zero points end in partly filled int32 words
    from compress import CompressionConfig, compress_model

    model = tiny_llama(**sizes)
    config = CompressionConfig(method="rtn", bits=bits, group_size=group_size, symmetric=symmetric,
                               scale_dtype=torch.bfloat16, target_modules="all-linear")
    report = compress_model(model, config, inplace=True, progress=False)
    save_hf_directory(model, tmp_path, quantized=report.quantized)
    written = 0
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        for name in report.quantized:
            for part in ("weight_packed", "weight_scale", "weight_zero_point"):
                if f"{name}.{part}" in f.keys():
                    t = f.get_tensor(f"{name}.{part}")
                    written += 8 * t.numel() * t.element_size()
    assert len(report.quantized) == 14 and written == report.storage_bits


def test_a_resave_into_the_same_directory_leaves_no_stale_weights(tmp_path):
    # one file, then shards, then one file again: each save must be what transformers loads
    from transformers import AutoModelForCausalLM

    first, second = tiny_llama(), tiny_llama(seed=1)
    save_hf_directory(first, tmp_path, dtype=torch.float32)
    save_hf_directory(second, tmp_path, dtype=torch.float32, max_shard_size="50KB")
    assert not (tmp_path / "model.safetensors").exists() and (tmp_path / "model.safetensors.index.json").exists()
    ids = torch.randint(0, 62, (1, 8))
    with torch.no_grad():
        want = second(ids).logits
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)(ids).logits, want)
        save_hf_directory(second, tmp_path, dtype=torch.float32)
        assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)(ids).logits, want)


def test_a_failed_resave_leaves_the_earlier_directory_loadable(tmp_path, monkeypatch):
    """The earlier weights go only once the new ones are written (a full disk used to leave no weights at all)."""
    from transformers import AutoModelForCausalLM, PreTrainedModel

    first = tiny_llama()
    save_hf_directory(first, tmp_path, dtype=torch.float32)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_hf_directory(tiny_llama(seed=1), tmp_path, dtype=torch.float32, max_shard_size="50KB")
    monkeypatch.undo()
    ids = torch.randint(0, 62, (1, 8))
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)(ids).logits
        assert torch.equal(got, first(ids).logits)


_RELOAD = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    out, ids_file, result = sys.argv[1], sys.argv[2], sys.argv[3]
    ids = torch.load(ids_file, weights_only=True)
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tensors = {"logits": model(ids).logits.float().detach()}
    tensors.update({k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith(".weight")})
    embeddings = model.get_input_embeddings()
    tensors["tied"] = torch.tensor(model.get_output_embeddings().weight is embeddings.weight)
    if len(sys.argv) > 4:
        from peft import PeftModel
        peft = PeftModel.from_pretrained(model, sys.argv[4])
        tensors["peft_logits"] = peft(ids).logits.float().detach()
    ours = sorted(m for m in sys.modules if m.split(".")[0] in ("tensornets", "compress", "adapters"))
    assert not ours, ours
    tensors["dtype_is_storage"] = torch.tensor(model.dtype == embeddings.weight.dtype)
    print(model.dtype)
    save_file(tensors, result)
""")


def _reload_elsewhere(tmp_path, out, ids, adapter=None) -> dict[str, torch.Tensor]:
    """Load ``out`` (and ``adapter``) with transformers / PEFT in a fresh process outside the repository."""
    torch.save(ids, tmp_path / "ids.pt")
    script = tmp_path / "reload.py"
    script.write_text(_RELOAD)
    argv = [sys.executable, str(script), str(out), str(tmp_path / "ids.pt"), str(tmp_path / "result.safetensors")]
    if adapter is not None:
        argv.append(str(adapter))
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(str(tmp_path / "result.safetensors"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reload_without_our_packages_gives_the_same_model(tmp_path, dtype):
    """transformers alone rebuilds ``s (q − z)`` exactly, and the logits equal the in-memory model's at ``dtype``.

    float32: the reloaded weights equal ``QuantizedWeight.dequantize()`` bitwise. bfloat16: they equal
    ``(q − z) · s`` computed in bfloat16 with the scales stored in bfloat16 (compressed-tensors' order), so the
    reference is the in-memory model with those weights, evaluated in bfloat16; logits agree to float rounding
    of the forward pass (the two processes may sum in different orders).
    """
    from compress import eora_compensate

    model = tiny_llama()
    dense = tiny_llama()
    quantized = _quantize_model(model, bits=3, group_size=32)
    adapter = eora_compensate(dense, model, None, rank=4, method="svd", target_modules=list(quantized))
    out = tmp_path / "out"
    save_hf_directory(model, out, tokenizer=bos_tokenizer(), quantized=quantized, dtype=dtype)
    adapter.save_pretrained(out / "eora-adapter", dtype=dtype)
    torch.manual_seed(1)
    ids = torch.randint(0, 62, (2, 24))
    got = _reload_elsewhere(tmp_path, out, ids, out / "eora-adapter")
    assert bool(got["tied"]) and bool(got["dtype_is_storage"])

    reference = tiny_llama().to(dtype)
    reference.load_state_dict(model.state_dict())
    for name, qw in quantized.items():
        expected = qw.dequantize() if dtype == torch.float32 else _ct_dequantized(qw, dtype)
        assert torch.equal(got[f"{name}.weight"], expected), name
        with torch.no_grad():
            reference.get_submodule(name).weight.copy_(expected)
    with torch.no_grad():
        logits = reference(ids).logits.float()
        compensated = adapter.apply(reference)(ids).logits.float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_close(got["logits"], logits, tol=tol, what="reloaded logits")
    assert_close(got["peft_logits"], compensated, tol=tol, what="reloaded + PEFT EoRA logits")
    # the adapter changes the output far more than the two processes differ
    assert relative_error(got["peft_logits"], got["logits"]) > 10 * relative_error(got["peft_logits"], compensated)


def tiny_mixtral() -> nn.Module:
    """A random ``MixtralForCausalLM`` (4 experts, fused 3-D expert weights in memory), float32, eval mode."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=62, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           tie_word_embeddings=False)
    return MixtralForCausalLM(config).eval()


def test_mixture_of_experts_with_packed_layers_reloads_in_its_in_memory_layout(tmp_path):
    """transformers stores Mixtral's experts per expert and fuses them on load, a conversion its loader does not
    run beside a quantization_config: the directory holds the fused in-memory tensors and reloads to the same
    logits; without packed layers the original per-expert layout is kept."""
    from safetensors import safe_open

    model = tiny_mixtral()
    quantized = _quantize_model(model, bits=4, group_size=32)
    assert sorted(quantized) == sorted(f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkvo")
    out = tmp_path / "out"
    save_hf_directory(model, out, quantized=quantized, dtype=torch.float32)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.experts.gate_up_proj" in keys and not any(".experts.0." in k for k in keys)
    torch.manual_seed(1)
    ids = torch.randint(0, 62, (2, 16))
    got = _reload_elsewhere(tmp_path, out, ids)
    with torch.no_grad():
        assert_close(got["logits"], model(ids).logits, tol=1e-5, what="reloaded logits")
    for name, qw in quantized.items():
        assert torch.equal(got[f"{name}.weight"], qw.dequantize()), name

    dense = tmp_path / "dense"
    save_hf_directory(tiny_mixtral(), dense, dtype=torch.float32)
    with safe_open(str(dense / "model.safetensors"), "pt") as f:
        assert any(".block_sparse_moe.experts.0." in k for k in f.keys())


def test_bf16_export_error_is_the_bf16_evaluation_error(tmp_path):
    """Against the float32 in-memory model, the bf16 directory is as close as the in-memory model cast to bf16.

    The export adds only the rounding of the scales to bfloat16 (relative 2^-9 per group) to the bf16 cast.
    """
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    quantized = _quantize_model(model, bits=4, group_size=32)
    save_hf_directory(model, tmp_path, quantized=quantized)
    torch.manual_seed(1)
    ids = torch.randint(0, 62, (2, 24))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    with torch.no_grad():
        exact = model(ids).logits
        cast = copy_to(model, torch.bfloat16)(ids).logits.float()
        got = reloaded(ids).logits.float()
    assert reloaded.dtype == torch.bfloat16
    assert relative_error(got, exact) <= 2 * relative_error(cast, exact)


def copy_to(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    twin = tiny_llama().to(dtype)
    twin.load_state_dict(model.state_dict())
    return twin


def test_symmetric_checkpoint_loads_packed_through_compressed_tensors(tmp_path):
    """Without the ``dequantize`` key, transformers keeps symmetric weights packed until the first forward."""
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    quantized = _quantize_model(model, bits=4, group_size=32, symmetric=True)
    save_hf_directory(model, tmp_path, quantized=quantized, dtype=torch.float32, dequantize_on_load=False)
    assert "dequantize" not in json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    layer = reloaded.get_submodule("model.layers.0.mlp.up_proj")
    assert hasattr(layer, "weight_packed") and not hasattr(layer, "weight")
    torch.manual_seed(1)
    ids = torch.randint(0, 62, (1, 16))
    with torch.no_grad():
        assert_close(reloaded(ids).logits, model(ids).logits, what="logits")


def test_mixed_schemes_and_a_dense_linear_reload(tmp_path):
    """Symmetric schemes per layer group and one linear left dense reload exactly (packed path)."""
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    quantized = _quantize_model(model, bits=4, group_size=32, symmetric=True,
                                skip=("lm_head", "model.layers.1.mlp.down_proj"))
    for name in [n for n in quantized if ".mlp." in n]:
        W = model.get_submodule(name).weight
        quantized[name] = _rtn(W, 3, 64, symmetric=True)
        with torch.no_grad():
            W.copy_(quantized[name].dequantize())
    save_hf_directory(model, tmp_path, quantized=quantized, dtype=torch.float32)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert len(qc["config_groups"]) == 2 and "dequantize" not in qc
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    torch.manual_seed(1)
    ids = torch.randint(0, 62, (1, 16))
    with torch.no_grad():
        assert_close(reloaded(ids).logits, model(ids).logits, what="logits")  # the first forward unpacks
    for name, module in model.named_modules():
        if type(module) is nn.Linear:
            assert torch.equal(reloaded.get_submodule(name).weight, module.weight), name

    quantized["model.layers.0.mlp.up_proj"] = _rtn(model.model.layers[0].mlp.up_proj.weight, 3, 64, False)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.copy_(quantized["model.layers.0.mlp.up_proj"].dequantize())
    with pytest.raises(ValueError, match="asymmetric"):
        save_hf_directory(model, tmp_path / "mixed", quantized=quantized)


def test_partly_quantized_fused_shards_warn_for_vllm(tmp_path):
    """vLLM fuses q/k/v and gate/up and refuses shards with different schemes: the export says so (and still
    writes the directory, which transformers loads); quantizing every block linear alike raises no warning."""
    import warnings

    model = tiny_llama()
    quantized = _quantize_model(model, bits=4, group_size=32, symmetric=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_hf_directory(model, tmp_path / "all", quantized=quantized, dtype=torch.float32)
    del quantized["model.layers.1.self_attn.k_proj"]
    quantized["model.layers.0.mlp.up_proj"] = _rtn(model.model.layers[0].mlp.up_proj.weight, 3, 32, True)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.copy_(quantized["model.layers.0.mlp.up_proj"].dequantize())
    with pytest.warns(UserWarning, match=r"vLLM fuses model\.layers\.1\.self_attn\.\{q_proj,k_proj,v_proj\}, "
                      r"model\.layers\.0\.mlp\.\{gate_proj,up_proj\} into one layer .*\(2 such groups\)"):
        report = save_hf_directory(model, tmp_path / "partial", quantized=quantized, dtype=torch.float32)
    assert "model.layers.1.self_attn.q_proj" in {layer.name for layer in report.packed}


def test_dense_model_and_untied_head(tmp_path):
    """No quantized layer: a plain checkpoint in the storage dtype, no quantization_config; untied heads are kept."""
    from transformers import AutoModelForCausalLM

    model = tiny_llama(tie=False)
    report = save_hf_directory(model, tmp_path, dtype=torch.float16)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    assert report.packed == [] and report.weight_bytes < 2 * sum(p.numel() for p in model.parameters()) + 10_000
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    assert reloaded.dtype == torch.float16
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight.to(torch.float16))


def test_subclasses_of_nn_linear_are_packed(tmp_path):
    """Falcon's projections are FalconLinear (an nn.Linear subclass): they were stored dense, none packed, though
    compressed-tensors matches its "Linear" target along the class hierarchy."""
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    model = FalconForCausalLM(FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           new_decoder_architecture=False)).eval()
    quantized = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            assert type(module) is not nn.Linear  # FalconLinear
            quantized[name] = _rtn(module.weight, 4, 16, False)
            with torch.no_grad():
                module.weight.copy_(quantized[name].dequantize())
    report = save_hf_directory(model, tmp_path / "out", quantized=quantized, dtype=torch.float32)
    assert sorted(p.name for p in report.packed) == sorted(quantized) and len(quantized) == 8 and not report.not_packed
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    got = _reload_elsewhere(tmp_path, tmp_path / "out", ids)
    with torch.no_grad():
        assert_close(got["logits"], model(ids).logits, tol=1e-5, what="reloaded logits")
    for name, qw in quantized.items():
        assert torch.equal(got[f"{name}.weight"], qw.dequantize()), name


def test_quantized_conv1d_layers_are_stored_dense_with_a_warning(tmp_path):
    """GPT-2's Conv1D projections cannot be packed (compressed-tensors packs nn.Linear): they keep their full size,
    which the export says, and still reload as the quantized values."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2)).eval()
    conv = model.transformer.h[0].mlp.c_fc  # Conv1D: weight (in, out)
    qw = _rtn(conv.weight.T, bits=4, group_size=16, symmetric=True)
    with torch.no_grad():
        conv.weight.copy_(qw.dequantize().T)
    with pytest.warns(UserWarning, match=r"1 quantized layer\(s\) \(Conv1D.*stored dense"):
        report = save_hf_directory(model, tmp_path, quantized={"transformer.h.0.mlp.c_fc": qw}, dtype=torch.float32)
    assert list(report.not_packed) == ["transformer.h.0.mlp.c_fc"] and report.packed == []
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    assert torch.equal(reloaded.transformer.h[0].mlp.c_fc.weight, conv.weight)


def test_bad_input_names_the_argument(tmp_path):
    model = tiny_llama()
    qw = _rtn(model.model.layers[0].mlp.up_proj.weight, 4, 32, False)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        save_hf_directory(nn.Linear(4, 4), tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        save_hf_directory(model, tmp_path, dtype=torch.int8)
    with pytest.raises(ValueError, match="does not have"):
        save_hf_directory(model, tmp_path, quantized={"model.layers.9.mlp.up_proj": qw})
    with pytest.raises(ValueError, match="shape"):
        save_hf_directory(model, tmp_path, quantized={"model.layers.0.mlp.down_proj": qw})
    with pytest.raises(TypeError, match="QuantizedWeight"):
        save_hf_directory(model, tmp_path, quantized={"model.layers.0.mlp.up_proj": qw.dequantize()})


def test_factorized_model_is_refused(tmp_path):
    from compress import CompressionConfig, compress_model

    model = tiny_llama()
    report = compress_model(model, CompressionConfig(method="svd", keep=0.5, target_modules=["up_proj"]))
    with pytest.raises(ValueError, match="save_compressed"):
        save_hf_directory(report.model, tmp_path)


def test_weights_changed_after_quantization_or_side_branches_are_refused(tmp_path):
    """A residual merged into quantized layers, or applied as a side branch, is never silently dropped: packing the
    codes would lose it (and a side branch's tensors have names no plain model has)."""
    from compress import CompressionConfig, collect_activation_stats, compress_model, eora_compensate, save_compressed

    model = tiny_llama()
    calib = [torch.randint(0, 62, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    targets = ["up_proj", "down_proj"]
    stats = collect_activation_stats(model, calib, targets, progress=False)
    report = compress_model(model, CompressionConfig(method="rtn", bits=3, group_size=32, target_modules=targets),
                            stats, progress=False)
    eora = eora_compensate(model, report.model, stats, rank=4, progress=False)
    save_hf_directory(report.model, tmp_path / "plain", quantized=report.quantized)  # the codes' own weights pass
    with pytest.raises(ValueError, match="differs from its quantized codes .* merged into it after quantization"):
        save_hf_directory(eora.merge(report.model), tmp_path / "merged", quantized=report.quantized)
    applied = eora.apply(report.model)
    with pytest.raises(ValueError, match="save_hf_directory: layers .* carry an adapter side branch"):
        save_hf_directory(applied, tmp_path / "applied", quantized=report.quantized)
    with pytest.raises(ValueError, match="save_compressed: layers .* carry an adapter side branch"):
        save_compressed(applied, tmp_path / "applied-ours")


def test_a_compiled_model_compresses_and_saves_as_the_module_it_wraps(tmp_path):
    from transformers import AutoModelForCausalLM

    from compress import CompressionConfig, collect_activation_stats, compress_model

    model = tiny_llama()
    compiled = torch.compile(model)
    calib = [torch.randint(0, 62, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    stats = collect_activation_stats(compiled, calib, ["up_proj"], progress=False)
    assert all(not name.startswith("_orig_mod.") for name in stats)
    config = CompressionConfig(method="rtn", bits=4, group_size=32, target_modules=["up_proj"])
    report = compress_model(compiled, config, stats, progress=False)
    save_hf_directory(torch.compile(report.model), tmp_path, quantized=report.quantized, dtype=torch.float32)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    with torch.no_grad():
        assert_close(reloaded(calib[0]).logits, report.model(calib[0]).logits, what="logits")


@pytest.mark.slow
def test_smollm2_3bit_directory_size_and_logits(tmp_path, smollm2_copy):
    """3-bit g64 SmolLM2: directory ≤ 0.45x the bf16 one (embeddings included), every layer ≤ 4/16, same logits.

    Measured: 104.1 MB vs 272.6 MB (0.382x); packed linears 43.8 MB for 212.3 MB of bf16 weights (0.206).
    """
    from transformers import AutoModelForCausalLM

    model, tok = smollm2_copy
    dense = save_hf_directory(model, tmp_path / "bf16", tokenizer=tok)
    quantized = _quantize_model(model, bits=3, group_size=64)
    report = save_hf_directory(model, tmp_path / "w3g64", tokenizer=tok, quantized=quantized)
    assert len(report.packed) == 210 and all(p.ratio <= (3 + 1) / 16 for p in report.packed)
    assert report.total_bytes <= 0.45 * dense.total_bytes
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "w3g64", local_files_only=True)
    ids = tok(pydoc_text()[:2000], return_tensors="pt")["input_ids"][:, :128]
    with torch.no_grad():
        exact = model(ids).logits
        got = reloaded(ids).logits.float()
        cast = model.to(torch.bfloat16)(ids).logits.float()
    assert relative_error(got, exact) <= 2 * relative_error(cast, exact)


def test_group_sizes_are_unified_exactly(tmp_path):
    """Groups of 64 shortened to 32 on narrow layers: every layer is written with groups of 32, same weights (the
    128-wide down_proj keeps two groups per row: not every layer is per row, so this is not the channel case)."""
    from transformers import AutoModelForCausalLM

    from compress.export import regroup

    model = tiny_llama(hidden=32, intermediate=128)
    quantized = {}
    for name, module in model.named_modules():
        if type(module) is nn.Linear and name != "lm_head":
            quantized[name] = _rtn(module.weight, 3, min(64, module.in_features), False)
            with torch.no_grad():
                module.weight.copy_(quantized[name].dequantize())
    assert {q.group_size for q in quantized.values()} == {32, 64}
    qw = quantized["model.layers.0.mlp.down_proj"]
    assert torch.equal(regroup(qw, 16).dequantize(), qw.dequantize())
    with pytest.raises(ValueError, match="divide"):
        regroup(qw, 48)
    report = save_hf_directory(model, tmp_path, quantized=quantized, dtype=torch.float32)
    assert {p.group_size for p in report.packed} == {32}
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert [g["weights"]["group_size"] for g in qc["config_groups"].values()] == [32] and qc["dequantize"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    for name in quantized:
        assert torch.equal(reloaded.get_submodule(name).weight, model.get_submodule(name).weight), name


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_scale_dtype_of_the_export_makes_the_directory_the_evaluated_model(method):
    # quantized with the scales the checkpoint stores (bf16), the reloaded weights are the in-memory ones, bitwise:
    # what was evaluated and compensated is what ships
    from transformers import AutoModelForCausalLM

    from compress import CompressionConfig, collect_activation_stats, compress_model

    model = tiny_llama().to(torch.bfloat16)
    batches = [torch.randint(0, 62, (2, 16)) for _ in range(2)]
    stats = collect_activation_stats(model, batches, progress=False)
    config = CompressionConfig(method=method, bits=3, group_size=32, scale_dtype=torch.bfloat16)
    report = compress_model(model, config, stats, progress=False)
    assert report.config.to_dict()["scale_dtype"] == "bfloat16"
    with tempfile.TemporaryDirectory() as out:
        save_hf_directory(report.model, out, quantized=report.quantized, dtype=torch.bfloat16)
        reloaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
        for name in report.quantized:
            assert torch.equal(reloaded.get_submodule(name).weight, report.model.get_submodule(name).weight), name
    with pytest.raises(TypeError, match="scale_dtype=torch.int8 must be a floating torch dtype"):
        CompressionConfig(method="rtn", scale_dtype=torch.int8)
    # with float32 scales (the API's default) a bf16 export rounds them: the file is not the evaluated model, said
    float_scales = compress_model(model.float(), CompressionConfig(method=method, bits=3, group_size=32), stats,
                                  progress=False)
    with tempfile.TemporaryDirectory() as out, pytest.warns(UserWarning, match=r"float32 scales that torch.bfloat16 "
                                                            r"cannot hold.*CompressionConfig\(scale_dtype="):
        save_hf_directory(float_scales.model, out, quantized=float_scales.quantized, dtype=torch.bfloat16)


@pytest.mark.parametrize("symmetric", [False, True])
def test_per_row_layers_of_several_widths_export_as_channel_scales(tmp_path, symmetric):
    """Per-row quantization (group_size=None) of layers 32 and 64 wide was regrouped to their gcd and written as
    groups of 32: twice the scales, and a config that said "group". It is compressed-tensors' "channel" strategy,
    one (out, 1) scale per row whatever the width, and transformers rebuilds the same weights from it."""
    from transformers import AutoModelForCausalLM

    model = tiny_llama(hidden=32, intermediate=64)
    quantized = {}
    for name, module in model.named_modules():
        if type(module) is nn.Linear and name != "lm_head":
            quantized[name] = _rtn(module.weight, 4, module.in_features, symmetric)
            with torch.no_grad():
                module.weight.copy_(quantized[name].dequantize())
    assert {q.group_size for q in quantized.values()} == {32, 64}
    report = save_hf_directory(model, tmp_path, quantized=quantized, dtype=torch.float32)
    assert {p.name: p.group_size for p in report.packed} == {n: q.group_size for n, q in quantized.items()}
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    assert group["weights"]["strategy"] == "channel" and group["weights"]["group_size"] is None
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        for name, qw in quantized.items():
            assert tuple(f.get_slice(f"{name}.weight_scale").get_shape()) == (qw.shape[0], 1), name
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    for name in quantized:
        assert torch.equal(reloaded.get_submodule(name).weight, model.get_submodule(name).weight), name
