"""Hot-swap: new weights into an existing slot equal a fresh load; under torch.compile, no recompilation."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from tests.conftest import model_output, perturb_trainable, tiny_llama

IDS = {"input_ids": torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0))}


def _saved(tmp_path, name, seed, **config):
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj", "v_proj"], **config))
    perturb_trainable(model, seed=seed)
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


def test_swap_equals_a_fresh_load_including_smaller_rank_and_other_alpha(tmp_path):
    a = _saved(tmp_path, "a", 1, r=4, lora_alpha=8)
    b = _saved(tmp_path, "b", 2, r=2, lora_alpha=7, use_rslora=True)
    model = dt.PeftModel.from_pretrained(tiny_llama(), a).eval()
    slot = model.get_base_model().model.layers[0].self_attn.q_proj.lora_A["default"].weight
    hotswap_adapter(model, b, "default")
    assert model.get_base_model().model.layers[0].self_attn.q_proj.lora_A["default"].weight is slot  # in place
    fresh = dt.PeftModel.from_pretrained(tiny_llama(), b).eval()
    torch.testing.assert_close(model_output(model, IDS), model_output(fresh, IDS), atol=1e-6, rtol=1e-6)
    assert model.peft_config["default"].r == 2 and model.peft_config["default"].use_rslora


def test_compiled_model_swaps_without_recompiling(tmp_path):
    a = _saved(tmp_path, "a", 1, r=2, lora_alpha=4)
    b = _saved(tmp_path, "b", 2, r=4, lora_alpha=16)
    c = _saved(tmp_path, "c", 3, r=1, lora_alpha=3)
    model = dt.PeftModel.from_pretrained(tiny_llama(), a).eval()
    prepare_model_for_compiled_hotswap(model, target_rank=4)
    torch.compiler.reset()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        compiled(**IDS)
        with torch._dynamo.config.patch(error_on_recompile=True):  # any recompilation raises
            for path in (b, c):
                hotswap_adapter(model, path, "default")
                got = compiled(**IDS).logits
                want = model_output(dt.PeftModel.from_pretrained(tiny_llama(), path).eval(), IDS)
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(dt.AdapterError, match="before torch.compile"):
        prepare_model_for_compiled_hotswap(compiled)


def test_refusals_name_the_problem(tmp_path):
    a = _saved(tmp_path, "a", 1, r=2)
    big = _saved(tmp_path, "big", 2, r=8)
    dora = _saved(tmp_path, "dora", 3, r=2, use_dora=True)
    other = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    other.save_pretrained(tmp_path / "other")
    model = dt.PeftModel.from_pretrained(tiny_llama(), a)
    with pytest.raises(dt.ConfigError, match="do not fit the slot"):
        hotswap_adapter(model, big, "default")
    with pytest.raises(dt.ConfigError, match="use_dora"):
        hotswap_adapter(model, dora, "default")
    with pytest.raises(dt.ConfigError, match="other modules"):
        hotswap_adapter(model, tmp_path / "other", "default")
    with pytest.raises(dt.AdapterError, match="no adapter slot"):
        hotswap_adapter(model, a, "nope")
    model.merge_adapter()
    with pytest.raises(dt.MergeError, match="unmerge_adapter"):
        hotswap_adapter(model, a, "default")
