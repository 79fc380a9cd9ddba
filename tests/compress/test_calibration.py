"""Calibration statistics: exact second moments via hooks, merging, persistence, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from compress import ActivationStats, collect_activation_stats
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
