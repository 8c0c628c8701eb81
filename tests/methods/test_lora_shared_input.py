"""Sibling LoRA linears reading one input compute their down-projections jointly in training (one matmul, one
dropout mask): outputs and gradients against the formula written here and against peft, the saved adapter
unchanged, and the cases where sharing must not happen (another input, an input or weight changed in place)."""

import copy

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.functional.lora import dropout_keep_mask
from deltatune.methods.lora_layer import LoraLinear
from tests.conftest import tiny_llama

S = 8 / 4  # lora_alpha / r


class _Attention(nn.Module):
    """q, k, v read `x`; `kv` (when given) stands in for cross-attention's encoder states read by k and v."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(6, 5), nn.Linear(6, 3), nn.Linear(6, 3)
        self.o_proj = nn.Linear(5, 6)

    def forward(self, x, kv=None):
        kv = x if kv is None else kv
        return self.o_proj(self.q_proj(x)).sum(-1) + self.k_proj(kv).sum(-1) + self.v_proj(kv).sum(-1)


def _adapted(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    model = dt.get_peft_model(
        _Attention(), dt.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "k_proj",
                                                                                              "v_proj", "o_proj"])
    )  # fmt: skip
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return model.train()


def _wrappers(model):
    inner = model.base_model.model
    return {n: getattr(inner, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}


def _by_formula(model, x, kv, masks):
    """W0 x + b + s·B A (mask ⊙ x)/(1-p) per module, written out; `masks[name]` is 1 where kept (None: no dropout)."""
    out = 0
    layers = _wrappers(model)
    inputs = {"q_proj": x, "k_proj": kv, "v_proj": kv}
    p = layers["q_proj"].dropout_p["default"]

    def term(name, inp):
        layer = layers[name]
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        dropped = inp if masks.get(name) is None else inp * masks[name] / (1 - p)
        return inp @ layer.base_layer.weight.T + layer.base_layer.bias + S * dropped @ a.T @ b.T

    out = term("o_proj", term("q_proj", x)).sum(-1)
    return out + term("k_proj", inputs["k_proj"]).sum(-1) + term("v_proj", inputs["v_proj"]).sum(-1)


def test_siblings_with_one_input_width_are_grouped():
    layers = _wrappers(_adapted())
    assert layers["q_proj"].input_group is layers["k_proj"].input_group is layers["v_proj"].input_group
    assert layers["q_proj"].input_group.members == [layers["q_proj"], layers["k_proj"], layers["v_proj"]]
    assert layers["o_proj"].input_group is None  # its input is 5 wide: alone
    targets = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    llama = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=targets))
    block = llama.base_model.model.model.layers[0]
    assert block.self_attn.q_proj.input_group.members == [block.self_attn.q_proj, block.self_attn.v_proj]
    assert block.self_attn.o_proj.input_group is None  # as wide as q, but it reads the attention's output
    assert block.mlp.gate_proj.input_group.members == [block.mlp.gate_proj, block.mlp.up_proj]
    assert block.mlp.down_proj.input_group is None


@pytest.mark.parametrize("cross", [False, True])
def test_joint_down_projection_equals_the_formula_with_one_mask_per_input(cross):
    """With dropout, q/k/v share the mask of the seed q draws; o_proj (alone, called next) draws the next; keys and
    values fed another tensor draw a third."""
    model = _adapted(dropout=0.3)
    x = torch.randn(2, 7, 6, requires_grad=True)
    kv = torch.randn(2, 7, 6, requires_grad=True) if cross else x
    torch.manual_seed(5)
    got = model(x, kv) if cross else model(x)
    torch.manual_seed(5)
    seeds = [int(torch.randint(0, 2**31, (1,)).item()) for _ in range(3)]
    mask_x = dropout_keep_mask(x.shape, 0.3, seeds[0], x.device, x.dtype)
    mask_o = dropout_keep_mask((2, 7, 5), 0.3, seeds[1], x.device, x.dtype)  # called right after q_proj
    # k on another tensor: a new joint computation (v takes its slice); on x, k and v take q's
    mask_kv = dropout_keep_mask(x.shape, 0.3, seeds[2], x.device, x.dtype) if cross else mask_x
    masks = {"q_proj": mask_x, "k_proj": mask_kv, "v_proj": mask_kv, "o_proj": mask_o}
    ref_model = copy.deepcopy(model)
    xr, kvr = x.detach().clone().requires_grad_(), kv.detach().clone().requires_grad_()
    want = _by_formula(ref_model, xr, kvr if cross else xr, masks)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(got)
    got.backward(g)
    want.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    for (name, p), (_, pr) in zip(model.named_parameters(), ref_model.named_parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, pr.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_joint_training_matches_peft_outputs_gradients_and_saved_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    targets = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]
    mine = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=targets, init_lora_weights=False)).train()
    mine.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True).train()
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    out_mine, out_theirs = mine(input_ids=ids, labels=ids), theirs(input_ids=ids, labels=ids)
    torch.testing.assert_close(out_mine.logits, out_theirs.logits, rtol=1e-5, atol=1e-5)
    out_mine.loss.backward()
    out_theirs.loss.backward()
    their_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for name, p in mine.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, their_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    mine.save_pretrained(tmp_path)  # training forwards changed nothing that is saved
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before


def test_no_reuse_after_the_input_or_a_weight_changed_in_place():
    model = _adapted()
    layers = _wrappers(model)
    x = torch.randn(3, 6)
    q = layers["q_proj"](x)  # computes q, k and v's down-projections; k and v wait for their slices
    with torch.no_grad():
        x.add_(1.0)  # in place: a new version of x
    want_k = x @ layers["k_proj"].base_layer.weight.T + layers["k_proj"].base_layer.bias
    a, b = layers["k_proj"].lora_A["default"].weight, layers["k_proj"].lora_B["default"].weight
    torch.testing.assert_close(layers["k_proj"](x), want_k + S * x @ a.T @ b.T)
    layers["q_proj"](x)
    with torch.no_grad():
        layers["v_proj"].lora_A["default"].weight.mul_(2.0)  # an optimizer step between two calls
    a, b = layers["v_proj"].lora_A["default"].weight, layers["v_proj"].lora_B["default"].weight
    want_v = x @ layers["v_proj"].base_layer.weight.T + layers["v_proj"].base_layer.bias + S * x @ a.T @ b.T
    torch.testing.assert_close(layers["v_proj"](x), want_v)
    assert q.requires_grad


def test_members_outside_the_joint_computation_compute_their_own():
    """A disabled-by-merge or eval-mode sibling is left out; a deep copy groups its own layers."""
    model = _adapted()
    layers = _wrappers(model)
    layers["k_proj"].eval()
    x = torch.randn(3, 6)
    layers["q_proj"](x)
    assert id(layers["k_proj"]) not in layers["q_proj"].input_group._last.waiting
    copied = copy.deepcopy(model)
    copied_layers = _wrappers(copied)
    assert copied_layers["q_proj"].input_group.members == [copied_layers[n] for n in ("q_proj", "k_proj", "v_proj")]
    assert copied_layers["q_proj"].input_group._last is None
    assert isinstance(copied_layers["q_proj"], LoraLinear)


def test_a_replica_sharing_the_group_computes_its_own():
    """DataParallel's replicas are shallow copies: they share the original's group but are not its members."""
    model = _adapted()
    layers = _wrappers(model)
    replica = layers["k_proj"]._replicate_for_data_parallel()
    x = torch.randn(3, 6)
    a, b = replica.lora_A["default"].weight, replica.lora_B["default"].weight
    want = x @ replica.base_layer.weight.T + replica.base_layer.bias + S * x @ a.T @ b.T
    torch.testing.assert_close(replica(x), want)
