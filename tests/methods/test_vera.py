"""VeRA: formula, shared seeded projections, parameter counts, peft both ways (with and without saved projections)."""

from __future__ import annotations

import math

import pytest
import torch

import deltatune as dt
from deltatune.functional.vera import vera_projections
from tests.conftest import TINY_MODELS
from tests.interop.roundtrip import assert_round_trip


def test_projections_are_seeded_kaiming_uniform_and_shared():
    a, b = vera_projections(0, 16, 300, 200)
    a2, _ = vera_projections(0, 16, 300, 200)
    assert torch.equal(a, a2) and not torch.equal(a, vera_projections(1, 16, 300, 200)[0])
    assert a.abs().max() <= math.sqrt(6 / 300) and b.abs().max() <= math.sqrt(6 / 16)
    model = dt.get_peft_model(TINY_MODELS["llama"][0](), dt.VeraConfig(r=8, target_modules=["q_proj", "down_proj"]))
    layers = [m for m in model.modules() if isinstance(m, dt.methods.vera.VeraLinear)]
    assert len({id(m.shared["default"]) for m in layers}) == 1  # one A/B pair for all layers of the adapter


def test_forward_equals_formula():
    torch.manual_seed(0)
    model = dt.get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(10, 6)), dt.VeraConfig(r=4, target_modules=["0"], init_weights=False)
    )
    layer = model.get_base_model()[0]
    a, b = layer.shared["default"].vera_A, layer.shared["default"].vera_B
    lb, ld = layer.vera_lambda_b["default"], layer.vera_lambda_d["default"]
    x = torch.randn(3, 10)
    want = layer.base_layer(x) + ((x @ a.T * ld) @ b.T) * lb
    torch.testing.assert_close(model(x), want)


def test_count_is_r_plus_d_out_per_layer_on_a_real_size_config():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    peft_model = dt.get_peft_model(model, dt.VeraConfig(r=256, target_modules=["q_proj", "v_proj"]))
    assert peft_model.get_nb_trainable_parameters()[0] == 32 * 2 * (256 + 4096)


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("direction", ["peft->deltatune", "deltatune->peft"])
def test_peft_interop(save_projection, direction, tmp_path):
    peft = pytest.importorskip("peft")
    kwargs = dict(r=8, target_modules=["q_proj", "v_proj", "down_proj"], save_projection=save_projection)
    lib_save, lib_load = (peft, dt) if direction == "peft->deltatune" else (dt, peft)
    assert_round_trip(lib_save, lib_load, "VeraConfig", kwargs, "llama", tmp_path)
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert ("base_model.vera_A" in keys) == save_projection
