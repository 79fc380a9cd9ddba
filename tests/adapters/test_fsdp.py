"""Every adapter trains under FSDP2 (``fully_shard``) with two gloo ranks as on one process.

Wrapping (:func:`conformance.fsdp_units`): each transformer block (or, in the block-less tiny
models, each adapted layer) is its own unit, then the root ``PeftModel``. LoTR's factors and
MoS's pools live on the tuner, outside every block, so they are in the root unit: one sharded
tensor per shared factor, all-gathered before the forward for every layer that uses it.

All cases train in one subprocess (two spawned ranks, 3 Adam steps in float64, rank ``k``
drawing batch ``100 step + k``); each is compared with one process training on both ranks'
batches, whose mean loss is what FSDP's averaged gradients descend.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import adapter_conformance as conf
import pytest
import torch
from safetensors.torch import load_file, save_file
from tolerance import assert_close

CASES = [case for case in conf.CASES if not case.spec.slow] + conf.FSDP_EXTRA_CASES
STEPS, RANKS = 3, (0, 1)


@dataclass(frozen=True)
class FsdpRun:
    """One case after 3 steps under FSDP2: each rank's gathered trainable state (+ its losses),
    the FSDP unit of every parameter, and the adapter directory rank 0 saved."""

    states: list[dict[str, torch.Tensor]]
    units: dict[str, str]
    saved: Path


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory) -> dict[str, FsdpRun]:
    outdir = tmp_path_factory.mktemp("adapters_fsdp")
    conf.run_entry_point("fsdp", json.dumps([case.id for case in CASES]), str(outdir))
    return {
        case.id: FsdpRun(
            states=[load_file(str(outdir / f"{case.id}.rank{rank}.safetensors")) for rank in RANKS],
            units=json.loads((outdir / f"{case.id}.rank0.json").read_text()),
            saved=outdir / case.id,
        )
        for case in CASES
    }


@functools.cache
def single_process_reference(case_id: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """The same 3 Adam steps in float64 on one process, each on the mean loss over both ranks' batches."""
    case = conf.case_by_id(case_id)
    model, _ = conf.build(case, adapter_seed=1)
    model.double()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for step in range(STEPS):
        batches = [conf.make_inputs(case, 100 * step + rank) for rank in RANKS]
        batches = [{k: v.double() if v.is_floating_point() else v for k, v in b.items()} for b in batches]
        loss = sum(conf.loss_of(case, model, batch) for batch in batches) / len(RANKS)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return model, tuple(losses)


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id) for case in CASES])
def test_fsdp_two_gloo_ranks_train_as_one_process_on_the_full_batch(case, fsdp_runs):
    state0, state1 = fsdp_runs[case.id].states
    params = [k for k in state0 if not k.startswith("loss.")]
    assert state0.keys() == state1.keys()
    assert all(torch.equal(state0[k], state1[k]) for k in params), "ranks disagree on a gathered parameter"
    reference, losses = single_process_reference(case.id)
    for step, loss in enumerate(losses):
        mean_loss = (state0[f"loss.{step}"] + state1[f"loss.{step}"]) / 2
        assert_close(mean_loss, loss.reshape(1), what=f"loss at step {step}")
    expected = conf.trainable(reference)
    assert set(params) == expected.keys()
    init = conf.trainable(conf.build(case, adapter_seed=1)[0])
    for name, tensor in expected.items():
        assert not torch.equal(tensor, init[name].double()), f"{name} never trained"
        assert_close(state0[name], tensor, what=name)


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id) for case in CASES])
def test_adapter_saved_from_fsdp_equals_the_single_process_one(case, fsdp_runs, tmp_path):
    """Rank 0's ``save_pretrained`` of the gathered full state: same keys and values, loads strictly."""
    saved_dir = fsdp_runs[case.id].saved
    single_process_reference(case.id)[0].save_pretrained(str(tmp_path))
    saved = load_file(str(saved_dir / "adapter_model.safetensors"))
    expected = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert saved.keys() == expected.keys()
    for key, tensor in expected.items():
        assert_close(saved[key], tensor, what=key)
    conf.load_strict(case, saved_dir, "default")


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id) for case in CASES])
def test_fsdp_keeps_shared_tensors_once_in_the_root_unit(case, fsdp_runs):
    state, units = fsdp_runs[case.id].states[0], fsdp_runs[case.id].units
    tuner = conf.build(case)[0].base_model
    shared = [k for k in state if k.startswith("base_model.") and not k.startswith("base_model.model.")]
    assert bool(shared) == getattr(tuner, "uses_shared_state", False)
    # One key per shared tensor (not one per layer using it), sharded by the root unit only.
    assert {units[k] for k in shared} <= {""}
    if shared:
        assert sum(state[k].numel() for k in shared) == sum(p.numel() for p in tuner.shared_parameters("default"))
    assert set(units.values()) - {""}, "every parameter is in the root unit: nothing was wrapped"


def test_learned_loretta_adp_scale_saved_0d_by_0_1_0_still_loads(tmp_path):
    """The learned scale is ``(1,)`` now (FSDP2 shards no 0-d parameter); 0.1.0 saved it 0-d."""
    case = conf.case_by_id("loretta-adp-mlp")
    model, inputs = conf.build(case)
    conf.perturb_(model, seed=3)
    model.save_pretrained(str(tmp_path))
    path = str(tmp_path / "adapter_model.safetensors")
    saved = load_file(path)
    scales = [k for k in saved if "loretta_adp_scale" in k]
    assert scales and all(saved[k].shape == (1,) for k in scales)
    save_file({k: v.reshape(()) if k in scales else v for k, v in saved.items()}, path)
    loaded = conf.load_strict(case, tmp_path, "default")
    with torch.no_grad():
        assert torch.equal(conf.output(case, loaded, inputs), conf.output(case, model, inputs))
