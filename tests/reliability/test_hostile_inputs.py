"""Per-method hostile cases (issue 27): each is refused by a typed deltatune error that names the problem, and the
model (modules, tensors, trainable flags) is exactly as it was before the call."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import deltatune as dt
from tests.conftest import tiny_bert, tiny_llama, tiny_mlp
from tests.reliability.hostile import assert_unchanged, model_snapshot


def _lora(names=("a",), **kw):
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj"], **kw), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, dt.LoraConfig(target_modules=["q_proj"], **kw))
    return model


def _bottlenecks(*types: str):
    model = dt.get_peft_model(tiny_llama(), dt.BottleneckConfig(adapter_type=types[0]), adapter_name="a")
    for index, kind in enumerate(types[1:]):
        model.add_adapter("bcd"[index], dt.BottleneckConfig(adapter_type=kind))
    return model


def _mixed_batch(names: list[str]) -> Callable:
    return lambda model: model(input_ids=torch.tensor([[1, 2, 3], [4, 5, 6]]), adapter_names=names)


def _hotswap_larger_rank(tmp_path):
    def make():
        model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"]))
        dt.prepare_model_for_compiled_hotswap(model, target_rank=4)
        return model

    def swap(model):
        dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=8, target_modules=["q_proj"])).save_pretrained(tmp_path)
        dt.hotswap_adapter(torch.compile(model), tmp_path, "default")

    return make, swap


def _gguf_export_of_ia3(tmp_path, model_dir):
    from deltatune.export import export_gguf_adapter

    def make():
        model = dt.get_peft_model(tiny_llama(), dt.IA3Config())
        model.save_pretrained(tmp_path / "ia3")
        return model

    return make, lambda model: export_gguf_adapter(tmp_path / "ia3", tmp_path / "x.gguf", model=str(model_dir))


def _get(config: dt.AdapterConfig) -> Callable:
    return lambda model: dt.get_peft_model(model, config)


CASES = {
    # case: (model factory, hostile call on it, error type, what the message names)
    "virtual tokens 0": (tiny_llama, lambda m: dt.PromptTuningConfig(num_virtual_tokens=0), dt.ConfigError, "positive"),
    "virtual tokens negative": (
        tiny_llama,
        lambda m: dt.PrefixTuningConfig(num_virtual_tokens=-3),
        dt.ConfigError,
        "num_virtual_tokens",
    ),
    "virtual tokens beyond the context": (
        tiny_llama,
        _get(dt.PromptEncoderConfig(num_virtual_tokens=600)),
        dt.ConfigError,
        "at most 64 positions",
    ),
    "prefix on a model without a transformers config or cache": (
        tiny_mlp,
        _get(dt.PrefixTuningConfig(num_virtual_tokens=3)),
        dt.ConfigError,
        "no transformers config",
    ),
    "LLaMA-Adapter adapter_layers beyond the model": (
        tiny_llama,
        _get(dt.AdaptionPromptConfig(adapter_len=2, adapter_layers=5)),
        dt.ConfigError,
        "adapter_layers=5 but the model has 2 layers",
    ),
    "LLaMA-Adapter on a model it has no attention adapter for": (
        tiny_bert,
        _get(dt.AdaptionPromptConfig(adapter_len=2, adapter_layers=1)),
        dt.ConfigError,
        "separate q/k/v/o projections",
    ),
    "ReFT layer out of range": (tiny_llama, _get(dt.ReftConfig(layer_indices=[7])), dt.TargetNotFoundError, "7"),
    "ReFT positions beyond the context": (
        tiny_llama,
        _get(dt.ReftConfig(positions="f999")),
        dt.ConfigError,
        "at most 64 positions",
    ),
    "AdapterFusion naming a missing adapter": (
        lambda: _bottlenecks("houlsby"),
        lambda m: m.add_adapter("fuse", dt.BottleneckConfig(fusion_of=["a", "nope"])),
        dt.ConfigError,
        "nope",
    ),
    "AdapterFusion over adapters of other placements": (
        lambda: _bottlenecks("houlsby", "pfeiffer"),
        lambda m: m.add_adapter("fuse", dt.BottleneckConfig(adapter_type="houlsby", fusion_of=["a", "b"])),
        dt.ConfigError,
        "same placement",
    ),
    "trainable token index outside the vocabulary": (
        tiny_llama,
        _get(dt.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[10**6])),
        dt.ConfigError,
        "must lie in",
    ),
    "trainable token index negative": (
        tiny_llama,
        _get(dt.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[-1])),
        dt.ConfigError,
        "trainable_token_indices",
    ),
    # ranks whose tensors cannot exist: torch's allocator refusal (a RuntimeError) becomes a typed error by name
    "LoRA rank past the machine's memory": (
        tiny_llama,
        _get(dt.LoraConfig(r=2**40, target_modules=["q_proj"])),
        dt.ConfigError,
        "r=1099511627776",
    ),
    "AdaLoRA init_r past int64": (
        tiny_llama,
        _get(dt.AdaLoraConfig(init_r=2**70, target_r=2, total_step=10, target_modules=["q_proj"])),
        dt.ConfigError,
        "does not fit in memory",
    ),
    "VeRA rank whose storage size overflows": (
        tiny_llama,
        _get(dt.VeraConfig(r=2**62, target_modules=["q_proj"])),
        dt.ConfigError,
        "VERA",
    ),
    "mixed batch: adapter_names of the wrong length": (
        lambda: _lora(),
        _mixed_batch(["a"]),
        dt.AdapterError,
        "got 1 names for a batch of 2 rows",
    ),
    "mixed batch: unknown adapter name": (
        lambda: _lora(("a", "b")),
        _mixed_batch(["a", "zzz"]),
        dt.AdapterError,
        "zzz",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_input_is_refused_by_name_and_changes_nothing(case):
    make, hostile, error, names = CASES[case]
    model = make()
    before = model_snapshot(model)
    with pytest.raises(error, match=names):
        result = hostile(model)
        if isinstance(result, dt.AdapterConfig):  # the config itself was accepted: now apply it
            dt.get_peft_model(model, result)
    assert_unchanged(model, before)


def test_hotswap_of_a_larger_rank_into_a_compiled_model_is_refused(tmp_path):
    make, swap = _hotswap_larger_rank(tmp_path)
    model = make()
    before = model_snapshot(model)
    with pytest.raises(dt.ConfigError, match="do not fit the slot"):
        swap(model)
    assert_unchanged(model, before)


def test_gguf_export_of_a_method_the_format_cannot_hold_is_refused_by_name(tmp_path, tiny_model_dir):
    pytest.importorskip("gguf")
    make, export = _gguf_export_of_ia3(tmp_path, tiny_model_dir)
    model = make()
    with pytest.raises(dt.ConfigError, match="IA3"):
        export(model)
    assert not (tmp_path / "x.gguf").exists()
