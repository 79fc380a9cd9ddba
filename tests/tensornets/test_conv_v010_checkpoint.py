"""``FactorizedConv2d`` state dicts and files saved by release 0.1.0 load, with bitwise-equal outputs.

0.1.0 (commit 4710530, ``tensornets/layers.py``) stored the conv factors as the layer's own parameters:

- tucker: ``in_factor: (C_in, R_in)``, ``core: (R_out, R_in, kh, kw)``, ``out_factor: (C_out, R_out)``;
- lowrank: ``core: (r, C_in, kh, kw)``, ``out_factor: (C_out, r)``;

plus ``bias: (C_out,)``, and its forward was three convolutions. Both are rebuilt here from that source, so the
reference does not depend on the current layer.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import tensornets
from tensornets import FactorizedConv2d
from tolerance import assert_close

C_IN, C_OUT, KERNEL = 5, 7, (3, 2)
RANKS = {"tucker": (4, 3), "lowrank": (6,)}  # 0.1.0 ranks: (R_out, R_in) and (r,)
GEOMETRY = {"stride": (2, 1), "padding": (1, 0), "dilation": (1, 2)}


def v010_state_dict(format: str, dtype: torch.dtype = torch.float32, bias: bool = True) -> dict[str, torch.Tensor]:
    """Random tensors under 0.1.0's key names and shapes."""
    kh, kw = KERNEL
    if format == "tucker":
        r_out, r_in = RANKS[format]
        shapes = {"in_factor": (C_IN, r_in), "core": (r_out, r_in, kh, kw), "out_factor": (C_OUT, r_out)}
    else:
        (r,) = RANKS[format]
        shapes = {"core": (r, C_IN, kh, kw), "out_factor": (C_OUT, r)}
    if bias:
        shapes["bias"] = (C_OUT,)
    return {name: torch.randn(shape).to(dtype) for name, shape in shapes.items()}


def v010_forward(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """0.1.0's ``FactorizedConv2d.forward``: 1x1 conv with ``in_factor`` (tucker), kh x kw conv with ``core``,
    1x1 conv with ``out_factor`` plus the bias."""
    h = x
    if "in_factor" in state:
        h = F.conv2d(h, state["in_factor"].mT[:, :, None, None])
    h = F.conv2d(h, state["core"], **GEOMETRY)
    return F.conv2d(h, state["out_factor"][:, :, None, None], state.get("bias"))


def v010_kernel(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """0.1.0's ``weight_dense``: the ``(C_out, C_in, kh, kw)`` kernel."""
    if "in_factor" in state:
        return torch.einsum("oa,abhw,ib->oihw", state["out_factor"], state["core"], state["in_factor"])
    return torch.einsum("or,rihw->oihw", state["out_factor"], state["core"])


def new_layer(format: str, bias: bool = True, rank: tuple[int, ...] | None = None) -> FactorizedConv2d:
    return FactorizedConv2d(C_IN, C_OUT, KERNEL, rank=rank or RANKS[format], format=format, bias=bias, **GEOMETRY)


@pytest.mark.parametrize("format", ["tucker", "lowrank"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_v010_state_dict_loads_with_bitwise_outputs(format: str, dtype: torch.dtype, bias: bool) -> None:
    old = v010_state_dict(format, dtype, bias)
    layer = new_layer(format, bias).to(dtype)
    layer.load_state_dict(old, strict=True)
    x = torch.randn(2, C_IN, 9, 8).to(dtype)
    assert torch.equal(layer(x), v010_forward(old, x))
    # the caller's dict is untouched (torch hands the layer a copy)
    assert set(old) == set(v010_state_dict(format, dtype, bias))


@pytest.mark.parametrize("format", ["tucker", "lowrank"])
def test_v010_kernel_is_the_dense_kernel(format: str) -> None:
    old = {k: v.double() for k, v in v010_state_dict(format).items()}
    layer = new_layer(format).double()
    layer.load_state_dict(old)
    assert_close(layer.weight_dense(), v010_kernel(old), what="dense kernel")
    assert_close(layer.to_conv().weight, v010_kernel(old), what="to_conv kernel")


def test_v010_state_dict_loads_inside_a_model() -> None:
    """Keys under a prefix (``1.core``) map as well; the rest of the model loads as usual."""
    old = v010_state_dict("tucker")
    head = nn.Linear(3, 3)
    saved = {**{f"1.{k}": v for k, v in old.items()}, **{f"2.{k}": v for k, v in head.state_dict().items()}}
    model = nn.Sequential(nn.Identity(), new_layer("tucker"), nn.Linear(3, 3))
    model.load_state_dict(saved, strict=True)
    x = torch.randn(2, C_IN, 9, 8)
    assert torch.equal(model[1](x), v010_forward(old, x))
    assert torch.equal(model[2].weight, head.weight)


@pytest.mark.parametrize("format", ["tucker", "lowrank"])
def test_v010_file_loads_with_tensornets_load(tmp_path, format: str) -> None:
    """A file as 0.1.0's ``tensornets.save`` wrote it (the manifest format is unchanged since)."""
    old = v010_state_dict(format)
    spec = {
        "in_channels": C_IN, "out_channels": C_OUT, "kernel_size": list(KERNEL), "rank": list(RANKS[format]),
        "format": format, "stride": list(GEOMETRY["stride"]), "padding": list(GEOMETRY["padding"]),
        "dilation": list(GEOMETRY["dilation"]), "bias": True,
    }
    path = tmp_path / "conv_v010.safetensors"
    save_file(old, str(path), metadata={"tensornets": json.dumps({"version": 1, "kind": "conv2d", "spec": spec})})
    layer = tensornets.load(path)
    x = torch.randn(2, C_IN, 9, 8)
    assert torch.equal(layer(x), v010_forward(old, x))


def test_v010_format_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="0.1.0 lowrank FactorizedConv2d.*format='lowrank'"):
        new_layer("tucker").load_state_dict(v010_state_dict("lowrank"))


def test_v010_tucker_into_truncated_spatial_rank_is_refused() -> None:
    """0.1.0 kept the spatial mode whole: a layer with a smaller spatial rank cannot hold it exactly."""
    layer = new_layer("tucker", rank=(*RANKS["tucker"], 4))
    with pytest.raises(ValueError, match="no exact mapping.*from_conv"):
        layer.load_state_dict(v010_state_dict("tucker"))


def test_v010_shape_mismatch_is_reported_by_torch() -> None:
    with pytest.raises(RuntimeError, match="size mismatch for factorization.core"):
        new_layer("tucker", rank=(3, 3)).load_state_dict(v010_state_dict("tucker"))
