"""VeLoRA: the compressed gradient against its formula written out, peft as the oracle on the same adapter, the
projection's init types, what backward keeps, and the config's checks."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.errors import ConfigError, UnsupportedFieldError, UnsupportedModuleError
from deltatune.functional.velora import compress, reconstruct, velora_down
from tests.conftest import tiny_llama


def _rebuilt_by_hand(x: torch.Tensor, v: torch.Tensor, groups: int, scale: float) -> torch.Tensor:
    """Each token cut into `groups` pieces of len(v) features (zero-padded), each piece replaced by <piece, v> v."""
    width = v.numel()
    rows = []
    for token in x.reshape(-1, x.shape[-1]):
        padded = torch.cat([token, token.new_zeros(groups * width - token.numel())])
        pieces = [padded[g * width : (g + 1) * width] for g in range(groups)]
        rows.append(torch.cat([torch.dot(p, v) * v for p in pieces])[: x.shape[-1]] * scale)
    return torch.stack(rows)


@pytest.mark.parametrize("d_in, groups", [(12, 3), (10, 3), (10, 1)])
def test_compress_then_reconstruct_is_the_rank_one_projection_of_each_sub_token(d_in, groups):
    torch.manual_seed(0)
    x = torch.randn(2, 3, d_in)
    v = torch.randn(-(-d_in // groups))
    v = v / v.norm()
    got = reconstruct(compress(x, v, groups), v, d_in, scale=0.5)
    torch.testing.assert_close(got, _rebuilt_by_hand(x, v, groups, 0.5))


def test_a_gradient_comes_from_the_rebuilt_input_and_everything_else_is_exact():
    torch.manual_seed(1)
    x = torch.randn(2, 5, 12, requires_grad=True)
    a = torch.randn(4, 12, requires_grad=True)
    v = torch.randn(4)
    v = v / v.norm()
    h, used = velora_down(x, a, v, num_groups=3, scale=1.5, dropout=0.0)
    assert torch.equal(used, v)
    torch.testing.assert_close(h, x @ a.T)  # the forward is plain
    g = torch.randn_like(h)
    grad_x, grad_a = torch.autograd.grad(h, [x, a], g)
    torch.testing.assert_close(grad_x, g @ a)  # exact
    want = g.reshape(-1, 4).T @ _rebuilt_by_hand(x.detach(), v, 3, 1.5)
    torch.testing.assert_close(grad_a, want)
    assert not torch.allclose(grad_a, g.reshape(-1, 4).T @ x.detach().reshape(-1, 12))  # it is an approximation


def test_sub_tokens_parallel_to_the_projection_give_lora_s_exact_gradient():
    torch.manual_seed(2)
    v = torch.randn(4)
    v = v / v.norm()
    coefficients = torch.randn(6, 3)
    x = (coefficients[..., None] * v).reshape(6, 12).requires_grad_(True)  # every sub-token is c·v
    a = torch.randn(5, 12, requires_grad=True)
    h, _ = velora_down(x, a, v, num_groups=3, scale=1.0, dropout=0.0)
    g = torch.randn_like(h)
    (grad_a,) = torch.autograd.grad(h, [a], g)
    torch.testing.assert_close(grad_a, g.T @ x.detach())


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 2))


@pytest.mark.parametrize("init_type", ["batch_average", "batch_average_once", "random"])
def test_gradients_and_projections_match_peft(init_type):
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.config import VeloraConfig as PeftVeloraConfig

    base = _mlp()
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(target_modules=["0", "2"], init_lora_weights=False,
                        velora_config=PeftVeloraConfig(num_groups=3, init_type=init_type)),
    ).train()  # fmt: skip
    ours = dt.get_peft_model(
        copy.deepcopy(base),
        dt.LoraConfig(target_modules=["0", "2"], init_lora_weights=False,
                      velora_config={"num_groups": 3, "init_type": init_type}),
    ).train()  # fmt: skip
    dt.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))  # same A, B, random projection
    for step in range(2):  # the second step shows whether the projection is refitted or kept
        x = torch.randn(4, 7, 10, generator=torch.Generator().manual_seed(step))
        theirs(x).square().sum().backward()
        ours(x).square().sum().backward()
    saved_theirs, saved_ours = peft.get_peft_model_state_dict(theirs), dt.get_peft_model_state_dict(ours)
    assert saved_ours.keys() == saved_theirs.keys()
    assert any(k.endswith("lora_velora_embed") for k in saved_ours)
    for key in saved_ours:
        torch.testing.assert_close(saved_ours[key], saved_theirs[key], rtol=1e-6, atol=1e-7)
    grads = {n.replace(".default", ""): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for name, param in ours.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name.replace(".default", "")], rtol=1e-5, atol=1e-6)


def test_the_projection_is_state_saved_with_the_adapter_and_never_trained(tmp_path):
    model = dt.get_peft_model(_mlp(), dt.LoraConfig(target_modules=["0"], velora_config=dt.VeloraConfig(4)))
    layer = model.base_model.model[0]
    assert layer.lora_velora_embed["default"].shape == (3,)  # ceil(10 / 4)
    assert not layer.lora_velora_embed["default"].any()  # batch_average: taken from the first training batch
    assert all("velora" not in n for n, p in model.named_parameters() if p.requires_grad)
    assert model.get_nb_trainable_parameters()[0] == 8 * (10 + 20)
    model.train()(torch.randn(5, 10)).sum().backward()
    projection = layer.lora_velora_embed["default"].clone()
    torch.testing.assert_close(projection.norm(), torch.tensor(1.0))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["velora_config"]
    assert saved == {"num_groups": 4, "scale": 1.0, "init_type": "batch_average"}
    loaded = dt.PeftModel.from_pretrained(_mlp(), tmp_path)
    assert loaded.peft_config["default"].velora_config == dt.VeloraConfig(4)
    assert torch.equal(loaded.base_model.model[0].lora_velora_embed["default"], projection)


def test_batch_average_once_keeps_a_loaded_projection(tmp_path):
    """A projection taken once stays through save and load (peft refits it after loading: a resumed run would see
    another projection than the run it continues)."""
    config = dt.LoraConfig(target_modules=["0"], velora_config=dt.VeloraConfig(2, init_type="batch_average_once"))
    model = dt.get_peft_model(_mlp(), config).train()
    model(torch.randn(5, 10)).sum().backward()
    first = model.base_model.model[0].lora_velora_embed["default"].clone()
    model(torch.randn(5, 10) + 3).sum().backward()
    assert torch.equal(model.base_model.model[0].lora_velora_embed["default"], first)
    model.save_pretrained(tmp_path)
    loaded = dt.PeftModel.from_pretrained(_mlp(), tmp_path, is_trainable=True).train()
    loaded(torch.randn(5, 10) - 3).sum().backward()
    assert torch.equal(loaded.base_model.model[0].lora_velora_embed["default"], first)


def test_outside_training_it_is_plain_lora_and_merges_as_lora():
    base = _mlp()
    lora = dt.get_peft_model(copy.deepcopy(base), dt.LoraConfig(target_modules=["0", "2"], init_lora_weights=False))
    velora = dt.get_peft_model(
        copy.deepcopy(base),
        dt.LoraConfig(target_modules=["0", "2"], init_lora_weights=False, velora_config=dt.VeloraConfig(3)),
    )
    velora.load_state_dict(lora.state_dict(), strict=False)
    x = torch.randn(3, 10)
    torch.testing.assert_close(velora.eval()(x), lora.eval()(x))
    merged = velora.merge_and_unload()
    torch.testing.assert_close(merged(x), lora(x), rtol=1e-5, atol=1e-6)


def test_backward_keeps_the_coefficients_not_the_input():
    """What autograd saves for the down-projection: num_groups numbers per token instead of d_in (plus A and the
    projection), against plain LoRA's input."""
    x = torch.randn(64, 256, requires_grad=True)
    a = torch.randn(8, 256, requires_grad=True)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    v = torch.ones(16) / 4
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        velora_down(x, a, v, num_groups=16, scale=1.0, dropout=0.1)
    assert sorted(saved) == sorted([64 * 16, a.numel(), v.numel()])


def test_trains_a_model_with_dropout_and_shared_siblings_left_alone():
    model = dt.get_peft_model(
        tiny_llama(),
        dt.LoraConfig(target_modules=["q_proj", "k_proj", "v_proj"], lora_dropout=0.1,
                      velora_config=dt.VeloraConfig(num_groups=8)),
    ).train()  # fmt: skip
    ids = torch.randint(0, 90, (2, 12))
    before = {k: v.clone() for k, v in model.adapter_state_dict("default").items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.adapter_state_dict("default")
    assert all(not torch.equal(before[k], after[k]) for k in after if "lora_B" in k)


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ConfigError, match="num_groups"):
        dt.VeloraConfig(num_groups=0)
    with pytest.raises(ConfigError, match="init_type"):
        dt.VeloraConfig(init_type="mean")
    with pytest.raises(ConfigError, match="unknown fields"):
        dt.LoraConfig(target_modules=["0"], velora_config={"groups": 2})
    with pytest.raises(UnsupportedFieldError, match="use_dora"):
        dt.LoraConfig(target_modules=["0"], use_dora=True, velora_config=dt.VeloraConfig())
    conv = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(UnsupportedModuleError, match="velora_config is not supported on Conv2d"):
        dt.get_peft_model(conv, dt.LoraConfig(target_modules=["0"], velora_config=dt.VeloraConfig()))
