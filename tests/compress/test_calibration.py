"""Calibration statistics: exact second moments via hooks, merging, persistence, bad input."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from compress import ActivationStats, collect_activation_stats
from compress.calibration import CalibrationWarning
from tolerance import assert_close


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 8))


def test_second_moments_equal_direct_computation():
    model = mlp()
    batches = [torch.randn(5, 3, 12) for _ in range(4)]
    stats = collect_activation_stats(model, batches, progress=False)
    X0 = torch.cat([b.reshape(-1, 12) for b in batches])
    X2 = model[1](model[0](X0))
    assert stats.order == ["0", "2"]
    for name, X in (("0", X0), ("2", X2)):
        st = stats[name]
        assert st.count == 60
        assert_close(st.gram, X.T @ X)
        assert_close(st.mean_abs, X.abs().mean(0))


def test_conv2d_statistics_are_those_of_unfolded_patches():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1, stride=2)
    model = nn.Sequential(conv)
    x = torch.randn(2, 3, 7, 7)
    st = collect_activation_stats(model, [x], target_modules=["0"], progress=False)["0"]
    cols = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 27)
    assert_close(st.gram, cols.T @ cols)
    # the unfolded rows reproduce the conv: weight.reshape(out, -1) is the matrix the stats belong to
    y = (cols @ conv.weight.reshape(5, -1).T + conv.bias).reshape(2, 16, 5).transpose(1, 2).reshape(2, 5, 4, 4)
    assert_close(y, conv(x))


@pytest.mark.parametrize("padding,kernel,dilation", [("same", 3, 1), ("same", 4, 1), ("same", (3, 4), (2, 1)),
                                                      ("valid", 3, 1)])
def test_conv2d_with_string_padding_unfolds_the_patches_the_conv_sees(padding, kernel, dilation):
    """'same' pads dilation·(k − 1) per side pair, the odd element on the right, as the conv does; 'valid' none."""
    from compress.calibration import layer_inputs

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, kernel, padding=padding, dilation=dilation, dtype=torch.float64)
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    rows = layer_inputs(conv, x)
    y = conv(x)
    patches = (rows @ conv.weight.reshape(5, -1).T + conv.bias).reshape(2, -1, 5).transpose(1, 2).reshape(y.shape)
    assert_close(patches, y)
    st = collect_activation_stats(nn.Sequential(conv), [x], target_modules=["0"], progress=False)["0"]
    assert_close(st.gram, rows.T @ rows)


def test_conv1d_and_dict_batches():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = Conv1D(16, 6)

        def forward(self, input_ids, scale=1.0):
            return self.c_fc(input_ids * scale)

    x = torch.randn(4, 6)
    st = collect_activation_stats(Block(), [{"input_ids": x, "scale": 2.0}], progress=False)["c_fc"]
    assert_close(st.gram, 4 * x.T @ x)


def test_merge_equals_one_pass_and_save_load_round_trip(tmp_path):
    model = mlp()
    batches = [torch.randn(4, 12) for _ in range(6)]
    whole = collect_activation_stats(model, batches, progress=False)
    merged = collect_activation_stats(model, batches[:2], progress=False).merge(
        collect_activation_stats(model, batches[2:], progress=False))
    for name in whole:
        assert_close(merged[name].gram, whole[name].gram)
        assert merged[name].count == whole[name].count
    whole.save(tmp_path / "stats.safetensors")
    back = ActivationStats.load(tmp_path / "stats.safetensors")
    assert back.order == whole.order
    for name in whole:
        assert torch.equal(back[name].gram, whole[name].gram) and back[name].count == whole[name].count


def test_model_is_left_as_it_was():
    model = mlp().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    collect_activation_stats(model, [torch.randn(3, 12)], progress=False)
    assert model.training and not model[0]._forward_pre_hooks
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_empty_calibration_is_refused():
    with pytest.raises(ValueError, match="calibration batches are empty"):
        collect_activation_stats(mlp(), [], progress=False)


def test_nested_inputs_of_a_transformer_encoder_count_their_real_tokens():
    # nn.TransformerEncoder with a padding mask hands its layers a nested (padding-free) batch
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True, dropout=0.0)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    x, lengths = torch.randn(3, 7, 16), [7, 5, 3]
    padding = torch.arange(7)[None, :] >= torch.tensor(lengths)[:, None]
    stats = collect_activation_stats(encoder, [(x, None, padding)], target_modules=["linear1"], progress=False)
    # the same sequences one by one, unpadded
    alone = collect_activation_stats(encoder, [x[i:i + 1, :n] for i, n in enumerate(lengths)], target_modules=["linear1"],
                                     progress=False)
    for name in ("layers.0.linear1", "layers.1.linear1"):
        assert stats[name].count == sum(lengths)
        assert_close(stats[name].gram, alone[name].gram, tol=1e-5, what=f"{name} statistics")


def test_each_stream_of_an_encoder_decoder_gets_its_own_mask():
    # the decoder's 6 positions are not the encoder's 6 tokens: the encoder's padding mask used to drop decoder rows
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
                      decoder_start_token_id=0)
    model = T5ForConditionalGeneration(config).eval()
    ids = torch.randint(1, 64, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    targets = ["encoder.block.0.layer.1.DenseReluDense.wi", "decoder.block.0.layer.2.DenseReluDense.wi", "lm_head"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        stats = collect_activation_stats(model, [{"input_ids": ids, "attention_mask": mask, "decoder_input_ids": ids}],
                                         target_modules=targets, progress=False)
        assert [stats[n].count for n in targets] == [9, 12, 12]  # real encoder tokens; every decoder position
        decoder_mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
        stats = collect_activation_stats(model, [{"input_ids": ids, "attention_mask": mask, "decoder_input_ids": ids,
                                                  "decoder_attention_mask": decoder_mask}],
                                         target_modules=targets, progress=False)
    assert [stats[n].count for n in targets] == [9, 10, 10]


def test_fewer_rows_than_inputs_warn_once_per_cause():
    # 15 rows: layer '0' (12 inputs) is fine, layer '2' (20 inputs) has a singular X^T X
    with pytest.warns(CalibrationWarning, match=r"1 target layer\(s\) saw fewer calibration rows \(down to 15\) than "
                      r"they have inputs \(up to 20\)"):
        collect_activation_stats(mlp(), [torch.randn(5, 12), torch.randn(10, 12)], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)
        collect_activation_stats(mlp(), [torch.randn(20, 12)], progress=False)


def test_nan_activations_are_refused_naming_the_layer():
    bad = torch.randn(4, 12)
    bad[1, 3] = math.nan
    with pytest.raises(ValueError, match=r"entering layer '0' contain NaN or inf"):
        collect_activation_stats(mlp(), [torch.randn(4, 12), bad], progress=False)


def test_unknown_target_module_is_refused():
    with pytest.raises(ValueError, match=r"target_modules entry 'q_proj': it matched no module.*e.g. \['0', '2'\]"):
        collect_activation_stats(mlp(), [torch.randn(2, 12)], target_modules=["q_proj"], progress=False)


def test_unused_target_is_refused():
    model = nn.ModuleDict({"used": nn.Linear(4, 4), "unused": nn.Linear(4, 4)})
    model.forward = lambda x: model["used"](x)
    with pytest.raises(ValueError, match=r"\['unused'\] received no input"):
        collect_activation_stats(model, [torch.randn(2, 4)], progress=False)


def _padded(lengths, vocab=50, seq=12, seed=3):
    """Right-padded token batch ``{"input_ids", "attention_mask"}`` of sequences of ``lengths``, and the sequences."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(1, vocab, (n,), generator=g) for n in lengths]
    ids = torch.zeros(len(seqs), seq, dtype=torch.long)
    mask = torch.zeros(len(seqs), seq, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    return {"input_ids": ids, "attention_mask": mask}, seqs


def test_padding_is_left_out_of_the_statistics():
    """A padded batch (a tokenizer's padding=True) gives the statistics of its unpadded sequences run one by one:
    the attention mask's padded positions never reach any layer's sums; a pooled head keeps its rows."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=32)).eval()
    batch, seqs = _padded([12, 7, 3])
    got = collect_activation_stats(model, [batch], "all-linear", progress=False)
    expected = collect_activation_stats(model, [s[None] for s in seqs], "all-linear", progress=False)
    assert got.order == expected.order and "pooler.dense" in got.order
    for name in got:
        assert got[name].count == expected[name].count, name
        assert_close(got[name].gram, expected[name].gram, tol=1e-5, what=name)
    assert got["encoder.layer.0.attention.self.query"].count == 22  # real tokens only (36 positions)
    assert got["pooler.dense"].count == 3  # one pooled row per sequence
    # an all-ones mask changes nothing
    full = {"input_ids": batch["input_ids"], "attention_mask": torch.ones_like(batch["attention_mask"])}
    plain = collect_activation_stats(model, [batch["input_ids"]], "all-linear", progress=False)
    assert all(torch.equal(collect_activation_stats(model, [full], "all-linear", progress=False)[n].gram,
                           plain[n].gram) for n in plain)
    # a tuple batch, run as model(input_ids, attention_mask), is masked the same (its padding used to count)
    as_tuple = collect_activation_stats(model, [(batch["input_ids"], batch["attention_mask"])], "all-linear",
                                        progress=False)
    assert all(torch.equal(as_tuple[n].gram, got[n].gram) and as_tuple[n].count == got[n].count for n in got)


def test_all_linear_leaves_out_layers_torch_never_calls():
    # nn.MultiheadAttention reads out_proj.weight and never calls out_proj: "received no input" failed every
    # all-linear calibration of a model holding one
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=False, dropout=0.0)
    model = nn.Sequential(nn.TransformerEncoder(layer, 1, enable_nested_tensor=False), nn.Linear(16, 4)).eval()
    with pytest.warns(UserWarning, match=r"'all-linear' leaves 1 layer\(s\) such as '0.layers.0.self_attn.out_proj' "
                                         r"out: .*they receive no input"):
        stats = collect_activation_stats(model, [torch.randn(40, 2, 16)], progress=False)
    assert sorted(stats) == ["0.layers.0.linear1", "0.layers.0.linear2", "1"]


@pytest.mark.parametrize("batches", [None, torch.zeros(2, 8, dtype=torch.long)])
def test_batches_that_are_not_an_iterable_of_inputs_are_named(batches):
    # a (B, T) tensor iterated over its rows: a shape error deep inside the model
    with pytest.raises(TypeError, match="batches must be an iterable of model inputs"):
        collect_activation_stats(nn.Sequential(nn.Linear(8, 8)), batches, target_modules=["0"])
