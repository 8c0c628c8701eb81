"""Prefix tuning / P-tuning v2 against independent references: the key/value cache of real tokens written into peft's
table layout by the test (a causal model then reads the prefix exactly as those tokens), an encoder's attention
written out by hand, and the published parameter counts."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.models.bert.modeling_bert import BertSelfAttention

import deltatune as dt
from deltatune.errors import ConfigError
from tests.conftest import tiny_bert, tiny_decoder, tiny_gpt2, tiny_llama


def _table_from_cache(cache, layers: int) -> torch.Tensor:
    """peft's (n, L·2·w) layout written out here: per layer its keys then its values, heads flattened."""
    columns = []
    for layer in range(layers):
        for t in (cache.layers[layer].keys, cache.layers[layer].values):  # (1, heads, n, head_dim)
            columns.append(t[0].permute(1, 0, 2).reshape(t.shape[2], -1))
    return torch.cat(columns, dim=1)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama-gqa", "gpt2"])
def test_a_prefix_made_of_real_tokens_keys_and_values_acts_as_those_tokens(factory):
    base = factory()
    context, ids = torch.randint(1, 97, (1, 4)), torch.randint(1, 97, (2, 5))
    cache = base(input_ids=context, use_cache=True).past_key_values
    pm = dt.get_peft_model(factory(), dt.PrefixTuningConfig(num_virtual_tokens=4))
    pm.load_adapter_tensors("default", {"prompt_embeddings": _table_from_cache(cache, 2)})
    want = base(input_ids=torch.cat([context.expand(2, -1), ids], dim=1)).logits[:, 4:]
    torch.testing.assert_close(pm(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    positions = torch.arange(5).expand(2, 5)  # given positions count after the prefix, as peft's
    torch.testing.assert_close(pm(input_ids=ids, position_ids=positions).logits, want, rtol=1e-5, atol=1e-5)


def _attention_with_prefix(prefix_kv):
    """BertSelfAttention.forward written out: softmax(q [Kp; K]ᵀ / √d + mask) [Vp; V], prefix keys always visible."""

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        b, t, _ = hidden_states.shape
        heads, d = self.num_attention_heads, self.attention_head_size
        q, k, v = (m(hidden_states).view(b, t, heads, d).transpose(1, 2) for m in (self.query, self.key, self.value))
        pk, pv = (x.expand(b, -1, -1, -1) for x in prefix_kv[self.layer_idx])
        k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        scores = q @ k.transpose(2, 3) / math.sqrt(d)
        keep = torch.cat([torch.ones(b, pk.shape[2], dtype=torch.bool), MASK.bool()], dim=1)
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, heads * d), None

    return forward


MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])


def test_p_tuning_v2_on_an_encoder_classifier_equals_attention_written_out(monkeypatch):
    pm = dt.get_peft_model(tiny_bert(), dt.PrefixTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS"))
    ids = torch.randint(1, 97, (2, 6))
    out = pm(input_ids=ids, attention_mask=MASK).logits
    table = pm.adapter_state_dict("default")["prompt_embeddings"]
    per_layer = table.view(3, 4, 4, 8).permute(1, 2, 0, 3)  # (2L, heads, n, head_dim)
    prefix_kv = {i: (per_layer[2 * i][None], per_layer[2 * i + 1][None]) for i in range(2)}
    monkeypatch.setattr(BertSelfAttention, "forward", _attention_with_prefix(prefix_kv))
    positions = torch.arange(3, 9).expand(2, 6)  # the input's positions come after the prefix's (peft's too)
    with pm.disable_adapter():
        ref = pm(input_ids=ids, attention_mask=MASK, position_ids=positions).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def _on_meta(cls, config):
    with torch.device("meta"):
        return cls(config)


@pytest.mark.parametrize(
    ("model", "config", "expected"),
    [
        (lambda: _on_meta(GPT2LMHeadModel, GPT2Config(n_embd=1024, n_layer=24, n_head=16)),
         dt.PrefixTuningConfig(num_virtual_tokens=10), 491_520),
        (lambda: _on_meta(GPT2LMHeadModel, GPT2Config(n_embd=1024, n_layer=24, n_head=16)),
         dt.PrefixTuningConfig(num_virtual_tokens=10, prefix_projection=True, encoder_hidden_size=512), 25_750_016),
        (lambda: _on_meta(LlamaForCausalLM, LlamaConfig(hidden_size=4096, intermediate_size=11008,
                                                         num_hidden_layers=32, num_attention_heads=32)),
         dt.PrefixTuningConfig(num_virtual_tokens=30), 7_864_320),
    ],
    ids=["gpt2-medium", "gpt2-medium-projection", "llama-7b"],
)  # fmt: skip
def test_counts_equal_the_published_values(model, config, expected):
    assert dt.get_peft_model(model(), config).get_nb_trainable_parameters()[0] == expected


def test_grouped_query_prefixes_have_the_key_value_width():
    pm = dt.get_peft_model(tiny_llama(), dt.PrefixTuningConfig(num_virtual_tokens=2))
    config = pm.peft_config["default"]
    assert (config.token_dim, config.num_attention_heads, config.num_layers) == (16, 2, 2)  # 2 kv heads of 8


def test_projection_trains_and_saves_its_output_as_the_table(tmp_path):
    config = dt.PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=8)
    pm = dt.get_peft_model(tiny_llama(), config)
    ids = torch.randint(1, 97, (2, 5))
    pm(input_ids=ids).logits.pow(2).mean().backward()
    assert all(p.grad is not None for p in pm.parameters() if p.requires_grad)
    pm.save_pretrained(tmp_path)
    loaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    torch.testing.assert_close(loaded(input_ids=ids).logits, pm(input_ids=ids).logits, rtol=0, atol=0)
    assert loaded.get_nb_trainable_parameters()[0] == 3 * 2 * 2 * 16


def test_zero_init_and_layer_count_checks():
    pm = dt.get_peft_model(tiny_llama(), dt.PrefixTuningConfig(num_virtual_tokens=2, init_weights="zero"))
    assert not pm.adapter_state_dict("default")["prompt_embeddings"].any()
    with pytest.raises(ConfigError, match="num_layers=3"):
        dt.get_peft_model(tiny_llama(), dt.PrefixTuningConfig(num_virtual_tokens=2, num_layers=3))


def test_beam_search_and_several_returned_sequences():
    pm = dt.get_peft_model(tiny_llama(), dt.PrefixTuningConfig(num_virtual_tokens=2))
    ids = torch.randint(3, 97, (2, 5))
    out = pm.generate(input_ids=ids, max_new_tokens=3, num_beams=3, num_return_sequences=2, do_sample=False)
    assert out.shape == (4, 8) and torch.equal(out[::2, :5], ids)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_real_token_prefix_on_other_decoder_families(family):
    base = tiny_decoder(family)
    context, ids = torch.randint(1, 97, (1, 3)), torch.randint(1, 97, (2, 5))
    cache = base(input_ids=context, use_cache=True).past_key_values
    pm = dt.get_peft_model(tiny_decoder(family), dt.PrefixTuningConfig(num_virtual_tokens=3))
    pm.load_adapter_tensors("default", {"prompt_embeddings": _table_from_cache(cache, 2)})
    want = base(input_ids=torch.cat([context.expand(2, -1), ids], dim=1)).logits[:, 3:]
    torch.testing.assert_close(pm(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_roberta_classifier_with_prompts_and_prefixes():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=48, max_position_embeddings=64, num_labels=2)  # fmt: skip
    ids = torch.randint(3, 97, (2, 6))
    prompt = dt.get_peft_model(RobertaForSequenceClassification(config).eval(),
                               dt.PromptTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS"))  # fmt: skip
    rows = prompt.adapter_state_dict("default")["prompt_embeddings"]
    base = prompt.get_base_model()
    with prompt.disable_adapter():
        embeds = torch.cat([rows.expand(2, -1, -1), base.get_input_embeddings()(ids)], dim=1)
        want = base(inputs_embeds=embeds).logits
    torch.testing.assert_close(prompt(input_ids=ids).logits, want, rtol=1e-5, atol=1e-6)
    prefix = dt.get_peft_model(RobertaForSequenceClassification(config).eval(),
                               dt.PrefixTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS"))  # fmt: skip
    out = prefix(input_ids=ids, labels=torch.tensor([0, 1]))
    out.loss.backward()
    assert out.logits.shape == (2, 2) and all(p.grad is not None for p in prefix.parameters() if p.requires_grad)
