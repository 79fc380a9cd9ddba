"""Init scales that make an adapter's first optimizer steps move the output like LoRA's.

The reference is PEFT's LoRA: ``ΔW = s_L B A`` with ``B: (d_out, r) = 0``, ``A: (r, d_in)``
Kaiming-uniform (``U(±d_in^{-1/2})``, std ``σ_A = (3 d_in)^{-1/2}``) and ``s_L = alpha / r``.
Under Adam the first step moves every entry that has a gradient by ``±lr`` (bias correction
makes ``|m̂ / sqrt(v̂)| = 1``); at step 0 only ``B`` has one (``∂L/∂A ∝ B = 0``), so
``s_L ΔB`` has entries of size ``s_L lr`` and the output change
``Δy = s_L ΔB (A x)`` has, per output coordinate, size about ``s_L lr · r σ_A ‖x‖``:
independent of ``d_out`` (the muP condition for a hidden layer) and proportional to ``alpha``.

Every update of ours that is linear in ``x`` can be written ``ΔW = s · (P C) A'`` with a
trainable core ``C: (q, r')`` that starts at zero, an output-side factor ``P: (d_out, q)`` and
an input-side factor ``A': (r', d_in)`` (LoTR: ``P = A``, ``C = G_m``, ``A' = B``; FLoRA on a
linear: ``P = U_out``, ``C = G``, ``A' = U_inᵀ``; LoRETTA-rep: ``P`` = the contraction of
``M_B``'s cores before its last, ``C`` = that last core, ``A' = M_Aᵀ``). The first step gives
``Δ(P C)`` entries of size ``sqrt(q) σ_P lr`` (a sum of ``q`` terms ``P_ja ΔC_ab``), so the
output change per coordinate is about ``s lr · sqrt(q) σ_P · r' σ_{A'} ‖x‖``. It equals LoRA's
at the same ``alpha`` (``s = s_L``) when

    ``sqrt(q) σ_P · r' σ_{A'} = r σ_A``,

which :func:`output_factor_std` solves for ``σ_P``. With ``r' = r`` and ``σ_{A'} = σ_A`` it is
``σ_P = q^{-1/2}``: the entries of ``s P ΔC`` then have LoRA's ``s_L lr``. Width transfer
follows: neither side depends on ``d_out``. Factors normalized to unit columns instead (the
earlier defaults) give ``σ_P = d_out^{-1/2}`` and slow the update by ``sqrt(q / d_out)`` (about
4-7x at d = 384-768), which is why LoTR, FLoRA and LoRETTA-rep needed a larger lr than LoRA's.

The first step is not the whole story when ``P`` is itself trained. LoRA learns its output
directions from zero in ``B``; a method whose ``P`` is fixed at a random init only rescales
``P``'s random column space. Under Adam a factor of entry std ``σ`` changes by about
``lr / σ`` of its size per step, LoRA's ``A`` by ``lr / σ_A``. LoRETTA-rep's ``P`` is a chain
of cores of std ``q^{-1/2}``, ``R^{-1/2}`` (~0.5): 17x slower than LoRA's ``A`` at ``d = 384``,
and after 2 epochs on MiniLM most of its ``ΔW`` still lay in ``P``'s initial column space. Its
default therefore stores each core of ``P`` at std ``σ_A`` and multiplies the train by the
fixed ``Π σ_k / σ_A`` (the muP multiplier; :func:`adapters.loretta.step_matched_init_`): the
same first step, and ``P`` learning at LoRA's ``A``'s relative rate.

LoTR's ``A`` and FLoRA's ``U_out`` are single factors of std ``σ_P = q^{-1/2}`` (0.35 at
``q = r = 8``), ``σ_A / σ_P`` (1/12 at ``d_in = 384``) as fast as LoRA's ``A``. Their default
(``init_weights="lora_rate"``; its 3-seed drug-review accuracies beside LoRA's:
benchmarks/results/finetune_defaults.md) is the same
reparametrization with one factor: ``P`` is stored at ``σ_A`` (the same draw, divided by
``μ = σ_P / σ_A``, :func:`lora_rate_multiplier`) and used as ``μ P_stored``. The value of
``ΔW`` and its first step are unchanged, while Adam's per-entry step ``lr`` on ``P_stored`` is
``lr / σ_A`` of its size, as on LoRA's ``A`` (``μ`` scales ``P``'s step and ``P`` alike). The
multiplier is derived from the shapes, never trained or saved: a checkpoint stores
``P_stored`` and its config's ``init_weights``. A factor shared across layers (LoTR) has one
multiplier, that of its group's shape. Apply ``μ`` to the factor before any contraction, so
that no intermediate is ``μ`` times smaller than in the plain parametrization (float16
autocast flushes values below ~6e-8 to zero).
"""

from __future__ import annotations

import math

__all__ = ["INIT_WEIGHTS", "REFERENCE_LORA_ALPHA", "lora_input_std", "lora_rate_multiplier", "output_factor_std"]

#: PEFT's default ``lora_alpha`` (with its default ``r = 8``: ``s_L = 1``), the LoRA that methods without an
#: ``alpha`` of their own (LoRETTA-adp) are matched to.
REFERENCE_LORA_ALPHA = 8.0

#: ``init_weights`` of LoTR and FLoRA: ``"lora_rate"`` (default) stores the output factor at LoRA's ``A`` std
#: under a fixed multiplier (:func:`lora_rate_multiplier`); ``"plain"`` stores it at its own std (the earlier
#: default, and what a checkpoint without ``init_weights`` in its config was saved with).
INIT_WEIGHTS = ("lora_rate", "plain")


def lora_input_std(fan_in: int) -> float:
    """Std ``σ_A = (3 fan_in)^{-1/2}`` of LoRA's ``A`` (Kaiming-uniform ``U(±fan_in^{-1/2})``)."""
    if fan_in < 1:
        raise ValueError(f"fan_in={fan_in} must be >= 1")
    return (3 * fan_in) ** -0.5


def output_factor_std(q: int, r_input: int, input_std: float, fan_in: int, r: int) -> float:
    """``σ_P`` solving ``sqrt(q) σ_P · r_input σ_{A'} = r σ_A`` (module docstring).

    Parameters
    ----------
    q : int
        Columns of the output-side factor ``P: (d_out, q)`` (rows of the zero-init core).
    r_input : int
        Rows ``r'`` of the input-side factor ``A': (r', fan_in)`` (columns of the core).
    input_std : float
        Entry std ``σ_{A'}`` of ``A'``.
    fan_in : int
        Input size of the layer (``d_in``; ``C_in / groups · ∏ kernel`` for a conv).
    r : int
        The rank ``r`` of the LoRA being matched (the ``r`` of ``s = alpha / r``).

    Returns
    -------
    float
        The entry std of ``P`` that makes ``s P ΔC A'`` after one Adam step as large as LoRA's
        ``s ΔB A`` at the same ``s``.
    """
    if min(q, r_input, fan_in, r) < 1 or input_std <= 0:
        raise ValueError(f"need positive sizes and std; got q={q}, r_input={r_input}, fan_in={fan_in}, r={r}, "
                         f"input_std={input_std}")
    return r * lora_input_std(fan_in) / (math.sqrt(q) * r_input * input_std)


def lora_rate_multiplier(factor_std: float, fan_in: int) -> float:
    """``μ = σ_P / σ_A``: the fixed multiplier of a factor stored at LoRA's ``A`` std instead of its own ``σ_P``.

    ``P = μ P_stored`` with ``P_stored`` of entry std ``σ_A = (3 fan_in)^{-1/2}``
    (:func:`lora_input_std`) has the value of a factor of std ``σ_P``, and Adam moves
    ``P_stored`` by ``lr / σ_A`` of its size per step, as it moves LoRA's ``A`` (module docstring).
    For LoTR's ``A`` and FLoRA's ``U_out`` on a linear layer, ``σ_P = r^{-1/2}`` and
    ``μ = sqrt(3 d_in / r)`` (12 at ``d_in = 384``, ``r = 8``).
    """
    if factor_std <= 0:
        raise ValueError(f"factor_std={factor_std} must be > 0")
    return factor_std / lora_input_std(fan_in)
