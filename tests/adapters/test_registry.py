"""PEFT integration: registration, coexistence with PEFT's own methods, the version range."""

from __future__ import annotations

import subprocess
import sys

import adapter_conformance as conf
import pytest
import torch
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTuner

import adapters
from adapters import _registry


def test_methods_are_registered_under_their_own_types_and_prefixes():
    methods = _registry.registered_methods()
    assert set(methods) == {peft_type for peft_type, _, _ in adapters._METHODS} >= {"LOTR", "FLORA"}
    for peft_type, method in methods.items():
        assert PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] is method.config_cls
        assert PEFT_TYPE_TO_TUNER_MAPPING[peft_type] is method.model_cls
        assert PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] == method.prefix == method.model_cls.prefix
        assert method.config_cls().peft_type == peft_type
    assert PEFT_TYPE_TO_PREFIX_MAPPING["FLORA"] == "flr_"  # 'flora_' would contain LoRA's 'lora_'


_PEFT_UNCHANGED = r"""
import json, tempfile, torch
from torch import nn
from peft import LoraConfig, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING as C, PEFT_TYPE_TO_TUNER_MAPPING as T
from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING as P
before = {name: dict(m) for name, m in (("C", C), ("T", T), ("P", P))}
import adapters
for name, m in (("C", C), ("T", T), ("P", P)):
    assert all(m[k] is v or m[k] == v for k, v in before[name].items()), name
    assert set(m) - set(before[name]) == {t for t, _, _ in adapters._METHODS} >= {"LOTR", "FLORA"}, name
torch.manual_seed(0)
base = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
model = get_peft_model(base, LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
x = torch.randn(3, 8)
out = model(x)
d = tempfile.mkdtemp()
model.save_pretrained(d)
assert json.load(open(d + "/adapter_config.json"))["peft_type"] == "LORA"
torch.manual_seed(0)
again = PeftModel.from_pretrained(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), d)
assert torch.equal(again(x), out)
"""


def test_peft_own_methods_unchanged_by_import():
    proc = subprocess.run(
        [sys.executable, "-c", _PEFT_UNCHANGED], env=conf.subprocess_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def test_register_rejects_clashes():
    lotr = adapters.LoTRModel
    with pytest.raises(ValueError, match="one of PEFT's own types"):
        _registry.register("LORA", prefix=lotr.prefix, config_cls=adapters.LoTRConfig, model_cls=lotr)
    with pytest.raises(ValueError, match="already registered"):
        _registry.register("LOTR", prefix=lotr.prefix, config_cls=adapters.FloraConfig, model_cls=lotr)
    with pytest.raises(ValueError, match="differs from"):
        _registry.register("NEW_METHOD", prefix="new_", config_cls=adapters.LoTRConfig, model_cls=lotr)
    with pytest.raises(ValueError, match="upper-case"):
        _registry.register("lotr2", prefix=lotr.prefix, config_cls=adapters.LoTRConfig, model_cls=lotr)


def test_register_is_idempotent_for_the_same_classes():
    method = _registry.registered_methods()["LOTR"]
    again = _registry.register("LOTR", prefix="lotr_", config_cls=method.config_cls, model_cls=method.model_cls)
    assert again == method


def test_peft_version_range(monkeypatch):
    import peft

    assert peft.__version__ and _registry.Version(peft.__version__) in _registry.PEFT_REQUIREMENT
    _registry.check_peft_version()
    with pytest.warns(UserWarning, match=r"tested with peft<0.22,>=0.21|tested with peft>=0.21,<0.22"):
        _registry.check_peft_version("0.22.0")
    monkeypatch.delattr(BaseTuner, "_get_adapter_state_dict")
    with pytest.raises(ImportError, match="cannot save adapters"):
        _registry.check_peft_version("0.20.0")


@pytest.mark.parametrize("config_cls", [adapters.LoTRConfig, adapters.FloraConfig])
def test_default_targets_follow_peft_lora_mapping_and_all_linear_works(config_cls):
    from peft import get_peft_model
    from transformers import BertConfig, BertModel

    def tiny_bert() -> BertModel:
        config = BertConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
        )
        return BertModel(config)

    default = get_peft_model(tiny_bert(), config_cls(r=2))
    assert {name.rsplit(".", 1)[-1] for name in default.base_model.targeted_module_names} == {"query", "value"}
    every = get_peft_model(tiny_bert(), config_cls(r=2, target_modules="all-linear"))
    assert len(every.base_model.targeted_module_names) == 2 * 6 + 1  # 6 linears per layer + pooler


ALL_LINEAR_CONFIGS = {
    "lotr": lambda t: adapters.LoTRConfig(r=2, target_modules=t),
    "flora": lambda t: adapters.FloraConfig(r=2, target_modules=t),
    "loretta_rep": lambda t: adapters.LoRETTARepConfig(r=2, target_modules=t),
    "loretta_adp": lambda t: adapters.LoRETTAAdpConfig(bottleneck=4, target_modules=t),
    "mos": lambda t: adapters.MoSConfig(r=2, v=2, p=1, c=2, target_modules=t),
}


@pytest.mark.parametrize("method", list(ALL_LINEAR_CONFIGS))
@pytest.mark.parametrize("first", [["query", "value"], "all-linear"])
def test_a_second_all_linear_adapter_covers_the_layers_the_first_wraps(method, first):
    # PEFT spots an already wrapped linear by "Linear" in its layer's class name; ours are named after
    # the method, so "all-linear" once skipped every layer the first adapter held (or found none)
    from peft import get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import BertConfig, BertModel

    def tiny_bert() -> BertModel:
        torch.manual_seed(0)
        return BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=32))

    def holding(model, name: str) -> set[str]:
        return {key for key, m in model.named_modules() if isinstance(m, BaseTunerLayer) and m._has_adapter(name)}

    make = ALL_LINEAR_CONFIGS[method]
    alone = get_peft_model(tiny_bert(), make("all-linear"), adapter_name="two")
    model = get_peft_model(tiny_bert(), make(first), adapter_name="one")
    model.add_adapter("two", make("all-linear"))
    assert holding(model, "two") == holding(alone, "two")
    assert len(holding(alone, "two")) == 2 * 6 + 1  # 6 linears per layer + pooler


@pytest.mark.parametrize("method", list(ALL_LINEAR_CONFIGS))
@pytest.mark.parametrize("training", [False, True])
def test_a_new_adapters_dropout_follows_the_mode_of_the_layer_it_wraps(method, training):
    # an adapter added to a model in eval mode must not drop inputs (two calls, two outputs otherwise)
    from peft import get_peft_model
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    base = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    base.train(training)
    config = ALL_LINEAR_CONFIGS[method]("all-linear")
    config.dropout = 0.5
    model = get_peft_model(base, config)
    dropouts = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and "delta_dropout" in name]
    assert dropouts and all(m.training == training for m in dropouts)
