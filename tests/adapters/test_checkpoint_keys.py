"""Checkpoint keys of the shared tuner base: the adapter name is stripped at any depth and restored on load."""

from __future__ import annotations

import adapters  # noqa: F401  (registers our methods with PEFT)
import adapter_conformance as conf
import pytest
import torch
from adapters._delta import legacy_checkpoint_keys
from adapters.loretta import LoRETTAAdpModel, LoRETTARepModel
from adapters.lotr import LoTRModel
from adapters.mos import MoSModel
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

QUERY = "base_model.model.encoder.layer.0.attention.self.query"


@pytest.mark.parametrize(
    "tuner_cls, key, adapter_name, checkpoint_key",
    [
        # Tensor-train cores: the name sits two levels above the end (PEFT alone keeps it there).
        (LoRETTARepModel, f"{QUERY}.loretta_rep_A.default.cores.0", "default", f"{QUERY}.loretta_rep_A.cores.0"),
        (LoRETTARepModel, f"{QUERY}.loretta_rep_B.other.cores.2", "other", f"{QUERY}.loretta_rep_B.cores.2"),
        # An adapter named like a segment inside its own container.
        (LoRETTARepModel, f"{QUERY}.loretta_rep_A.cores.cores.0", "cores", f"{QUERY}.loretta_rep_A.cores.0"),
        # A base module named like the adapter: only the segment after a container goes.
        (LoRETTAAdpModel, "base_model.model.default.o.loretta_adp_U.default.cores.1", "default",
         "base_model.model.default.o.loretta_adp_U.cores.1"),
        # ParameterDict entries (name last) and shared containers on the tuner.
        (LoRETTAAdpModel, "base_model.model.o.loretta_adp_bias_D.b", "b", "base_model.model.o.loretta_adp_bias_D"),
        (LoTRModel, "base_model.lotr_A.default.q_16x16", "default", "base_model.lotr_A.q_16x16"),
        (LoTRModel, "base_model.model.q.lotr_core.x.weight", "x", "base_model.model.q.lotr_core.weight"),
        (MoSModel, "base_model.mos_B.a.up_32x16", "a", "base_model.mos_B.up_32x16"),
    ],
)
def test_adapter_name_removed_after_its_container(tuner_cls, key, adapter_name, checkpoint_key):
    assert tuner_cls._remove_adapter_name_from_key(key, adapter_name) == checkpoint_key


def test_keys_outside_containers_follow_peft_rule():
    # A modules_to_save copy (no container of ours in the key) keeps PEFT's behaviour.
    key = "base_model.model.classifier.modules_to_save.default.weight"
    assert LoRETTARepModel._remove_adapter_name_from_key(key, "default") == (
        "base_model.model.classifier.modules_to_save.weight"
    )


def test_state_dict_round_trip_under_another_name_with_layers_injected_directly():
    # set_peft_model_state_dict on the PeftModel and on the bare injected model (no prefix).
    case = conf.case_by_id("loretta-rep-mlp")
    source, inputs = conf.build(case)
    conf.perturb_(source, seed=3)
    checkpoint = get_peft_model_state_dict(source)
    assert checkpoint and not any(".default" in key for key in checkpoint)
    target, _ = conf.build(case, adapter_seed=2, adapter_name="renamed")
    result = set_peft_model_state_dict(target, checkpoint, adapter_name="renamed")
    assert not result.unexpected_keys
    assert not [key for key in result.missing_keys if ".renamed" in key]
    with torch.no_grad():
        assert torch.equal(conf.output(case, target, inputs), conf.output(case, source, inputs))


def test_old_layout_maps_onto_current_keys_for_any_saved_name():
    case = conf.case_by_id("loretta-adp-mlp")
    model, _ = conf.build(case, adapter_name="mine")
    current = get_peft_model_state_dict(model, adapter_name="mine")
    # The previous version kept the saved name before "cores" (any name, here "saved_as").
    old = {key.replace(".cores.", ".saved_as.cores."): t for key, t in current.items()}
    renamed = legacy_checkpoint_keys(LoRETTAAdpModel, model, "mine", old)
    assert renamed and all(".saved_as." in key for key in renamed)
    assert {renamed.get(key, key) for key in old} == set(current)


def test_old_and_current_copy_of_one_tensor_is_an_error():
    case = conf.case_by_id("loretta-rep-mlp")
    model, _ = conf.build(case)
    current = get_peft_model_state_dict(model)
    key = next(key for key in current if ".cores." in key)
    both = {**current, key.replace(".cores.", ".default.cores."): current[key]}
    with pytest.raises(ValueError, match="both in the old layout"):
        set_peft_model_state_dict(model, both)


def test_every_method_saves_no_adapter_name():
    # The name of the saved adapter must appear in no key, for every case of the conformance table.
    for case in conf.CASES:
        if case.spec.slow:
            continue
        model, _ = conf.build(case, adapter_name="zzname")
        assert not any("zzname" in key for key in get_peft_model_state_dict(model, adapter_name="zzname")), case.id
