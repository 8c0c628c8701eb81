"""Differences peft's own test suite found (issue 28, benchmarks/results/peft_suite.md), each checked against peft:
the tuner level (`model.base_model`) answers peft's `BaseTuner` calls itself, configs have peft's helpers, and the
state-dict helpers return what peft's do."""

from __future__ import annotations

import contextlib
import json
import re

import pytest
import torch

import deltatune as dt
from tests.conftest import model_output, perturb_trainable, tiny_llama

peft = pytest.importorskip("peft")

LIBS = {"peft": peft, "deltatune": dt}
IDS = {"input_ids": torch.tensor([[1, 5, 9, 2, 7]])}


def _lora(lib, targets=("q_proj", "v_proj")):
    return lib.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets))


@pytest.fixture
def two_adapters(tmp_path):
    """Two saved LoRA adapters (a: q/v, b: v/o), trained-looking, for loading into either library."""
    source = dt.get_peft_model(tiny_llama(), _lora(dt), adapter_name="a")
    source.add_adapter("b", _lora(dt, ("v_proj", "o_proj")))
    perturb_trainable(source)  # only the active adapter is trainable: move b too
    source.set_adapter("b")
    perturb_trainable(source, seed=4)
    source.save_pretrained(tmp_path)  # named adapters under a/ and b/ (peft's layout)
    return tmp_path


def _load(lib, folder):
    model = lib.PeftModel.from_pretrained(tiny_llama(), folder / "a", adapter_name="a")
    result = model.load_adapter(folder / "b", adapter_name="b")
    return model.eval(), result


def test_the_tuner_level_answers_basetuner_calls_as_peft_does(two_adapters):
    outputs, states = {}, {}
    for name, lib in LIBS.items():
        model, _ = _load(lib, two_adapters)
        tuner = model.base_model
        tuner.set_adapter(["a", "b"])  # peft's documented way to activate several adapters on LoraModel
        states[name] = [tuner.active_adapters, sorted(tuner.peft_config)]
        both = model_output(model, IDS)
        tuner.merge_adapter()
        merged = model_output(model, IDS)
        tuner.unmerge_adapter()
        tuner.delete_adapter("b")
        states[name].append(sorted(tuner.peft_config))
        outputs[name] = (both, merged, model_output(model, IDS))
    assert states["deltatune"] == states["peft"] == [["a", "b"], ["a", "b"], ["a"]]
    for ours, theirs in zip(outputs["deltatune"], outputs["peft"], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_the_tuner_level_peft_config_is_the_models(two_adapters):
    model, _ = _load(dt, two_adapters)
    assert model.base_model.peft_config is model.peft_config
    plain = model.base_model.unload()
    assert not any("lora_" in k for k in plain.state_dict())


def test_load_adapter_returns_a_load_result_like_peft(two_adapters):
    for lib in LIBS.values():
        _, result = _load(lib, two_adapters)
        # peft lists the other adapter's keys as missing; none of the loaded adapter's may be
        assert not [k for k in result.missing_keys if ".b." in k] and list(result.unexpected_keys) == []


def test_set_base_model_state_dict_restores_the_base_as_peft_does():
    restored = {}
    for name, lib in LIBS.items():
        model = lib.get_peft_model(tiny_llama(), _lora(lib)).eval()
        perturb_trainable(model)
        original = lib.get_base_model_state_dict(model)
        with torch.no_grad():
            for p in model.get_base_model().parameters():
                p.add_(1.0)
        extra = {**original, "not.a.key": torch.zeros(1)}
        result = lib.set_base_model_state_dict(model, extra, strict=False)
        assert list(result.missing_keys) == [] and list(result.unexpected_keys) == ["not.a.key"], name
        restored[name] = model_output(model, IDS)
        assert all(torch.equal(v, original[k]) for k, v in lib.get_base_model_state_dict(model).items()), name
    torch.testing.assert_close(restored["deltatune"], restored["peft"], rtol=1e-5, atol=1e-5)


def test_strict_set_base_model_state_dict_refuses_a_partial_dict_and_changes_nothing():
    model = dt.get_peft_model(tiny_llama(), _lora(dt))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    partial = dict(list(dt.get_base_model_state_dict(model).items())[:2])
    with pytest.raises(dt.CheckpointError, match="missing"):
        dt.set_base_model_state_dict(model, {k: v + 1 for k, v in partial.items()})
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_config_helpers_match_peft(tmp_path):
    for name, lib in LIBS.items():
        config = lib.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
        config.save_pretrained(tmp_path / name)
        saved = lib.LoraConfig.from_json_file(tmp_path / name / "adapter_config.json")
        assert saved["r"] == 4 and saved["peft_type"] == "LORA"
        # a saved dict, peft_type included, rebuilds the config (`LoraConfig(**json.load(f))`)
        assert lib.LoraConfig(**{k: v for k, v in saved.items() if k in ("r", "peft_type", "target_modules")}).r == 4
        with pytest.raises(ValueError, match="Invalid task type: 'nope'. Must be one of the following task types"):
            lib.LoraConfig(task_type="nope")
    # each library reads the other's file
    assert peft.PeftConfig.from_pretrained(tmp_path / "deltatune").r == 4
    assert dt.PeftConfig.from_pretrained(tmp_path / "peft").r == 4
    on_disk = json.loads((tmp_path / "deltatune" / "adapter_config.json").read_text())
    assert dt.LoraConfig.from_json_file(tmp_path / "deltatune" / "adapter_config.json") == on_disk


def test_a_peft_type_of_another_method_is_refused_by_name():
    # peft overwrites it silently (the config then is not what the caller wrote); deltatune says so
    with pytest.raises(dt.ConfigError, match="peft_type='IA3' given to LoraConfig"):
        dt.LoraConfig(peft_type="IA3")


def test_prompt_configs_build_without_a_token_count_like_peft():
    for lib in LIBS.values():
        assert lib.PromptTuningConfig().num_virtual_tokens is None
        assert lib.AdaptionPromptConfig().adapter_len is None


def test_infer_device_names_an_available_device():
    import peft.utils

    from deltatune.utils import infer_device

    assert infer_device() == peft.utils.infer_device()


def test_state_dict_helpers_work_on_an_injected_model_with_peft_keys():
    config = {"r": 2, "target_modules": ["q_proj", "v_proj"]}
    ours = dt.inject_adapter_in_model(dt.LoraConfig(**config), tiny_llama())
    perturb_trainable(ours)
    saved = dt.get_peft_model_state_dict(ours)
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**config), tiny_llama())
    assert sorted(saved) == sorted(peft.get_peft_model_state_dict(theirs))  # keys relative to the model, as peft's
    peft.set_peft_model_state_dict(theirs, saved)
    torch.testing.assert_close(model_output(theirs, IDS), model_output(ours, IDS), rtol=1e-5, atol=1e-5)
    again = dt.inject_adapter_in_model(dt.LoraConfig(**config), tiny_llama())
    dt.set_peft_model_state_dict(again, peft.get_peft_model_state_dict(theirs))
    torch.testing.assert_close(model_output(again, IDS), model_output(ours, IDS), rtol=1e-5, atol=1e-5)


def test_inject_refuses_a_method_with_shared_state_before_the_model_changes():
    model = tiny_llama()
    before = dict(model.named_modules())
    with pytest.raises(dt.ConfigError, match="get_peft_model"):
        dt.inject_adapter_in_model(dt.VeraConfig(r=2, target_modules=["q_proj"]), model)
    assert dict(model.named_modules()).keys() == before.keys()


def test_peft_type_answers_value_and_name_like_peft_s_enum_and_stays_a_plain_string_in_dicts():
    import yaml

    ours, theirs = dt.LoraConfig(), peft.LoraConfig()
    assert ours.peft_type.value == theirs.peft_type.value == "LORA" and ours.peft_type.name == theirs.peft_type.name
    assert ours.peft_type == "LORA" and type(ours.to_dict()["peft_type"]) is str
    yaml.safe_dump(ours.to_dict())  # safe_dump refuses str subclasses


def test_tuner_level_active_adapter_lists_several_active_adapters():
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj"]))
    model.add_adapter("other", dt.LoraConfig(target_modules=["q_proj"]))
    assert model.base_model.active_adapter == "default"
    model.base_model.set_adapter(["default", "other"])
    assert model.base_model.active_adapter == ["default", "other"] and model.active_adapters == ["default", "other"]
    assert model.has_active_enabled_adapter
    with model.disable_adapter():
        assert not model.has_active_enabled_adapter


def test_a_layers_own_set_adapter_switches_and_freezes_as_peft_s_does(two_adapters):
    flags, outputs = {}, {}
    for name, lib in LIBS.items():
        model, _ = _load(lib, two_adapters)
        model.train()
        for module in model.modules():  # peft's per-layer switch, as custom training loops call it
            if hasattr(module, "adapter_layer_names") and hasattr(module, "set_adapter"):
                assert "lora_A" in module.adapter_layer_names and "scaling" in module.other_param_names
                assert isinstance(module.adapter_layer_names + module.other_param_names, tuple)  # peft adds them
                module.set_adapter(["a", "b"] if "v_proj" in str(module.base_layer) else "b")
        flags[name] = {n: p.requires_grad for n, p in model.named_parameters() if "lora_" in n}
        outputs[name] = model_output(model.eval(), IDS)
    assert flags["deltatune"] == flags["peft"] and any(flags["peft"].values())
    torch.testing.assert_close(outputs["deltatune"], outputs["peft"], rtol=1e-5, atol=1e-6)


def test_deleting_a_merged_adapter_is_refused_in_peft_s_words(two_adapters):
    for lib in LIBS.values():
        model, _ = _load(lib, two_adapters)
        model.set_adapter("a")
        model.merge_adapter()
        peft_words = "Cannot delete adapter(s) ['a'] while they are merged. Please unmerge them first."
        with pytest.raises(ValueError, match=re.escape(peft_words)):
            model.delete_adapter("a")


def test_configs_record_their_writer_in_peft_version(tmp_path, monkeypatch):
    from deltatune import config as config_module

    assert dt.LoraConfig().peft_version == config_module.__version__ and "+deltatune" in config_module.__version__
    monkeypatch.setattr(config_module, "__version__", "0.2.0.dev1")
    monkeypatch.setattr(config_module, "_get_commit_hash", lambda package: "abc123")
    made = dt.LoraConfig(target_modules=["q_proj"])
    assert made.peft_version == "0.2.0.dev1@abc123"  # a development version names its commit, as peft's does
    made.save_pretrained(tmp_path)
    monkeypatch.setattr(config_module, "__version__", "9.9.9")
    assert dt.LoraConfig.from_pretrained(tmp_path).peft_version == "0.2.0.dev1@abc123"  # kept as written
    assert peft.LoraConfig.from_pretrained(tmp_path).peft_version == "0.2.0.dev1@abc123"  # and peft reads it


@pytest.mark.parametrize("targets", [["conv"], ["conv1d"], ["conv", "conv1d", "lin0"]])
def test_lora_bias_on_convolutions_matches_peft_both_ways_and_merges(tmp_path, targets):
    from tests.conftest import tiny_mlp

    ids = torch.tensor([[1, 5, 9, 2, 7]])
    config = dict(r=2, lora_alpha=4, target_modules=targets, lora_bias=True)
    ours = dt.get_peft_model(tiny_mlp(), dt.LoraConfig(**config)).eval()
    perturb_trainable(ours)  # B and its bias non-zero
    assert all(ours.get_base_model().get_submodule(t).lora_B["default"].bias.abs().sum() > 0 for t in targets)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_mlp(), tmp_path / "ours").eval()
    torch.testing.assert_close(ours(ids), theirs(ids), rtol=1e-5, atol=1e-6)
    theirs.save_pretrained(tmp_path / "theirs")  # and back: peft's file into deltatune
    back = dt.PeftModel.from_pretrained(tiny_mlp(), tmp_path / "theirs").eval()
    torch.testing.assert_close(back(ids), theirs(ids), rtol=1e-5, atol=1e-6)
    unmerged = ours(ids)
    torch.testing.assert_close(ours.merge_and_unload()(ids), unmerged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs.merge_and_unload()(ids), unmerged, rtol=1e-5, atol=1e-5)


class _GroupedConvs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.conv1d = torch.nn.Conv1d(6, 6, 3, padding=1, groups=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)  # (b, 8, 5, 5)
        return self.conv1d(h.flatten(2)[:, :6])


def test_lora_on_grouped_convolutions_matches_peft_both_ways_and_refuses_to_merge(tmp_path):
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    config = dict(r=6, lora_alpha=6, target_modules=["conv", "conv1d"])
    torch.manual_seed(0)
    ours = dt.get_peft_model(_GroupedConvs(), dt.LoraConfig(**config)).eval()
    perturb_trainable(ours)
    layer = ours.get_base_model().conv
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert b.shape == (8, 3, 1, 1)  # B grouped (6 / 2 input channels per group), A dense over all 4 input channels
    want = layer.base_layer(x) + torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, a, padding=1), b, groups=2)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)
    ours.save_pretrained(tmp_path / "ours")
    torch.manual_seed(0)
    theirs = peft.PeftModel.from_pretrained(_GroupedConvs(), tmp_path / "ours").eval()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    theirs.save_pretrained(tmp_path / "theirs")
    torch.manual_seed(0)
    back = dt.PeftModel.from_pretrained(_GroupedConvs(), tmp_path / "theirs").eval()
    torch.testing.assert_close(back(x), theirs(x), rtol=1e-5, atol=1e-6)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(dt.MergeError, match="groups=2"):
        ours.merge_adapter()
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())  # nothing merged halfway
    with pytest.raises(dt.UnsupportedModuleError, match="divisible by 2"):
        dt.get_peft_model(_GroupedConvs(), dt.LoraConfig(r=3, target_modules=["conv"]))
    with pytest.raises(dt.UnsupportedModuleError, match="use_dora"):
        dt.get_peft_model(_GroupedConvs(), dt.LoraConfig(r=4, target_modules=["conv"], use_dora=True))


class _TwoLinears(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1 = torch.nn.Linear(10, 20), torch.nn.Linear(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.lin0(x))


@pytest.mark.parametrize("method", ["LoraConfig", "GraloraConfig"])
def test_a_second_adapter_whose_targets_include_a_module_to_save_applies_as_in_peft(tmp_path, method):
    from safetensors.torch import load_file

    config = dict(target_modules=["lin0", "lin1"], modules_to_save=["lin1"])
    keys = {}
    for name, lib in LIBS.items():
        torch.manual_seed(0)
        model = lib.get_peft_model(_TwoLinears(), getattr(lib, method)(**config))
        model.add_adapter("other", getattr(lib, method)(**config))  # lin1 is a trainable copy by now
        model.save_pretrained(tmp_path / name, selected_adapters=["other"])
        keys[name] = sorted(load_file(tmp_path / name / "other" / "adapter_model.safetensors"))
    assert keys["deltatune"] == keys["peft"] and any("lin1" in k for k in keys["peft"])
    with pytest.raises(dt.TargetNotFoundError, match="lin7"):  # a real typo next to a saved module is still named
        dt.get_peft_model(_TwoLinears(), dt.LoraConfig(target_modules=["lin0", "lin7"], modules_to_save=["lin1"]))


def test_every_layer_exposes_in_and_out_features_as_peft_s_do():
    from tests.conftest import tiny_mlp

    sizes = {}
    for name, lib in LIBS.items():
        model = lib.get_peft_model(tiny_mlp(), lib.LoraConfig(target_modules=["emb", "conv", "conv1d", "lin0"]))
        sizes[name] = {
            n.split(".")[-1]: (m.in_features, m.out_features)
            for n, m in model.named_modules()
            if n.endswith(("emb", "conv", "conv1d", "lin0")) and hasattr(m, "base_layer")
        }
    assert sizes["deltatune"] == sizes["peft"] and len(sizes["peft"]) == 4


def test_two_active_adapters_training_one_module_whole_are_refused_as_in_peft():
    config = dict(target_modules=["lin0"], modules_to_save=["lin1"])
    for lib in LIBS.values():
        model = lib.get_peft_model(_TwoLinears(), lib.LoraConfig(**config))
        model.add_adapter("other", lib.LoraConfig(**config))  # adding is fine
        with pytest.raises(ValueError, match="Only one adapter can be set at a time for ModulesToSaveWrapper"):
            model.base_model.set_adapter(["default", "other"])
    assert model.active_adapters == ["default"]  # deltatune's (the last) refused before changing anything
    model.set_adapter("other")
    assert model.get_base_model().lin1.active_adapters == ["other"]


def test_load_adapter_leaves_the_requires_grad_the_user_set_as_peft_does(tmp_path):
    """peft's TestRequiresGrad::test_loading_adapter_preserves_custom_requires_grad: a base weight unfrozen and an
    adapter tensor frozen by hand stay so when another adapter is loaded (deltatune re-applied its own rule)."""
    dt.get_peft_model(tiny_llama(), _lora(dt)).save_pretrained(tmp_path)
    flags = {}
    for name, lib in LIBS.items():
        model = lib.get_peft_model(tiny_llama(), _lora(lib))
        attention = model.base_model.model.model.layers[0].self_attn
        attention.q_proj.base_layer.weight.requires_grad = True
        attention.q_proj.lora_A["default"].weight.requires_grad = False
        before = {n: p.requires_grad for n, p in model.named_parameters()}
        model.load_adapter(tmp_path, adapter_name="other", is_trainable=False)
        after = {n: p.requires_grad for n, p in model.named_parameters()}
        assert {n: after[n] for n in before} == before, name
        flags[name] = after
    assert flags["deltatune"] == flags["peft"]


class _EmbLinNorm(torch.nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.emb, self.lin0, self.norm = torch.nn.Embedding(vocab, 8), torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4)

    def forward(self, x):
        return self.norm(self.lin0(self.emb(x)).mean(1))


def test_ignore_mismatched_sizes_loads_the_rest_and_integer_buffers_round_trip(tmp_path):
    """peft's test_load_resized_embedding_ignore_mismatched_sizes and test_ignore_mismatched_sizes_with_scalar_
    modules_to_save: a vocabulary resized from 100 to 105 is a RuntimeError naming both sizes, and with
    ignore_mismatched_sizes=True everything else loads (as in peft); a saved BatchNorm's integer
    num_batches_tracked loads back (deltatune refused any non-float tensor)."""
    torch.manual_seed(0)
    config = dt.LoraConfig(target_modules=["emb", "lin0"], modules_to_save=["norm"], init_lora_weights=False)
    source = dt.get_peft_model(_EmbLinNorm(100), config)
    source.base_model.model.norm.modules_to_save["default"].num_batches_tracked.fill_(7)
    source.save_pretrained(tmp_path)
    for lib in LIBS.values():
        with pytest.raises(RuntimeError, match=r"size mismatch.*\(?8, 100\)?.*\(?8, 105"):
            lib.PeftModel.from_pretrained(_EmbLinNorm(105), tmp_path)
    loaded = {}
    for name, lib in LIBS.items():
        torch.manual_seed(1)
        with pytest.warns(UserWarning) if name == "deltatune" else contextlib.nullcontext():
            loaded[name] = lib.PeftModel.from_pretrained(_EmbLinNorm(105), tmp_path, ignore_mismatched_sizes=True)
    for model in loaded.values():
        inner = model.base_model.model
        assert inner.norm.modules_to_save["default"].num_batches_tracked.item() == 7
        assert torch.equal(inner.lin0.lora_A["default"].weight, source.base_model.model.lin0.lora_A["default"].weight)
        assert inner.emb.lora_embedding_A["default"].shape == (8, 105)
    same = dt.PeftModel.from_pretrained(_EmbLinNorm(100), tmp_path)  # the integer buffer without the flag too
    assert same.base_model.model.norm.modules_to_save["default"].num_batches_tracked.item() == 7


@pytest.mark.parametrize("value", ["False", 0, None])
def test_ignore_mismatched_sizes_takes_only_a_bool_in_every_loader(tmp_path, value):
    """A string "False" is truthy: read as a flag it would silently drop tensors. Every loader refuses a non-bool
    by name, before anything is loaded."""
    source = dt.get_peft_model(_EmbLinNorm(100), dt.LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    source.save_pretrained(tmp_path)
    model = dt.get_peft_model(_EmbLinNorm(100), dt.LoraConfig(target_modules=["lin0"]))
    before = {n: t.clone() for n, t in model.state_dict().items()}
    calls = [
        lambda: dt.PeftModel.from_pretrained(_EmbLinNorm(100), tmp_path, ignore_mismatched_sizes=value),
        lambda: model.load_adapter(tmp_path, adapter_name="other", ignore_mismatched_sizes=value),
        lambda: dt.set_peft_model_state_dict(
            model, dt.get_peft_model_state_dict(source), ignore_mismatched_sizes=value
        ),
    ]
    for call in calls:
        with pytest.raises(dt.ConfigError, match=r"ignore_mismatched_sizes must be True or False"):
            call()
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items()) and len(model.state_dict()) == len(
        before
    )


def test_inject_adapter_in_model_refuses_shared_state_methods_in_peft_words():
    """peft's test_save_load_roundtrip_direct_injection takes a ValueError naming "shared state" and get_peft_model as
    the refusal of such methods; deltatune refused VeRA (and AdaLoRA, prompt methods) in other words."""
    for lib in LIBS.values():
        model = tiny_llama()
        before = {n: p.clone() for n, p in model.state_dict().items()}
        with pytest.raises(ValueError, match=r"shared state.*get_peft_model"):
            lib.inject_adapter_in_model(lib.VeraConfig(r=4, target_modules=["q_proj", "v_proj"]), model)
        assert all(torch.equal(before[n], p) for n, p in model.state_dict().items()) and len(before) == len(
            model.state_dict()
        )


def test_printed_lora_layers_carry_peft_names():
    """peft's TestLayerRepr: `lora.Linear(...)`, `lora.Embedding(...)`, `lora.Conv2d(...)`, `lora.ParamWrapper(...)`
    (with the parameter's name), first words equal to peft's on the same models."""
    from tests.conftest import two_linear

    cases = [
        (two_linear, {"target_modules": ["lin0"]}, "lin0"),
        (lambda: torch.nn.Sequential(torch.nn.Embedding(100, 5)), {"target_modules": ["0"]}, "0"),
        (lambda: torch.nn.Sequential(torch.nn.Conv2d(5, 10, 3)), {"target_modules": ["0"]}, "0"),
        (two_linear, {"target_parameters": ["lin0.weight"]}, "lin0"),
    ]
    for factory, kwargs, path in cases:
        printed = {
            name: repr(lib.get_peft_model(factory(), lib.LoraConfig(**kwargs)).base_model.model.get_submodule(path))
            for name, lib in LIBS.items()
        }
        assert printed["deltatune"].split("(")[0] == printed["peft"].split("(")[0], printed
    assert "parameter_name='weight'" in printed["deltatune"]


def test_adalora_warns_about_r_in_peft_words_and_only_when_given():
    import warnings

    for lib in LIBS.values():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            lib.AdaLoraConfig(init_r=12, lora_alpha=32, total_step=1)
        with pytest.warns(UserWarning, match="Note that `r` is not used in AdaLora and will be ignored"):
            lib.AdaLoraConfig(r=10, total_step=1)


@pytest.mark.parametrize("config_class", ["LoraConfig", "AdaLoraConfig"])
def test_a_regex_target_with_layer_selection_is_refused_as_peft_refuses_it(config_class):
    """peft's test_regex_with_layer_indexing_lora: peft refuses layers_to_transform / layers_pattern with a str
    target_modules when it builds (or reads) the config, so such an adapter could not move to peft; deltatune
    honoured it. Both refuse now, in the same words; the list form stays accepted."""
    extra = {"total_step": 10} if config_class == "AdaLoraConfig" else {}
    for lib in LIBS.values():
        cls = getattr(lib, config_class)
        with pytest.raises(ValueError, match="`layers_to_transform` cannot be used when `target_modules` is a str."):
            cls(target_modules=".*q_proj", layers_to_transform=[0], **extra)
        with pytest.raises(ValueError, match="`layers_pattern` cannot be used when `target_modules` is a str."):
            cls(target_modules=".*q_proj", layers_pattern=["layers"], **extra)
        cls(target_modules=["q_proj"], layers_pattern=["layers"], layers_to_transform=[0], **extra)


def test_layers_to_transform_zero_is_kept_as_given_and_selects_the_first_layer(tmp_path):
    """peft's test_config_layers_to_transform_index_zero: an int index stays the int (deltatune made it [0]); it
    selects layer 0 only, survives the saved config, and peft wraps the same modules from deltatune's file."""
    config = dt.LoraConfig(target_modules=["q_proj"], layers_to_transform=0, layers_pattern="layers")
    assert config.layers_to_transform == 0 and config.layers_pattern == "layers"
    model = dt.get_peft_model(tiny_llama(), config)
    wrapped = sorted(n for n, m in model.named_modules() if n.endswith("q_proj") and hasattr(m, "lora_A"))
    assert wrapped == ["base_model.model.model.layers.0.self_attn.q_proj"]
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["layers_to_transform"] == 0
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert sorted(n for n, m in theirs.named_modules() if n.endswith("q_proj") and hasattr(m, "lora_A")) == wrapped
    with pytest.raises(dt.ConfigError, match="layers_to_transform must be a layer index"):
        dt.LoraConfig(target_modules=["q_proj"], layers_to_transform=[0, -1])


def test_modules_to_save_wrappers_list_their_adapter_containers_like_peft():
    """peft's test_set_requires_grad and test_delete_adapter walk `adapter_layer_names` (+ `other_param_names`) of
    every wrapper, a modules_to_save one included; deltatune's trainable copy had neither. Same names, same
    requires_grad after set_requires_grad."""
    seen = {}
    for name, lib in LIBS.items():
        model = lib.get_peft_model(tiny_llama(), _lora(lib), adapter_name="a")
        model.add_adapter("b", lib.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
        model.set_requires_grad(adapter_names="b")
        wrapper = model.base_model.model.lm_head
        seen[name] = (
            (tuple(wrapper.adapter_layer_names), tuple(wrapper.other_param_names)),
            {
                n: p.requires_grad
                for c in wrapper.adapter_layer_names
                for n, p in getattr(wrapper, c)["b"].named_parameters()
            },
        )
        model.delete_adapter("b")
        seen[name] += (wrapper._adapters,)  # peft's private record, read by its delete_adapter tests
    assert seen["deltatune"] == seen["peft"] and seen["peft"][1] and all(seen["peft"][1].values())


def test_config_signatures_list_their_fields_like_peft_s():
    """peft's test_config_layers_to_transform_index_zero picks the configs with layer selection by
    inspect.signature(config_class); deltatune's configs showed (*args, **kwargs) (their metaclass's __call__)."""
    import inspect

    for name in ("LoraConfig", "AdaLoraConfig", "VeraConfig"):
        ours, theirs = (set(inspect.signature(getattr(lib, name)).parameters) for lib in (dt, peft))
        assert {"layers_to_transform", "layers_pattern", "target_modules", "r"} <= ours & theirs, name
