"""A small MLP fed inputs with an anisotropic spectrum (two outlier channels, the rest decaying 100x), as LLM
activations are: the case where EoRA's eigenspace weighting matters."""

import torch
from torch import nn


def anisotropic_mlp(seed: int = 0) -> tuple[nn.Module, list[torch.Tensor], list[torch.Tensor]]:
    """``(model, calibration batches, held-out batches)``: 32 -> 64 -> 48 -> 16 with GELUs, 8 batches of 64 rows each."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 16)).eval()
    scale = torch.logspace(0, -2, 32)
    scale[:2] = 10.0
    draw = lambda n: [torch.randn(64, 32) * scale for _ in range(n)]
    return model, draw(8), draw(8)
