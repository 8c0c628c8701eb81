"""Property-based fuzzing of every config class and of the run YAML (issue 27).

Every example ends in a config or a typed deltatune error; never a bare Python exception, and a config that fails to
apply leaves the model exactly as it was. `make fuzz` runs the same properties with many more random examples.
"""

from __future__ import annotations

import json
import warnings

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

import deltatune as dt
from deltatune.errors import DeltatuneError, UnknownFieldWarning
from deltatune.registry import list_methods
from deltatune.train.config import load_train_config
from tests.conftest import tiny_llama
from tests.reliability.hostile import JSON_VALUES, assert_unchanged, model_snapshot

MODEL_READY = {
    "ADALORA": {"total_step": 10},
    "PREFIX_TUNING": {"num_virtual_tokens": 3},
    "PROMPT_TUNING": {"num_virtual_tokens": 3},
    "P_TUNING": {"num_virtual_tokens": 3, "encoder_hidden_size": 8},
    "ADAPTION_PROMPT": {"adapter_len": 2, "adapter_layers": 1},
    "SELECTIVE": {"train_parameters": ["weight"], "select_modules": ["q_proj"]},
}
"""Fields that make each method's default config apply to the tiny LLaMA (the valid starting point of mutations)."""

SPECS = {spec.peft_type: spec for spec in list_methods()}


def valid_dict(peft_type: str) -> dict:
    return {**SPECS[peft_type].config_cls().to_dict(), **MODEL_READY.get(peft_type, {})}


def build(peft_type: str, data: dict):
    """from_dict under test: a config, or a DeltatuneError (returned, so the caller can check what it names)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownFieldWarning)
        try:
            return SPECS[peft_type].config_cls.from_dict(data)
        except DeltatuneError as exc:
            return exc


def test_every_method_has_a_valid_starting_config():
    for peft_type in SPECS:
        config = build(peft_type, valid_dict(peft_type))
        assert isinstance(config, dt.AdapterConfig), (peft_type, config)
        dt.get_peft_model(tiny_llama(), config)  # applies: the mutations below start from a config that works


@pytest.mark.parametrize("peft_type", sorted(SPECS))
@given(data=st.data())
def test_random_fields_end_in_a_config_or_a_typed_error(peft_type, data):
    fields = sorted(valid_dict(peft_type))
    chosen = data.draw(st.lists(st.sampled_from(fields), min_size=1, max_size=4, unique=True), label="fields")
    mutated = {**valid_dict(peft_type), **{name: data.draw(JSON_VALUES, label=name) for name in chosen}}
    if data.draw(st.booleans(), label="drop some"):
        for name in data.draw(st.lists(st.sampled_from(fields), max_size=3), label="dropped"):
            mutated.pop(name, None)
    mutated.update(data.draw(st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=2), label="extra"))
    result = build(peft_type, mutated)
    if isinstance(result, DeltatuneError):
        assert str(result)  # names the problem
        return
    again = build(peft_type, result.to_dict())  # a built config survives its own JSON round trip
    assert again == result
    model = tiny_llama()
    before = model_snapshot(model)
    try:
        dt.get_peft_model(model, result)
    except DeltatuneError:
        assert_unchanged(model, before)


@given(value=JSON_VALUES)
def test_any_json_in_adapter_config_json_is_read_or_refused_by_name(tmp_path_factory, value):
    folder = tmp_path_factory.mktemp("cfg")
    (folder / "adapter_config.json").write_text(json.dumps(value))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnknownFieldWarning)
            dt.load_config(folder)
    except DeltatuneError as exc:
        assert "adapter_config.json" in str(exc) or "peft_type" in str(exc)


@given(peft_type=JSON_VALUES)
def test_any_peft_type_is_a_known_method_or_an_unknown_method_error(tmp_path_factory, peft_type):
    folder = tmp_path_factory.mktemp("cfg")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type}))
    try:
        dt.load_config(folder)
    except dt.UnknownMethodError as exc:
        assert "peft_type" in str(exc)
    except DeltatuneError:
        assert peft_type in SPECS


def test_binary_or_oversized_config_files_are_config_errors(tmp_path):
    (tmp_path / "adapter_config.json").write_bytes(b"\xff\xfe{\x00")
    with pytest.raises(dt.ConfigError, match="UTF-8"):
        dt.load_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(dt.ConfigError, match="nests"):
        dt.load_config(tmp_path)
    with open(tmp_path / "adapter_config.json", "wb") as fh:
        fh.truncate(17 * 2**20)  # sparse: 17 MiB of zeros, more than any config
    with pytest.raises(dt.ConfigError, match="bytes"):
        dt.load_config(tmp_path)


RUN_SECTIONS = {
    "data": ["train", "max_length", "packing", "prompt_field"],
    "optim": ["lr", "steps", "batch_size", "grad_accum", "optimizer"],
    "method": ["peft_type", "r", "lora_alpha", "target_modules"],
}


@given(data=st.data())
def test_random_run_yaml_ends_in_a_run_config_or_a_config_error(tmp_path_factory, data):
    tree = {}
    for section, keys in RUN_SECTIONS.items():
        if data.draw(st.booleans(), label=section):
            chosen = data.draw(st.lists(st.sampled_from(keys), max_size=3, unique=True), label=f"{section} keys")
            tree[section] = {k: data.draw(JSON_VALUES, label=f"{section}.{k}") for k in chosen}
    if data.draw(st.booleans(), label="top-level junk"):
        tree[data.draw(st.sampled_from(["seed", "task", "model", "output_dir", "zzz"]))] = data.draw(JSON_VALUES)
    path = tmp_path_factory.mktemp("run") / "run.yaml"
    path.write_text(yaml.safe_dump(tree, allow_unicode=True))
    try:
        load_train_config(path)
    except dt.ConfigError as exc:
        assert str(exc)


@pytest.mark.parametrize(
    "value, field",
    [("8", "r"), (True, "r"), (float("nan"), "lora_dropout"), ([{"a": 1}], "target_modules"), ("every", "bias")],
)
def test_mistyped_lora_fields_name_the_field(value, field):
    with pytest.raises(dt.ConfigError, match=field):
        dt.LoraConfig.from_dict({"peft_type": "LORA", field: value})


def test_tuples_and_sets_are_accepted_where_lists_are_declared():
    config = dt.LoraConfig(target_modules=("v_proj", "q_proj"), layers_to_transform=(1, 0))
    assert config.target_modules == ["v_proj", "q_proj"] and config.layers_to_transform == [1, 0]
    assert dt.LoraConfig(target_modules={"v_proj", "q_proj"}).target_modules == ["q_proj", "v_proj"]
