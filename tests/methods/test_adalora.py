"""AdaLoRA: peft as a lock-step oracle for training and allocation, the final budget, pruned triplets, the file
layout both ways, closed-form counts, Conv2d, 4-bit bases and the errors."""

from __future__ import annotations

import warnings

import pytest
import torch

import deltatune as dt
from deltatune.config import TrainingContext
from deltatune.errors import ConfigError, UnsupportedFieldError
from deltatune.methods.adalora import SvdConv2d, SvdLinear
from tests.conftest import tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))


def _kw(**extra):
    return (
        dict(
            init_r=4,
            target_r=2,
            lora_alpha=4,
            total_step=8,
            tinit=1,
            tfinal=2,
            target_modules=TARGETS,
            task_type="CAUSAL_LM",
        )
        | extra
    )


def _train(model, allocate, steps, start=0, optimizer=None):
    """peft's documented loop: backward, step, allocate, zero_grad (labels given: the model adds the penalty)."""
    opt = optimizer or torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    losses = []
    for step in range(start, start + steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        allocate(step)
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _layers(model):
    return {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, SvdLinear)}


def _pair(**extra):
    """peft's and deltatune's AdaLoRA on the same tiny LLaMA with identical starting adapters."""
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(**_kw(**extra)))
    ours = dt.get_peft_model(tiny_llama(), dt.AdaLoraConfig(**_kw(**extra)))
    ours.load_adapter_tensors("default", peft.get_peft_model_state_dict(theirs))
    return peft, theirs, ours


def test_trains_and_allocates_in_lock_step_with_peft():
    peft, theirs, ours = _pair()
    their_losses = _train(theirs, theirs.base_model.update_and_allocate, 8)
    our_losses = _train(ours, ours.update_and_allocate, 8)
    torch.testing.assert_close(our_losses, their_losses, rtol=1e-5, atol=1e-6)  # orthogonal penalty included
    their_pattern = {k.removesuffix(".default"): v for k, v in theirs.peft_config["default"].rank_pattern.items()}
    assert ours.peft_config["default"].rank_pattern == their_pattern
    assert sum(sum(v) for v in their_pattern.values()) == 2 * 6  # target_r x matrices
    theirs_sd = peft.get_peft_model_state_dict(theirs)
    ours_sd = ours.adapter_state_dict("default")
    assert set(ours_sd) == set(theirs_sd)
    for key, value in theirs_sd.items():
        torch.testing.assert_close(ours_sd[key], value, rtol=1e-4, atol=1e-6)


def test_schedule_ends_exactly_at_the_target_budget_and_pruned_triplets_stay_pruned():
    model = dt.get_peft_model(tiny_llama(), dt.AdaLoraConfig(**_kw(total_step=12, tfinal=4, tinit=2)))
    adam = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _train(model, model.update_and_allocate, 9, optimizer=adam)  # steps 0..8; step 8 = T - tfinal: final mask
    layers = _layers(model)
    assert sum(m.kept_rank("default") for m in layers.values()) == 2 * len(layers)
    final = {n: m.rank_mask["default"].clone() for n, m in layers.items()}
    assert any(not k.all() for k in final.values())
    moved = []

    def allocate_and_check(step):
        moved.append(any(m.lora_E["default"][~final[n]].abs().sum() > 0 for n, m in layers.items()))
        model.update_and_allocate(step)

    _train(model, allocate_and_check, 3, start=9, optimizer=adam)
    assert all(moved)  # AdamW's momentum did move the pruned singular values ...
    for name, layer in layers.items():  # ... and the allocator zeroed them again
        assert torch.equal(layer.rank_mask["default"], final[name])
        assert torch.all(layer.lora_E["default"][~final[name]] == 0)
    budget = sum(sum(v) for v in model.peft_config["default"].rank_pattern.values())
    assert budget == 2 * len(layers)


@pytest.mark.parametrize("direction", ["peft->deltatune", "deltatune->peft"])
def test_pruned_adapter_moves_both_ways_at_its_final_ranks(direction, tmp_path):
    peft, theirs, ours = _pair()
    source = theirs if direction == "peft->deltatune" else ours
    allocate = theirs.base_model.update_and_allocate if source is theirs else ours.update_and_allocate
    _train(source, allocate, 8)
    source.eval()
    with torch.no_grad():
        want = source(input_ids=IDS).logits
    source.save_pretrained(tmp_path)
    lib = dt if source is theirs else peft
    loaded = lib.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, want, rtol=1e-5, atol=1e-5)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    pattern = loaded.peft_config["default"].rank_pattern
    for key, kept in pattern.items():
        prefix = "base_model.model." + key.removesuffix(".default").removesuffix(".lora_E")
        assert saved[prefix + ".lora_E"].shape == (sum(kept), 1)
        assert saved[prefix + ".lora_A"].shape[0] == saved[prefix + ".lora_B"].shape[1] == sum(kept)


def test_trainable_count_matches_the_closed_form_on_tiny_and_real_size_models():
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama(**size):
        return LlamaForCausalLM(LlamaConfig(num_key_value_heads=size["num_attention_heads"], **size))

    tiny = llama(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=97)
    config = dt.AdaLoraConfig(init_r=12, total_step=10, target_modules=["q_proj", "v_proj"])
    assert dt.get_peft_model(tiny, config).get_nb_trainable_parameters()[0] == 6_192  # 2·2·12·(64+64+1)
    with torch.device("meta"):
        big = llama(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
    assert dt.get_peft_model(big, config).get_nb_trainable_parameters()[0] == 32 * 2 * 12 * (4096 + 4096 + 1)


def test_conv2d_update_equals_the_dense_convolution():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, padding=1, stride=2))
    model = dt.get_peft_model(
        net,
        dt.AdaLoraConfig(
            init_r=3, target_r=2, total_step=5, lora_alpha=2, target_modules=["0"], init_lora_weights=False
        ),
    )
    layer = model.get_base_model()[0]
    assert isinstance(layer, SvdConv2d) and layer.lora_A["default"].shape == (3, 3 * 9)
    a, e, b = layer.lora_A["default"], layer.lora_E["default"], layer.lora_B["default"]
    weight = layer.base_layer.weight + (2 / (3 + 1e-5)) * (b @ (a * e)).reshape(5, 3, 3, 3)
    x = torch.randn(2, 3, 8, 8)
    want = torch.nn.functional.conv2d(x, weight, layer.base_layer.bias, stride=2, padding=1)
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


def test_orthogonal_penalty_joins_a_model_computed_loss_in_training_only():
    model = dt.get_peft_model(tiny_llama(), dt.AdaLoraConfig(**_kw(orth_reg_weight=0.3)))
    layers = _layers(model).values()
    penalty = sum(
        torch.linalg.matrix_norm(m.lora_A["default"] @ m.lora_A["default"].T - torch.eye(4))
        + torch.linalg.matrix_norm(m.lora_B["default"].T @ m.lora_B["default"] - torch.eye(4))
        for m in layers
    ) / (2 * len(layers))
    model.eval()
    plain = model(input_ids=IDS, labels=IDS).loss
    model.train()
    torch.testing.assert_close(model(input_ids=IDS, labels=IDS).loss, plain + 0.3 * penalty)


def test_warns_when_update_and_allocate_is_never_called():
    model = dt.get_peft_model(tiny_llama(), dt.AdaLoraConfig(**_kw()))
    model.train()
    with pytest.warns(UserWarning, match="update_and_allocate"):
        for _ in range(70):
            model(input_ids=IDS[:, :4])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(model, model.update_and_allocate, 2)  # called: no warning


def test_trains_on_a_4bit_base():
    base = dt.quantize_model(tiny_llama())
    model = dt.get_peft_model(base, dt.AdaLoraConfig(**_kw()))
    assert len(_layers(model)) == 6
    losses = _train(model, model.update_and_allocate, 4)
    assert losses[-1] < losses[0]


def test_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match="total_step"):
        dt.get_peft_model(tiny_llama(), dt.AdaLoraConfig(target_modules=TARGETS))
    with pytest.raises(ConfigError, match="no budget phase"):
        dt.AdaLoraConfig(total_step=10, tinit=6, tfinal=4)
    with pytest.raises(ConfigError, match="exceeds init_r"):
        dt.get_peft_model(tiny_llama(), dt.AdaLoraConfig(**_kw(init_r=4, target_r=8)))
    with pytest.raises(UnsupportedFieldError, match="use_rslora"):
        dt.AdaLoraConfig.from_dict({"peft_type": "ADALORA", "total_step": 10, "use_rslora": True})
    with pytest.warns(UserWarning, match="init_r"):
        dt.AdaLoraConfig(total_step=10, r=16)
    assert dt.AdaLoraConfig().for_training(TrainingContext(60)).total_step == 60
    assert dt.AdaLoraConfig(total_step=40).for_training(TrainingContext(60)).total_step == 40


def test_training_state_carries_importance_and_masks_to_a_resumed_run():
    first = dt.get_peft_model(tiny_llama(), dt.AdaLoraConfig(**_kw(total_step=10, tinit=1, tfinal=2)))
    _train(first, first.update_and_allocate, 4)  # mid budget phase: EMAs and masks exist
    state = first.training_state_dict()
    assert any(k.startswith("method.default.ema_ipt.") for k in state) and any(".mask." in k for k in state)
    second = dt.get_peft_model(tiny_llama(), dt.AdaLoraConfig(**_kw(total_step=10, tinit=1, tfinal=2)))
    second.load_training_state_dict({k: v.clone() for k, v in state.items()})
    ema_a, ema_b = first.shared["default"].ema, second.shared["default"].ema
    assert ema_a.keys() == ema_b.keys() and all(torch.equal(ema_a[k][1], ema_b[k][1]) for k in ema_a)
    assert second.peft_config["default"].rank_pattern == first.peft_config["default"].rank_pattern
    # SGD keeps no state, so both runs continue identically, allocations included
    assert _train(first, first.update_and_allocate, 4, start=4) == _train(
        second, second.update_and_allocate, 4, start=4
    )
    assert second.peft_config["default"].rank_pattern == first.peft_config["default"].rank_pattern


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
@pytest.mark.parametrize("direction", ["peft->deltatune", "deltatune->peft"])
def test_unpruned_adapter_moves_both_ways(model_name, direction, tmp_path):
    peft = pytest.importorskip("peft")
    from tests.conftest import TINY_MODELS
    from tests.interop.roundtrip import assert_round_trip

    kwargs = dict(init_r=4, target_r=2, total_step=10, target_modules=TINY_MODELS[model_name][1])
    lib_save, lib_load = (peft, dt) if direction == "peft->deltatune" else (dt, peft)
    assert_round_trip(lib_save, lib_load, "AdaLoraConfig", kwargs, model_name, tmp_path)


def test_without_tfinal_the_last_step_of_the_run_reaches_the_target_budget():
    # the last re-allocation of peft's schedule is at step 5 (deltaT = 5), to a budget of 13 > 12, and none follows
    config = dt.AdaLoraConfig(**_kw(init_r=12, target_r=2, total_step=7, tinit=0, tfinal=0, deltaT=5))
    model = dt.get_peft_model(tiny_llama(), config)
    _train(model, model.update_and_allocate, 7)
    assert sum(sum(v) for v in model.peft_config["default"].rank_pattern.values()) == 2 * 6
