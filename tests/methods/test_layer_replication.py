"""layer_replication: a longer layer stack from shared base weights, each position with its own adapter; peft as the
oracle both ways, generation with a KV cache, and a failed injection restoring the original stack."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from tests.conftest import model_output, perturb_trainable, tiny_llama

IDS = {"input_ids": torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0))}
MAP = [[0, 2], [1, 2]]  # layers 0, 1 -> 0, 1, 1


def test_replicated_layers_share_weights_and_carry_their_own_adapters():
    config = dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], layer_replication=MAP)
    model = dt.get_peft_model(tiny_llama(), config)
    layers = model.get_base_model().model.layers
    assert len(layers) == 3 and model.get_base_model().config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2]
    q1, q2 = layers[1].self_attn.q_proj, layers[2].self_attn.q_proj
    assert q1.get_base_layer().weight is q2.get_base_layer().weight  # no base weight is duplicated
    assert q1.lora_A["default"].weight is not q2.lora_A["default"].weight
    base_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    assert base_params == sum(p.numel() for p in tiny_llama().parameters())
    # at init (B = 0) the model computes layers 0, 1, 1 of the base: the same as running layer 1 twice by hand
    plain = tiny_llama()
    with torch.no_grad():
        hidden = plain.model.embed_tokens(IDS["input_ids"])
        position = torch.arange(6)[None]
        rotary = plain.model.rotary_emb(hidden, position)
        mask = torch.full((6, 6), float("-inf")).triu(1)[None, None]
        for index in (0, 1, 1):
            hidden = plain.model.layers[index](hidden, attention_mask=mask, position_embeddings=rotary)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        want = plain.lm_head(plain.model.norm(hidden))
    torch.testing.assert_close(model_output(model, IDS), want, rtol=1e-4, atol=1e-5)
    out = model.generate(**IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)  # the KV cache has 3 layers
    assert out.shape == (2, 10)


def test_peft_interop_both_ways(tmp_path):
    peft = pytest.importorskip("peft")
    config = dict(r=2, target_modules=["q_proj", "v_proj", "down_proj"], layer_replication=MAP)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**config))
    perturb_trainable(theirs)
    theirs.eval().save_pretrained(tmp_path / "theirs")
    ours = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs")
    torch.testing.assert_close(model_output(ours, IDS), model_output(theirs, IDS), rtol=1e-5, atol=1e-5)
    mine = dt.get_peft_model(tiny_llama(), dt.LoraConfig(**config))
    perturb_trainable(mine, seed=4)
    mine.save_pretrained(tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(model_output(loaded, IDS), model_output(mine.eval(), IDS), rtol=1e-5, atol=1e-5)


def test_a_second_adapter_reuses_the_stack_and_failures_restore_it():
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"], layer_replication=MAP))
    model.add_adapter("other", dt.LoraConfig(r=2, target_modules=["v_proj"], layer_replication=MAP))
    assert len(model.get_base_model().model.layers) == 3
    with pytest.raises(dt.ConfigError, match="replicated by"):
        model.add_adapter("third", dt.LoraConfig(r=2, target_modules=["v_proj"], layer_replication=[[0, 1]]))
    base = tiny_llama()
    with pytest.raises(dt.TargetNotFoundError):
        dt.get_peft_model(base, dt.LoraConfig(target_modules=["nope"], layer_replication=MAP))
    assert len(base.model.layers) == 2 and base.config.num_hidden_layers == 2
    with pytest.raises(dt.ConfigError, match="ranges"):
        dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj"], layer_replication=[[0, 9]]))
