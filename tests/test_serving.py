"""Servers' rules on saved adapters, and the vLLM rewrite: what vLLM computes from it (one scale, alpha / r) equals
deltatune's adapter."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune.serving import export_for_vllm, serving_report
from tests.conftest import perturb_trainable, tiny_llama


def _save(tmp_path, name, config):
    model = dt.get_peft_model(tiny_llama(), config)
    perturb_trainable(model)
    model.save_pretrained(tmp_path / name)
    return model, tmp_path / name


def _failed(path, server):
    return {c.rule for c in serving_report(path, server) if not c.ok}


def test_rules_name_what_a_server_cannot_load(tmp_path):
    _, plain = _save(tmp_path, "plain", dt.LoraConfig(r=8, target_modules=["q_proj"]))
    assert _failed(plain, "vllm") == set() and _failed(plain, "llama.cpp") == set()
    _, dora = _save(tmp_path, "dora", dt.LoraConfig(r=2, use_dora=True, target_modules=["q_proj"]))
    assert "no DoRA" in _failed(dora, "vllm")
    _, pattern = _save(tmp_path, "pattern", dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                          rank_pattern={"v_proj": 2}))  # fmt: skip
    assert _failed(pattern, "vllm") == {"one scale for all modules"} and _failed(pattern, "llama.cpp") == set()
    _, saved = _save(tmp_path, "head", dt.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert "no modules_to_save" in _failed(saved, "vllm")
    ia3 = dt.get_peft_model(tiny_llama(), dt.IA3Config())
    ia3.save_pretrained(tmp_path / "ia3")
    assert "LoRA" in _failed(tmp_path / "ia3", "sglang")
    with pytest.raises(dt.ConfigError, match="not one of"):
        serving_report(plain, "tgi")


def test_vllm_rewrite_is_served_exactly_under_one_scale(tmp_path):
    """Simulate vLLM's rule (scale = lora_alpha / r from the config, or / sqrt(r) with use_rslora, for every module)
    on the rewritten files: it gives deltatune's ΔW for each module, rsLoRA and patterns included."""
    config = dt.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"],
                           rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 5})  # fmt: skip
    model, path = _save(tmp_path, "a", config)
    out = export_for_vllm(path, tmp_path / "vllm")
    served = json.loads((out / "adapter_config.json").read_text())
    assert not served.get("rank_pattern") and not served.get("alpha_pattern") and not served["use_rslora"]
    scale = served["lora_alpha"] / (math.sqrt(served["r"]) if served["use_rslora"] else served["r"])
    tensors = load_file(out / "adapter_model.safetensors")
    for name, layer in model.get_base_model().named_modules():
        if hasattr(layer, "lora_A"):
            a = tensors[f"base_model.model.{name}.lora_A.weight"]
            b = tensors[f"base_model.model.{name}.lora_B.weight"]
            torch.testing.assert_close(scale * b @ a, layer.get_delta_weight("default"), atol=1e-6, rtol=1e-5)
    assert _failed(out, "vllm") == set()
    _, dora = _save(tmp_path, "dora", dt.LoraConfig(r=2, use_dora=True, target_modules=["q_proj"]))
    with pytest.raises(dt.ConfigError, match="no DoRA"):
        export_for_vllm(dora, tmp_path / "x")


def test_inspect_serving_command(tmp_path):
    from typer.testing import CliRunner

    from deltatune.cli.app import app

    _, path = _save(tmp_path, "a", dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}))
    out = CliRunner().invoke(app, ["inspect", str(path), "--serving", "vllm"], terminal_width=200)
    assert (
        out.exit_code == 0
        and "does not load this adapter as saved" in out.output
        and "one scale for all modules" in out.output
    )
    out = CliRunner().invoke(app, ["export", "peft", "--adapter", str(path), "--out", str(tmp_path / "v")])
    assert out.exit_code == 0, out.output
    out = CliRunner().invoke(app, ["inspect", str(tmp_path / "v"), "--serving", "vllm"], terminal_width=200)
    assert "vllm: loads this adapter" in out.output
