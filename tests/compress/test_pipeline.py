"""Block-sequential pipeline: equal to the whole-model path where the order does not matter, one float32 block."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from tolerance import assert_close, assert_close_relative

import compress.pipeline as pipeline
from compress import (
    CompressionConfig,
    collect_activation_stats,
    compress_model,
    eora_compensate,
    eora_factors,
    find_targets,
    sequential_eora_factors,
)
from compress.calibration import CrossStats
from compress.export import save_hf_directory
from compress.factor_store import OffloadedFactors
from compress.sequential_eora import INDEPENDENT
from compress.targets import dense_weight
from compress.pipeline import compress_blocks, find_decoder_blocks

VOCAB = 50


def tiny_llama(layers: int = 3, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A random ``LlamaForCausalLM`` (hidden 64, 4 heads / 2 KV heads), eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).to(dtype).eval()


def calib(n: int = 4, batch: int = 2, seq: int = 16, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seq), generator=g) for _ in range(n)]


def logits(model: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(b).logits.float() for b in batches])


def whole_model(model, config, batches, eora_rank=0, method="eora"):
    """Today's path, as the CLI runs it: dense statistics, compress every layer, compensate every target."""
    targets = list(find_targets(model, config.target_modules, config.exclude_modules))
    stats = collect_activation_stats(model, batches, targets, progress=False)
    report = compress_model(model, config, stats, progress=False)
    eora = None
    if eora_rank:
        eora = eora_compensate(model, report.model, stats, rank=eora_rank, method=method, target_modules=targets,
                               progress=False)
    return report, eora


def test_find_decoder_blocks():
    model = tiny_llama(layers=2)
    path, blocks = find_decoder_blocks(model)
    assert path == "model.layers" and blocks is model.model.layers
    assert find_decoder_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))) is None


@pytest.mark.parametrize("config", [
    CompressionConfig(method="rtn", bits=3, group_size=16),
    CompressionConfig(method="svd", keep=0.5),
], ids=["rtn", "svd"])
def test_same_model_as_whole_model_path(config):
    model = tiny_llama()
    batches = calib()
    expected, _ = whole_model(model, config, batches)
    out = compress_blocks(model, config, batches, progress=False)
    assert out.block_path == "model.layers"
    got = out.model.state_dict()
    for name, tensor in expected.model.state_dict().items():
        assert_close(got[name], tensor, what=name)
    assert [r.name for r in out.report.layers] == [r.name for r in expected.layers]
    assert out.report.params_after == expected.params_after
    assert_close(logits(out.model, batches), logits(expected.model, batches), tol=1e-4, what="logits")
    # both come back in the eval mode the model went in with (dropout stays off), new layers included
    for result in (out.model, expected.model):
        assert not [name for name, m in result.named_modules() if m.training]
    # the dense model is left as it was
    assert_close(logits(model, batches), logits(tiny_llama(), batches), tol=0.0, what="original")


def test_independent_eora_same_as_whole_model_path():
    model = tiny_llama()
    batches = calib()
    config = CompressionConfig(method="rtn", bits=3, group_size=16)
    expected_report, expected = whole_model(model, config, batches, eora_rank=8)
    out = compress_blocks(model, config, batches, eora_rank=8, progress=False)
    assert sorted(out.eora.factors) == sorted(expected.factors)
    for name, (B, A) in expected.factors.items():
        Bg, Ag = out.eora.factors[name]
        # the residual BA is unique (up to rotations of the factors), B and A are not
        assert_close_relative(Bg.double() @ Ag.double(), B.double() @ A.double(), 1e-4, what=name)
    for row, exp in zip(out.eora.layers, expected.layers):
        assert row.name == exp.name
        assert row.error_after == pytest.approx(exp.error_after, rel=1e-4)
    compensated = logits(out.eora.apply(out.model), batches)
    assert_close(compensated, logits(expected.apply(expected_report.model), batches), tol=1e-4, what="logits")


def padded_calib(pad_token: int, seed: int = 2) -> tuple[list[dict[str, torch.Tensor]], list[torch.Tensor]]:
    """Four right-padded batches of 3 sequences (lengths 3-16, 138 tokens: more than the width, so every Gram matrix
    is well conditioned) with ``pad_token`` in the padding, and the sequences."""
    g = torch.Generator().manual_seed(seed)
    batches, seqs = [], []
    for lengths in ([16, 9, 4], [12, 16, 6], [16, 16, 3], [10, 16, 14]):
        ids = torch.full((3, 16), pad_token)
        mask = torch.zeros(3, 16, dtype=torch.long)
        for i, n in enumerate(lengths):
            seqs.append(torch.randint(0, VOCAB, (1, n), generator=g))
            ids[i, :n], mask[i, :n] = seqs[-1][0], 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches, seqs


def test_padding_is_left_out_of_every_blocks_statistics():
    """Padded calibration batches (``attention_mask``) give the block pipeline the model the whole-model path builds
    from the unpadded sequences; whatever sits in the padding changes nothing, sequential EoRA included."""
    model = tiny_llama(layers=2)
    padded, seqs = padded_calib(pad_token=0)
    # independent EoRA on the dense statistics: the same residuals as the whole-model path
    config = CompressionConfig(method="rtn", bits=3, group_size=16)
    _, expected = whole_model(model, config, seqs, eora_rank=4)
    out = compress_blocks(model, config, padded, eora_rank=4, progress=False)
    for name, (B, A) in expected.factors.items():
        Bg, Ag = out.eora.factors[name]
        assert_close_relative(Bg.double() @ Ag.double(), B.double() @ A.double(), 1e-3, what=name)

    # statistics of the compressed stream (whitened SVD) and cross statistics (sequential EoRA) ignore the padding
    config = CompressionConfig(method="whitened_svd", keep=0.5)
    other_pad, _ = padded_calib(pad_token=VOCAB - 1)
    runs = [compress_blocks(model, config, batches, eora_rank=4, eora_sequential=True, progress=False)
            for batches in (padded, other_pad)]
    for name, tensor in runs[0].model.state_dict().items():
        assert_close(runs[1].model.state_dict()[name], tensor, tol=1e-4, what=name)
    for name, (B, A) in runs[0].eora.factors.items():
        Bg, Ag = runs[1].eora.factors[name]
        assert_close_relative(Bg.double() @ Ag.double(), B.double() @ A.double(), 1e-3, what=name)


def test_sequential_eora_without_drift_fits_the_compression_error():
    """Block 0's attention projections see the embeddings in both streams (``X̃ = X``): every candidate fits ``ΔW``
    (independent EoRA, or its ridge-penalised form), and the one cross-validation chose is refitted on all data."""
    model = tiny_llama()
    batches = calib()
    config = CompressionConfig(method="rtn", bits=3, group_size=16)
    out = compress_blocks(model, config, batches, eora_rank=8, eora_sequential=True, progress=False)
    seq = out.eora
    assert seq.method == "eora-sequential"
    choices = {row.name: row.choice for row in seq.layers}
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"):
        stats = collect_activation_stats(model, batches, [name], progress=False)[name]
        same = CrossStats(stats, stats, stats.gram)
        W = dense_weight(model.get_submodule(name)).double()
        Wc = dense_weight(out.model.get_submodule(name)).double()
        if choices[name] == INDEPENDENT:
            want = eora_factors(W - Wc, stats, 8)
        else:
            want = sequential_eora_factors(W, Wc, same, 8, ridge=float(choices[name].split("=")[1]))
        B, A = seq.factors[name]
        assert_close_relative(B.double() @ A.double(), want[0] @ want[1], 1e-4, what=name)


@pytest.mark.parametrize("layers,bits", [(2, 2), (2, 3), (4, 2), (4, 3)])
def test_sequential_eora_beats_independent_eora(layers, bits):
    """On held-out tokens the final logits of the sequentially compensated model are closer to the dense ones."""
    model = tiny_llama(layers=layers)
    batches, held_out = calib(n=8), calib(seed=5)
    config = CompressionConfig(method="rtn", bits=bits, group_size=16)
    seq = compress_blocks(model, config, batches, eora_rank=8, eora_sequential=True, progress=False)
    ind = compress_blocks(model, config, batches, eora_rank=8, progress=False)
    dense = logits(model, held_out)
    err = lambda m: float((logits(m, held_out) - dense).norm() / dense.norm())
    assert err(seq.eora.apply(seq.model)) < err(ind.eora.apply(ind.model)) < err(ind.model)
    assert len(seq.eora.factors) == len(seq.report.layers) == layers * 7
    for row in seq.eora.layers:
        assert row.error_after < row.error_before


class _Mixed(nn.Module):
    """Identical blocks in a ModuleList, but the model transforms the hidden states between them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = 3 * x + block(torch.tanh(x))
        return x


class _Scaled(nn.Module):
    """Blocks that chain, but each is called with its own argument (Swin's stages: their input_dimensions)."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))

        def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            return x + self.mlp(scale * x)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(self.Block() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, scale=float(i + 1))
        return x


def _no_blocks() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


@pytest.mark.parametrize("build,why", [
    (_no_blocks, "no decoder blocks"),
    (_Mixed, "block 1 of _Mixed does not take block 0's output as its input"),  # it would get inputs it never sees
], ids=["no-blocks", "blocks-that-do-not-chain"])
def test_fallback_warns_and_gives_the_whole_model_result(build, why):
    model = build()
    batches = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    config = CompressionConfig(method="rtn", bits=3, group_size=8)
    with pytest.warns(UserWarning, match=why):
        out = compress_blocks(model, config, batches, eora_rank=4, progress=False)
    assert out.block_path is None
    expected, eora = whole_model(model, config, batches, eora_rank=4)
    for name, tensor in expected.model.state_dict().items():
        assert torch.equal(out.model.state_dict()[name], tensor), name
    for name, (B, A) in eora.factors.items():
        assert_close(out.eora.factors[name][0] @ out.eora.factors[name][1], B @ A, what=name)


class _Adaptive(_Scaled):
    """Blocks called with an argument the model derives from their hidden states: recording the arguments with
    blocks that pass their input through would give every block block 0's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, scale=float(1 + x.abs().mean()))
        return x


@pytest.mark.parametrize("build", [_Scaled, _Adaptive], ids=["own-constant", "derived-from-hidden-states"])
def test_blocks_called_with_their_own_arguments(build, recwarn):
    """Each block is replayed with the arguments the model passes it, not block 0's: block by block, and the
    whole-model path's model and residuals."""
    model = build().eval()
    batches = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    config = CompressionConfig(method="rtn", bits=3, group_size=8)
    out = compress_blocks(model, config, batches, eora_rank=4, progress=False)
    assert out.block_path == "blocks" and not [w for w in recwarn if "block-sequential" in str(w.message)]
    expected, eora = whole_model(model, config, batches, eora_rank=4)
    for name, tensor in expected.model.state_dict().items():
        assert torch.equal(out.model.state_dict()[name], tensor), name
    for name, (B, A) in eora.factors.items():
        assert_close(out.eora.factors[name][0] @ out.eora.factors[name][1], B @ A, what=name)
    assert all("forward" not in block.__dict__ for block in model.blocks)  # the pass-through forwards are gone


def test_swin_stages_block_by_block(recwarn):
    """Swin's stages (its largest list of identical modules) are each called with their own input_dimensions, and
    stage 0 ends in a patch merging: block by block, to the whole-model path's residuals."""
    from transformers import SwinConfig, SwinModel

    torch.manual_seed(0)
    model = SwinModel(SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                 window_size=4)).eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(3)]
    config = CompressionConfig(method="rtn", bits=4, group_size=16, target_modules="all-linear")
    out = compress_blocks(model, config, batches, eora_rank=4, progress=False)
    assert out.block_path == "encoder.layers" and not [w for w in recwarn if "block-sequential" in str(w.message)]
    _, expected = whole_model(model, config, batches, eora_rank=4)
    assert "encoder.layers.0.downsample.reduction" in expected.factors
    for name, (B, A) in expected.factors.items():
        Bg, Ag = out.eora.factors[name]
        assert_close_relative(Bg.double() @ Ag.double(), B.double() @ A.double(), 1e-4, what=name)


def test_arguments_passed_to_every_block_are_stored_once():
    """Llama passes every block the same rotary embeddings: recorded once per batch, whatever the depth."""
    model = tiny_llama(layers=3)
    blocks = model.model.layers
    hidden, kwargs, _ = pipeline.capture_block_inputs(model, blocks, calib(n=2), passthrough="tensor")
    assert len(hidden) == 2 and [len(k) for k in kwargs] == [2, 2, 2]
    for batch in range(2):
        cos = kwargs[0][batch]["position_embeddings"][0]
        assert all(kwargs[i][batch]["position_embeddings"][0] is cos for i in (1, 2))
    assert all("forward" not in block.__dict__ for block in blocks)


def test_t5_decoder_blocks_with_eora(recwarn):
    """T5's decoder blocks take the position biases block 0 returns, and its feed-forward reads ``wo.weight.dtype``
    (which an applied EoRA residual answers with the base layer's, as PEFT's LoRA does): block by block, to the
    whole-model path's residuals."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                num_decoder_layers=3, num_heads=4)).eval()
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(3):
        ids = torch.randint(5, VOCAB, (2, 12), generator=g)
        batches.append({"input_ids": ids, "decoder_input_ids": ids[:, :8]})
    config = CompressionConfig(method="rtn", bits=3, group_size=16, target_modules=r"decoder\.block\..*")
    out = compress_blocks(model, config, batches, eora_rank=2, progress=False)
    assert out.block_path == "decoder.block" and not [w for w in recwarn if "block-sequential" in str(w.message)]
    _, expected = whole_model(model, config, batches, eora_rank=2)
    assert len(expected.factors) == 3 * 10  # self- and cross-attention q, k, v, o; wi, wo
    for name, (B, A) in expected.factors.items():
        Bg, Ag = out.eora.factors[name]
        assert_close_relative(Bg.double() @ Ag.double(), B.double() @ A.double(), 1e-4, what=name)


def _gemma(kind: str) -> nn.Module:
    """A random Gemma 2 / Gemma 3 (local layers: a 4-token sliding window; Gemma 3's also other rotary embeddings)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    shape = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, sliding_window=4, max_position_embeddings=64,
                 layer_types=["sliding_attention", "full_attention"] * 2)
    if kind == "gemma2":
        return Gemma2ForCausalLM(Gemma2Config(**shape)).eval()
    return Gemma3ForCausalLM(Gemma3TextConfig(**shape)).eval()


def _short_then_long() -> list[torch.Tensor]:
    """A first batch shorter than the sliding window (its local and global masks agree), then longer ones."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (2, 3), generator=g)] + [torch.randint(0, VOCAB, (2, 12), generator=g)
                                                             for _ in range(3)]


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_sliding_window_layers_get_their_own_masks_on_every_batch(kind, recwarn):
    """Gemma's local layers take a sliding-window mask (and, in Gemma 3, other position embeddings), which differs
    from the global layers' only on sequences longer than the window: each block's arguments are recorded on every
    batch. Replaying block 0's, as recorded on the first batch, gave residuals 0.80 away from the whole model's."""
    model = _gemma(kind)
    config = CompressionConfig(method="rtn", bits=3, group_size=16, exclude_modules=["lm_head"])
    batches = _short_then_long()
    out = compress_blocks(model, config, batches, eora_rank=4, progress=False)
    assert out.block_path == "model.layers" and not [w for w in recwarn if "block-sequential" in str(w.message)]
    _, expected = whole_model(model, config, batches, eora_rank=4)
    assert len(expected.factors) == 4 * 7
    for name, (B, A) in expected.factors.items():
        Bg, Ag = out.eora.factors[name]
        assert_close_relative(Bg.double() @ Ag.double(), B.double() @ A.double(), 1e-4, what=name)


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)).eval()


def _bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128, max_position_embeddings=64)).eval()


@pytest.mark.parametrize("build", [_gpt2, _bert], ids=["gpt2", "bert"])
def test_blocks_called_with_positional_arguments(build, recwarn):
    """GPT-2's and BERT's blocks take the attention mask (and more) positionally: the pipeline names them from the
    block's signature and runs block by block, to the whole-model path's residuals (Conv1D layers included)."""
    model = build()
    config = CompressionConfig(method="rtn", bits=3, group_size=16, exclude_modules=["lm_head", "pooler.dense"])
    out = compress_blocks(model, config, calib(), eora_rank=4, progress=False)
    assert out.block_path is not None and not [w for w in recwarn if "block-sequential" in str(w.message)]
    _, expected = whole_model(model, config, calib(), eora_rank=4)
    assert sorted(out.eora.factors) == sorted(expected.factors) and len(expected.factors) >= 8
    for name, (B, A) in expected.factors.items():
        Bg, Ag = out.eora.factors[name]
        assert_close_relative(Bg.double() @ Ag.double(), B.double() @ A.double(), 1e-4, what=name)


@pytest.mark.parametrize("eora_rank", [0, 4])
def test_targets_whose_names_end_another_layers_name_select_only_themselves(eora_rank):
    """BERT's FFN output ``output.dense`` is also the end of ``attention.output.dense``: each block compresses
    exactly the layers the model-level regex selected, as the whole-model path does."""
    model = _bert()
    ffn = r".*layer\.\d+\.(intermediate|output)\.dense"
    config = CompressionConfig(method="rtn", bits=3, group_size=16, target_modules=ffn)
    selected = sorted(find_targets(model, ffn))
    assert len(selected) == 4
    out = compress_blocks(model, config, calib(), eora_rank=eora_rank, progress=False)
    assert out.block_path == "encoder.layer"
    assert sorted(r.name for r in out.report.layers) == selected
    if eora_rank:
        assert sorted(out.eora.factors) == selected
    for i in range(2):
        name = f"encoder.layer.{i}.attention.output.dense.weight"
        assert torch.equal(out.model.state_dict()[name], model.state_dict()[name]), name
    expected, _ = whole_model(model, config, calib())
    for name, tensor in expected.model.state_dict().items():
        assert torch.equal(out.model.state_dict()[name], tensor), name


class _VarArgsBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.fc(args[0]) * args[1]


class _VarArgsModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_VarArgsBlock() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, torch.ones(()))
        return x


def test_blocks_the_pipeline_cannot_replay_fall_back_to_the_whole_model():
    torch.manual_seed(0)
    model = _VarArgsModel().eval()
    batches = [torch.randn(8, 16) for _ in range(3)]
    config = CompressionConfig(method="rtn", bits=3, group_size=8)
    with pytest.warns(UserWarning, match="positional arguments that its forward does not name"):
        out = compress_blocks(model, config, batches, eora_rank=4, progress=False)
    expected, _ = whole_model(model, config, batches, eora_rank=4)
    for name, tensor in expected.model.state_dict().items():
        assert torch.equal(out.model.state_dict()[name], tensor), name


def test_fallback_for_targets_outside_the_blocks():
    model = tiny_llama(layers=2)
    config = CompressionConfig(method="rtn", bits=4, group_size=16, target_modules=["lm_head", "up_proj"])
    with pytest.warns(UserWarning, match="outside the decoder blocks"):
        out = compress_blocks(model, config, calib(n=2), progress=False)
    assert out.block_path is None and len(out.report.layers) == 3


def test_one_float32_block_at_a_time():
    model = tiny_llama(dtype=torch.bfloat16)
    blocks = model.model.layers
    seen: list[list[torch.dtype]] = []

    def record(_module, _args):
        seen.append([next(b.parameters()).dtype for b in blocks])

    for b in blocks:
        b.register_forward_pre_hook(record)
    out = compress_blocks(model, CompressionConfig(method="rtn", bits=3, group_size=16), calib(), eora_rank=4,
                          inplace=True, progress=False)
    assert out.model is model
    # the check that the block calls can be replayed (every block on one batch) and the capture of every block's
    # arguments (every block called on every batch, passing its input through) see all blocks in bf16; every later
    # block run sees exactly one float32 block
    before = len(blocks) + len(calib()) * len(blocks)
    assert seen[:before] == [[torch.bfloat16] * 3] * before
    processing = seen[before:]
    assert processing and all(d.count(torch.float32) == 1 for d in processing)
    assert {d.index(torch.float32) for d in processing} == {0, 1, 2}
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_device_moves_one_block_at_a_time(monkeypatch):
    """``device="cuda"`` on a CPU machine: every move is recorded and then carried out on the CPU."""
    model = tiny_llama(dtype=torch.bfloat16)
    blocks = list(model.model.layers)
    where = {id(b): "cpu" for b in blocks}
    moves: list[tuple[int, str, torch.dtype]] = []
    place, to = pipeline._place, pipeline._to

    def fake_place(block, device, dtype):
        if id(block) in where:
            where[id(block)] = torch.device(device).type
            moves.append((blocks.index(block), torch.device(device).type, dtype))
            assert sum(d != "cpu" for d in where.values()) <= 1, "two blocks on the accelerator"
        place(block, torch.device("cpu"), dtype)

    monkeypatch.setattr(pipeline, "_place", fake_place)
    monkeypatch.setattr(pipeline, "_to", lambda obj, device, memo=None: to(obj, torch.device("cpu"), memo))
    monkeypatch.setattr(pipeline, "usable_device", lambda device, *args, **kwargs: torch.device(device))
    compress_blocks(model, CompressionConfig(method="rtn", bits=3, group_size=16), calib(n=2), device="cuda",
                    inplace=True, progress=False)
    per_block = [(torch.float32, "cuda"), (torch.bfloat16, "cuda"), (torch.float32, "cuda"), (torch.bfloat16, "cpu")]
    assert moves == [(i, dev, dt) for i in range(3) for dt, dev in per_block]
    assert all(d == "cpu" for d in where.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a torch without CUDA")
def test_cuda_without_a_gpu_is_refused_before_any_work():
    with pytest.raises(ValueError, match=r"device='cuda': this torch \(.*\) has no usable cuda device; pass device=None"):
        compress_blocks(tiny_llama(), CompressionConfig(method="rtn", bits=3, group_size=16), calib(n=2),
                        device="cuda", progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_equals_cpu():
    config = CompressionConfig(method="rtn", bits=3, group_size=16)
    batches = calib()
    on_cpu = compress_blocks(tiny_llama(), config, batches, eora_rank=8, progress=False)
    on_gpu = compress_blocks(tiny_llama(), config, batches, eora_rank=8, device="cuda", progress=False)
    assert all(p.device.type == "cpu" for p in on_gpu.model.parameters())
    assert_close(logits(on_gpu.eora.apply(on_gpu.model), batches), logits(on_cpu.eora.apply(on_cpu.model), batches),
                 tol=1e-4, what="logits")


def test_a_layer_the_method_cannot_take_is_refused_before_the_first_block():
    model = tiny_llama(layers=3)
    # every block's linears are 64 or 128 wide but for the last block's down_proj, made 96 wide here
    model.model.layers[2].mlp.down_proj = nn.Linear(96, 64, bias=False)
    model.model.layers[2].mlp.up_proj = nn.Linear(64, 96, bias=False)
    model.model.layers[2].mlp.gate_proj = nn.Linear(64, 96, bias=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"group_size=64 does not divide in_features=96 of layer "
                       r"'model.layers.2.mlp.down_proj'"):
        compress_blocks(model, CompressionConfig(method="rtn", bits=3, group_size=64), calib(), inplace=True,
                        progress=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_bad_arguments_name_the_argument():
    model = tiny_llama(layers=1)
    config = CompressionConfig(method="rtn", bits=4, group_size=16)
    with pytest.raises(ValueError, match="eora_rank"):
        compress_blocks(model, config, calib(n=1), eora_rank=-1)
    with pytest.raises(ValueError, match="eora_method"):
        compress_blocks(model, config, calib(n=1), eora_rank=4, eora_method="lora")
    with pytest.raises(ValueError, match="eora_sequential"):
        compress_blocks(model, config, calib(n=1), eora_rank=4, eora_method="svd", eora_sequential=True)
    with pytest.raises(ValueError, match="device"):
        compress_blocks(model, config, calib(n=1), device="gpu0")
    with pytest.raises(TypeError, match="config"):
        compress_blocks(model, {"method": "rtn"}, calib(n=1))
    with pytest.raises(ValueError, match="calib_batches is empty"):
        compress_blocks(model, config, [])
    # refused before the first block is compressed in place (eora_compensate found it after block 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for ridge, match in ((0.1, "eora_method='svd' does not read eora_ridge=0.1"), (float("nan"), "eora_ridge=nan")):
        with pytest.raises(ValueError, match=match):
            compress_blocks(model, config, calib(n=1), eora_rank=2, eora_method="svd", eora_ridge=ridge, inplace=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def offloaded_and_resident(model: nn.Module, tmp_path) -> tuple[nn.Module, nn.Module]:
    """``model`` saved, then loaded twice in bfloat16: with its blocks on disk (``disk_offload_map``) and whole."""
    from transformers import AutoModelForCausalLM

    from compress import disk_offload_map

    model.save_pretrained(tmp_path / "dense")
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", device_map=disk_offload_map(model),
                                                     dtype=torch.bfloat16, offload_folder=tmp_path / "load-offload")
    resident = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.bfloat16)
    return offloaded.eval(), resident.eval()


def test_disk_offloaded_blocks(tmp_path):
    """Blocks offloaded by accelerate are loaded one at a time, compressed, and written back to offload_folder."""
    offloaded, resident = offloaded_and_resident(tiny_llama(), tmp_path)
    config = CompressionConfig(method="svd", keep=0.5, target_modules=["q_proj", "down_proj"])
    batches = calib()
    with pytest.raises(ValueError, match="offload_folder"):
        compress_blocks(offloaded, config, batches, inplace=True)
    with pytest.raises(ValueError, match=r"block-sequential compression is not possible \(allocation='global'.* "
                                         r"accelerate offloads some of this model's"):  # not a meta-device error
        compress_blocks(offloaded, CompressionConfig(method="svd", keep=0.5, allocation="global"), batches,
                        offload_folder=tmp_path / "unused", inplace=True)
    out = compress_blocks(offloaded, config, batches, eora_rank=4, offload_folder=tmp_path / "compressed",
                          inplace=True, progress=False)
    expected = compress_blocks(resident, config, batches, eora_rank=4, inplace=True, progress=False)
    assert all(p.device.type == "meta" for p in out.model.model.layers.parameters())
    assert (tmp_path / "compressed" / "model.layers.2.mlp.down_proj.factorization.U.dat").is_file()
    # the factors went to disk with their blocks: the result keeps none of them in memory
    assert isinstance(out.eora.factors, OffloadedFactors) and out.eora.factors.resident_nbytes == 0
    assert (tmp_path / "compressed" / "eora" / "model.layers.2.safetensors").is_file()
    assert list(out.eora.factors) == list(expected.eora.factors)
    assert_close(logits(out.model, batches), logits(expected.model, batches), tol=0.0, what="logits")
    for name, (B, A) in expected.eora.factors.items():
        assert torch.equal(out.eora.factors[name][0], B) and torch.equal(out.eora.factors[name][1], A), name
    # the residual of an offloaded layer lives where accelerate runs the layer, not on meta (NaN logits before)
    compensated = logits(out.eora.apply(out.model), batches)
    assert torch.isfinite(compensated).all()
    assert_close(compensated, logits(expected.eora.apply(expected.model), batches), tol=0.0, what="compensated")


@pytest.mark.parametrize("group_size", [16, None], ids=["g16", "per-row"])
def test_export_of_disk_offloaded_blocks(tmp_path, group_size):
    """A quantized result whose blocks accelerate keeps on disk is exported without loading them back (transformers
    loads the offloaded tensors one shard at a time; packed layers' weights are never read): the same directory as
    the resident model's export, which transformers loads to the same logits. Per row, layers of two widths are
    written with the "channel" scheme, not regrouped on their way to disk."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    offloaded, resident = offloaded_and_resident(tiny_llama(), tmp_path)
    config = CompressionConfig(method="rtn", bits=4, group_size=group_size,
                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
    batches = calib()
    out = compress_blocks(offloaded, config, batches, offload_folder=tmp_path / "compressed", inplace=True,
                          progress=False)
    expected = compress_blocks(resident, config, batches, inplace=True, progress=False)
    # the codes went to disk with their blocks: the result keeps no bytes of them
    assert all(q.offloaded and q.nbytes == 0 for q in out.report.quantized.values())
    assert not any(q.offloaded for q in expected.report.quantized.values())
    assert (tmp_path / "compressed" / "model.layers.0.self_attn.q_proj.weight_packed.dat").is_file()
    with pytest.raises(ValueError, match=r"dtype=torch.float32, but the model's offloaded tensors are stored in "
                                         r"bfloat16"):
        save_hf_directory(out.model, tmp_path / "wrong-dtype", quantized=out.report.quantized, dtype=torch.float32)
    # max_shard_size: several shards, each loaded and written on its own
    report = save_hf_directory(out.model, tmp_path / "export", quantized=out.report.quantized, max_shard_size="100KB")
    save_hf_directory(expected.model, tmp_path / "export-resident", quantized=expected.report.quantized,
                      max_shard_size="100KB")
    assert all(p.device.type == "meta" for p in out.model.model.layers.parameters())  # still offloaded
    assert len(report.packed) == 3 * 5 and sum(n.endswith(".safetensors") for n in report.files) > 1
    for directory in ("export", "export-resident"):
        (scheme,) = json.loads((tmp_path / directory / "config.json").read_text())["quantization_config"][
            "config_groups"].values()
        assert scheme["weights"]["strategy"] == ("group" if group_size else "channel"), directory
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "export-resident").eval()
    assert reloaded.state_dict().keys() == reference.state_dict().keys()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    # the loader dequantizes the codes in bfloat16 its own way: rounding apart, the in-memory result's logits
    assert_close(logits(reloaded, batches), logits(out.model, batches), tol=2e-2, what="logits")
    # tensors on meta that no offload hook holds have no values to write
    from accelerate import init_empty_weights

    with init_empty_weights():
        empty = LlamaForCausalLM(resident.config)
    with pytest.raises(ValueError, match="is on the meta device .* no values to save"):
        save_hf_directory(empty, tmp_path / "empty")


def test_disk_offloaded_blocks_called_with_their_own_arguments(tmp_path):
    """An offloaded Gemma 3 (local and global layers called with other arguments) is compressed block by block, to
    the resident model's result."""
    offloaded, resident = offloaded_and_resident(_gemma("gemma3"), tmp_path)
    config = CompressionConfig(method="rtn", bits=4, group_size=16, target_modules=["o_proj", "down_proj"])
    batches = _short_then_long()
    out = compress_blocks(offloaded, config, batches, eora_rank=4, offload_folder=tmp_path / "compressed",
                          inplace=True, progress=False)
    expected = compress_blocks(resident, config, batches, eora_rank=4, inplace=True, progress=False)
    assert out.block_path == expected.block_path == "model.layers"
    assert all(p.device.type == "meta" for p in out.model.model.layers.parameters())
    for name, (B, A) in expected.eora.factors.items():
        assert torch.equal(out.eora.factors[name][0], B) and torch.equal(out.eora.factors[name][1], A), name
    assert_close(logits(out.model, batches[1:]), logits(expected.model, batches[1:]), tol=0.0, what="logits")
    # the adapter of the factors on disk is written a layer at a time: the resident result's adapter, bit for bit
    out.eora.save_pretrained(tmp_path / "adapter-offloaded")
    expected.eora.save_pretrained(tmp_path / "adapter-resident")
    written, reference = (load_file(tmp_path / d / "adapter_model.safetensors")
                          for d in ("adapter-offloaded", "adapter-resident"))
    assert written.keys() == reference.keys() and len(written) == 2 * len(expected.eora.factors)
    assert all(torch.equal(written[k], t) and written[k].dtype == t.dtype for k, t in reference.items())


def test_disk_offload_map_puts_the_blocks_on_disk_and_the_rest_in_memory():
    from compress import disk_offload_map

    assert disk_offload_map(tiny_llama()) == {"lm_head": "cpu", "model.embed_tokens": "cpu", "model.norm": "cpu",
                                              "model.rotary_emb": "cpu", "model.layers": "disk"}
    with pytest.raises(ValueError, match="has no decoder blocks"):
        disk_offload_map(_no_blocks())
    model = _Scaled()
    model.gain = nn.Parameter(torch.ones(()))  # a tensor above the blocks: no device-map key covers it alone
    with pytest.raises(ValueError, match=r"holds tensors of its own \(\['gain'\]\) above the decoder blocks"):
        disk_offload_map(model)


def test_float32_compute_of_a_disk_offloaded_model(tmp_path):
    """Offloaded bfloat16 blocks compute in float32 as resident ones do (accelerate casts what it loads to a float32
    placeholder; a bfloat16 weight met float32 hidden states before), and stay bfloat16 on disk and on meta."""
    from compress.pipeline import float32_compute

    offloaded, resident = offloaded_and_resident(tiny_llama(), tmp_path)
    x = calib(n=1)[0]
    with torch.no_grad(), float32_compute(offloaded):
        got = offloaded(x).logits
    with torch.no_grad(), float32_compute(resident):
        expected = resident(x).logits
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert {(p.device.type, p.dtype) for p in offloaded.model.layers.parameters()} == {("meta", torch.bfloat16)}


def test_gptq_on_the_compressed_stream_beats_rtn():
    """GPTQ's statistics come from the compressed stream (each block sees its real inputs): lower output error."""
    model = tiny_llama()
    batches, held_out = calib(n=8), calib(seed=5)
    dense = logits(model, held_out)
    err = lambda m: float((logits(m, held_out) - dense).norm() / dense.norm())
    gptq = compress_blocks(model, CompressionConfig(method="gptq", bits=3, group_size=16), batches, progress=False)
    rtn = compress_blocks(model, CompressionConfig(method="rtn", bits=3, group_size=16), batches, progress=False)
    assert err(gptq.model) < err(rtn.model)


def test_float32_compute_runs_a_bf16_model_in_float32_and_leaves_it_unchanged():
    """Inside the context a bfloat16 model computes exactly what its float32 copy computes; on exit every tensor has
    its old values and dtype, and a residual's float32 factors were never rounded."""
    from compress.pipeline import float32_compute

    from compress.eora import CompensatedLayer

    model = tiny_llama(layers=3, dtype=torch.bfloat16)
    mlp = model.model.layers[0].mlp
    mlp.down_proj = CompensatedLayer(mlp.down_proj, torch.randn(64, 4) / 3, torch.randn(4, 128) / 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert before["model.layers.0.mlp.down_proj.lora_A.weight"].dtype == torch.float32
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        want = copy.deepcopy(model).float()(input_ids=ids).logits
        upcast_in_forward = []
        with float32_compute(model) as same:
            hook = model.model.layers[1].register_forward_pre_hook(  # runs after the context's own pre-hook
                lambda m, a: upcast_in_forward.append({p.dtype for p in m.parameters()}))
            got = same(input_ids=ids).logits
            hook.remove()
            between = {k: v.dtype for k, v in model.state_dict().items()}
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert between == {k: v.dtype for k, v in before.items()} | {  # one block at a time: cast back after each
        k: torch.float32 for k in before if not k.startswith("model.layers.")}  # forward; the rest stays upcast
    assert upcast_in_forward == [{torch.float32}]
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_blocks_that_are_the_target_layers_fall_back_to_the_whole_model():
    # a ModuleList of linears: the "blocks" are the targets; nothing inside them to compress block by block
    torch.manual_seed(0)

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    model = Stack()
    batches = [torch.randn(4, 16) for _ in range(2)]
    with pytest.warns(UserWarning, match="are decoder blocks themselves"):
        out = compress_blocks(model, CompressionConfig(method="rtn", bits=4, group_size=8), batches, progress=False)
    assert out.block_path is None and len(out.report.layers) == 3
