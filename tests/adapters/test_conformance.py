"""Every adapter case of ``conformance.CASES`` through the same checks."""

from __future__ import annotations

import copy
import json
import warnings

import adapter_conformance as conf
import adapters
import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTuner
from safetensors.torch import load_file
from tolerance import assert_close

CASES = [pytest.param(case, id=case.id, marks=[pytest.mark.slow] if case.spec.slow else []) for case in conf.CASES]
FAST_CASES = [case for case in conf.CASES if not case.spec.slow]
MERGEABLE_CASES = [param for param in CASES if param.values[0].mergeable]
UNMERGEABLE_CASES = [param for param in CASES if not param.values[0].mergeable]


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # merged vs unmerged float32 outputs differ by rounding of W + ΔW, amplified through the model's depth
    assert_close(actual, expected, tol=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_output_unchanged_at_init(case):
    model, inputs = conf.build(case)
    with torch.no_grad():
        adapted = conf.output(case, model, inputs)
        with model.disable_adapter():
            base = conf.output(case, model, inputs)
    assert torch.equal(adapted, base)


@pytest.mark.parametrize("case", CASES)
def test_step_changes_output_and_only_adapter_parameters(case):
    model, inputs = conf.build(case)
    with torch.no_grad():
        before = conf.output(case, model, inputs)
    frozen_before, trainable_before = conf.frozen(model), conf.trainable(model)
    assert trainable_before and all(case.prefix in name for name in trainable_before)
    conf.train_step(case, model, inputs)
    with torch.no_grad():
        after = conf.output(case, model, inputs)
    assert not torch.allclose(after, before)
    assert all(torch.equal(p, frozen_before[n]) for n, p in conf.frozen(model).items())
    changed = [n for n, p in conf.trainable(model).items() if not torch.equal(p, trainable_before[n])]
    assert changed and all(case.prefix in n for n in changed)


def selected_cases(request, *test_names: str) -> list:
    """Cases of the given tests that this session will run (``-m "not slow"`` drops MiniLM)."""
    ids = {
        item.callspec.params["case"].id
        for item in request.session.items
        if getattr(item, "originalname", None) in test_names and hasattr(item, "callspec")
    }
    return [case for case in conf.CASES if case.id in ids]


@pytest.fixture(scope="module")
def saved_and_reloaded(request, tmp_path_factory):
    """Save every selected case after one step; reload all of them in one fresh interpreter."""
    root = tmp_path_factory.mktemp("adapters_roundtrip")
    saved, jobs = {}, []
    for case in selected_cases(
        request,
        "test_save_load_roundtrip_in_fresh_process_is_bitwise",
        "test_checkpoint_size_equals_trainable_parameter_count",
    ):
        out, state = conf.save_trained(case, root / case.id)
        saved[case.id] = (root / case.id, out, state)
        jobs.append([case.id, str(root / case.id), str(root / f"{case.id}.loaded.safetensors")])
    conf.run_entry_point("load", json.dumps(jobs))
    return {
        cid: (directory, out, state, load_file(str(root / f"{cid}.loaded.safetensors")))
        for cid, (directory, out, state) in saved.items()
    }


@pytest.mark.parametrize("case", CASES)
def test_save_load_roundtrip_in_fresh_process_is_bitwise(case, saved_and_reloaded):
    _, out, state, loaded = saved_and_reloaded[case.id]
    assert torch.equal(loaded["output"], out)
    loaded_state = {k.removeprefix("state."): v for k, v in loaded.items() if k.startswith("state.")}
    assert loaded_state.keys() == state.keys()
    assert all(torch.equal(loaded_state[k], v) for k, v in state.items())


@pytest.mark.parametrize("case", CASES)
def test_checkpoint_size_equals_trainable_parameter_count(case, saved_and_reloaded):
    directory, _, state, _ = saved_and_reloaded[case.id]
    checkpoint = load_file(str(directory / "adapter_model.safetensors"))
    floats = [t for t in checkpoint.values() if t.is_floating_point()]
    assert sum(t.numel() for t in floats) == sum(t.numel() for t in state.values())
    assert all(t.dtype == torch.float32 for t in floats)
    # the only other tensors: MoS's fixed routing, its index tables (L · 2 r c int64 per module type)
    indices = {k: t for k, t in checkpoint.items() if not t.is_floating_point()}
    assert bool(indices) == (case.prefix == "mos_")
    assert all(".mos_index_" in k and t.dtype == torch.int64 for k, t in indices.items())


@pytest.mark.parametrize("case", MERGEABLE_CASES)
def test_merge_equals_adapted_forward_and_unmerge_restores(case):
    model, inputs = conf.build(case)
    conf.train_step(case, model, inputs)
    weights = conf.base_weights(model)
    with torch.no_grad():
        adapted = conf.output(case, model, inputs)
        model.merge_adapter()
        close(conf.output(case, model, inputs), adapted)
        model.unmerge_adapter()
        restored = conf.base_weights(model)
        for k, w in weights.items():
            assert_close(restored[k], w, what=f"unmerged {k}")
        close(conf.output(case, model, inputs), adapted)
        merged = copy.deepcopy(model).merge_and_unload()
        assert not any(case.prefix in name for name, _ in merged.named_parameters())
        close(case.spec.output(merged(**inputs)), adapted)


@pytest.mark.parametrize("case", MERGEABLE_CASES)
def test_safe_merge_raises_on_nan_and_leaves_weights(case):
    model, inputs = conf.build(case)
    weights = conf.base_weights(model)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if p.requires_grad and case.prefix in n).fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        model.merge_adapter(safe_merge=True)
    model.unmerge_adapter()
    assert all(torch.equal(conf.base_weights(model)[k], w) for k, w in weights.items())


@pytest.mark.parametrize("case", UNMERGEABLE_CASES)
def test_unmergeable_method_raises_on_merge_and_unloads(case):
    model, inputs = conf.build(case)
    with torch.no_grad():
        base = conf.output(case, model, inputs)
    conf.train_step(case, model, inputs)
    weights = conf.base_weights(model)
    with pytest.raises(ValueError, match="not mergeable"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="not mergeable"):
        copy.deepcopy(model).merge_and_unload()
    assert all(torch.equal(conf.base_weights(model)[k], w) for k, w in weights.items())
    unloaded = copy.deepcopy(model).unload()
    assert not any(case.prefix in name for name, _ in unloaded.named_parameters())
    with torch.no_grad():
        assert torch.equal(case.spec.output(unloaded(**inputs)), base)


@pytest.mark.parametrize("case", CASES)
def test_disable_adapter_gives_base_output(case):
    model, inputs = conf.build(case)
    with torch.no_grad():
        base = conf.output(case, model, inputs)
    conf.train_step(case, model, inputs)
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(conf.output(case, model, inputs), base)


@pytest.mark.parametrize("case", CASES)
def test_two_adapters_on_one_model(case):
    model, inputs = conf.build(case)
    with torch.no_grad():
        base = conf.output(case, model, inputs)
    conf.train_step(case, model, inputs)
    with torch.no_grad():
        first = conf.output(case, model, inputs)
    first_state = conf.trainable(model)

    model.add_adapter("other", case.config())
    model.set_adapter("other")
    trainable_names = set(conf.trainable(model))
    assert trainable_names and all(".other" in n for n in trainable_names)
    with torch.no_grad():
        assert torch.equal(conf.output(case, model, inputs), base)  # new adapter starts at ΔW = 0
    conf.train_step(case, model, inputs)
    with torch.no_grad():
        assert not torch.allclose(conf.output(case, model, inputs), base)

    # PEFT's status reports see both adapters under our peft type on every adapted layer
    status = model.get_model_status()
    peft_type = adapters._registry.peft_type_name(case.config().peft_type)
    assert status.peft_types == {"default": peft_type, "other": peft_type}
    assert status.available_adapters == ["default", "other"] and status.active_adapters == ["other"]
    assert all(layer.available_adapters == ["default", "other"] for layer in model.get_layer_status())

    model.set_adapter("default")
    assert all(torch.equal(p, first_state[n]) for n, p in conf.trainable(model).items())
    with torch.no_grad():
        assert torch.equal(conf.output(case, model, inputs), first)

    with pytest.raises(TypeError, match="does not support add_weighted_adapter .*adapters.export_lora"):
        model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix")  # LoRA's only, as in PEFT

    model.delete_adapter("other")
    assert not any(".other" in n for n, _ in model.named_parameters())
    assert list(model.peft_config) == ["default"]
    with torch.no_grad():
        assert torch.equal(conf.output(case, model, inputs), first)

    # deleting the active adapter hands over to the remaining one, trainable in full (shared tensors included), as LoRA
    model.add_adapter("third", case.config())
    model.delete_adapter("default")
    assert model.active_adapters == ["third"]
    third = {n for n, _ in model.named_parameters() if ".third" in n}
    assert third and set(conf.trainable(model)) == third


@pytest.mark.parametrize("case", CASES)
def test_adding_an_inference_adapter_keeps_the_active_one_trainable(case, tmp_path):
    # PEFT's inject_adapter ends with set_adapter(active, inference_mode=<new config's>): the shared tensors of the
    # active adapter (LoTR factors, MoS pools), held by the tuner, must keep their requires_grad as LoRA's layers do
    model, inputs = conf.build(case)
    conf.train_step(case, model, inputs)
    trainable = set(conf.trainable(model))
    model.save_pretrained(str(tmp_path))

    frozen_config = case.config()
    frozen_config.inference_mode = True
    model.add_adapter("added", frozen_config)
    model.load_adapter(str(tmp_path), adapter_name="loaded")  # is_trainable=False: loaded for inference
    assert model.active_adapters == ["default"]
    assert set(conf.trainable(model)) == trainable
    assert not any(p.requires_grad for name in ("added", "loaded") for p in model.base_model.shared_parameters(name))


@pytest.mark.parametrize("case", CASES)
def test_fp32_adapter_on_bf16_base(case):
    model, inputs = conf.build(case, dtype=torch.bfloat16)
    adapter = conf.trainable(model)
    assert adapter and all(t.dtype == torch.float32 for t in adapter.values())
    assert all(t.dtype == torch.bfloat16 for t in conf.frozen(model).values() if t.is_floating_point())
    with torch.no_grad():
        base = conf.output(case, model, inputs)
    assert base.dtype == torch.bfloat16
    conf.train_step(case, model, inputs)
    with torch.no_grad():
        out = conf.output(case, model, inputs)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all() and not torch.equal(out, base)


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id) for case in FAST_CASES])
def test_float64_base_gets_a_float64_adapter(case):
    """As PEFT's LoRA: autocast upcasts half-precision adapters to float32 but keeps a float64 base's precision."""
    model, inputs = conf.build(case, dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in conf.trainable(model).values())
    conf.train_step(case, model, inputs)
    with torch.no_grad():
        out = conf.output(case, model, inputs)
    assert out.dtype == torch.float64 and torch.isfinite(out).all()


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id) for case in FAST_CASES])
def test_adapter_follows_base_dtype_without_autocast(case):
    base = case.spec.build().to(torch.bfloat16)
    model = get_peft_model(base, case.config(), autocast_adapter_dtype=False)
    assert all(t.dtype == torch.bfloat16 for t in conf.trainable(model).values())
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in conf.make_inputs(case).items()}
    conf.train_step(case, model, inputs)
    with torch.no_grad():
        assert torch.isfinite(conf.output(case, model, inputs)).all()


@pytest.mark.parametrize("case", CASES)
def test_hf_trainer_runs_a_step(case, tmp_path):
    from transformers import Trainer, TrainingArguments

    model, _ = conf.build(case)
    before = conf.trainable(model)
    rows = []
    for seed in range(4):
        inputs = {k: v[0] for k, v in conf.make_inputs(case, seed).items()}
        rows.append({**inputs, "labels": torch.tensor(0.5)})

    def loss(outputs, labels, num_items_in_batch=None):
        out = case.spec.output(outputs).float()
        return ((out.flatten(1) - labels[:, None]) ** 2).mean()

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=2,
        learning_rate=0.05,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(model=model, args=args, train_dataset=rows, compute_loss_func=loss)
        trainer.train()
    assert trainer.state.global_step == 1
    after = conf.trainable(model)
    assert any(not torch.equal(after[n], t) for n, t in before.items())


@pytest.fixture(scope="module")
def ddp_states(request, tmp_path_factory):
    """Selected tiny-model cases trained 3 steps under DDP with two gloo ranks, in one subprocess."""
    outdir = tmp_path_factory.mktemp("adapters_ddp")
    cases = selected_cases(request, "test_ddp_two_gloo_ranks_keep_parameters_identical")
    conf.run_entry_point("ddp", json.dumps([case.id for case in cases]), str(outdir))
    return {
        case.id: [load_file(str(outdir / f"{case.id}.rank{rank}.safetensors")) for rank in (0, 1)] for case in cases
    }


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id) for case in FAST_CASES])
def test_ddp_two_gloo_ranks_keep_parameters_identical(case, ddp_states):
    rank0, rank1 = ddp_states[case.id]
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    model, _ = conf.build(case, adapter_seed=1)
    init = conf.trainable(model)
    assert any(not torch.equal(rank0[k], init[k]) for k in init)
    shared = [k for k in rank0 if k.startswith("base_model.") and not k.startswith("base_model.model.")]
    assert bool(shared) == model.base_model.uses_shared_state


@pytest.mark.parametrize("bad", [pytest.param(b, id=b.id) for b in conf.BAD_CASES])
def test_bad_config_raises_clear_error(bad):
    with pytest.raises(bad.error, match=bad.match):
        get_peft_model(conf.MODELS[bad.model].build(), bad.config())


@pytest.mark.parametrize("case", CASES)
def test_load_under_other_names_beside_each_other(case, tmp_path):
    out_one, state_one = conf.save_perturbed(case, tmp_path / "one", seed=11)
    out_two, state_two = conf.save_perturbed(case, tmp_path / "two", seed=12)
    assert not torch.equal(out_one, out_two)
    inputs = conf.make_inputs(case)

    for first_name in ("first", "default"):
        model = conf.load_strict(case, tmp_path / "one", adapter_name=first_name)
        first = conf.adapter_state(model, first_name)
        assert first.keys() == state_one.keys() and all(torch.equal(first[k], v) for k, v in state_one.items())
        with torch.no_grad():
            assert torch.equal(conf.output(case, model, inputs), out_one)

        result = model.load_adapter(str(tmp_path / "two"), adapter_name="second")
        assert not result.missing_keys and not result.unexpected_keys
        second = conf.adapter_state(model, "second")
        assert second.keys() == state_two.keys() and all(torch.equal(second[k], v) for k, v in state_two.items())
        assert all(torch.equal(t, first[k]) for k, t in conf.adapter_state(model, first_name).items())
        with torch.no_grad():
            model.set_adapter("second")
            assert torch.equal(conf.output(case, model, inputs), out_two)
            model.set_adapter(first_name)
            assert torch.equal(conf.output(case, model, inputs), out_one)


@pytest.mark.parametrize("case", CASES)
def test_low_cpu_mem_usage_builds_on_meta_and_loads_the_same_adapter(case, tmp_path):
    # PEFT's low_cpu_mem_usage=True creates the adapter under accelerate's init_empty_weights (meta
    # tensors) and assigns the checkpoint's tensors: no copy out of meta may happen on the way
    out, state = conf.save_perturbed(case, tmp_path / "saved", seed=11)
    model = conf.load_strict(case, tmp_path / "saved", adapter_name="default", low_cpu_mem_usage=True)
    loaded = conf.adapter_state(model, "default")
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())
    with torch.no_grad():
        assert torch.equal(conf.output(case, model, conf.make_inputs(case)), out)
    fresh = get_peft_model(case.spec.build(), case.config(), low_cpu_mem_usage=True)
    assert any(p.is_meta for n, p in fresh.named_parameters() if case.prefix in n)


@pytest.mark.parametrize("case", CASES)
def test_checkpoint_with_adapter_name_inside_keys_still_loads(case, tmp_path, monkeypatch):
    # The layout of the previous version: PEFT's own rule strips the adapter name only as the
    # last or second-to-last segment, so deeper keys kept it ("...loretta_rep_A.trained.cores.0").
    with monkeypatch.context() as patch:
        tuner_cls = PEFT_TYPE_TO_TUNER_MAPPING[case.config().peft_type]
        patch.setattr(tuner_cls, "_remove_adapter_name_from_key", BaseTuner._remove_adapter_name_from_key)
        out, state = conf.save_perturbed(case, tmp_path / "old", seed=13, adapter_name="trained")
    inputs = conf.make_inputs(case)
    for name in ("default", "trained", "other"):
        # save_pretrained puts an adapter not named "default" into a subdirectory of that name.
        model = conf.load_strict(case, tmp_path / "old" / "trained", adapter_name=name)
        loaded = conf.adapter_state(model, name)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())
        with torch.no_grad():
            assert torch.equal(conf.output(case, model, inputs), out)


@pytest.mark.parametrize("case", [param for param in CASES if param.values[0].model == "mlp"])
def test_load_onto_a_base_of_other_widths_fails(case, tmp_path):
    # LoRA fails on the shapes; shared tensors (LoTR, MoS) are keyed by layer shape and matched nothing, so PEFT
    # only warned and kept them at their initial values beside the loaded per-layer tensors
    conf.save_perturbed(case, tmp_path / "a", seed=11)
    torch.manual_seed(0)
    wider = conf.TinyMLP(d=24).eval()
    with pytest.raises((ValueError, RuntimeError), match="other layer shapes|size mismatch"):
        PeftModel.from_pretrained(wider, str(tmp_path / "a"))


@pytest.mark.parametrize("case", [param for param in CASES if param.values[0].model == "mlp"])
def test_a_checkpoint_edited_or_loaded_with_other_targets_is_refused(case, tmp_path):
    # PEFT drops adapter tensors it has no layer for without a word (a narrowed target_modules loaded another
    # model), and cast integer tensors or loaded NaN
    import json

    from safetensors.torch import load_file, save_file

    conf.save_perturbed(case, tmp_path / "a", seed=11)
    config_file, weights = tmp_path / "a" / "adapter_config.json", tmp_path / "a" / "adapter_model.safetensors"
    config, tensors = json.loads(config_file.read_text()), load_file(str(weights))
    narrowed = {**config, "target_modules": sorted(config["target_modules"])[:1]}
    config_file.write_text(json.dumps(narrowed))
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="has no layer for|other layer shapes|another number of adapted layers"):
        PeftModel.from_pretrained(conf.TinyMLP().eval(), str(tmp_path / "a"))
    config_file.write_text(json.dumps(config))
    key = max(tensors, key=lambda k: tensors[k].numel())
    for edit in (lambda t: t.to(torch.int32), lambda t: t.clone().fill_(float("nan"))):
        save_file({**tensors, key: edit(tensors[key])}, str(weights))
        with pytest.raises(ValueError, match=r"hold integers or NaN / inf where the adapter stores finite floats"):
            PeftModel.from_pretrained(conf.TinyMLP().eval(), str(tmp_path / "a"))


def _mixed_output(case, model, inputs, names):
    return case.spec.output(model(**inputs, adapter_names=names))


@pytest.mark.parametrize("case", CASES)
def test_mixed_adapter_batch_routes_each_row(case):
    # PEFT's mixed-adapter batches: row i runs adapter names[i] ("__base__": none), whichever adapter is active
    model, inputs = conf.build(case)
    conf.perturb_(model, seed=1)
    model.add_adapter("other", case.config())
    model.set_adapter("other")
    conf.perturb_(model, seed=2)
    model.set_adapter("default")
    model.eval()
    with torch.no_grad():
        per_adapter = {}
        for name in ("default", "other"):
            model.set_adapter(name)
            per_adapter[name] = conf.output(case, model, inputs)
        with model.disable_adapter():
            per_adapter["__base__"] = conf.output(case, model, inputs)
        assert not torch.allclose(per_adapter["default"], per_adapter["other"])
        for names in (["other", "__base__"], ["default", "other"], ["__base__", "default"]):
            mixed = _mixed_output(case, model, inputs, names)
            for row, name in enumerate(names):
                assert_close(mixed[row], per_adapter[name][row], tol=1e-5)
        with pytest.raises(ValueError, match=r"no adapter named \['typo'\]"):
            _mixed_output(case, model, inputs, ["default", "typo"])
        with pytest.raises(ValueError, match="one adapter name .* per row"):
            _mixed_output(case, model, inputs, ["default"])
        with pytest.raises(TypeError, match="list of adapter names"):
            _mixed_output(case, model, inputs, "default")
        model.train()
        with pytest.raises(ValueError, match=r"for inference: call model.eval\(\)"):
            _mixed_output(case, model, inputs, ["default", "other"])
        model.eval()
        # the hooks are gone after the call: a plain forward is the active adapter's again
        model.set_adapter("other")
        assert torch.equal(conf.output(case, model, inputs), per_adapter["other"])
        if case.mergeable:
            model.merge_adapter()
            with pytest.raises(ValueError, match=r"merged: call unmerge_adapter\(\)"):
                _mixed_output(case, model, inputs, ["default", "other"])


def _tiny_causal_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


def _tiny_seq2seq():
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                               decoder_start_token_id=0, pad_token_id=0))


@pytest.mark.parametrize("num_beams", [1, 2])
@pytest.mark.parametrize("make_base,targets", [(_tiny_causal_lm, ["q_proj", "v_proj"]), (_tiny_seq2seq, ["q", "v"])],
                         ids=["llama", "t5"])
def test_mixed_adapter_batch_in_generate(make_base, targets, num_beams):
    # generate() forwards adapter_names to every step; beam search repeats each row's name for its beams, except in
    # an encoder-decoder model's encoder, which runs once on the unrepeated rows
    torch.manual_seed(0)
    config = lambda: adapters.LoTRConfig(r=4, target_modules=targets)  # noqa: E731
    model = get_peft_model(make_base().eval(), config())
    conf.perturb_(model, seed=1, std=0.5)
    model.add_adapter("other", config())
    model.set_adapter("other")
    conf.perturb_(model, seed=2, std=0.5)
    model.eval()
    prompt = torch.randint(1, 64, (3, 5), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=6, do_sample=False, num_beams=num_beams, pad_token_id=0)
    with torch.no_grad():
        alone = {}
        for name in ("default", "other"):
            model.set_adapter(name)
            alone[name] = model.generate(input_ids=prompt, **kwargs)
        with model.disable_adapter():
            alone["__base__"] = model.generate(input_ids=prompt, **kwargs)
        names = ["other", "__base__", "default"]
        mixed = model.generate(input_ids=prompt, adapter_names=names, **kwargs)
    assert not torch.equal(alone["default"], alone["other"])
    for row, name in enumerate(names):
        assert torch.equal(mixed[row], alone[name][row])
