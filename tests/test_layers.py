"""The AdapterLayer base: exact unmerge in any dtype, per-adapter derived state."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.layers import AdapterLayer, exact_restore_record
from tests.conftest import tiny_llama


def test_exact_restore_record_gives_back_the_original_bits():
    torch.manual_seed(0)
    original = torch.randn(64, 32).to(torch.bfloat16)
    delta = torch.randn(64, 32) * 0.05
    merged = (original.float() + delta).to(torch.bfloat16)
    recovered = merged.float() - delta
    record = exact_restore_record(original, recovered)
    assert 0 < record["index"].numel() < original.numel()  # rounding really loses bits somewhere
    restored = recovered.to(torch.bfloat16)
    restored.view(-1)[record["index"].long()] = record["value"]
    assert torch.equal(restored.view(torch.int16), original.view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_unmerge_cycles_leave_the_base_bit_identical(dtype, use_dora):
    """Regression: merge -> unmerge went through float32 and back, so switching adapters on a merged bf16 model
    moved the base a little every time."""
    model = tiny_llama().to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = dt.LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=use_dora, init_lora_weights=False
    )
    torch.manual_seed(1)
    pm = dt.get_peft_model(model, cfg)
    pm.add_adapter("b", cfg)
    for cycle in range(20):
        pm.merge_adapter()
        pm.set_adapter("b" if cycle % 2 == 0 else "default")  # unmerges automatically
    pm.merge_adapter()
    with pm.disable_adapter():  # unmerges too
        pass
    after = {k.replace(".base_layer", ""): v for k, v in pm.get_base_model().state_dict().items() if "lora_" not in k}
    for key, value in before.items():
        assert torch.equal(after[key].view(torch.uint8), value.view(torch.uint8)), key
    assert all(not layer.merge_state for layer in pm.modules() if isinstance(layer, AdapterLayer))


def test_merge_record_is_small_and_moves_with_the_model():
    model = tiny_llama().to(torch.bfloat16)
    torch.manual_seed(1)
    pm = dt.get_peft_model(model, dt.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    with torch.no_grad():  # a trained-size update (about 5% of the weights' scale), not the random init's
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(0.003)
    pm.merge_adapter()
    layers = [m for m in pm.modules() if isinstance(m, AdapterLayer)]
    weight_bytes = sum(m.base_weight.numel() * m.base_weight.element_size() for m in layers)
    assert 0 < sum(m.merge_record_bytes for m in layers) < weight_bytes / 4  # far below a second copy
    pm.to(torch.float32)
    assert all(t.dtype in (torch.float32, torch.int32) for m in layers for t in m.merge_state["default"].values())


def test_peft_layer_api():
    """What peft-style loops touch on a layer: base layer, weight proxy, switches, delta, merge(safe_merge=...)."""
    from torch import nn

    torch.manual_seed(0)
    pm = dt.get_peft_model(
        tiny_llama(), dt.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)
    )
    layer = next(m for m in pm.modules() if isinstance(m, AdapterLayer))
    base = layer.get_base_layer()
    assert isinstance(base, nn.Linear) and layer.weight is base.weight and layer.bias is None
    assert layer.active_adapter == "default" and layer.disable_adapters is False
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(layer.get_delta_weight("default"), 2.0 * b @ a)  # alpha / r = 2
    x = torch.randn(3, base.in_features)
    layer.enable_adapters(False)
    torch.testing.assert_close(layer(x), base(x))
    layer.enable_adapters(True)
    want = layer(x)
    layer.merge(safe_merge=True, adapter_names=["default"])
    assert layer.merged and layer.merged_adapters == ["default"]
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    layer.unmerge()


def test_a_delta_or_a_check_leaves_no_merge_record():
    cfg = dt.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True, init_lora_weights=False)
    pm = dt.get_peft_model(tiny_llama(), cfg)
    layer = next(m for m in pm.modules() if isinstance(m, AdapterLayer))
    layer.get_delta_weight("default")
    pm.merge_adapter(safe_merge=True)
    record = {k: v.clone() for k, v in layer.merge_state["default"].items()}
    layer.get_delta_weight("default")  # on a merged adapter: must not replace the record unmerge needs
    assert all(torch.equal(layer.merge_state["default"][k], v) for k, v in record.items())
    pm.unmerge_adapter()
    assert not layer.merge_state


def test_scale_api_matches_peft_layer_for_layer(tmp_path):
    """set_scale / scale_layer / unscale_layer, use_dora, lora_dropout: compared with peft's layers on one adapter."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    ours = dt.get_peft_model(
        tiny_llama(),
        dt.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], lora_dropout=0.1, init_lora_weights=False),
    )
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    mine = ours.get_base_model().model.layers[0].self_attn.q_proj
    their = theirs.base_model.model.model.layers[0].self_attn.q_proj
    assert mine.use_dora == their.use_dora == {"default": False}
    assert mine.lora_dropout["default"].p == their.lora_dropout["default"].p == 0.1
    x = torch.randn(3, 32)
    mine.eval(), their.eval()
    for call in [
        lambda layer: layer.set_scale("default", 0.5),
        lambda layer: layer.scale_layer(3.0),
        lambda layer: layer.unscale_layer(2.0),
        lambda layer: layer.unscale_layer(),
        lambda layer: layer.set_scale("absent", 9.0),
    ]:
        call(mine), call(their)
        assert mine.scaling["default"] == pytest.approx(their.scaling["default"])
        torch.testing.assert_close(mine(x), their(x), rtol=1e-5, atol=1e-5)
    mine.scale_layer(2.0)
    mine.merge()
    with pytest.raises(dt.MergeError, match="unmerge"):
        mine.scale_layer(2.0)


def test_per_adapter_views_held_across_a_delete_forget_the_adapter():
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="a")
    model.add_adapter("b", dt.LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.2))
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    dropout, dora = layer.lora_dropout, layer.use_dora  # held, as code that inspects layers holds them
    assert "b" in dropout and dropout["b"].p == 0.2 and dict(dora) == {"a": False, "b": False}
    model.delete_adapter("b")
    assert "b" not in dropout and "b" not in dora and list(dropout) == ["a"]
