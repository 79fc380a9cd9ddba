"""tensornets: factorized linear maps (low rank, Tucker, TT, MPO, BTT, CP) for PyTorch.

>>> import torch, tensornets
>>> W = torch.randn(256, 512)
>>> mpo = tensornets.decompose(W, "mpo", rank=16, num_cores=3)
>>> y = mpo(torch.randn(8, 512))            # (8, 256) through the cores, no dense W
>>> W_hat = mpo.to_dense()                   # (256, 512)
"""

from .contraction import ContractionPlan, batch_bucket, clear_plan_cache, plan_cache_info, plan_contraction
from .decompositions import (
    cp_als,
    hooi,
    hosvd,
    mode_product,
    randomized_svd,
    stack_tucker2,
    truncated_svd,
    tt_svd,
    tucker_to_tensor,
)
from .formats import (
    BTT,
    CP,
    MPO,
    EinsumFactorization,
    Factorization,
    LowRank,
    TensorTrain,
    Tucker,
    available_formats,
    get_format,
    register_format,
)
from .init import factor_std, init_factorization_, mup_param_groups
from .io import load, save
from .layers import FactorizedConv2d, FactorizedLinear, decompose
from .plans import get_strategy, set_strategy
from .shapes import factorize, padded_size, prime_factors

__version__ = "0.1.0"

__all__ = [
    "decompose",
    "Factorization",
    "EinsumFactorization",
    "LowRank",
    "Tucker",
    "TensorTrain",
    "MPO",
    "BTT",
    "CP",
    "register_format",
    "get_format",
    "available_formats",
    "FactorizedLinear",
    "FactorizedConv2d",
    "truncated_svd",
    "randomized_svd",
    "tt_svd",
    "hosvd",
    "hooi",
    "stack_tucker2",
    "mode_product",
    "tucker_to_tensor",
    "cp_als",
    "set_strategy",
    "get_strategy",
    "ContractionPlan",
    "plan_contraction",
    "batch_bucket",
    "plan_cache_info",
    "clear_plan_cache",
    "init_factorization_",
    "factor_std",
    "mup_param_groups",
    "save",
    "load",
    "factorize",
    "padded_size",
    "prime_factors",
]
