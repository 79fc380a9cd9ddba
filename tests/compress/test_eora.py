"""EoRA on models: PEFT export, baselines, merging, bad input (sequential EoRA: test_sequential_eora.py)."""

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

import tensornets
from compress import (
    CompressionConfig,
    collect_activation_stats,
    compress_model,
    eora_compensate,
    eora_compensate_pairs,
)
from compress.targets import dense_weight
from anisotropic import anisotropic_mlp
from tolerance import assert_close


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def llama_rtn():
    model = tiny_llama()
    batches = [torch.randint(0, 96, (4, 16)) for _ in range(4)]
    stats = collect_activation_stats(model, batches, progress=False)
    quant = compress_model(model, CompressionConfig(method="rtn", bits=3, group_size=32), stats, progress=False).model
    return model, quant, stats, batches


def test_a_failed_adapter_resave_leaves_the_earlier_adapter_whole(tmp_path, llama_rtn, monkeypatch):
    import compress.eora as eora_module

    model, quant, stats, _ = llama_rtn
    eora_compensate(model, quant, stats, rank=2, progress=False).save_pretrained(tmp_path / "adapter")
    bigger = eora_compensate(model, quant, stats, rank=8, progress=False)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(eora_module, "write_safetensors", full_disk)
    with pytest.raises(OSError, match="No space left"):
        bigger.save_pretrained(tmp_path / "adapter")
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 2
    PeftModel.from_pretrained(copy.deepcopy(quant), tmp_path / "adapter")  # config and weights still agree


def test_peft_adapter_reproduces_in_memory_outputs_without_our_packages(tmp_path, llama_rtn):
    model, quant, stats, _ = llama_rtn
    eora = eora_compensate(model, quant, stats, rank=8, progress=False)
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        compensated = eora.apply(quant)(ids).logits
        assert not torch.equal(compensated, quant(ids).logits)

    eora.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 8
    # sorted, not in the hash seed's order (PEFT stores a set): the file is the same on every run
    assert config["target_modules"] == sorted(eora.factors) and len(config["target_modules"]) > 1
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"].shape == (8, 64)
    assert tensors["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"].shape == (128, 8)

    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(copy.deepcopy(quant), tmp_path / "adapter")
        assert_close(peft_model(ids).logits, compensated)

    # a fresh interpreter with only transformers + peft loads the same thing
    quant.save_pretrained(tmp_path / "base")
    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from peft import PeftModel
        from transformers import LlamaForCausalLM
        base = LlamaForCausalLM.from_pretrained({str(tmp_path / 'base')!r}).eval()
        model = PeftModel.from_pretrained(base, {str(tmp_path / 'adapter')!r})
        ids = torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True)
        with torch.no_grad():
            torch.save(model(ids).logits, {str(tmp_path / 'logits.pt')!r})
        assert not any(m.split('.')[0] in ('compress', 'tensornets', 'adapters') for m in sys.modules)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    assert_close(torch.load(tmp_path / "logits.pt", weights_only=True), compensated)


def test_eora_beats_plain_svd_and_asvd_on_held_out_model_outputs():
    model, calib, held_out = anisotropic_mlp()
    stats = collect_activation_stats(model, calib, progress=False)
    quant = compress_model(model, CompressionConfig(method="rtn", bits=2, group_size=16), stats, progress=False).model
    x = torch.cat(held_out)
    with torch.no_grad():
        ref = model(x)
        err = {}
        for method in ("eora", "svd", "asvd"):
            out = eora_compensate(model, quant, stats, rank=6, method=method, progress=False).apply(quant)(x)
            err[method] = float(torch.linalg.norm(out - ref) / torch.linalg.norm(ref))
        err["none"] = float(torch.linalg.norm(quant(x) - ref) / torch.linalg.norm(ref))
    assert err["eora"] < err["asvd"] and err["eora"] < err["svd"] and err["eora"] < err["none"], err


def test_the_adapter_table_has_one_row_per_layer_with_its_errors():
    model, calib, _ = anisotropic_mlp()
    stats = collect_activation_stats(model, calib, progress=False)
    quant = compress_model(model, CompressionConfig(method="rtn", bits=2, group_size=16), stats, progress=False).model
    eora = eora_compensate(model, quant, stats, rank=3, progress=False)
    head, rule, *rows = eora.table().splitlines()
    assert head.split() == ["layer", "shape", "rank", "rel", "out", "err", "before", "after"] and set(rule) <= {"-", " "}
    assert len(rows) == len(eora.layers) > 1
    for row, layer in zip(rows, eora.layers):
        assert row.split() == [layer.name, f"{layer.shape[0]}x{layer.shape[1]}", str(layer.rank),
                               f"{layer.error_before:.4f}", f"{layer.error_after:.4f}"]
        assert layer.error_after < layer.error_before
    assert str(eora) == f"EoRA (eora, r=3)\n{eora.table()}"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt / mallinfo2")
def test_return_freed_memory_serves_large_blocks_from_mmap():
    # glibc's dynamic threshold rises to the size of a freed block (up to 32 MB), after which such blocks come from
    # the heap and stay there; a fixed threshold keeps serving them from mmap (mallinfo2().hblks counts those)
    script = textwrap.dedent("""
        import ctypes, ctypes.util, sys
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not hasattr(libc, "mallinfo2"):
            sys.exit(77)  # not glibc >= 2.33
        class Info(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in
                        ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                         "fordblks", "keepcost")]
        libc.mallinfo2.restype = Info
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        def mmapped_while_allocated(size):
            p = libc.malloc(size)
            n = libc.mallinfo2().hblks
            libc.free(p)
            return n
        libc.free(libc.malloc(4 << 20))  # raises the dynamic threshold past 4 MB
        before = mmapped_while_allocated(1 << 20) - libc.mallinfo2().hblks
        if sys.argv[1] == "fixed":
            from compress import return_freed_memory
            return_freed_memory()
        after = mmapped_while_allocated(1 << 20) - libc.mallinfo2().hblks
        print(before, after)
    """)
    results = {}
    for mode in ("default", "fixed"):
        run = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True)
        if run.returncode == 77:
            pytest.skip("needs glibc >= 2.33 (mallinfo2)")
        assert run.returncode == 0, run.stderr
        results[mode] = tuple(int(v) for v in run.stdout.split())
    assert results["default"] == (0, 0)  # after the 4 MB free, 1 MB blocks come from the heap
    assert results["fixed"] == (0, 1)  # the fixed 128 KiB threshold serves them from mmap again


def test_pairs_give_the_same_factors_as_models():
    model, calib, _ = anisotropic_mlp()
    stats = collect_activation_stats(model, calib, progress=False)
    quant = compress_model(model, CompressionConfig(method="2:4"), stats, progress=False).model
    by_model = eora_compensate(model, quant, stats, rank=4, progress=False)
    names = ["0", "2", "4"]
    pairs = [(dense_weight(model.get_submodule(n)), dense_weight(quant.get_submodule(n))) for n in names]
    by_pairs = eora_compensate_pairs(pairs, [stats[n] for n in names], rank=4, progress=False)
    for i, n in enumerate(names):
        for a, b in zip(by_model.factors[n], by_pairs.factors[str(i)]):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="one LayerStats per pair"):
        eora_compensate_pairs(pairs, rank=4)
    keyed = dict(zip(names, pairs))
    with pytest.raises(ValueError, match=r"stats has no entry for pairs \['4'\]"):
        eora_compensate_pairs(keyed, {n: stats[n] for n in names[:2]}, rank=4, progress=False)
    with pytest.raises(ValueError, match="pair '2': its statistics are of"):
        eora_compensate_pairs(keyed, {"0": stats["0"], "2": stats["0"], "4": stats["4"]}, rank=4, progress=False)
    with pytest.warns(DeprecationWarning, match="eora_compensate_pairs"):
        old = eora_compensate(pairs, stats=[stats[n] for n in names], rank=4, progress=False)
    assert all(torch.equal(a, b) for n in old.factors for a, b in zip(old.factors[n], by_pairs.factors[n]))


def test_residual_of_low_rank_compression_merges_exactly():
    model, calib, held_out = anisotropic_mlp()
    stats = collect_activation_stats(model, calib, progress=False)
    small = compress_model(model, CompressionConfig(method="whitened_svd", keep=0.3), stats, progress=False).model
    eora = eora_compensate(model, small, stats, rank=3, progress=False)
    x = held_out[0]
    with torch.no_grad():
        merged = eora.merge(small)
        assert isinstance(merged[0], tensornets.FactorizedLinear)
        assert merged[0].factorization.ranks[0] == small[0].factorization.ranks[0] + 3
        assert_close(merged(x), eora.apply(small)(x))
    with pytest.raises(ValueError, match="already holds this adapter's residual"):
        eora.merge(merged)  # the lowrank layer was replaced: the mark travels with the new layer
    with pytest.raises(ValueError, match="PEFT LoRA wraps dense"):
        eora.save_pretrained("unused")
    mpo = compress_model(model, CompressionConfig(method="mpo", keep=0.5), stats, progress=False).model
    with pytest.raises(ValueError, match="cannot absorb a low-rank residual exactly"):
        eora_compensate(model, mpo, stats, rank=2, progress=False).merge(mpo)


#: a (16, 32) first layer and calibration inputs for it: a linear, and a 1x1 conv (its kernel is (16, 32, 1, 1))
_FIRST_LAYERS = {
    "linear": (lambda: nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8)), (64, 32)),
    "conv": (lambda: nn.Sequential(nn.Conv2d(32, 16, 1), nn.ReLU(), nn.Conv2d(16, 8, 3)), (4, 32, 6, 6)),
}


@pytest.mark.parametrize("kind", _FIRST_LAYERS)
@pytest.mark.parametrize("eora_rank", [2, 16])
def test_a_low_rank_layer_merges_its_residual_even_past_its_full_rank(tmp_path, kind, eora_rank):
    """(16, 32) at rank 6: rank 6 + 2 merges as [U B][V; A]; 6 + 16 > 16 as the exact rank-16 SVD of it (a linear
    was concatenated to rank 22, more parameters than its dense weight)."""
    build, shape = _FIRST_LAYERS[kind]
    torch.manual_seed(0)
    model = build().double().eval()
    calib = [torch.randn(*shape, dtype=torch.float64) for _ in range(3)]
    stats = collect_activation_stats(model, calib, target_modules=["0"], progress=False)
    small = compress_model(model, CompressionConfig(method="whitened_svd", rank=6, target_modules=["0"]), stats,
                           progress=False).model
    eora = eora_compensate(model, small, stats, rank=eora_rank, progress=False)
    merged = eora.merge(small)
    assert merged[0].factorization.ranks == (min(6 + eora_rank, 16),)
    with torch.no_grad():
        assert_close(merged(calib[0]), eora.apply(small)(calib[0]), tol=1e-6)
    tensornets.save(merged[0], tmp_path / "merged.safetensors")  # a structure that reloads
    assert tensornets.load(tmp_path / "merged.safetensors").spec() == merged[0].spec()


def test_dense_merge_equals_side_branch():
    model, calib, held_out = anisotropic_mlp()
    stats = collect_activation_stats(model, calib, progress=False)
    quant = compress_model(model, CompressionConfig(method="magnitude", sparsity=0.5), stats, progress=False).model
    eora = eora_compensate(model, quant, stats, rank=4, progress=False)
    with torch.no_grad():
        merged = eora.merge(quant)
        assert_close(merged(held_out[0]), eora.apply(quant)(held_out[0]))
    # once per model: a second merge (or apply on a compensated model) would add the residual twice
    with pytest.raises(ValueError, match="already holds this adapter's residual"):
        eora.merge(copy.deepcopy(merged), inplace=True)
    with pytest.raises(ValueError, match="already carries an EoRA side branch"):
        eora.apply(eora.apply(quant))
    # another adapter (a second round computed on the merged model) merges on top
    again = eora_compensate(model, merged, stats, rank=2, progress=False)
    assert again.merge(merged) is not merged
    # the side branch shares the adapter's factors, frozen: training the applied model cannot change the adapter
    applied = eora.apply(quant)
    assert not any(p.requires_grad for n, p in applied.named_parameters() if "lora_" in n)
    with pytest.raises(TypeError, match="not a PeftModel"):
        eora.apply(eora.as_peft_init(quant))


@pytest.mark.parametrize("kind", ["conv2d", "conv1d"])
def test_conv_layers_export_to_peft(tmp_path, kind):
    torch.manual_seed(0)
    if kind == "conv2d":
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2)).eval()
        batches = [torch.randn(2, 3, 9, 9) for _ in range(3)]
        targets = ["0", "2"]
    else:
        model = nn.Sequential(Conv1D(24, 16), nn.ReLU(), Conv1D(16, 24)).eval()
        batches = [torch.randn(16, 16) for _ in range(3)]
        targets = ["0", "2"]
    stats = collect_activation_stats(model, batches, target_modules=targets, progress=False)
    group_size = 9 if kind == "conv2d" else 8  # divides the input widths (27 and 72; 16 and 24)
    quant = compress_model(model, CompressionConfig(method="rtn", bits=2, group_size=group_size, target_modules=targets),
                           stats, progress=False).model
    eora = eora_compensate(model, quant, stats, rank=3, progress=False)
    eora.save_pretrained(tmp_path / "a")
    with torch.no_grad():
        want = eora.apply(quant)(batches[0])
        got = PeftModel.from_pretrained(copy.deepcopy(quant), tmp_path / "a")(batches[0])
        assert_close(got, want)
        assert torch.linalg.norm(want - model(batches[0])) < torch.linalg.norm(quant(batches[0]) - model(batches[0]))


@pytest.mark.parametrize("method", ["svd", "tucker"])
def test_factorized_convs_take_the_residual_as_a_conv_branch(method):
    """EoRA on FactorizedConv2d layers: ``apply`` adds ``BA`` as a conv branch (the model then equals dense convs of
    kernel ``W_c + BA``); ``merge`` folds it into low-rank convs exactly (rank ``r_c + r``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2)).eval()
    batches = [torch.randn(2, 3, 9, 9) for _ in range(3)]
    stats = collect_activation_stats(model, batches, target_modules=["0", "2"], progress=False)
    small = compress_model(model, CompressionConfig(method=method, keep=0.5, target_modules=["0", "2"]), stats,
                           progress=False).model
    assert isinstance(small[0], tensornets.FactorizedConv2d)
    eora = eora_compensate(model, small, stats, rank=2, progress=False)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, (B, A) in eora.factors.items():
            conv = reference.get_submodule(name)
            conv.weight.copy_((dense_weight(small.get_submodule(name)) + B @ A).reshape(conv.weight.shape))
            conv.bias.copy_(small.get_submodule(name).bias)
        x = torch.randn(2, 3, 9, 9)
        assert_close(eora.apply(small)(x), reference(x), tol=1e-5)
        if method == "svd":
            merged = eora.merge(small)
            assert merged[0].factorization.ranks[0] == small[0].factorization.ranks[0] + 2
            assert_close(merged(x), reference(x), tol=1e-5)


def test_bad_eora_calls(llama_rtn):
    model, quant, stats, _ = llama_rtn
    with pytest.raises(ValueError, match=r"rank=40 for layer 'model.layers.0.self_attn.k_proj' of shape \(32, 64\)"
                                         r".*pass a smaller rank \(the residual's rank\)"):
        eora_compensate(model, quant, stats, rank=40, progress=False)
    with pytest.raises(ValueError, match="method='gptq' must be one of"):
        eora_compensate(model, quant, stats, rank=4, method="gptq")
    with pytest.raises(ValueError, match="needs activation statistics"):
        eora_compensate(model, quant, rank=4)
    with pytest.raises(ValueError, match="'nope': it matched no module"):
        eora_compensate(model, quant, stats, rank=4, target_modules=["nope"])
    with pytest.raises(ValueError, match="pass the compressed model"):
        eora_compensate(model, None, stats, rank=4)


def test_default_targets_are_the_changed_layers(llama_rtn):
    model, _, stats, _ = llama_rtn
    mlp_only = compress_model(model, CompressionConfig(method="rtn", bits=3, group_size=32, target_modules=["up_proj"]),
                              progress=False).model
    eora = eora_compensate(model, mlp_only, stats, rank=4, progress=False)
    assert sorted(eora.factors) == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    with pytest.raises(ValueError, match="nothing to compensate"):
        eora_compensate(model, copy.deepcopy(model), stats, rank=4)


def test_storage_dtype_must_hold_the_factors(tmp_path, llama_rtn):
    # int8 wrote an all-zero adapter; a dtype name failed inside torch as "Invalid device string"
    model, quant, stats, batches = llama_rtn
    eora = eora_compensate(model, quant, stats, rank=2, progress=False)
    for dtype in (torch.int8, torch.bool, torch.float8_e4m3fn, 3):
        with pytest.raises(TypeError, match="cannot store the factors"):
            eora.save_pretrained(tmp_path / "bad", dtype=dtype)
        with pytest.raises(TypeError, match="cannot store the factors"):
            eora.lora_state_dict(dtype=dtype)
    named = eora.lora_state_dict(dtype="bfloat16")
    assert {t.dtype for t in named.values()} == {torch.bfloat16}
    assert all(torch.equal(named[k], t) for k, t in eora.lora_state_dict(dtype=torch.bfloat16).items())


def test_apply_and_merge_refuse_a_model_peft_already_compensated(tmp_path, llama_rtn):
    # PeftModel.from_pretrained(model, adapter) injects the residual into model itself: applying it again added it
    # twice (the outputs moved by the residual a second time)
    model, quant, stats, _ = llama_rtn
    eora = eora_compensate(model, quant, stats, rank=2, progress=False)
    eora.save_pretrained(tmp_path / "adapter")
    base = copy.deepcopy(quant)
    PeftModel.from_pretrained(base, tmp_path / "adapter")
    for method in (eora.apply, eora.merge):
        with pytest.raises(ValueError, match="is wrapped by a PEFT adapter .* would add it twice"):
            method(base)
    eora.as_peft_init(copy.deepcopy(quant))  # the PEFT path itself still takes plain models


def test_bad_arguments_of_the_eora_functions_name_them():
    # a NaN or another method's option was ignored; a 1-D or NaN delta, empty pairs and foreign stats failed deep
    from compress import LayerStats, eora_compensate_pairs, eora_factors, lowrank_factors, relative_output_error
    from compress.memory import return_freed_memory

    torch.manual_seed(0)
    delta, x = torch.randn(8, 6), torch.randn(40, 6)
    stats = LayerStats(x.T @ x, x.abs().sum(0), 40)
    cases = [
        (lambda: eora_factors(delta, stats, 2, ridge=float("nan")), ValueError, "ridge=nan must be a finite number"),
        (lambda: eora_factors(delta, stats, 2, alpha=0.9), ValueError, "does not read alpha=0.9 .*'asvd'"),
        (lambda: eora_factors(delta, stats, 2, method="asvd", ridge=0.1), ValueError, "does not read ridge=0.1"),
        (lambda: eora_factors(delta, stats, 2, eps=1.0), ValueError, r"eps=1.0 must be in \[0, 1\)"),
        (lambda: eora_factors(delta[0], stats, 2), ValueError, "delta must be 2-D"),
        (lambda: eora_factors(delta * float("nan"), stats, 2), ValueError, "delta has 48 NaN/inf entries"),
        (lambda: eora_compensate_pairs({}), ValueError, "pairs is empty"),
        (lambda: lowrank_factors(delta, 2, stats=x), TypeError, "stats must be a LayerStats"),
        (lambda: lowrank_factors(torch.randn(8, 5), 2, stats=stats), ValueError, "stats are of 6 inputs but the weight has 5"),
        (lambda: relative_output_error(delta, delta[:, :5], stats), ValueError, "must be equal .* matrices"),
        (lambda: return_freed_memory("x"), ValueError, "threshold='x' must be a number of bytes"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
