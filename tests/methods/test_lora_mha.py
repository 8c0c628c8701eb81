"""LoRA on torch's nn.MultiheadAttention: against the formula written here (a plain attention whose packed q/k/v
weight and output weight get s·B·A added by hand), merged and unmerged, inside torch's transformer layer, and in
peft's file layout."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from deltatune.errors import UnsupportedModuleError
from tests.conftest import perturb_trainable


class TinyMha(nn.Module):
    def __init__(self, batch_first: bool = False) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(12, 3, batch_first=batch_first)
        self.lin0 = nn.Linear(12, 4)

    def forward(self, x):
        return self.lin0(self.mha(x, x, x)[0])


def _model(batch_first: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return TinyMha(batch_first).eval()


def _x():
    return torch.randn(5, 2, 12, generator=torch.Generator().manual_seed(1))  # (length, batch, width)


def _reference(model: dt.PeftModel, base: nn.Module) -> nn.Module:
    """`base` with s·B·A of the adapter added to its attention's two weights by hand."""
    reference = copy.deepcopy(base)
    wrapper = model.get_base_model().mha
    a, b, s = wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight, wrapper.scaling["default"]
    out = wrapper.out_proj
    a_o, b_o, s_o = out.lora_A["default"].weight, out.lora_B["default"].weight, out.scaling["default"]
    with torch.no_grad():
        reference.mha.in_proj_weight += s * b @ a
        reference.mha.out_proj.weight += s_o * b_o @ a_o
    return reference


def _adapted(**kwargs) -> dt.PeftModel:
    model = dt.get_peft_model(_model(), dt.LoraConfig(r=4, lora_alpha=8, target_modules=["mha"], **kwargs))
    perturb_trainable(model, seed=3, scale=0.2)
    return model.eval()


def test_forward_is_the_attention_with_both_weights_changed_by_s_b_a():
    model = _adapted()
    want = _reference(model, _model())(_x())
    assert (want - _model()(_x())).abs().max() > 1e-3
    torch.testing.assert_close(model(_x()), want, rtol=1e-5, atol=1e-6)
    model.train()
    model(_x()).pow(2).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_merge_unmerge_and_unload():
    model = _adapted()
    want = model(_x())
    base_in = _model().mha.in_proj_weight.detach().clone()
    model.merge_adapter()
    torch.testing.assert_close(model(_x()), want, rtol=1e-5, atol=1e-6)
    model.unmerge_adapter()
    assert torch.equal(model.get_base_model().mha.in_proj_weight, base_in)  # the exact bits back
    plain = model.merge_and_unload()
    assert type(plain.mha) is nn.MultiheadAttention and type(plain.mha.out_proj) is not dt.PeftModel
    assert not any("lora" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(plain(_x()), want, rtol=1e-5, atol=1e-6)


def test_disable_and_a_second_adapter():
    model = _adapted()
    with model.disable_adapter():
        torch.testing.assert_close(model(_x()), _model()(_x()))
    model.add_adapter("other", dt.LoraConfig(r=2, target_modules=["mha"]))
    model.set_adapter("other")  # B = 0: the base again
    torch.testing.assert_close(model(_x()), _model()(_x()))
    with pytest.raises(TypeError, match="does not support mixed adapter batches"):
        model(_x().transpose(0, 1).contiguous(), adapter_names=["other", "default"])


def test_the_adapter_acts_inside_torchs_transformer_layer_in_inference():
    """nn.TransformerEncoderLayer's fused inference path reads the attention's weights itself; with an adapter it
    must go through the wrapper (it sees _qkv_same_embed_dim False and takes the plain path)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(12, 3, dim_feedforward=16, batch_first=True).eval()
    model = dt.get_peft_model(copy.deepcopy(layer), dt.LoraConfig(r=4, target_modules=["self_attn"]))
    perturb_trainable(model, seed=2, scale=0.3)
    model.eval()
    x = torch.randn(2, 5, 12)
    wrapper = model.get_base_model().self_attn
    reference = copy.deepcopy(layer)
    with torch.no_grad():
        reference.self_attn.in_proj_weight += wrapper.scaling["default"] * (
            wrapper.lora_B["default"].weight @ wrapper.lora_A["default"].weight
        )
        out = wrapper.out_proj
        reference.self_attn.out_proj.weight += out.scaling["default"] * (
            out.lora_B["default"].weight @ out.lora_A["default"].weight
        )
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
        assert (model(x) - layer(x)).abs().max() > 1e-3


def test_saved_under_peft_keys_and_read_back(tmp_path):
    model = _adapted()
    model.save_pretrained(tmp_path)
    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == [
        "base_model.model.mha.base_layer.out_proj.lora_A.weight",
        "base_model.model.mha.base_layer.out_proj.lora_B.weight",
        "base_model.model.mha.lora_A.weight",
        "base_model.model.mha.lora_B.weight",
    ]
    loaded = dt.PeftModel.from_pretrained(_model(), tmp_path)
    torch.testing.assert_close(loaded(_x()), model(_x()))


def test_a_peft_file_loads_with_the_same_tensors_and_outputs_where_peft_is_right(tmp_path):
    """peft 0.21 adds the out_proj term twice in its forward (an open peft fix, huggingface/peft#3774), so outputs
    are compared with the out_proj adapter at zero; the tensors load as saved either way."""
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(_model(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["mha"]))
    perturb_trainable(theirs, seed=6, scale=0.2)
    with torch.no_grad():
        theirs.base_model.model.mha.base_layer.out_proj.lora_B["default"].weight.zero_()
    theirs.eval()
    theirs.save_pretrained(tmp_path)
    ours = dt.PeftModel.from_pretrained(_model(), tmp_path).eval()
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert all(torch.equal(ours.adapter_state_dict("default")[k], v) for k, v in saved.items())
    torch.testing.assert_close(ours(_x()), theirs(_x()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [({"lora_dropout": 0.1}, "lora_dropout=0.1"), ({"use_dora": True}, "variant='use_dora'")],
)
def test_what_this_layer_cannot_do_is_refused_by_name(kwargs, words):
    with pytest.raises(UnsupportedModuleError, match=words):
        dt.get_peft_model(_model(), dt.LoraConfig(r=4, target_modules=["mha"], **kwargs))


def test_separate_qkv_weights_are_refused():
    model = nn.Sequential(nn.MultiheadAttention(12, 3, kdim=6, vdim=6))
    with pytest.raises(UnsupportedModuleError, match="packed q/k/v projection"):
        dt.get_peft_model(model, dt.LoraConfig(r=4, target_modules=["0"]))
