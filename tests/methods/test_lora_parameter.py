"""target_parameters: LoRA on a mixture-of-experts layer's 3-d expert tensors (and 2-d parameters), per expert
ΔW[e] = s·B_e A_e in peft's layout; peft as the oracle both ways, merge/unmerge, gradients."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from tests.conftest import model_output, perturb_trainable

IDS = {"input_ids": torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0))}
TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    return MixtralForCausalLM(config).eval()


def test_each_expert_gets_its_own_low_rank_update():
    model = dt.get_peft_model(
        _mixtral(), dt.LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=TARGETS)
    )
    perturb_trainable(model)
    experts = model.get_base_model().model.layers[0].mlp.experts.base_layer  # inner wrapper: gate_up_proj
    assert experts.parameter_name == "gate_up_proj"
    assert model.get_base_model().model.layers[0].mlp.experts.parameter_name == "down_proj"  # outer
    a, b = experts.lora_A["default"].weight, experts.lora_B["default"].weight  # (r*E, in), (out, r*E)
    assert a.shape == (2 * 4, 32) and b.shape == (96, 2 * 4)
    for e in range(4):  # peft's layout: A rows grouped by expert, B columns interleaved (out, r, E)
        want = 2.0 * b.reshape(96, 2, 4)[:, :, e] @ a.reshape(4, 2, 32)[e]
        torch.testing.assert_close(experts.get_delta_weight("default")[e], want.detach(), rtol=1e-5, atol=1e-6)
    loss = model(**IDS, labels=IDS["input_ids"]).loss
    loss.backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    weight = experts.base_weight.detach().clone()
    want = model_output(model, IDS)
    model.merge_adapter()
    torch.testing.assert_close(model_output(model, IDS), want, rtol=1e-4, atol=1e-5)
    model.unmerge_adapter()
    assert torch.equal(experts.base_weight, weight)
    with pytest.raises(dt.AdapterError, match="rows"):
        model(**IDS, adapter_names=["default", "__base__"])
    plain = model.unload()  # both nested wrappers come off
    assert type(plain.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    assert torch.equal(plain.model.layers[0].mlp.experts.gate_up_proj, weight)


@pytest.mark.parametrize("direction", ["peft->deltatune", "deltatune->peft"])
def test_peft_interop(direction, tmp_path):
    peft = pytest.importorskip("peft")
    config = dict(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=TARGETS)
    if direction == "peft->deltatune":
        source = peft.get_peft_model(_mixtral(), peft.LoraConfig(**config))
        perturb_trainable(source)
        source.save_pretrained(tmp_path)
        loaded = dt.PeftModel.from_pretrained(_mixtral(), tmp_path)
    else:
        source = dt.get_peft_model(_mixtral(), dt.LoraConfig(**config))
        perturb_trainable(source)
        source.save_pretrained(tmp_path)
        loaded = peft.PeftModel.from_pretrained(_mixtral(), str(tmp_path))
    torch.testing.assert_close(model_output(loaded.eval(), IDS), model_output(source.eval(), IDS), rtol=1e-5, atol=1e-5)


def test_refusals():
    with pytest.raises(dt.ConfigError, match="match no parameter"):
        dt.get_peft_model(_mixtral(), dt.LoraConfig(target_modules=[], target_parameters=["experts.nope"]))
    with pytest.raises(dt.UnsupportedModuleError, match="lora_dropout"):
        dt.get_peft_model(_mixtral(), dt.LoraConfig(target_modules=[], target_parameters=TARGETS, lora_dropout=0.1))
    with pytest.raises(dt.ConfigError, match="empty list"):
        dt.LoraConfig(target_modules=[])


def test_target_parameters_alone_on_a_model_without_default_targets(tmp_path):
    """target_modules left unset: a family with no default targets adapts the named parameters only (peft's rule;
    a known family adds its default modules), and the file keeps target_modules unset."""

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(6, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight.T

    torch.manual_seed(0)
    base = torch.nn.Sequential(Scaled(), torch.nn.ReLU())
    x = torch.randn(3, 4)
    plain = base(x)
    model = dt.get_peft_model(base, dt.LoraConfig(r=2, target_parameters=["0.weight"], init_lora_weights=False))
    assert model.peft_config["default"].target_modules is None
    assert sorted(dt.get_peft_model_state_dict(model)) == ["base_model.model.0.lora_A.weight",
                                                            "base_model.model.0.lora_B.weight"]  # fmt: skip
    assert not torch.allclose(model(x), plain)
    model.save_pretrained(tmp_path)
    assert '"target_modules": null' in (tmp_path / "adapter_config.json").read_text()
    torch.manual_seed(0)
    again = dt.PeftModel.from_pretrained(torch.nn.Sequential(Scaled(), torch.nn.ReLU()), tmp_path)
    torch.testing.assert_close(again(x), model(x))
