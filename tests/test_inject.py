"""find_targets is pure: names and types in, names out."""

import pytest
from torch import nn

from deltatune.errors import TargetNotFoundError, UnsupportedModuleError
from deltatune.inject import find_targets, layer_index

TYPES = {
    "model": nn.Module,
    "model.embed_tokens": nn.Embedding,
    **{f"model.layers.{i}.self_attn.{p}": nn.Linear for i in range(3) for p in ("q_proj", "k_proj", "v_proj")},
    **{f"model.layers.{i}.self_attn": nn.Module for i in range(3)},
    **{f"model.layers.{i}.mlp.down_proj": nn.Linear for i in range(3)},
    "lm_head": nn.Linear,
}
LINEAR = (nn.Linear,)


def test_suffix_list():
    got = find_targets(TYPES, target_modules=["q_proj", "down_proj"], supported=LINEAR)
    assert got == [n for n in TYPES if n.endswith(("q_proj", "down_proj"))]


def test_regex_matches_whole_name():
    got = find_targets(TYPES, target_modules=r".*layers\.[01]\.self_attn\.(q|v)_proj", supported=LINEAR)
    assert got == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]


def test_all_linear_skips_output_head():
    got = find_targets(TYPES, target_modules="all-linear", supported=LINEAR, output_head="lm_head")
    assert "lm_head" not in got and len(got) == 12


def test_exclude_and_layers_to_transform():
    got = find_targets(
        TYPES,
        target_modules=["q_proj", "v_proj"],
        supported=LINEAR,
        exclude_modules=["v_proj"],
        layers_to_transform=[2],
        layers_pattern="layers",
    )
    assert got == ["model.layers.2.self_attn.q_proj"]
    assert layer_index("model.layers.11.mlp.down_proj", None) == 11
    assert layer_index("transformer.h.3.attn", "h") == 3


def test_typo_lists_close_names_even_when_another_entry_matches():
    with pytest.raises(TargetNotFoundError, match="q_prj") as info:
        find_targets(TYPES, target_modules=["q_prj", "v_proj"], supported=LINEAR)
    assert "q_proj" in info.value.suggestions
    # loaders are lenient per entry (peft configs list names for several families) but not when nothing matches
    assert find_targets(TYPES, target_modules=["q_prj", "v_proj"], supported=LINEAR, strict=False)
    with pytest.raises(TargetNotFoundError):
        find_targets(TYPES, target_modules=["nothing"], supported=LINEAR, strict=False)


def test_container_module_is_reported_not_silently_adapted():
    with pytest.raises(UnsupportedModuleError, match="self_attn"):
        find_targets(TYPES, target_modules=["self_attn"], supported=LINEAR)


def test_filters_that_leave_nothing_error():
    with pytest.raises(TargetNotFoundError, match="leaves no module"):
        find_targets(TYPES, target_modules=["q_proj"], supported=LINEAR, layers_to_transform=[7])
