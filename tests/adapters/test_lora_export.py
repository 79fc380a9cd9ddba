"""Exact LoRA export (``adapters.to_lora`` / ``adapters.export_lora``) and PEFT's ``convert_to_lora``.

The central check: each method's adapter, with random (non-zero) factors, is written as a plain
PEFT LoRA directory, loaded in a fresh interpreter that never imports ``adapters`` or
``tensornets`` (the way vLLM or a user without our package loads it), and its update of the
model's output, computed in float64 on both sides, equals ours to a relative Frobenius error of
1e-5 (the only difference is rounding the factors to float32 once: ~1e-7).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora.conversion import convert_to_lora, save_as_lora
from safetensors.torch import load_file, save_file
from tolerance import assert_close, assert_close_relative
from torch import nn
from transformers import AutoModel, BertConfig, BertModel

import adapters

# ---------------------------------------------------------------------------------------------
# Base models both processes can build: a tiny BERT saved as an HF directory, and nn.Sequential
# conv stacks described as JSON (layer class name + kwargs) with their weights in safetensors.
# ---------------------------------------------------------------------------------------------

_BERT = dict(
    vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    max_position_embeddings=32, type_vocab_size=2,
)

Arch = list[tuple[str, dict[str, Any]]]

_CONV2D: Arch = [
    ("Conv2d", {"in_channels": 4, "out_channels": 8, "kernel_size": 3, "padding": 1}),
    ("ReLU", {}),
    ("Conv2d", {"in_channels": 8, "out_channels": 8, "kernel_size": 3, "stride": 2, "padding": 1, "groups": 2}),
    ("ReLU", {}),
    ("Conv2d", {"in_channels": 8, "out_channels": 8, "kernel_size": 3, "padding": 1, "groups": 8}),
]
_CONV1D: Arch = [
    ("Conv1d", {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "padding": 1}),
    ("Tanh", {}),
    ("Conv1d", {"in_channels": 6, "out_channels": 6, "kernel_size": 1}),
]
_CONV3D: Arch = [("Conv3d", {"in_channels": 3, "out_channels": 4, "kernel_size": (1, 3, 3), "padding": (0, 1, 1)})]
_CONV_INPUTS = {"conv2d": (2, 4, 8, 8), "conv1d": (2, 4, 10), "conv3d": (2, 3, 2, 6, 6)}


def build_sequential(arch: Arch) -> nn.Sequential:
    return nn.Sequential(*(getattr(nn, name)(**kwargs) for name, kwargs in arch))


@dataclass(frozen=True)
class ExportCase:
    """A method's config on a base: ``arch`` None means the tiny BERT."""

    id: str
    config: Any
    arch: Optional[Arch] = None
    inputs: str = "bert"
    #: The LoRA rank of the exported layers, by module-name suffix (one entry matches each target).
    ranks: dict[str, int] = field(default_factory=dict)


LOTR, FLORA, REP, MOS = adapters.LoTRConfig, adapters.FloraConfig, adapters.LoRETTARepConfig, adapters.MoSConfig
CASES = [
    ExportCase("lotr", lambda: LOTR(r=4, target_modules=["query", "value"]), ranks={"query": 4, "value": 4}),
    ExportCase(
        "lotr-share-all",
        lambda: LOTR(r=3, target_modules=["query", "value", "attention.output.dense"], share="all"),
        ranks={"query": 3, "value": 3, "attention.output.dense": 3},
    ),
    ExportCase(
        "loretta-rep-train-norms",
        lambda: REP(r=4, tt_rank=3, target_modules=["query", "value"], train_norms=True),
        ranks={"query": 3, "value": 3},  # the bond between M_A's d and r modes caps ΔW's rank
    ),
    ExportCase(
        "mos", lambda: MOS(r=3, v=2, p=1, c=2, target_modules=["query", "value"]), ranks={"query": 3, "value": 3}
    ),
    ExportCase(
        "flora-linear-embedding",
        lambda: FLORA(
            r=4, target_modules=["query", "intermediate.dense", "word_embeddings", "token_type_embeddings"]
        ),
        ranks={"query": 4, "intermediate.dense": 4, "word_embeddings": 4, "token_type_embeddings": 2},
    ),
    ExportCase(
        "flora-in-rank-smaller",
        lambda: FLORA(r=[6, 3], target_modules=["query", "word_embeddings"], modules_to_save=["pooler"]),
        ranks={"query": 3, "word_embeddings": 3},
    ),
    # Conv ranks: r_out, times the groups for grouped convs (2 here); a depthwise group has one output channel, so
    # rank 1 per group (8 groups).
    ExportCase(
        "flora-conv2d-grouped-depthwise",
        lambda: FLORA(r=3, target_modules=["0", "2", "4"]),
        _CONV2D,
        "conv2d",
        ranks={"0": 3, "2": 6, "4": 8},
    ),
    ExportCase(
        "flora-conv2d-in-rank-smaller", lambda: FLORA(r=[4, 1, 2, 1], target_modules=["0"]), _CONV2D, "conv2d", {"0": 2}
    ),
    ExportCase(
        "flora-conv1d", lambda: FLORA(r=2, target_modules=["0", "2"], scale=4.0), _CONV1D, "conv1d", {"0": 2, "2": 2}
    ),
    ExportCase("flora-conv3d", lambda: FLORA(r=[3, 2, 1, 2, 2], target_modules=["0"]), _CONV3D, "conv3d", {"0": 3}),
]

# ---------------------------------------------------------------------------------------------
# The fresh-process loader: imports torch, transformers, peft and safetensors only.
# ---------------------------------------------------------------------------------------------

_FRESH_LOAD = r"""
import json, sys
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModel

for job in json.load(open(sys.argv[1])):
    config = json.load(open(job["lora"] + "/adapter_config.json"))
    assert config["peft_type"] == "LORA", config["peft_type"]
    if job["arch"] is None:
        base = AutoModel.from_pretrained(config["base_model_name_or_path"])
    else:
        base = torch.nn.Sequential(*(getattr(torch.nn, name)(**kwargs) for name, kwargs in job["arch"]))
        base.load_state_dict(load_file(job["base_state"]))
    model = PeftModel.from_pretrained(base, job["lora"]).double().eval()
    inputs = load_file(job["inputs"])

    def run():
        if job["arch"] is not None:
            return model(inputs["x"])
        out = model(**inputs)
        return torch.cat([out.last_hidden_state.flatten(), out.pooler_output.flatten()])

    with torch.no_grad():
        adapted = run()
        with model.disable_adapter():
            plain = run()
    save_file({"adapted": adapted, "base": plain}, job["out"])

json.dump(sorted(m for m in ("adapters", "tensornets", "compress") if m in sys.modules), open(sys.argv[2], "w"))
"""


def _randomize(model: nn.Module, std: float = 0.2) -> None:
    """Move every trainable parameter (adapter factors, saved-module copies) off its init."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(std * torch.randn(param.shape, generator=generator, dtype=param.dtype))


def _inputs(kind: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    if kind == "bert":
        return {
            "input_ids": torch.randint(1, 100, (2, 9), generator=generator),
            "token_type_ids": torch.randint(0, 2, (2, 9), generator=generator),
            "attention_mask": torch.ones(2, 9, dtype=torch.long),
        }
    return {"x": torch.randn(_CONV_INPUTS[kind], generator=generator, dtype=torch.float64)}


def _output(model: nn.Module, case: ExportCase, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    if case.arch is not None:
        return model(inputs["x"])
    out = model(**inputs)
    return torch.cat([out.last_hidden_state.flatten(), out.pooler_output.flatten()])


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-bert")
    BertModel(BertConfig(**_BERT)).save_pretrained(path)
    return path


def _base(case: ExportCase, bert_dir: Path) -> nn.Module:
    if case.arch is None:
        return AutoModel.from_pretrained(bert_dir).eval()  # records name_or_path = bert_dir
    torch.manual_seed(0)
    return build_sequential(case.arch).eval()


def _adapted(case: ExportCase, bert_dir: Path):
    model = get_peft_model(_base(case, bert_dir), case.config())
    _randomize(model)
    return model.eval()


@dataclass
class Exported:
    case: ExportCase
    lora_dir: Path
    ours: torch.Tensor  # our model's output minus the base output, float64
    lora: torch.Tensor  # the same from the LoRA loaded in the fresh process
    base_norm: float


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, bert_dir: Path) -> tuple[dict[str, Exported], list[str]]:
    """Export every case, load all of them in one fresh interpreter, return the two updates per case."""
    root = tmp_path_factory.mktemp("lora-export")
    jobs, ours = [], {}
    for case in CASES:
        work = root / case.id
        work.mkdir()
        model = _adapted(case, bert_dir)
        name = None if case.arch is None else f"tiny-{case.inputs}"
        adapters.export_lora(model, work / "lora", base_model_name_or_path=name)
        inputs = _inputs(case.inputs)
        save_file(inputs, str(work / "inputs.safetensors"))
        job = {"lora": str(work / "lora"), "arch": case.arch, "inputs": str(work / "inputs.safetensors")}
        job["out"] = str(work / "out.safetensors")
        if case.arch is not None:
            save_file(_base(case, bert_dir).state_dict(), str(work / "base.safetensors"))  # the same seeded base
            job["base_state"] = str(work / "base.safetensors")
        jobs.append(job)
        model.double()
        with torch.no_grad():
            adapted = _output(model, case, inputs)
            with model.disable_adapter():
                plain = _output(model, case, inputs)
        ours[case.id] = (work, adapted - plain, plain.norm().item())
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", _FRESH_LOAD, str(root / "jobs.json"), str(root / "imported.json")],
        cwd=root,  # not the repository: nothing of ours is importable from the working directory
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"fresh-process load failed:\n{proc.stdout}\n{proc.stderr}"
    results = {}
    for case in CASES:
        work, delta, base_norm = ours[case.id]
        out = load_file(str(work / "out.safetensors"))
        results[case.id] = Exported(case, work / "lora", delta, out["adapted"] - out["base"], base_norm)
    return results, json.loads((root / "imported.json").read_text())


# ---------------------------------------------------------------------------------------------
# Exactness of the export, loaded without our package.
# ---------------------------------------------------------------------------------------------


def test_fresh_process_never_imports_our_packages(exported) -> None:
    _, imported = exported
    assert imported == []


@pytest.mark.parametrize("case_id", [case.id for case in CASES])
def test_exported_lora_gives_our_update(exported, case_id: str) -> None:
    result = exported[0][case_id]
    assert result.lora.dtype == result.ours.dtype == torch.float64
    assert result.ours.norm() > 1e-3 * result.base_norm, "the adapter's update is trivial: nothing is tested"
    assert_close_relative(result.lora, result.ours, 1e-5, what=f"{case_id}: LoRA update vs ours")


@pytest.mark.parametrize("case_id", [case.id for case in CASES])
def test_exported_config_is_plain_lora_at_the_method_rank(exported, bert_dir: Path, case_id: str) -> None:
    result = exported[0][case_id]
    config = json.loads((result.lora_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    expected_name = str(bert_dir) if result.case.arch is None else f"tiny-{result.case.inputs}"
    assert config["base_model_name_or_path"] == expected_name
    assert config["lora_alpha"] == config["r"]
    assert config["alpha_pattern"] == config["rank_pattern"]
    ranks = {name: config["rank_pattern"].get(name, config["r"]) for name in config["target_modules"]}
    state = load_file(str(result.lora_dir / "adapter_model.safetensors"))
    for name, rank in ranks.items():
        suffix_ranks = [r for suffix, r in result.case.ranks.items() if name == suffix or name.endswith("." + suffix)]
        assert suffix_ranks == [rank], f"{name}: exported rank {rank}, expected {result.case.ranks}"
        a = state.get(f"base_model.model.{name}.lora_A.weight", state.get(f"base_model.model.{name}.lora_embedding_A"))
        assert a.shape[0] == rank


def test_to_lora_state_dict_loads_with_set_peft_model_state_dict(bert_dir: Path) -> None:
    case = next(case for case in CASES if case.id == "flora-in-rank-smaller")
    ours = _adapted(case, bert_dir)
    config, state = adapters.to_lora(ours)
    lora = get_peft_model(_base(case, bert_dir), config)
    assert set(get_peft_model_state_dict(lora)) == set(state)
    result = set_peft_model_state_dict(lora, state)
    assert not result.unexpected_keys
    inputs = _inputs(case.inputs)
    with torch.no_grad():
        assert_close(_output(lora.eval(), case, inputs), _output(ours, case, inputs), what="LoRA vs ours (float32)")


def test_to_lora_exports_the_named_adapter_only(bert_dir: Path) -> None:
    model = get_peft_model(_base(CASES[0], bert_dir), LOTR(r=4, target_modules=["query", "value"]))
    model.add_adapter("other", LOTR(r=2, target_modules=["value"]))
    _randomize(model)
    with torch.no_grad():  # add_adapter leaves the new adapter frozen: randomize its factors explicitly
        for name, param in model.named_parameters():
            if ".other" in name:
                param.normal_(0, 0.2)
    config, state = adapters.to_lora(model, "other")
    assert config.r == 2 and all(name.endswith("value") for name in config.target_modules)
    for name in config.target_modules:
        layer = model.base_model.model.get_submodule(name)
        delta = state[f"base_model.model.{name}.lora_B.weight"] @ state[f"base_model.model.{name}.lora_A.weight"]
        assert_close(delta, layer.get_delta_weight("other"), what=name)


def test_to_lora_dtype(bert_dir: Path) -> None:
    _, state = adapters.to_lora(_adapted(CASES[0], bert_dir), dtype=torch.bfloat16)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# PEFT's own bridge (convert_to_lora: an SVD of each ΔW) agrees with ours on linear layers.
# ---------------------------------------------------------------------------------------------

_LINEAR_CASES = {
    "lotr": (lambda: LOTR(r=4, target_modules=["query", "value"]), 4),
    "loretta-rep": (lambda: REP(r=4, tt_rank=3, target_modules=["query", "value"]), 3),  # ΔW has rank tt_rank
    "mos": (lambda: MOS(r=3, v=2, p=1, c=2, target_modules=["query", "value"]), 3),
    "flora": (lambda: FLORA(r=[6, 3], target_modules=["query", "value"]), 3),
}


@pytest.mark.parametrize("method", list(_LINEAR_CASES))
def test_peft_convert_to_lora_matches_to_lora(bert_dir: Path, method: str, tmp_path: Path) -> None:
    make_config, rank = _LINEAR_CASES[method]
    model = get_peft_model(AutoModel.from_pretrained(bert_dir), make_config())
    _randomize(model)
    assert model.supports_lora_conversion()
    peft_config, peft_state = convert_to_lora(model, rank=rank)
    config, state = adapters.to_lora(model)
    assert config.r == peft_config.r == rank
    assert set(peft_state) == set(state)
    for key in state:
        if key.endswith("lora_A.weight"):
            key_b = key.replace("lora_A", "lora_B")
            ours = state[key_b].double() @ state[key].double()
            theirs = peft_state[key_b].double() @ peft_state[key].double()
            assert_close_relative(theirs, ours, 1e-5, what=f"{method} {key}: convert_to_lora vs to_lora")
    save_as_lora(tmp_path, model, rank=rank)  # PEFT's writer runs on our model too
    assert (tmp_path / "adapter_model.safetensors").is_file()


def test_peft_convert_to_lora_refuses_flora_conv_and_embedding(bert_dir: Path) -> None:
    # PEFT would take a batched SVD of a 4-d conv ΔW and write lora_A keys for an embedding:
    # those layers say they do not support its conversion; to_lora exports them.
    conv = get_peft_model(build_sequential(_CONV2D), FLORA(r=3, target_modules=["0"]))
    embedding = get_peft_model(AutoModel.from_pretrained(bert_dir), FLORA(r=3, target_modules=["word_embeddings"]))
    for model in (conv, embedding):
        with pytest.raises(TypeError, match="FloraLayer"):
            convert_to_lora(model, rank=3)
        adapters.to_lora(model)


# ---------------------------------------------------------------------------------------------
# What cannot be exported says so.
# ---------------------------------------------------------------------------------------------


def test_loretta_adp_cannot_be_exported(bert_dir: Path) -> None:
    model = get_peft_model(AutoModel.from_pretrained(bert_dir), adapters.LoRETTAAdpConfig(bottleneck=8, tt_rank=2))
    with pytest.raises(ValueError, match="LORETTA_ADP.*nonlinear"):
        adapters.to_lora(model)
    with pytest.raises(TypeError, match="do not support LoRA conversion"):
        convert_to_lora(model, rank=4)


@pytest.mark.parametrize("conv_kwargs", [{"padding_mode": "reflect"}, {"dilation": 2}])
def test_conv_peft_lora_cannot_express_raises_naming_the_layer(conv_kwargs: dict) -> None:
    base = nn.Sequential(nn.Conv2d(4, 4, 3, padding=2, **conv_kwargs))
    model = get_peft_model(base, FLORA(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match="layer '0' is a Conv2d"):
        adapters.to_lora(model)


def test_grouped_conv_export_warns_and_keeps_one_rank_per_depthwise_group() -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16))
    model = get_peft_model(base, FLORA(r=4, target_modules=["0"]))
    with pytest.warns(UserWarning, match=r"grouped Conv2d \(groups=16\).*cannot merge it"):
        config, state = adapters.to_lora(model)
    assert state["base_model.model.0.lora_A.weight"].shape == (16, 16, 3, 3)  # rank 1 per group, not 4


def test_bad_arguments(bert_dir: Path) -> None:
    model = _adapted(CASES[0], bert_dir)
    with pytest.raises(TypeError, match="PeftModel"):
        adapters.to_lora(model.base_model)
    with pytest.raises(ValueError, match="adapter_name='nope'"):
        adapters.to_lora(model, "nope")
    with pytest.raises(TypeError, match="dtype"):
        adapters.to_lora(model, dtype=torch.int8)
    lora = get_peft_model(AutoModel.from_pretrained(bert_dir), LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(ValueError, match="not one of ours"):
        adapters.to_lora(lora)


def test_export_into_a_file_path_is_refused(bert_dir: Path, tmp_path: Path) -> None:
    model = get_peft_model(AutoModel.from_pretrained(bert_dir), LOTR(r=2, target_modules=["query"]))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file; export_lora writes a directory"):
        adapters.export_lora(model, tmp_path / "file")
