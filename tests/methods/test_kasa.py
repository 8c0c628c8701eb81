"""KaSA: the truncation and the update against their formulas, the regularizer written out, peft as the oracle on
the same adapter both ways, and the refusals that keep the base untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.methods.kasa import truncate_smallest
from tests.conftest import two_linear


def _kasa(base: nn.Module) -> dt.PeftModel:
    config = dt.LoraConfig(r=4, target_modules=["lin0", "lin1"], init_lora_weights=False, kasa_config=dt.KasaConfig())
    return dt.get_peft_model(base, config)


def test_truncation_drops_exactly_the_r_smallest_singular_values():
    weight = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))
    singular = torch.linalg.svdvals(weight)
    kept = torch.linalg.svdvals(truncate_smallest(weight, 2))
    torch.testing.assert_close(kept[:3], singular[:3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kept[3:], torch.zeros(2), rtol=0, atol=1e-5)


def test_forward_is_the_truncated_base_plus_b_diag_a():
    original = two_linear()
    model = _kasa(copy.deepcopy(original)).eval()
    layer = model.base_model.model.lin0
    torch.testing.assert_close(layer.base_layer.weight, truncate_smallest(original.lin0.weight.detach(), 4))
    a, b, diag = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_diag["default"]
    x = torch.randn(3, 10)
    want = x @ (layer.base_layer.weight + layer.scaling["default"] * (b * diag) @ a).T + layer.base_layer.bias
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.get_delta_weight("default"), layer.scaling["default"] * (b * diag) @ a)
    before = layer.base_layer.weight.detach().clone()
    model.merge_adapter()
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    assert torch.equal(layer.base_layer.weight, before)


def test_the_regularizer_is_betas_l2_plus_gammas_orthogonality_and_trains_the_diagonal():
    model = dt.get_peft_model(two_linear(), dt.LoraConfig(r=4, target_modules=["lin0", "lin1"], init_lora_weights=False,
                                                     kasa_config={"beta": 0.5, "gamma": 0.25}))  # fmt: skip
    want = 0.0
    for name in ("lin0", "lin1"):
        layer = getattr(model.base_model.model, name)
        a, b, d = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_diag["default"]
        eye = torch.eye(4)
        frobenius = ((b.T @ b - eye) ** 2).sum().sqrt() + ((a @ a.T - eye) ** 2).sum().sqrt()
        want = want + 0.5 * (d**2).sum() + 0.25 * frobenius
    loss = dt.kasa_loss(model)
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert model.base_model.model.lin0.lora_diag["default"].grad is not None
    assert dt.kasa_loss(model, "other") == 0.0


def test_matches_peft_both_ways(tmp_path):
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.config import KasaConfig as PeftKasaConfig

    base = two_linear()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["lin0", "lin1"],
                                 init_lora_weights=False, kasa_config=PeftKasaConfig(beta=0.1)))  # fmt: skip
    ours = dt.get_peft_model(copy.deepcopy(base), dt.LoraConfig(r=4, target_modules=["lin0", "lin1"],
                             init_lora_weights=False, kasa_config=dt.KasaConfig(beta=0.1)))  # fmt: skip
    dt.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    for name in ("lin0", "lin1"):  # the same truncated base
        mine, peft_weight = (getattr(m.base_model.model, name).base_layer.weight for m in (ours, theirs))
        torch.testing.assert_close(mine, peft_weight, rtol=1e-5, atol=1e-6)
    x = torch.randn(4, 10)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dt.kasa_loss(ours), theirs._get_kasa_loss(), rtol=1e-5, atol=1e-7)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")  # truncation replayed on load
    here = dt.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "theirs")
    torch.testing.assert_close(in_peft(x), ours(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(here(x), theirs(x), rtol=1e-5, atol=1e-6)


def test_refusals_leave_the_base_untouched():
    base = two_linear()
    weights = {k: v.clone() for k, v in base.state_dict().items()}

    def untouched() -> bool:
        return all(torch.equal(v, weights[k]) for k, v in base.state_dict().items() if "base_layer" not in k)

    with pytest.raises(dt.UnsupportedModuleError, match="r < min"):  # lin1 (20 -> 6) cannot drop 6 components
        dt.get_peft_model(base, dt.LoraConfig(r=6, target_modules=["lin0", "lin1"], kasa_config=dt.KasaConfig()))
    assert type(base.lin0) is nn.Linear and untouched()  # lin0 was adapted first: its truncation never ran
    model = dt.get_peft_model(base, dt.LoraConfig(r=2, target_modules=["lin0"]))
    with pytest.raises(dt.UnsupportedModuleError, match="rewrites the base"):
        model.add_adapter("k", dt.LoraConfig(r=2, target_modules=["lin0"], kasa_config=dt.KasaConfig()))
    assert model.base_model.model.lin0.adapter_names == ["default"]
    assert torch.equal(model.base_model.model.lin0.base_layer.weight, weights["lin0.weight"])
    with pytest.raises(dt.UnsupportedModuleError, match="Conv1D"):
        dt.get_peft_model(nn.Sequential(Conv1D(6, 10)), dt.LoraConfig(r=2, target_modules=["0"], kasa_config={}))
    with pytest.raises(dt.UnsupportedFieldError, match="use one of them"):
        dt.LoraConfig(target_modules=["0"], use_dora=True, kasa_config=dt.KasaConfig())
    with pytest.raises(dt.UnsupportedFieldError, match="use one of them"):
        dt.LoraConfig(target_modules=["0"], init_lora_weights="pissa", kasa_config=dt.KasaConfig())
    with pytest.raises(dt.ConfigError, match="beta"):
        dt.KasaConfig(beta=-1.0)
