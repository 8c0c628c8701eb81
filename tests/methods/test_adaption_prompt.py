"""LLaMA-Adapter: exactly the base at init, the gated prompt attention written out in the test, the paper's count,
the families it supports and refuses."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import deltatune as dt
from deltatune.errors import ConfigError
from tests.conftest import tiny_bert, tiny_decoder, tiny_gpt2, tiny_llama

FAMILIES = ["llama", "mistral", "qwen2"]  # Qwen2: q/k/v with biases


@pytest.mark.parametrize("family", FAMILIES)
def test_starts_exactly_at_the_base_and_moves_when_the_gate_opens(family):
    ids = torch.randint(1, 97, (2, 6))
    base = tiny_decoder(family)(input_ids=ids).logits
    pm = dt.get_peft_model(tiny_decoder(family), dt.AdaptionPromptConfig(adapter_len=3, adapter_layers=2))
    torch.testing.assert_close(pm(input_ids=ids).logits, base, rtol=0, atol=0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "adaption_gate" in name:
                p.fill_(0.5)
    assert not torch.allclose(pm(input_ids=ids).logits, base)


def test_output_gains_the_gated_prompt_attention_written_out():
    pm = dt.get_peft_model(tiny_llama(), dt.AdaptionPromptConfig(adapter_len=3, adapter_layers=1))
    layer = pm.get_base_model().model.layers[1].self_attn
    with torch.no_grad():
        layer.adaption_gate["default"].fill_(0.7)
        layer.adaption_prompt["default"].normal_()
    seen = {}
    layer.base_layer.register_forward_hook(
        lambda m, args, kwargs, out: seen.update(kwargs=kwargs, out=out[0]), with_kwargs=True
    )
    adapted = {}
    layer.register_forward_hook(lambda m, args, out: adapted.update(out=out[0]))
    pm(input_ids=torch.randint(1, 97, (2, 6)))
    attn, h = layer.base_layer, seen["kwargs"]["hidden_states"]
    cos, sin = seen["kwargs"]["position_embeddings"]
    q = attn.q_proj(h).view(2, 6, 4, 8).transpose(1, 2)
    q, _ = apply_rotary_pos_emb(q, q, cos, sin)
    prompt = layer.adaption_prompt["default"][0]  # (3, 32)
    k = attn.k_proj(prompt).view(3, 2, 8).transpose(0, 1).repeat_interleave(2, dim=0)  # 2 kv heads -> 4 heads
    v = attn.v_proj(prompt).view(3, 2, 8).transpose(0, 1).repeat_interleave(2, dim=0)
    weights = 0.7 * torch.softmax(q @ k.transpose(1, 2) / math.sqrt(8), dim=-1)
    term = attn.o_proj((weights @ v).transpose(1, 2).reshape(2, 6, 32))
    torch.testing.assert_close(adapted["out"], seen["out"] + term, rtol=1e-5, atol=1e-6)


def test_count_on_llama_7b_equals_the_papers():
    with torch.device("meta"):
        model = LlamaForCausalLM(
            LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
        )
    pm = dt.get_peft_model(model, dt.AdaptionPromptConfig(adapter_len=10, adapter_layers=30))
    assert pm.get_nb_trainable_parameters()[0] == 1_228_830  # 30 · (10 · 4096 + 1)
    adapted = [n for n, _ in pm.named_parameters() if "adaption_gate" in n]
    assert len(adapted) == 30 and all(".layers.1." not in n and ".layers.0." not in n for n in adapted)


@pytest.mark.parametrize(("factory", "why"), [(tiny_gpt2, "separate q/k/v/o"), (tiny_bert, "separate q/k/v/o")])
def test_families_without_separate_projections_in_one_module_are_refused(factory, why):
    with pytest.raises(ConfigError, match=why):
        dt.get_peft_model(factory(), dt.AdaptionPromptConfig(adapter_len=2, adapter_layers=1))


def test_config_needs_both_sizes_and_no_more_layers_than_the_model():
    with pytest.raises(ConfigError, match="adapter_layers"):
        dt.AdaptionPromptConfig(adapter_len=2, adapter_layers=0)
    with pytest.raises(ConfigError, match="adapter_layers is not set"):  # None is peft's default: refused on a model
        dt.get_peft_model(tiny_llama(), dt.AdaptionPromptConfig(adapter_len=2))
    with pytest.raises(ConfigError, match="adapter_layers=5"):
        dt.get_peft_model(tiny_llama(), dt.AdaptionPromptConfig(adapter_len=2, adapter_layers=5))
