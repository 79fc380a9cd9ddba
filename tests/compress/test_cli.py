"""``tensornets compress`` (compress.main_job through compress.cli) on a tiny random Llama saved to disk.

The full default run on SmolLM2 is the README's main command, not a test: here a 2-layer Llama with a word-level
tokenizer over the pydoc text stands in for it (``--model-path``), with a few hundred tokens of calibration and
evaluation, so every stage (load, slices, calibration, compression, EoRA, evaluation, saving) runs in seconds.
"""

from __future__ import annotations

import collections
import json
import math
import random
import re
import shutil
import warnings

from pathlib import Path

import pytest
import torch
from torch import nn

from compress import load_compressed, load_compressed_directory
from compress.cli import main as cli_main
from compress.evaluation import perplexity
from compress import main_job
from compress.main_job import build_parser, parse_args
from compress.models import pydoc_text, token_slices

SMALL = ["--calib-tokens", "256", "--eval-tokens", "128", "--seq-len", "32", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random-init 2-layer Llama (hidden 32, MLP 64) with a 200-word WordLevel tokenizer, saved with save_pretrained."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = collections.Counter(re.findall(r"\w+|[^\w\s]", pydoc_text()[:200_000]))
    vocab = {"[UNK]": 0, **{w: i + 1 for i, (w, _) in enumerate(words.most_common(199))}}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _fresh(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["compress", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for action in build_parser()._actions:
        for flag in action.option_strings:
            assert flag in text, flag
        assert action.help, f"{action.option_strings} has no help"
    assert "fraction of the targeted layers' parameters KEPT" in text


def test_top_level_help_lists_compress(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["--help"])
    assert exc.value.code == 0
    assert "compress" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "whitened_svd", "--keep", "0"], "outside (0, 1]"),
        (["--method", "rtn", "--no-act-order"],
         "argument --act-order: --method rtn does not use it (it applies to gptq)"),
        (["--method", "sparsegpt", "--act-order"], "argument --act-order: --method sparsegpt does not use it"),
        (["--method", "svd", "--keep", "1.5"], "outside (0, 1]"),
        (["--keep", "abc"], "not a number"),
        (["--method", "quantum"], "unknown method 'quantum'"),
        (["--method", "rtn", "--keep", "0.5"], "keeps dense weights"),
        (["--eval-tokens", "100", "--seq-len", "32"], "not a multiple of --seq-len"),
        (["--eora-rank", "-1"], "must be >= 0"),
        (["--threads", "0"], "must be a positive integer"),
        (["--threads", "100000"], "is more than 4x the"),  # failed later, blaming --model-path
        (["--calib-tokens", "0"], "needs activation statistics"),
        (["--sequential", "--eora-rank", "0"], "needs --eora-rank > 0"),
        (["--sequential", "--eora-method", "svd"], "sequential compensation is EoRA's"),
        (["--sequential", "--calib-tokens", "256"], "needs at least 2 calibration windows; pass --calib-tokens >= 512"),
    ],
)
def test_bad_flags_exit_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["compress", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_output_paths_are_checked_before_any_work(tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "model.safetensors").write_text("an earlier run's")
    for argv, message in (
        (["--output-dir", str(tmp_path / "afile")], "argument --output-dir: " + str(tmp_path / "afile") + " is a file"),
        (["--output-dir", str(tmp_path / "used")], "is not empty; choose a new directory, or pass --overwrite"),
        (["--json", str(tmp_path / "afile" / "s.json")], "argument --json: " + str(tmp_path / "afile") + " is a file"),
        (["--json", str(tmp_path)], "is a directory"),
    ):
        with pytest.raises(SystemExit) as exc:
            parse_args(argv)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
    assert parse_args(["--output-dir", str(tmp_path / "used"), "--overwrite"]).overwrite
    for out in ("used", "."):  # the model's own directory, or one above it: --overwrite would replace the model
        with pytest.raises(SystemExit):
            parse_args(["--model-path", str(tmp_path / "used"), "--output-dir", str(tmp_path / out), "--overwrite"])
        assert "holds the model being compressed" in capsys.readouterr().err
    assert parse_args(["--model-path", str(tmp_path / "used"), "--output-dir", str(tmp_path / "used" / "out")])
    monkeypatch.chdir(tmp_path / "used")
    for where in (".", ".."):
        with pytest.raises(SystemExit):
            parse_args(["--output-dir", where, "--overwrite"])
        assert "is the working directory, one of its parents" in capsys.readouterr().err
    # "--output-dir=~/x": the shell does not expand ~ after "="
    monkeypatch.setenv("HOME", str(tmp_path))
    args = parse_args(["--output-dir=~/out", "--json=~/s.json"])
    assert (args.output_dir, args.json) == (str(tmp_path / "out"), str(tmp_path / "s.json"))


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where nothing can be created")
@pytest.mark.parametrize("flag, path", [("--output-dir", "/proc/tensornets-out"), ("--json", "/proc/x/s.json")])
def test_an_unwritable_output_path_is_refused_at_parsing(flag, path, capsys):
    # both used to pass the checks and fail with a raw traceback after the whole compression (root ignores file
    # modes, so /proc stands in for a read-only place on every machine)
    with pytest.raises(SystemExit) as exc:
        parse_args([flag, path])
    assert exc.value.code == 2
    assert f"argument {flag}: cannot create files in /proc" in capsys.readouterr().err


@pytest.mark.parametrize("device, message", [
    ("gpu", "'gpu' is not a torch device"), ("", "'' is not a torch device"), ("meta", "meta holds no values"),
    ("cpu:256", "'cpu:256': device index 256 is out of range"),
    pytest.param("cuda:1", "no usable cuda device", marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                                            reason="a GPU is present")),
])
def test_a_device_this_torch_cannot_use_is_refused_at_parsing(device, message, capsys):
    # they ended in raw torch tracebacks after the model had loaded
    with pytest.raises(SystemExit) as exc:
        parse_args(["--device", device])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "argument --device: " in err and message in err
    assert parse_args(["--device", "cpu:0"]).device == "cpu:0"


def test_overwrite_replaces_an_earlier_runs_directory_whole(tiny_model_dir, tmp_path, capsys):
    # a rerun must not leave the earlier run's weights or adapter beside its own config
    out = tmp_path / "out"
    cli_main(["compress", "--model-path", str(tiny_model_dir), "--eora-rank", "2", "--output-dir", str(out), *SMALL])
    assert (out / "eora-adapter").is_dir()
    (out / "notes.txt").write_text("left by the user")
    with pytest.raises(SystemExit):
        cli_main(["compress", "--model-path", str(tiny_model_dir), "--output-dir", str(out), *SMALL])
    cli_main(["compress", "--model-path", str(tiny_model_dir), "--method", "whitened_svd", "--eora-rank", "0",
              "--output-dir", str(out), "--overwrite", *SMALL])
    capsys.readouterr()
    assert not (out / "eora-adapter").exists() and not (out / "notes.txt").exists()
    assert not any(p.name.startswith((".out.previous-", ".out.new-")) for p in tmp_path.iterdir())
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert json.loads((out / "report.json").read_text())["method"] == "whitened_svd"
    assert f'load_compressed_directory("{out}")' in (out / "README.md").read_text()  # not the staging directory


def test_a_failed_save_leaves_the_earlier_directory_in_place(tiny_model_dir, tmp_path, capsys, monkeypatch):
    # written aside and swapped in whole: a save that fails (or a process killed while saving) keeps the earlier run
    out = tmp_path / "out"
    cli_main(["compress", "--model-path", str(tiny_model_dir), "--eora-rank", "0", "--output-dir", str(out), *SMALL])
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real = main_job._write_output_dir

    def fail_midway(args, target, final, *rest):
        real(args, target, final, *rest)
        raise OSError("disk full")

    monkeypatch.setattr(main_job, "_write_output_dir", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        cli_main(["compress", "--model-path", str(tiny_model_dir), "--method", "whitened_svd", "--eora-rank", "0",
                  "--output-dir", str(out), "--overwrite", *SMALL])
    capsys.readouterr()
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_missing_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="holds no config.json"):
        cli_main(["compress", "--model-path", str(tmp_path), *SMALL])


@pytest.mark.parametrize("group_size", ["16", "0"], ids=["g16", "per-row"])
def test_offload_folder_gives_the_resident_run(tiny_model_dir, tmp_path, group_size):
    """--offload-folder: the blocks (and their codes) stay on disk from loading to export, and the run's numbers and
    exported directory are the resident run's. Per row, the layers' groups differ (32 and 64 wide) and the export
    regroups them to one size: the codes written to disk were regrouped before."""
    from transformers import AutoModelForCausalLM

    argv = ["--model-path", str(tiny_model_dir), "--method", "rtn", "--bits", "4", "--group-size", group_size,
            "--eora-rank", "2", "--export-dtype", "float32", *SMALL]
    resident = cli_main_summary([*argv, "--output-dir", str(tmp_path / "resident")])
    offloaded = cli_main_summary([*argv, "--output-dir", str(tmp_path / "offloaded"),
                                  "--offload-folder", str(tmp_path / "offload")])
    assert offloaded["path"].startswith("block by block")
    assert offloaded["perplexity"] == resident["perplexity"]
    assert (tmp_path / "offload" / "compressed" / "model.layers.1.mlp.down_proj.weight.dat").is_file()
    ours, theirs = (AutoModelForCausalLM.from_pretrained(tmp_path / d).state_dict() for d in ("offloaded", "resident"))
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
    adapter = "eora-adapter/adapter_model.safetensors"
    assert (tmp_path / "offloaded" / adapter).read_bytes() == (tmp_path / "resident" / adapter).read_bytes()


@pytest.mark.parametrize("argv,message", [
    (["--model-path", "m.gguf"], "a .gguf file is de-quantized in memory as a whole"),
    (["--eora-rank", "4", "--sequential"], "--sequential needs the whole-model path"),
    (["--method", "whitened_svd", "--output-dir", "{tmp}/out"], "--method whitened_svd writes factorized layers"),
    (["--output-dir", "{tmp}/off/out"], "overlap; the output directory is replaced as a whole"),
    (["--calib-tokens", "0", "--eora-rank", "0"], "pass --calib-tokens > 0"),
])
def test_offload_folder_refuses_what_it_cannot_serve(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args([*(a.format(tmp=tmp_path) for a in argv), "--offload-folder", str(tmp_path / "off")])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncated", "random-bytes"])
def test_corrupt_checkpoint_names_the_flag(tiny_model_dir, tmp_path, damage):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated"
                        else bytes(random.Random(0).randrange(256) for _ in range(4096)))
    with pytest.raises(SystemExit, match=r"--model-path .*broken'?: transformers cannot load the model \("):
        cli_main(["compress", "--model-path", str(broken), "--output-dir", str(tmp_path / "out"), *SMALL])
    assert not (tmp_path / "out").exists()


def test_defaults_and_aliases():
    args = parse_args([])
    assert (args.method, args.bits, args.group_size, args.eora_rank, args.target_spec) == (
        "rtn", 3, 64, 64, "all-linear")
    args = parse_args(["--method", "prune24"])
    assert args.method == "2:4" and args.keep is None
    args = parse_args(["--method", "whitened_svd"])
    assert args.keep == 0.8 and args.target_spec == "mlp"  # resolved on the loaded model (compress.targets.mlp_targets)
    assert parse_args(["--targets", "q_proj,v_proj"]).target_spec == ["q_proj", "v_proj"]
    assert parse_args(["--targets", r".*\.mlp\..*"]).target_spec == r".*\.mlp\..*"
    assert parse_args(["--threads", "3"]).threads == 3 and parse_args([]).threads >= 1


def test_rtn_eora_end_to_end_writes_loadable_model_and_adapter(tiny_model_dir, tmp_path, capsys):
    from peft import PeftModel

    out, report = tmp_path / "out", tmp_path / "out" / "summary" / "summary.json"  # made as --output-dir is
    cli_main(["compress", "--model-path", str(tiny_model_dir), "--eora-rank", "4", "--output-dir", str(out),
              "--export-dtype", "float32", "--json", str(report), *SMALL])
    text = capsys.readouterr().out
    for section in ("perplexity (held-out)", "dense", "compressed", "+ EoRA r=4", "parameters", "targeted layers",
                    "whole model", "+ EoRA adapter", "storage of the targeted layers", "time per stage",
                    "calibration", "compensation (eora)", "total", "saved"):
        assert section in text, section
    summary = json.loads(report.read_text())
    ppl = summary["perplexity"]
    assert all(math.isfinite(v) and v > 1 for v in ppl.values())
    assert summary["targets"]["layers"] == 14  # 7 block linears x 2 layers, not the LM head
    assert summary["params"]["adapter"] == 2 * 4 * (2 * (32 + 32) + 2 * (32 + 16) + 3 * (32 + 64))
    assert summary["rel_output_error"]["compensated_eora_mean"] < summary["rel_output_error"]["before_eora_mean"]

    # the saved artifacts reproduce the printed perplexities
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    _, held_out = token_slices(tok, 256, 128, 32)
    # out is a Hugging Face directory (packed 3-bit weights; float32 scales and rest, so the reload is exact)
    compressed = _fresh(out)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    assert perplexity(compressed, held_out) == pytest.approx(ppl["compressed"], rel=1e-5)
    peft_model = PeftModel.from_pretrained(compressed, str(out / "eora-adapter")).eval()
    assert perplexity(peft_model, held_out) == pytest.approx(ppl["compensated_eora"], rel=1e-4)
    assert json.loads((out / "report.json").read_text())["method"] == "rtn"
    # the adapter names the compressed directory as its base: PEFT's auto class loads both in one call
    from peft import AutoPeftModelForCausalLM

    assert f"peft.AutoPeftModelForCausalLM.from_pretrained({str(out / 'eora-adapter')!r})" in text

    auto = AutoPeftModelForCausalLM.from_pretrained(str(out / "eora-adapter"), dtype=torch.float32).eval()
    assert perplexity(auto, held_out) == pytest.approx(ppl["compensated_eora"], rel=1e-4)


def test_factorized_method_with_baselines_merges_the_residual(tiny_model_dir, tmp_path, capsys):
    out, report = tmp_path / "out", tmp_path / "summary.json"
    cli_main(["compress", "--model-path", str(tiny_model_dir), "--method", "whitened_svd", "--keep", "0.5",
              "--eora-rank", "2", "--compare", "--output-dir", str(out), "--export-dtype", "float32",
              "--json", str(report), *SMALL])
    text = capsys.readouterr().out
    for label in ("+ EoRA r=2", "+ plain SVD (LoRC) r=2", "+ ASVD r=2"):
        assert label in text, label
    summary = json.loads(report.read_text())
    assert summary["params"]["keep_targets"] <= 0.5
    assert summary["params"]["model_after"] < summary["params"]["model_before"]
    # PEFT's LoRA cannot wrap a FactorizedLinear: the residual is merged into the low-rank layers, and that one
    # compensated model is what the directory holds (no uncompensated copy beside it)
    assert "adapter" not in summary["saved"] and "merged into" in summary["saved"]["residual"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == []
    from transformers import AutoTokenizer

    _, held_out = token_slices(AutoTokenizer.from_pretrained(tiny_model_dir), 256, 128, 32)
    merged = load_compressed(_fresh(tiny_model_dir), out)
    assert perplexity(merged, held_out) == pytest.approx(summary["perplexity"]["compensated_eora"], rel=1e-4)
    # the directory reloads alone (no base model), tokenizer included
    assert perplexity(load_compressed_directory(out), held_out) == pytest.approx(
        summary["perplexity"]["compensated_eora"], rel=1e-4)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(tiny_model_dir).get_vocab()
    # the size printed is every byte the directory holds
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and f.name != "report.json") / 1e6
    assert f"({size:.1f} MB, low-rank layers with the EoRA r=2 residual merged in, float32)" in text
    assert f"load: model = compress.load_compressed_directory({str(out)!r})" in text


def test_tensor_format_method_with_eora_writes_the_factorized_model_and_says_the_residual_is_not_saved(
        tiny_model_dir, tmp_path, capsys):
    out, report = tmp_path / "out", tmp_path / "summary.json"
    cli_main(["compress", "--model-path", str(tiny_model_dir), "--method", "tucker", "--keep", "0.5",
              "--eora-rank", "2", "--output-dir", str(out), "--export-dtype", "float32", "--json", str(report),
              *SMALL])
    text = capsys.readouterr().out
    summary = json.loads(report.read_text())
    # a Tucker layer cannot absorb BA and PEFT's LoRA cannot wrap it: the directory holds the factorized model
    assert summary["saved"]["residual"].startswith("not saved: PEFT's LoRA cannot wrap tensor-format layers")
    assert "adapter" not in summary["saved"] and not (out / "eora-adapter").exists()
    assert "factorized layers, float32)" in summary["saved"]["compressed"]
    from transformers import AutoTokenizer

    _, held_out = token_slices(AutoTokenizer.from_pretrained(tiny_model_dir), 256, 128, 32)
    assert perplexity(load_compressed_directory(out), held_out) == pytest.approx(
        summary["perplexity"]["compressed"], rel=1e-4)
    assert "residual             not saved" in text


def _tiny_dir(arch: str, tokenizer_dir, path):
    """A random-init 2-layer OPT or GPT-2 (width 32) saved with the tiny Llama's tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if arch == "opt":
        model = OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                         num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4,
                                           n_positions=64, bos_token_id=0, eos_token_id=0))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("arch, names", [("opt", ("fc1", "fc2")), ("gpt2", ("mlp.c_fc", "mlp.c_proj"))])
def test_factorizing_default_targets_the_feed_forward_layers_of_other_architectures(arch, names, tiny_model_dir,
                                                                                     tmp_path, capsys):
    """--targets auto (= mlp) for a factorizing method finds each architecture's feed-forward linears."""
    from compress.targets import find_targets, mlp_targets

    path = _tiny_dir(arch, tiny_model_dir, tmp_path / arch)
    summary = cli_main_summary(["--model-path", str(path), "--method", "whitened_svd", "--keep", "0.5",
                                "--eora-rank", "2", *SMALL])
    assert summary["targets"]["layers"] == 4 and summary["params"]["keep_targets"] <= 0.5
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    assert sorted(find_targets(model, mlp_targets(model))) == sorted(f"{prefix}.{i}.{n}" for i in range(2)
                                                                     for n in names for prefix in [
                                                                         "model.decoder.layers" if arch == "opt"
                                                                         else "transformer.h"])
    with pytest.raises(ValueError, match="target_modules='mlp' found no feed-forward linears"):
        mlp_targets(nn.Sequential(nn.Linear(4, 4)))


def test_mlp_targets_leave_a_mixtures_router_alone():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    from compress.targets import find_targets, mlp_targets

    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2))
    # 4 experts x (gate_up 2·16 x 32 + down 32 x 16) = 6,144 parameters
    with pytest.warns(UserWarning, match=r"target_modules='mlp' leaves 6,144 parameters dense: 1 Qwen2MoeExperts "
                      r"module\(s\) \(\['model.layers.0.mlp.experts'\]\) hold them as fused 3-D tensors"):
        spec = mlp_targets(model)
    names = sorted(find_targets(model, spec))
    assert names == [f"model.layers.0.mlp.shared_expert.{n}" for n in ("down_proj", "gate_proj", "up_proj")]


def _tiny_qwen2_moe(tokenizer_dir, path):
    """A random-init 2-layer Qwen2-MoE (width 32, 4 fused experts, a shared expert and its 1 x 32 gate)."""
    from transformers import AutoTokenizer, Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_mixture_says_what_it_leaves_dense_and_exclude_drops_its_gate(tiny_model_dir, tmp_path, capsys):
    """all-linear on a mixture: its fused 3-D experts stay dense with a warning; the shared expert's 1 x 32 gate
    caps the EoRA rank at 1, and the refusal names --exclude, which leaves the gate out."""
    path = _tiny_qwen2_moe(tiny_model_dir, tmp_path / "moe")
    argv = ["--model-path", str(path), "--method", "rtn", "--bits", "4", "--group-size", "16", "--eora-rank", "4",
            *SMALL]
    with pytest.raises(SystemExit, match=r"--eora-rank 4 exceeds min\(out, in\) = 1 of layer "
                       r"'model.layers.\d.mlp.shared_expert_gate' \(2 targeted layers that small\); pass "
                       r"--eora-rank <= 1, or leave such layers out with --exclude shared_expert_gate"):
        cli_main_summary(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = cli_main_summary([*argv, "--exclude", "shared_expert_gate"])
    fused = [w for w in caught if "'all-linear' leaves 12,288 parameters dense: 2 Qwen2MoeExperts" in str(w.message)]
    assert len(fused) == 1  # said once, not once per target selection (it was 3 times)
    assert summary["targets"]["exclude"] == ["shared_expert_gate"]
    # q/k/v/o and the shared expert's gate/up/down in each of 2 layers
    assert summary["targets"]["layers"] == 14
    assert "excluded: shared_expert_gate" in capsys.readouterr().out


def test_prune24_without_compensation(tiny_model_dir, capsys):
    summary = cli_main_summary(["--model-path", str(tiny_model_dir), "--method", "prune24", "--eora-rank", "0",
                                *SMALL])
    assert summary["params"]["keep_targets"] == pytest.approx(0.5)
    assert set(summary["perplexity"]) == {"dense", "compressed"}
    assert "compensation (eora)" not in capsys.readouterr().out


def cli_main_summary(argv):
    from compress.main_job import main

    return main(argv)


def test_sequential_eora_and_demo_routing(tiny_model_dir, capsys, monkeypatch):
    summary = cli_main_summary(["--model-path", str(tiny_model_dir), "--eora-rank", "2", "--sequential", *SMALL])
    out = capsys.readouterr().out
    assert "and sequential EoRA" in out and "EoRA sequential r=2" in out
    # both are evaluated, each with its share of the log-perplexity gap
    assert {"compensated_eora", "compensated_eora_sequential"} <= set(summary["perplexity"])
    assert set(summary["recovered"]) == {"compensated_eora", "compensated_eora_sequential"}
    err = summary["rel_output_error"]
    assert err["compensated_eora_mean"] < err["before_eora_mean"]

    import tensornets.demo

    calls = []
    monkeypatch.setattr(tensornets.demo, "main", lambda argv: calls.append(argv))
    cli_main(["demo", "--reps", "1"])
    assert calls == [["--reps", "1"]]


def test_gptq_with_eora_exports_an_adapter_and_beats_rtn(tiny_model_dir, tmp_path, capsys):
    """The issue's command at a small setting: --method gptq --bits 3 --group-size G --eora-rank R."""
    from peft import PeftModel

    out = tmp_path / "out"
    gptq = cli_main_summary(["--model-path", str(tiny_model_dir), "--method", "gptq", "--bits", "3", "--group-size",
                             "16", "--eora-rank", "4", "--output-dir", str(out), *SMALL])
    text = capsys.readouterr().out
    assert "gptq 3-bit, group 16, act-order" in text and "+ EoRA r=4" in text
    assert "writes pruned weights dense" not in text  # nothing pruned: the storage line is what the export writes
    assert gptq["targets"]["layers"] == 14 and gptq["params"]["keep_targets"] == 1.0
    err = gptq["rel_output_error"]
    assert err["compensated_eora_mean"] < err["before_eora_mean"]
    rtn = cli_main_summary(["--model-path", str(tiny_model_dir), "--method", "rtn", "--bits", "3", "--group-size", "16",
                            "--eora-rank", "4", *SMALL])
    assert err["compressed_mean"] < rtn["rel_output_error"]["compressed_mean"]
    # the storage line is the packed tensors --output-dir holds: 3-bit codes, 16-bit scales, 3-bit zero points
    from safetensors import safe_open

    written = 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for key in f.keys():
            if key.endswith((".weight_packed", ".weight_scale", ".weight_zero_point")):
                tensor = f.get_tensor(key)
                written += tensor.numel() * tensor.element_size()
    assert gptq["storage_16bit"]["compressed_mb"] == pytest.approx(written / 1e6, rel=1e-12)

    from transformers import AutoTokenizer

    _, held_out = token_slices(AutoTokenizer.from_pretrained(tiny_model_dir), 256, 128, 32)
    # the CLI loads this float32 directory in its export dtype (bfloat16), so the directory it writes is the model it
    # evaluated: the reload gives its perplexities (they differed by 7e-5 when it evaluated the float32 model)
    compressed = _fresh(out)
    assert perplexity(compressed, held_out) == pytest.approx(gptq["perplexity"]["compressed"], rel=1e-5)
    peft_model = PeftModel.from_pretrained(compressed, str(out / "eora-adapter")).eval()
    assert perplexity(peft_model, held_out) == pytest.approx(gptq["perplexity"]["compensated_eora"], rel=1e-5)


def test_observer_flag_reaches_the_quantizer(tiny_model_dir, capsys):
    """--observer mse clips each group's range: the report says so and the codes differ from min-max's."""
    assert parse_args([]).observer == "minmax" and parse_args(["--observer", "mse"]).observer == "mse"
    runs = {}
    for observer in ("minmax", "mse"):
        runs[observer] = cli_main_summary(["--model-path", str(tiny_model_dir), "--method", "gptq", "--bits", "3",
                                           "--group-size", "16", "--observer", observer, "--eora-rank", "0", *SMALL])
        text = capsys.readouterr().out
        assert ("mse grid" in text) == (observer == "mse")
    assert runs["mse"]["rel_output_error"]["compressed_mean"] != runs["minmax"]["rel_output_error"]["compressed_mean"]


def test_eora_rounds_end_to_end(tiny_model_dir, tmp_path, capsys):
    """--eora-rounds: never worse than plain EoRA on the calibration objective; the saved model and adapter reload
    to the reported perplexity; no share of the gap is claimed against a base fitted with its residual."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    argv = ["--model-path", str(tiny_model_dir), "--method", "gptq", "--bits", "3", "--group-size", "16",
            "--eora-rank", "4", *SMALL]
    plain = cli_main_summary(argv)
    capsys.readouterr()
    out = tmp_path / "out"
    rounds = cli_main_summary([*argv, "--eora-rounds", "2", "--output-dir", str(out)])
    text = capsys.readouterr().out
    assert "eora r=4, 2 rounds with the compressor" in text and "fitted with the residual" in text
    assert rounds["recovered"] == {"compensated_eora": None}
    assert (rounds["rel_output_error"]["compensated_eora_mean"]
            <= plain["rel_output_error"]["compensated_eora_mean"] * (1 + 1e-9))
    _, held_out = token_slices(AutoTokenizer.from_pretrained(tiny_model_dir), 256, 128, 32)
    peft_model = PeftModel.from_pretrained(_fresh(out), str(out / "eora-adapter")).eval()
    assert perplexity(peft_model, held_out) == pytest.approx(rounds["perplexity"]["compensated_eora"], rel=1e-2)


def test_sparsegpt_2_4_quantized_with_eora(tiny_model_dir, capsys):
    summary = cli_main_summary(["--model-path", str(tiny_model_dir), "--method", "sparsegpt", "--pattern", "2:4",
                                "--sparse-bits", "4", "--group-size", "16", "--eora-rank", "2", *SMALL])
    out = capsys.readouterr().out
    assert "sparsegpt 2:4 + 4-bit, group 16" in out
    assert "--output-dir writes pruned weights dense" in out  # the storage line counts a sparse format
    assert summary["params"]["keep_targets"] <= 0.5
    err = summary["rel_output_error"]
    assert err["compensated_eora_mean"] < err["before_eora_mean"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "gptq", "--calib-tokens", "0", "--eora-method", "svd"], "--method gptq needs activation"),
        (["--method", "sparsegpt", "--pattern", "4:2"], "argument --pattern: pattern='4:2'"),
        (["--method", "gptq", "--keep", "0.5"], "keeps dense weights"),
        (["--method", "gptq", "--bits", "9"], "argument --bits: 9 is above 8"),
        (["--method", "sparsegpt", "--sparse-bits", "12"], "argument --sparse-bits: 12 is above 8"),
        (["--method", "gptq", "--damp", "-1"], "argument --damp: -1.0 must be >= 0"),
        (["--eora-rounds", "2", "--eora-rank", "0"], "argument --eora-rounds: alternates the compressor"),
        (["--eora-rounds", "2", "--compare"], "drop --compare and --sequential"),
        (["--eora-rounds", "2", "--method", "svd", "--keep", "0.5"], "--method svd replaces the layers"),
        # a flag the method never reads would be silently ignored
        (["--method", "rtn", "--sparsity", "0.3"], "argument --sparsity: --method rtn does not use it"),
        # an alias is named as the user spelled it
        (["--method", "prune24", "--group-size", "64"], "argument --group-size: --method prune24 does not use it"),
        (["--method", "rtn", "--pattern", "2:4"], "argument --pattern: --method rtn does not use it"),
        (["--method", "gptq", "--sparse-bits", "4"], "argument --sparse-bits: --method gptq does not use it"),
        (["--method", "rtn", "--damp", "0.1"], "argument --damp: --method rtn does not use it"),
        (["--method", "sparsegpt", "--bits", "4"], "argument --bits: --method sparsegpt does not use it"),
        (["--method", "whitened_svd", "--bits", "4"], "argument --bits: --method whitened_svd does not use it"),
        (["--method", "sparsegpt", "--symmetric"],
         "argument --symmetric: --method sparsegpt reads it only with --sparse-bits; add --sparse-bits"),
    ],
)
def test_bad_compressor_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["compress", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_group_size_that_does_not_divide_is_named(tiny_model_dir):
    # the message names the flags, not the library's arguments (group_size=None is --group-size 0 here)
    with pytest.raises(SystemExit, match=r"--group-size 24 does not divide in_features=32 of layer "
                       r"'model.layers.0.self_attn.q_proj'.* or --group-size 0 \(one group per row\)"):
        cli_main_summary(["--model-path", str(tiny_model_dir), "--method", "gptq", "--group-size", "24",
                          "--eora-rank", "0", *SMALL])


def test_eora_rank_above_a_layers_size_is_refused_before_any_work(tiny_model_dir):
    # the tiny model's k/v projections are 16 x 32: rank 20 fits the others, not those
    with pytest.raises(SystemExit, match=r"--eora-rank 20 exceeds min\(out, in\) = 16 of layer .*k_proj.* "
                       r"pass --eora-rank <= 16"):
        cli_main_summary(["--model-path", str(tiny_model_dir), "--eora-rank", "20", *SMALL])


def test_decoder_model_takes_the_block_pipeline(tiny_model_dir, capsys):
    """The default path for a transformers decoder: block by block, compressed in place, dense perplexity first; RTN
    does not depend on the order, so its perplexities equal the whole-model path's (here computed directly)."""
    from compress import CompressionConfig, collect_activation_stats, compress_model, eora_compensate, find_targets
    from transformers import AutoTokenizer

    # --export-dtype float32: the CLI loads, compresses and evaluates the model in it (as the float32 reference here)
    summary = cli_main_summary(["--model-path", str(tiny_model_dir), "--eora-rank", "4", "--export-dtype", "float32",
                                *SMALL])
    out = capsys.readouterr()
    assert summary["path"] == "block by block (2 blocks of model.layers, one in float32 at a time)"
    assert "path         block by block (2 blocks of model.layers" in out.out
    assert "whole-model path" not in out.err
    assert "calibration, compression, compensation (eora), block by block" in summary["times_s"]

    model = _fresh(tiny_model_dir)
    calib, held_out = token_slices(AutoTokenizer.from_pretrained(tiny_model_dir), 256, 128, 32)
    config = CompressionConfig(method="rtn", bits=3, group_size=64, target_modules="all-linear")
    stats = collect_activation_stats(model, calib, list(find_targets(model, "all-linear")))
    report = compress_model(model, config, stats)
    eora = eora_compensate(model, report.model, stats, rank=4)
    assert summary["perplexity"]["dense"] == pytest.approx(perplexity(model, held_out), rel=1e-6)
    assert summary["perplexity"]["compressed"] == pytest.approx(perplexity(report.model, held_out), rel=1e-6)
    assert summary["perplexity"]["compensated_eora"] == pytest.approx(
        perplexity(eora.apply(report.model), held_out), rel=1e-4)


class _StackLM(torch.nn.Module):
    """A position-wise causal LM without decoder blocks (no nn.ModuleList): embedding, two linears, LM head."""

    def __init__(self, vocab: int, width: int = 32) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.body = torch.nn.Sequential(torch.nn.Linear(width, 64), torch.nn.GELU(), torch.nn.Linear(64, width))
        self.lm_head = torch.nn.Linear(width, vocab, bias=False)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, **_: object):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.lm_head(self.body(self.embed(input_ids))))


def test_model_without_decoder_blocks_falls_back_and_says_why(tiny_model_dir, capsys, monkeypatch):
    from transformers import AutoTokenizer

    import compress.main_job

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    monkeypatch.setattr(compress.main_job, "_load", lambda args, device: (_StackLM(len(tok)).eval(), tok, "stack"))
    summary = cli_main_summary(["--eora-rank", "2", *SMALL])
    out = capsys.readouterr()
    reason = "_StackLM has no decoder blocks (no nn.ModuleList of identical modules)"
    assert f"tensornets compress: whole-model path ({reason})" in out.err
    assert f"path         whole model ({reason})" in out.out
    assert summary["targets"]["layers"] == 2  # body.0, body.2; not the LM head
    err = summary["rel_output_error"]
    assert err["compensated_eora_mean"] < err["before_eora_mean"]


def test_fewer_calibration_tokens_than_a_layers_inputs_warns(tiny_model_dir, capsys):
    # down_proj takes 64 inputs: 32 tokens give a rank-32 X^T X, which whitening / EoRA would overfit
    few = ["--calib-tokens", "32", "--eval-tokens", "32", "--seq-len", "32", "--no-progress", "--eora-rank", "2"]
    cli_main(["compress", "--model-path", str(tiny_model_dir), *few])
    err = capsys.readouterr().err
    assert "warning: 32 calibration tokens, fewer than the 64 inputs of the widest targeted layer" in err
    cli_main(["compress", "--model-path", str(tiny_model_dir), *SMALL, "--eora-rank", "2"])
    assert "rank-deficient" not in capsys.readouterr().err


def test_the_recovered_share_needs_a_gap_to_divide_by():
    from compress.main_job import _recovered

    assert _recovered(10.0, 20.0, 15.0) == pytest.approx(math.log(20 / 15) / math.log(2))
    assert _recovered(10.0, 10.001, 10.02) is None  # a 1e-4 log gap printed "recovers -1900 %"
    assert _recovered(10.0, float("nan"), 10.0) is None
