"""Behaviour a peft user relies on, checked against peft itself (issue 29): each test runs the same calls through
both libraries and compares what happens, or pins a difference deltatune keeps on purpose (docs/from_peft.md)."""

from __future__ import annotations

import warnings

import pytest
import torch
import yaml

import deltatune as dt
from deltatune.errors import ConfigError, UnsupportedArgumentError
from tests.conftest import model_output, perturb_trainable, tiny_gpt2, tiny_llama, tiny_mlp

peft = pytest.importorskip("peft")

LIBS = {"peft": peft, "deltatune": dt}
IDS = {"input_ids": torch.tensor([[1, 5, 9, 2, 7]])}


def _lora(lib, **kw):
    return lib.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **kw})


def _both(build):
    """`build(lib)` run with each library, as {name: result}."""
    return {name: build(lib) for name, lib in LIBS.items()}


# -- errors a peft user catches -----------------------------------------------------------------------------------
@pytest.mark.parametrize("lib_name", sorted(LIBS))
def test_deleting_an_unknown_or_merged_adapter_is_a_value_error_and_changes_nothing(lib_name):
    lib = LIBS[lib_name]
    model = lib.get_peft_model(tiny_llama(), _lora(lib))
    perturb_trainable(model)
    with pytest.raises(ValueError):
        model.delete_adapter("unknown")
    model.merge_adapter()
    merged_out = model_output(model, IDS)
    with pytest.raises(ValueError, match="merged"):
        model.delete_adapter("default")
    assert list(model.peft_config) == ["default"]
    torch.testing.assert_close(model_output(model, IDS), merged_out)


def test_delete_refusals_keep_the_keyerror_for_deltatune_code():
    model = dt.get_peft_model(tiny_llama(), _lora(dt))
    with pytest.raises(KeyError, match="unknown"):
        model.delete_adapter("unknown")


def test_a_second_merge_warns_like_peft():
    caught = {}
    for name, lib in LIBS.items():
        model = lib.get_peft_model(tiny_llama(), _lora(lib))
        model.merge_adapter()
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            model.merge_adapter()
        caught[name] = [str(w.message) for w in record if "merged" in str(w.message)]
    assert set(caught["deltatune"]) == set(caught["peft"]) == {"All adapters are already merged, nothing to do."}
    assert len(caught["deltatune"]) == 1  # once per call (peft warns once per layer)


def test_merging_a_second_adapter_on_top_of_a_merged_one_warns_like_peft():
    caught = {}
    for name, lib in LIBS.items():
        model = lib.get_peft_model(tiny_llama(), _lora(lib))
        model.add_adapter("other", _lora(lib, target_modules=["k_proj"]))
        model.merge_adapter(["default"])
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            model.merge_adapter(["other"])
        caught[name] = {str(w.message) for w in record if "merged" in str(w.message)}
    assert caught["deltatune"] == caught["peft"]
    assert caught["peft"] == {"Already following adapters were merged default. You are now additionally merging other."}


# -- a second adapter may not train the first one's base tensors ------------------------------------------------------
@pytest.mark.parametrize("lib_name", sorted(LIBS))
def test_a_second_adapter_training_all_biases_is_refused(lib_name):
    lib = LIBS[lib_name]
    targets = dict(target_modules=["c_attn"], fan_in_fan_out=True)
    model = lib.get_peft_model(tiny_gpt2(), lib.LoraConfig(bias="all", **targets))
    before = model_output(model, IDS)
    with pytest.raises(ValueError):
        model.add_adapter("other", lib.LoraConfig(bias="all", **targets))
    assert "other" not in model.peft_config
    torch.testing.assert_close(model_output(model, IDS), before)
    model.add_adapter("plain", lib.LoraConfig(**targets))  # one that trains no base tensor is fine
    assert "plain" in model.peft_config


def test_deltatune_names_both_adapters_and_undoes_the_refused_one():
    model = dt.get_peft_model(tiny_gpt2(), dt.LoraConfig(target_modules=["c_attn"], fan_in_fan_out=True, bias="all"))
    modules = [n for n, _ in model.named_modules()]
    with pytest.raises(ConfigError, match=r"'other'.*'default'") as info:
        model.add_adapter("other", dt.LoraConfig(target_modules=["c_proj"], fan_in_fan_out=True, bias="all"))
    assert "bias" in str(info.value)
    assert [n for n, _ in model.named_modules()] == modules  # no c_proj wrapper left behind


def test_lora_only_biases_on_disjoint_layers_are_kept_apart():
    """Deliberately more than peft (which refuses any second adapter with a bias): each adapter trains and saves only
    the biases of its own layers."""
    model = dt.get_peft_model(
        tiny_gpt2(), dt.LoraConfig(target_modules=["c_attn"], fan_in_fan_out=True, bias="lora_only")
    )
    model.add_adapter("mlp", dt.LoraConfig(target_modules=["c_fc"], fan_in_fan_out=True, bias="lora_only"))
    first = [k for k in model.adapter_state_dict("default") if k.endswith(".bias")]
    second = [k for k in model.adapter_state_dict("mlp") if k.endswith(".bias")]
    assert first and second
    assert all("c_attn" in k for k in first) and all("c_fc" in k for k in second)


# -- disabled adapters do not train -----------------------------------------------------------------------------------
def test_disable_adapter_turns_gradients_off_for_the_block_like_peft():
    flags = {}
    for name, lib in LIBS.items():
        model = lib.get_peft_model(tiny_llama(), _lora(lib))
        lora = [p for n, p in model.named_parameters() if "lora_" in n]
        with model.disable_adapter():
            inside = {p.requires_grad for p in lora}
        flags[name] = (inside, {p.requires_grad for p in lora})
    assert flags["deltatune"] == flags["peft"] == ({False}, {True})


def test_disable_keeps_each_flag_it_found():
    model = dt.get_peft_model(tiny_llama(), _lora(dt))
    model.add_adapter("frozen", _lora(dt, target_modules=["k_proj"]))
    model.set_requires_grad("frozen", False)
    model.disable_adapter_layers()
    assert not any(p.requires_grad for p in model.parameters())
    model.enable_adapter_layers()
    grads = {n: p.requires_grad for n, p in model.named_parameters() if "lora_" in n}
    assert all(v for n, v in grads.items() if ".default" in n) and not any(
        v for n, v in grads.items() if ".frozen" in n
    )


# -- target modules are never picked silently -------------------------------------------------------------------------
def test_no_default_targets_for_an_unknown_model_is_refused_like_peft():
    for lib in LIBS.values():
        with pytest.raises(ValueError, match="Please specify `target_modules`"):
            lib.get_peft_model(tiny_mlp(), lib.LoraConfig())


def test_the_refusal_names_what_could_be_chosen():
    with pytest.raises(ConfigError, match=r"lin0.*all-linear"):
        dt.get_peft_model(tiny_mlp(), dt.LoraConfig())


def test_known_families_get_peft_default_targets_written_into_the_users_config():
    configs = _both(lambda lib: lib.LoraConfig())
    for name, lib in LIBS.items():
        lib.get_peft_model(tiny_llama(), configs[name])
    assert sorted(configs["deltatune"].target_modules) == sorted(configs["peft"].target_modules) == ["q_proj", "v_proj"]


# -- adapter dtype and where loaded tensors go ------------------------------------------------------------------------
@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float64])
def test_autocast_adapter_dtype_gives_peft_dtypes(autocast, base_dtype):
    dtypes = {}
    for name, lib in LIBS.items():
        model = lib.get_peft_model(tiny_llama().to(base_dtype), _lora(lib), autocast_adapter_dtype=autocast)
        dtypes[name] = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert dtypes["deltatune"] == dtypes["peft"]
    assert dtypes["peft"] == {torch.float32 if autocast and base_dtype == torch.bfloat16 else base_dtype}


def test_a_bfloat16_adapter_runs_and_loads_in_bfloat16(tmp_path):
    model = dt.get_peft_model(tiny_llama().to(torch.bfloat16), _lora(dt), autocast_adapter_dtype=False)
    perturb_trainable(model)
    out = model_output(model, IDS)
    model.save_pretrained(tmp_path)
    loaded = dt.PeftModel.from_pretrained(tiny_llama().to(torch.bfloat16), tmp_path, autocast_adapter_dtype=False)
    assert {p.dtype for n, p in loaded.named_parameters() if "lora_" in n} == {torch.bfloat16}
    torch.testing.assert_close(model_output(loaded, IDS), out)
    model.add_adapter("wide", _lora(dt), autocast_adapter_dtype=True)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n and ".wide" in n} == {torch.float32}


def _saved(lib, tmp_path):
    model = lib.get_peft_model(tiny_llama(), _lora(lib))
    perturb_trainable(model)
    model.save_pretrained(tmp_path)
    return model_output(model, IDS)


@pytest.mark.parametrize("options", [dict(torch_device="cpu"), dict(device_map="auto"), dict(device_map={"": "cpu"})])
def test_load_adapter_device_options_are_honoured_like_peft(options, tmp_path):
    want = _saved(dt, tmp_path)
    for lib in LIBS.values():
        model = lib.PeftModel.from_pretrained(tiny_llama(), tmp_path)
        model.load_adapter(tmp_path, adapter_name="again", **options)
        model.set_adapter("again")
        torch.testing.assert_close(model_output(model, IDS), want)
        assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_load_adapter_refuses_devices_it_cannot_use(tmp_path):
    _saved(dt, tmp_path)
    model = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with pytest.raises(ConfigError, match="torch_device='nowhere'"):
        model.load_adapter(tmp_path, adapter_name="x", torch_device="nowhere")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no cuda device"):
            model.load_adapter(tmp_path, adapter_name="x", torch_device="cuda")
    with pytest.raises(ConfigError, match="device_map"):
        model.load_adapter(tmp_path, adapter_name="x", device_map=3)
    offloaded = tiny_llama()
    offloaded.hf_device_map = {"model.layers.0": "cpu", "model.layers.1": "disk"}
    with pytest.raises(UnsupportedArgumentError, match="offloaded"):
        dt.PeftModel.from_pretrained(offloaded, tmp_path, device_map="auto")
    assert list(model.peft_config) == ["default"]


def test_get_peft_model_signature_options():
    cfg = _lora(dt)
    model = dt.get_peft_model(tiny_llama(), cfg, revision="v2")
    assert model.peft_config["default"].revision == "v2"
    with pytest.raises(UnsupportedArgumentError, match="mixed"):
        dt.get_peft_model(tiny_llama(), _lora(dt), mixed=True)
    with pytest.raises(UnsupportedArgumentError, match="low_cpu_mem_usage"):
        dt.get_peft_model(tiny_llama(), _lora(dt), low_cpu_mem_usage=True)


# -- peft.utils helpers -----------------------------------------------------------------------------------------------
def test_get_submodules_matches_peft():
    from peft.utils import _get_submodules as theirs

    from deltatune.utils import _get_submodules as ours

    model = tiny_llama()
    for key in ["model.layers.0.self_attn.q_proj", "lm_head"]:
        assert [id(x) if not isinstance(x, str) else x for x in ours(model, key)] == [
            id(x) if not isinstance(x, str) else x for x in theirs(model, key)
        ]


@pytest.mark.parametrize(
    "config",
    [
        dict(target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"]),
        dict(target_modules=["q_proj"], use_dora=True),
        dict(target_modules=["q_proj", "v_proj"], bias="all"),
    ],
    ids=["embedding-modules-to-save", "dora", "bias"],
)
def test_get_base_model_state_dict_is_the_original_state_dict(config):
    """Independent truth: the model's own state dict taken before any adapter existed; peft gives the same."""
    original = {k: v.clone() for k, v in tiny_llama().state_dict().items()}
    got = {}
    for name, lib in LIBS.items():
        model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(**config))
        perturb_trainable(model)
        got[name] = lib.get_base_model_state_dict(model)
    assert sorted(got["deltatune"]) == sorted(got["peft"]) == sorted(original)
    for key, value in original.items():
        if "bias" not in key:  # bias="all" trains the base biases themselves
            torch.testing.assert_close(got["deltatune"][key], value)


def test_get_base_model_state_dict_for_a_soft_prompt():
    original = tiny_llama().state_dict()
    model = dt.get_peft_model(tiny_llama(), dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    assert sorted(dt.get_base_model_state_dict(model)) == sorted(original)


# -- the model keeps the user's config object -------------------------------------------------------------------------
def test_the_model_keeps_the_config_object_it_was_given(tmp_path):
    for lib in LIBS.values():
        cfg, other = _lora(lib), _lora(lib, target_modules=["k_proj"])
        model = lib.get_peft_model(tiny_llama(), cfg)
        model.add_adapter("other", other)
        assert model.peft_config["default"] is cfg and model.peft_config["other"] is other
        model.save_pretrained(tmp_path / lib.__name__)
        given = _lora(lib)
        loaded = lib.PeftModel.from_pretrained(tiny_llama(), tmp_path / lib.__name__, config=given)
        assert loaded.peft_config["default"] is given and given.inference_mode is True


def test_a_refused_adapter_leaves_the_users_config_untouched():
    cfg = dt.LoraConfig()
    with pytest.raises(ConfigError):
        dt.get_peft_model(tiny_mlp(), cfg)
    assert cfg.target_modules is None


# -- the model card ---------------------------------------------------------------------------------------------------
def _card(lib, tmp_path, name_or_path):
    base = tiny_llama()
    base.config._name_or_path = name_or_path
    lib.get_peft_model(base, _lora(lib)).save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    return yaml.safe_load(text.split("---\n")[1])


def test_the_model_card_names_the_base_model_and_tags_like_peft(tmp_path):
    ours, theirs = _card(dt, tmp_path / "dt", "org/tiny"), _card(peft, tmp_path / "peft", "org/tiny")
    assert ours["base_model"] == theirs["base_model"] == "org/tiny"
    assert ours["library_name"] == theirs["library_name"] == "peft"
    assert {"lora", "transformers"} <= set(ours["tags"]) & set(theirs["tags"])
    assert "base_model:adapter:org/tiny" in ours["tags"]  # peft writes the tag with an empty name


def test_the_model_card_of_an_unnamed_base_has_no_base_model_entry(tmp_path):
    """peft writes `base_model: ''` here, which names no model; deltatune leaves the entry out."""
    assert _card(peft, tmp_path / "peft", "")["base_model"] == ""
    ours = _card(dt, tmp_path / "dt", "")
    assert "base_model" not in ours and not any(t.startswith("base_model:") for t in ours["tags"])


def test_two_trainable_adalora_adapters_each_keep_their_own_state():
    """Deliberately more than peft (one trainable AdaLoRA adapter per model): training one leaves the other alone."""
    budget = dict(target_modules=["q_proj"], total_step=10, init_r=4, target_r=2)
    with pytest.raises(ValueError, match="only 1 trainable adapter"):
        peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(**budget)).add_adapter("b", peft.AdaLoraConfig(**budget))
    model = dt.get_peft_model(tiny_llama(), dt.AdaLoraConfig(**budget))
    model.add_adapter("b", dt.AdaLoraConfig(**budget))
    model.set_adapter("b")
    first = {k: v.clone() for k, v in model.adapter_state_dict("default").items()}
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A"
    trained_before = model.adapter_state_dict("b")[key].clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(2):
        model(**IDS, labels=IDS["input_ids"]).loss.backward()
        optimizer.step()
        model.update_and_allocate(step)
        optimizer.zero_grad()
    assert all(torch.equal(v, model.adapter_state_dict("default")[k]) for k, v in first.items())
    assert not torch.equal(model.adapter_state_dict("b")[key], trained_before)


@pytest.mark.parametrize("name", ["IA3Config", "LNTuningConfig", "GraloraConfig", "VeraConfig"])
def test_fields_peft_lacks_are_declared_from_peft_s_own_classes(name):
    """`peft_ignores` lists exactly the fields deltatune's config has and peft's class of the method has not
    (read from peft's signatures: the save warning must neither miss one nor cry wolf)."""
    import inspect

    ours, theirs = (set(inspect.signature(getattr(lib, name)).parameters) for lib in (dt, peft))
    assert set(getattr(dt, name).peft_ignores) == ours - theirs


def test_saving_a_field_peft_ignores_warns_and_peft_indeed_adapts_other_modules(tmp_path):
    """IA3 on layer 0 only: deltatune honours layers_to_transform, peft 0.21 has no such IA3 field, drops it when
    loading and wraps every layer (its own warnings say so). The save warns, naming the field and the fix; the same
    adapter without it saves quietly."""
    config = dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    model = dt.get_peft_model(tiny_llama(), dt.IA3Config(**config, layers_to_transform=[0]))
    with pytest.warns(dt.PeftWarning, match=r"IA3Config\(layers_to_transform=\[0\]\).*no such field.*target_modules"):
        model.save_pretrained(tmp_path / "layer0")
    with pytest.warns(UserWarning, match="Unexpected keyword arguments"):
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "layer0")
    wrapped = {n for n, m in theirs.named_modules() if n.endswith("k_proj") and hasattr(m, "ia3_l")}
    assert len(wrapped) == 2  # both of tiny_llama's layers: the selection did not survive the move
    with warnings.catch_warnings():
        warnings.simplefilter("error", dt.PeftWarning)
        dt.get_peft_model(tiny_llama(), dt.IA3Config(**config)).save_pretrained(tmp_path / "all")
