"""Compressed-model directories: bitwise round trips from the directory alone, storage dtype, corrupt files and
mismatching manifests, models that are not transformers models, 0.1.0 files, and load memory without the dense
model."""

import copy
import json
import re
import threading
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_model
from torch import nn

from compress import (
    CompressionConfig,
    collect_activation_stats,
    compress_model,
    load_compressed,
    load_compressed_directory,
    save_compressed,
)
from compress.checkpoint import MANIFEST_FILE, WEIGHTS_FILE
from tensornets import FactorizedLinear
from tensornets.io import module_spec
from tiny_hf import bos_tokenizer, tiny_llama


def _compressed(method: str, **kw) -> nn.Module:
    model = tiny_llama()
    batches = [torch.randint(0, 62, (2, 16)) for _ in range(2)]
    stats = collect_activation_stats(model, batches, progress=False)
    return compress_model(model, CompressionConfig(method=method, **kw), stats, progress=False).model


@pytest.fixture(scope="module")
def saved_lowrank(tmp_path_factory) -> tuple[nn.Module, Path]:
    model = _compressed("whitened_svd", keep=0.5)
    return model, save_compressed(model, tmp_path_factory.mktemp("lowrank"))


def _assert_bitwise_equal(got: nn.Module, want: nn.Module) -> None:
    for what in ("named_parameters", "named_buffers"):
        g, w = dict(getattr(got, what)()), dict(getattr(want, what)())
        assert g.keys() == w.keys(), what
        for k in w:
            assert g[k].dtype == w[k].dtype and torch.equal(g[k], w[k]), k


@pytest.mark.parametrize("method,kw", [("whitened_svd", dict(keep=0.5)), ("tt", dict(keep=0.5))])
def test_directory_alone_reloads_bitwise(tmp_path, method, kw):
    model = _compressed(method, **kw)
    out = save_compressed(model, tmp_path / "out", tokenizer=bos_tokenizer())
    assert {WEIGHTS_FILE, MANIFEST_FILE, "config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "model.safetensors").exists()  # transformers alone must refuse it, not load random layers
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    factorized = {n: m for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}
    assert manifest["layers"] == {n: module_spec(m) for n, m in factorized.items()} and len(factorized) == 14
    assert manifest["shared"] == {"lm_head.weight": "model.embed_tokens.weight"}

    loaded = load_compressed_directory(out)
    assert type(loaded) is type(model) and not loaded.training
    _assert_bitwise_equal(loaded, model)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.randint(0, 62, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    # the same directory onto a model the caller built
    _assert_bitwise_equal(load_compressed(tiny_llama(seed=1), out), model)


def test_the_two_checkpoint_kinds_never_share_a_directory(tmp_path, saved_lowrank):
    # config.json + a stale model.safetensors would make transformers load random layers with a warning only
    from compress.export import save_hf_directory

    model, _ = saved_lowrank
    dense = tiny_llama()
    save_hf_directory(dense, tmp_path / "hf")
    with pytest.raises(ValueError, match=r"already holds model.safetensors .*save_compressed"):
        save_compressed(model, tmp_path / "hf")
    assert not (tmp_path / "hf" / WEIGHTS_FILE).exists()
    save_compressed(model, tmp_path / "ours")
    with pytest.raises(ValueError, match=rf"already holds {MANIFEST_FILE}, {WEIGHTS_FILE} .*save_hf_directory"):
        save_hf_directory(dense, tmp_path / "ours")
    save_compressed(model, tmp_path / "ours")  # its own files are rewritten in place


def test_storage_dtype(tmp_path, saved_lowrank):
    model, _ = saved_lowrank
    out = save_compressed(model, tmp_path, dtype=torch.bfloat16)
    loaded = load_compressed_directory(out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    want = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    got = loaded.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(TypeError, match="dtype"):
        save_compressed(model, tmp_path, dtype=torch.int8)
    with pytest.raises(ValueError, match="'0.weight' is on the meta device"):
        save_compressed(nn.Sequential(nn.Linear(4, 4, device="meta")), tmp_path)


def test_a_storage_dtype_that_overflows_is_refused_before_writing(tmp_path, saved_lowrank):
    model = copy.deepcopy(saved_lowrank[0])
    with torch.no_grad():
        model.model.norm.weight.fill_(1e6)  # beyond float16's 65504: would be stored as inf
    with pytest.raises(ValueError, match=r"dtype=torch.float16 turns finite entries of 'model.norm.weight' "
                                         r"\(entries up to 1e\+06\) into inf.*pass dtype=torch.bfloat16"):
        save_compressed(model, tmp_path / "half", dtype=torch.float16)
    assert not (tmp_path / "half").exists()
    loaded = load_compressed_directory(save_compressed(model, tmp_path / "bf16", dtype=torch.bfloat16))
    assert torch.equal(loaded.model.norm.weight, model.model.norm.weight.bfloat16())


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_weights_name_the_file(tmp_path, saved_lowrank, damage):
    out = _copy(saved_lowrank[1], tmp_path / "d")
    data = (out / WEIGHTS_FILE).read_bytes()
    (out / WEIGHTS_FILE).write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x07" * 64)
    for load in (load_compressed_directory, lambda p: load_compressed(tiny_llama(), p)):
        with pytest.raises(ValueError, match=re.escape(str(out / WEIGHTS_FILE))):
            load(out)


def _edit_manifest(out: Path, edit) -> None:
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    edit(manifest)
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))


def _other_rank(m: dict) -> None:
    m["layers"]["model.layers.0.mlp.up_proj"]["spec"]["factorization"]["ranks"][0] += 1


def _unknown_layer(m: dict) -> None:
    m["layers"]["model.layers.7.mlp.up_proj"] = m["layers"]["model.layers.0.mlp.up_proj"]


@pytest.mark.parametrize("edit,match", [
    (_other_rank, f"{WEIGHTS_FILE} does not fit the model built from .*{MANIFEST_FILE}.*shape mismatches"),
    (_unknown_layer, f"{MANIFEST_FILE} lists layer 'model.layers.7.mlp.up_proj'"),
    (lambda m: m.update(version=99), f"{MANIFEST_FILE} has version 99"),
    (lambda m: m.update(architecture="NoSuchForCausalLM"), f"{MANIFEST_FILE} names architecture"),
])
def test_manifest_that_does_not_match_names_the_file(tmp_path, saved_lowrank, edit, match):
    out = _copy(saved_lowrank[1], tmp_path / "d")
    _edit_manifest(out, edit)
    with pytest.raises(ValueError, match=match):
        load_compressed_directory(out)


def test_a_manifest_claiming_huge_ranks_is_refused_before_anything_of_its_size_is_allocated(tmp_path, saved_lowrank):
    # the layers were built for real before the shape check: 10**9 ranks asked the allocator for hundreds of GB
    out = _copy(saved_lowrank[1], tmp_path / "d")
    _edit_manifest(out, lambda m: m["layers"]["model.layers.0.mlp.up_proj"]["spec"]["factorization"].update(
        ranks=[10**9]))
    for load in (load_compressed_directory, lambda p: load_compressed(tiny_llama(), p)):
        with pytest.raises(ValueError, match=f"{WEIGHTS_FILE} does not fit the model built from .*shape mismatches"):
            load(out)


def test_unreadable_manifest_and_missing_files(tmp_path, saved_lowrank):
    out = _copy(saved_lowrank[1], tmp_path / "d")
    (out / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=f"{MANIFEST_FILE} is not valid JSON"):
        load_compressed_directory(out)
    for load in (load_compressed_directory, lambda p: load_compressed(tiny_llama(), p)):
        with pytest.raises(FileNotFoundError, match="holds no"):
            load(tmp_path / "missing")


def test_load_onto_an_empty_base_and_device_names(tmp_path, saved_lowrank):
    """A base built on meta (accelerate.init_empty_weights) is filled, not left on meta; 'cpu:0' is a device, 'meta'
    is refused by name (not as a corrupt file)."""
    from accelerate import init_empty_weights

    model, out = saved_lowrank
    with init_empty_weights():
        base = tiny_llama(seed=1)
    _assert_bitwise_equal(load_compressed(base, out), model)
    _assert_bitwise_equal(load_compressed_directory(out, device="cpu:0"), model)
    with pytest.warns(UserWarning, match=r"torch.float32 -> torch.float16"):  # a half base is not a bitwise copy
        load_compressed(tiny_llama(seed=1).half(), out)
    compiled = torch.compile(tiny_llama(seed=1))  # loads into the module the wrapper holds, returns the wrapper
    assert load_compressed(compiled, out) is compiled
    _assert_bitwise_equal(compiled._orig_mod, model)
    with pytest.raises(ValueError, match="device='meta': meta holds no values; load to 'cpu'"):
        load_compressed_directory(out, device="meta")


def test_plain_module_reloads_onto_a_rebuilt_model_only(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16))
    stats = collect_activation_stats(model, [torch.randn(64, 32) for _ in range(2)], progress=False)
    compressed = compress_model(model, CompressionConfig(method="svd", keep=0.5), stats, progress=False).model
    out = save_compressed(compressed, tmp_path)
    assert not (out / "config.json").exists()
    with pytest.raises(ValueError, match="load_compressed"):
        load_compressed_directory(out)
    torch.manual_seed(1)
    _assert_bitwise_equal(load_compressed(nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16)), out),
                          compressed)
    with pytest.raises(ValueError, match=f"{MANIFEST_FILE} lists layer '2'"):
        load_compressed(nn.Sequential(nn.Linear(32, 64)), out)


def test_release_0_1_0_file_still_loads(tmp_path, saved_lowrank):
    """0.1.0 wrote ``model.safetensors`` (safetensors' ``save_model``) with the manifest in its header."""
    model, _ = saved_lowrank
    layers = {n: module_spec(m) for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}
    save_model(model, str(tmp_path / "model.safetensors"),
               metadata={"tensornets.compress": json.dumps({"version": 1, "layers": layers})})
    loaded = load_compressed(tiny_llama(seed=1), tmp_path)
    _assert_bitwise_equal(loaded, model)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    for header, match in (("{not json", "manifest is not valid JSON"), ("[1]", "lacks its 'layers' table")):
        save_model(model, str(tmp_path / "model.safetensors"), metadata={"tensornets.compress": header})
        with pytest.raises(ValueError, match=match):
            load_compressed(tiny_llama(seed=1), tmp_path)


def _peak_rss_bytes() -> int:
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak RSS")
def test_loading_never_allocates_the_dense_model(tmp_path):
    """A Llama whose dense linears would take 1.07 GB, stored at rank 2: the load's peak RSS stays far below."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=2048, intermediate_size=8192, num_hidden_layers=4,
                         num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=True)
    with init_empty_weights():
        model = LlamaForCausalLM(config)
    dense_bytes = 4 * sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, nn.Linear))
    for name, m in list(model.model.layers.named_modules()):
        if isinstance(m, nn.Linear):  # a rank-2 layer of the same shape, built without its dense weight
            model.model.layers.set_submodule(name, FactorizedLinear.create(m.in_features, m.out_features, "lowrank",
                                                                           rank=2))
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    model.tie_weights()
    out = save_compressed(model, tmp_path)
    del model

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _peak_rss_bytes()
    loaded = load_compressed_directory(out)
    grown = _peak_rss_bytes() - before
    assert grown < dense_bytes / 8, f"peak RSS grew {grown / 1e6:.0f} MB while loading; dense is {dense_bytes / 1e6:.0f} MB"
    assert isinstance(loaded.model.layers[3].mlp.down_proj, FactorizedLinear)


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _stray_tensor(out: Path) -> None:
    _edit_tensors(out, lambda t: t.update(stray=torch.zeros(2)))


def _half_core(out: Path) -> None:
    def edit(tensors):
        key = next(k for k in tensors if ".factorization." in k)
        tensors[key] = tensors[key].half()
    _edit_tensors(out, edit)


def _alias_of_nothing(out: Path) -> None:
    _edit_manifest(out, lambda m: m["shared"].update({"lm_head.weight": "model.no_such.weight"}))


def _alias_of_another_shape(out: Path) -> None:  # would load a (64,) lm_head: logits of the wrong shape
    _edit_manifest(out, lambda m: m["shared"].update({"lm_head.weight": "model.norm.weight"}))


def _alias_of_a_stored_tensor(out: Path) -> None:  # tying would silently replace the stored tensor
    _edit_manifest(out, lambda m: m["shared"].update(
        {"model.layers.0.input_layernorm.weight": "model.layers.0.post_attention_layernorm.weight"}))


def _nan_core(out: Path) -> None:  # a NaN factor loaded silently, and every forward gave NaN
    _edit_tensors(out, lambda t: t["model.layers.0.mlp.up_proj.factorization.U"].view(-1)[0:1].fill_(float("nan")))


@pytest.mark.parametrize("damage,match", [
    (_stray_tensor, r"does not fit .*unexpected keys \['stray'\]"),
    (_nan_core, rf"{WEIGHTS_FILE}: factorized layer tensors \['model.layers.0.mlp.up_proj.factorization.U'\] hold "
                r"NaN or inf"),
    (_half_core, r"holds tensors of another dtype than float32 \(the manifest's dtype\): \[.*torch.float16"),
    (_alias_of_nothing, r"shared tensors \['lm_head.weight -> model.no_such.weight'\]"),
    (_alias_of_another_shape, rf"{MANIFEST_FILE}: shared tensors \['lm_head.weight \(62, 64\) -> model.norm.weight "
                              r"\(64,\)'\] tie tensors of different shapes"),
    (_alias_of_a_stored_tensor, rf"{MANIFEST_FILE}: shared tensors \['model.layers.0.input_layernorm.weight -> "
                                rf"model.layers.0.post_attention_layernorm.weight'\] .*{WEIGHTS_FILE} stores"),
    (lambda out: _edit_manifest(out, _unknown_layer), "lists layer 'model.layers.7.mlp.up_proj'"),
], ids=["stray-tensor", "nan-core", "dtype", "shared", "shared-shape", "shared-stored", "unknown-layer"])
def test_a_checkpoint_that_does_not_fit_leaves_the_base_model_as_it_was(tmp_path, saved_lowrank, damage, match):
    out = _copy(saved_lowrank[1], tmp_path / "d")
    damage(out)
    base = tiny_llama(seed=1)
    before = _state_copy(base)
    with pytest.raises(ValueError, match=match):
        load_compressed(base, out)
    assert not any(isinstance(m, FactorizedLinear) for m in base.modules())
    after = base.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    with pytest.raises(ValueError, match=match):  # the directory loader checks the same, before assigning anything
        load_compressed_directory(out)


def test_a_base_whose_layer_has_other_sizes_is_refused(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 100))
    stats = collect_activation_stats(model, [torch.randn(64, 32) for _ in range(2)], progress=False)
    out = save_compressed(compress_model(model, CompressionConfig(method="svd", keep=0.5), stats,
                                         progress=False).model, tmp_path)
    base = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 10))  # another number of classes
    with pytest.raises(ValueError, match=r"layer '2' was saved with out_features 10 \(model\) vs 100 \(file\)"):
        load_compressed(base, out)
    assert isinstance(base[2], nn.Linear) and base[2].out_features == 10


def test_a_failed_resave_leaves_the_earlier_checkpoint_whole(tmp_path, saved_lowrank, monkeypatch):
    import compress.checkpoint as checkpoint

    model, saved = saved_lowrank
    out = _copy(saved, tmp_path / "d")
    other = _compressed("tt", keep=0.5)

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.json, "dumps", fail)  # the manifest write fails after the weights are written
    with pytest.raises(OSError, match="No space left"):
        save_compressed(other, out)
    monkeypatch.undo()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    _assert_bitwise_equal(load_compressed_directory(out), model)


def test_weights_and_manifest_of_two_saves_are_refused(tmp_path, saved_lowrank):
    # a save stopped between its two renames, or files copied from two checkpoints of the same structure: the
    # manifest of one save describing the weights of another loaded silently
    first = _copy(saved_lowrank[1], tmp_path / "first")
    second = save_compressed(saved_lowrank[0], tmp_path / "second")
    (first / MANIFEST_FILE).write_bytes((second / MANIFEST_FILE).read_bytes())
    for load in (load_compressed_directory, lambda p: load_compressed(tiny_llama(), p)):
        with pytest.raises(ValueError, match=rf"{WEIGHTS_FILE} and .*{MANIFEST_FILE} come from different saves"):
            load(first)


def test_a_save_stopped_before_config_json_is_said_on_load(tmp_path, saved_lowrank, monkeypatch):
    import compress.checkpoint as checkpoint

    out = _copy(saved_lowrank[1], tmp_path / "d")
    model = copy.deepcopy(saved_lowrank[0])
    model.config.rms_norm_eps = 1e-3  # another config.json than the one in out
    replace = checkpoint.os.replace

    def stop_at_config(src, dst):
        if Path(dst).name == "config.json":
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", stop_at_config)
    with pytest.raises(KeyboardInterrupt):
        save_compressed(model, out)
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in saved_lowrank[1].iterdir())  # no temp left
    with pytest.warns(UserWarning, match=r"config.json is not the config.json saved with these weights"):
        load_compressed_directory(out)
    save_compressed(model, out)  # saved whole: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert load_compressed_directory(out).config.rms_norm_eps == 1e-3


def test_saves_to_one_directory_at_once_run_one_after_the_other(tmp_path):
    # every rank of a distributed job saving to one path: the fixed temporary names collided (FileNotFoundError),
    # and the files of two saves could interleave
    models = [_compressed("whitened_svd", keep=keep) for keep in (0.3, 0.5, 0.7)]
    out, errors = tmp_path / "d", []

    def save(model):
        try:
            for _ in range(3):
                save_compressed(model, out)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=save, args=(m,)) for m in models]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    loaded = load_compressed_directory(out)
    assert any(_state_equal(loaded, model) for model in models)


def _state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------------------- packed quantized layers
def _mixed_net() -> nn.Module:
    """nn.Linear, transformers' Conv1D ((in, out) storage) and a Conv2d, all quantizable at group size 16."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), Conv1D(64, 128), nn.Unflatten(1, (16, 2, 2)),
                         nn.Conv2d(16, 8, 3, padding=1), nn.Flatten(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def quantized_net():
    model = _mixed_net()
    config = CompressionConfig(method="rtn", bits=4, group_size=16, target_modules=["0", "2", "4"])
    return compress_model(model, config, progress=False)


def test_quantized_layers_are_stored_packed_and_reload_bitwise(tmp_path, quantized_net):
    report = quantized_net
    dense = save_compressed(report.model, tmp_path / "dense")
    packed = save_compressed(report.model, tmp_path / "packed", quantized=report.quantized)
    manifest = json.loads((packed / MANIFEST_FILE).read_text())
    assert manifest["version"] == 3 and json.loads((dense / MANIFEST_FILE).read_text())["version"] == 2
    assert manifest["quantized"]["2"] == {"bits": 4, "group_size": 16, "symmetric": False, "kind": "conv1d",
                                          "shape": [128, 64], "dtype": "float32", "storage_dtype": "float32"}
    # 4-bit codes + a float32 scale and an int8 zero point per 16 weights: 0.125 + 0.25 + 0.0625 of float32's bytes
    ratio = (packed / WEIGHTS_FILE).stat().st_size / (dense / WEIGHTS_FILE).stat().st_size
    assert ratio < 0.5, ratio
    loaded = load_compressed(_mixed_net(), packed)
    _assert_bitwise_equal(loaded, report.model)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), report.model(x))


def test_packed_layers_follow_the_storage_dtype(tmp_path, quantized_net):
    report = quantized_net
    packed = save_compressed(report.model, tmp_path / "packed", quantized=report.quantized, dtype=torch.bfloat16)
    dense = save_compressed(report.model, tmp_path / "dense", dtype=torch.bfloat16)
    _assert_bitwise_equal(load_compressed(_mixed_net().bfloat16(), packed),
                          load_compressed(_mixed_net().bfloat16(), dense))


def test_a_transformers_model_with_packed_layers_reloads_from_its_directory_alone(tmp_path):
    model = tiny_llama()
    batches = [torch.randint(0, 62, (2, 16)) for _ in range(2)]
    stats = collect_activation_stats(model, batches, progress=False)
    report = compress_model(model, CompressionConfig(method="gptq", bits=3, group_size=16), stats, progress=False)
    out = save_compressed(report.model, tmp_path / "out", quantized=report.quantized)
    loaded = load_compressed_directory(out)
    _assert_bitwise_equal(loaded, report.model)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_packing_refuses_weights_that_are_not_the_quantized_ones(tmp_path, quantized_net):
    report = quantized_net
    changed = _mixed_net()
    changed.load_state_dict(report.model.state_dict())
    with torch.no_grad():
        changed[4].weight[0, 0, 0, 0] += 1e-3  # e.g. an adapter merged after compression
    with pytest.raises(ValueError, match=r"layer '4'.s weight is not the one quantized\['4'\] dequantizes to"):
        save_compressed(changed, tmp_path / "a", quantized=report.quantized)
    with pytest.raises(ValueError, match="quantized names layer 'head', which the model does not have"):
        save_compressed(report.model, tmp_path / "b", quantized={"head": report.quantized["0"]})
    with pytest.raises(TypeError, match=r"quantized\['0'\] is a Parameter; pass CompressionReport.quantized"):
        save_compressed(report.model, tmp_path / "c", quantized={"0": report.model[0].weight})
    assert not any((tmp_path / d).exists() for d in "abc")  # refused before anything is written


def test_a_packed_entry_that_does_not_fit_names_the_file(tmp_path, quantized_net):
    report = quantized_net
    out = save_compressed(report.model, tmp_path / "out", quantized=report.quantized)
    _edit_manifest(out, lambda m: m["quantized"]["0"].update(bits=3))
    with pytest.raises(ValueError, match=rf"{WEIGHTS_FILE}: the packed tensors of layer '0' do not fit"):
        load_compressed(_mixed_net(), out)
    _edit_manifest(out, lambda m: m["quantized"]["0"].pop("kind"))
    with pytest.raises(ValueError, match=rf"{MANIFEST_FILE}: quantized layers \['0'\] lack"):
        load_compressed(_mixed_net(), out)


def _edit_tensors(out: Path, edit) -> None:
    """Change the tensors of ``out``'s weights file in place, its header's metadata (the save id) kept."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(out / WEIGHTS_FILE), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(out / WEIGHTS_FILE))
    edit(tensors)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata=metadata)


@pytest.mark.parametrize("field,value", [("dtype", "int8"), ("storage_dtype", "int32"), ("group_size", 16.0),
                                         ("bits", 4.0), ("bits", True), ("shape", [128, 64.0]),
                                         ("symmetric", "false")])
def test_a_packed_entry_of_the_wrong_type_is_refused(tmp_path, quantized_net, field, value):
    """An integer dtype would truncate the dequantized weights; a float group size reached a reshape."""
    report = quantized_net
    out = save_compressed(report.model, tmp_path / "out", quantized=report.quantized)
    _edit_manifest(out, lambda m: m["quantized"]["2"].update({field: value}))
    with pytest.raises(ValueError, match=rf"{MANIFEST_FILE}: quantized layers \['2'\] lack a valid .*"
                                         rf"{re.escape(f'{field}={value!r}')}"):
        load_compressed(_mixed_net(), out)


@pytest.mark.parametrize("key,value,match", [
    ("weight_scale", -1.0, "weight_scale has 8 entries that are not finite positive numbers"),
    ("weight_scale", 0.0, "weight_scale has 8 entries"),
    ("weight_scale", float("nan"), r"weight_scale has 8 entries .*\(e.g. nan\)"),
    ("weight_scale", float("inf"), r"weight_scale has 8 entries .*\(e.g. inf\)"),
    ("weight_zero_point", 8, r"weight_zero_point spans \[-?\d, 8\], outside the 4-bit code range \[-8, 7\]"),
    ("weight_zero_point", -9, r"weight_zero_point spans \[-9, \d\]"),
], ids=["scale-negative", "scale-zero", "scale-nan", "scale-inf", "zero-point-8", "zero-point--9"])
def test_packed_values_out_of_their_range_are_refused(tmp_path, quantized_net, key, value, match):
    """The invariants of QuantizedWeight (scales > 0, zero points in the code range) hold for what is loaded."""
    report = quantized_net
    out = save_compressed(report.model, tmp_path / "out", quantized=report.quantized)
    _edit_tensors(out, lambda t: t[f"2.{key}"][3].fill_(value))  # one row of layer '2': 128 / 16 = 8 groups
    base = _mixed_net()
    before = _state_copy(base)
    with pytest.raises(ValueError, match=rf"{WEIGHTS_FILE}: packed layer '2' is not a valid quantization \({match}"):
        load_compressed(base, out)
    after = base.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_a_symmetric_layer_with_zero_points_is_refused(tmp_path):
    model = _mixed_net()
    report = compress_model(model, CompressionConfig(method="rtn", bits=4, group_size=16, symmetric=True,
                                                     target_modules=["0"]), progress=False)
    out = save_compressed(report.model, tmp_path / "out", quantized=report.quantized)
    load_compressed(_mixed_net(), out)
    _edit_tensors(out, lambda t: t["0.weight_zero_point"][0, 0].fill_(1))
    with pytest.raises(ValueError, match="packed layer '0' .*weight_zero_point is not all zero .*symmetric"):
        load_compressed(_mixed_net(), out)


def test_a_directory_whose_files_disagree_or_are_unreadable_is_refused(tmp_path, saved_lowrank):
    out = _copy(saved_lowrank[1], tmp_path / "d")
    _edit_manifest(out, lambda m: m.update(architecture=["LlamaForCausalLM"]))
    with pytest.raises(ValueError, match=r"names architecture \['LlamaForCausalLM'\], which this transformers"):
        load_compressed_directory(out)
    _edit_manifest(out, lambda m: m.update(architecture="BertModel"))
    with pytest.raises(ValueError, match="whose config is a BertConfig, but config.json holds a LlamaConfig"):
        load_compressed_directory(out)
    _edit_manifest(out, lambda m: m.update(architecture="LlamaForCausalLM"))
    (out / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json is not a transformers config it can read"):
        load_compressed_directory(out)


def test_save_compressed_names_a_bad_path_or_quantized_argument(tmp_path, saved_lowrank):
    model = saved_lowrank[0]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file; save_compressed writes a directory"):
        save_compressed(model, tmp_path / "file")
    with pytest.raises(TypeError, match="quantized must map layer names to QuantizedWeight"):
        save_compressed(model, tmp_path / "out", quantized=[1])
