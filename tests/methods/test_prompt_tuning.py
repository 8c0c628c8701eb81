"""Prompt tuning and P-tuning against hand-built references: the virtual tokens concatenated to the input's embeddings
by the test, the inits, the papers' parameter counts, the folded P-tuning file."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import deltatune as dt
from deltatune.errors import ConfigError
from tests.conftest import tiny_bert, tiny_gpt2, tiny_llama, tiny_tokenizer

N = 4


def _rows(pm) -> torch.Tensor:
    return pm.adapter_state_dict(pm.active_adapter)["prompt_embeddings"]


def _by_hand(base, rows, ids, mask, **kw):
    """The base model on [rows; embeddings of ids] with the mask extended by n ones."""
    embeds = torch.cat([rows.expand(ids.shape[0], -1, -1), base.get_input_embeddings()(ids)], dim=1)
    mask = torch.cat([torch.ones(ids.shape[0], rows.shape[0], dtype=mask.dtype), mask], dim=1)
    return base(inputs_embeds=embeds, attention_mask=mask, **kw)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("config_cls", [dt.PromptTuningConfig, dt.PromptEncoderConfig])
def test_causal_forward_and_loss_equal_virtual_tokens_concatenated_by_hand(factory, config_cls):
    pm = dt.get_peft_model(factory(), config_cls(num_virtual_tokens=N, task_type="CAUSAL_LM"))
    ids = torch.randint(1, 97, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    out = pm(input_ids=ids, attention_mask=mask, labels=ids)
    labels = torch.cat([torch.full((2, N), -100), ids], dim=1)  # virtual positions out of the loss
    with pm.disable_adapter():
        ref = _by_hand(pm.get_base_model(), _rows(pm), ids, mask, labels=labels)
    assert out.logits.shape == (2, N + 6, 97)  # peft's layout: virtual positions first
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)


def test_inputs_embeds_and_positional_ids_give_the_same_as_input_ids():
    pm = dt.get_peft_model(tiny_llama(), dt.PromptTuningConfig(num_virtual_tokens=N))
    ids = torch.randint(1, 97, (2, 6))
    want = pm(input_ids=ids).logits
    embeds = pm.get_base_model().get_input_embeddings()(ids)
    torch.testing.assert_close(pm(inputs_embeds=embeds).logits, want, rtol=0, atol=0)
    torch.testing.assert_close(pm(ids).logits, want, rtol=0, atol=0)


def test_encoder_classifier_reads_the_prompts_as_leading_tokens():
    pm = dt.get_peft_model(tiny_bert(), dt.PromptTuningConfig(num_virtual_tokens=N, task_type="SEQ_CLS"))
    ids = torch.randint(1, 97, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    types = torch.zeros_like(ids)
    out = pm(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=torch.tensor([0, 2]))
    with pm.disable_adapter():
        ref = _by_hand(pm.get_base_model(), _rows(pm), ids, mask, labels=torch.tensor([0, 2]))
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-6)
    assert {n for n, p in pm.named_parameters() if p.requires_grad} >= {
        "base_model.model.classifier.modules_to_save.default.weight"
    }


def test_sample_vocab_init_takes_rows_of_the_embedding_table():
    torch.manual_seed(0)
    pm = dt.get_peft_model(tiny_llama(), dt.PromptTuningConfig(num_virtual_tokens=N, prompt_tuning_init="SAMPLE_VOCAB"))
    table = pm.get_base_model().get_input_embeddings().weight
    for row in _rows(pm):
        assert (table == row).all(-1).any()


def test_text_init_takes_the_texts_token_embeddings_repeated_to_n(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    config = dt.PromptTuningConfig(
        num_virtual_tokens=7,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="abc",
        tokenizer_name_or_path=str(tmp_path),
    )
    model = tiny_llama()
    table = model.get_input_embeddings().weight.detach().clone()
    pm = dt.get_peft_model(model, config)
    ids = tokenizer("abc")["input_ids"]
    expected = [ids[i % len(ids)] for i in range(7)]
    torch.testing.assert_close(_rows(pm), table[expected])


def test_text_init_without_a_tokenizer_is_refused():
    with pytest.raises(ConfigError, match="tokenizer_name_or_path"):
        dt.PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi")


def test_module_fields_are_refused_by_name():
    with pytest.raises(ConfigError, match="target_modules"):
        dt.PromptTuningConfig(num_virtual_tokens=2, target_modules=["q_proj"])
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        dt.PromptTuningConfig(num_virtual_tokens=0)


def test_an_unset_token_count_is_refused_when_the_adapter_is_added():
    # peft builds `PromptTuningConfig()` (count None) and needs the count only on a model: so do we, by name
    config = dt.PromptTuningConfig()
    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="num_virtual_tokens is not set"):
        dt.get_peft_model(model, config)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def _gpt2_medium_on_meta():
    with torch.device("meta"):
        return GPT2LMHeadModel(GPT2Config(n_embd=1024, n_layer=24, n_head=16))


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (dt.PromptTuningConfig(num_virtual_tokens=20), 20_480),
        (dt.PromptEncoderConfig(num_virtual_tokens=20), 3_169_280),  # MLP, h = d
        (dt.PromptEncoderConfig(num_virtual_tokens=20, encoder_reparameterization_type="LSTM", encoder_hidden_size=128),
         1_926_400),
    ],
    ids=["prompt", "p-tuning-mlp", "p-tuning-lstm"],
)  # fmt: skip
def test_counts_equal_the_published_values_on_gpt2_medium(config, expected):
    pm = dt.get_peft_model(_gpt2_medium_on_meta(), config)
    assert pm.get_nb_trainable_parameters()[0] == expected


def test_p_tuning_saves_its_encoder_output_and_loads_as_that_table(tmp_path):
    pm = dt.get_peft_model(tiny_llama(), dt.PromptEncoderConfig(num_virtual_tokens=N, encoder_hidden_size=8))
    ids = torch.randint(1, 97, (2, 5))
    want = pm(input_ids=ids).logits
    encoder = pm.get_base_model().get_input_embeddings().prompt_embeddings["default"]
    pm.save_pretrained(tmp_path)
    trainable = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    torch.testing.assert_close(trainable(input_ids=ids).logits, want, rtol=0, atol=0)
    assert trainable.get_nb_trainable_parameters()[0] == N * 32  # the table trains (the encoder is not saved)
    with torch.no_grad():
        torch.testing.assert_close(_rows(trainable), encoder())


def test_lstm_encoder_trains():
    config = dt.PromptEncoderConfig(num_virtual_tokens=N, encoder_reparameterization_type="LSTM", encoder_hidden_size=8)
    pm = dt.get_peft_model(tiny_llama(), config)
    pm(input_ids=torch.randint(1, 97, (2, 5))).logits.pow(2).mean().backward()
    assert all(p.grad is not None for p in pm.parameters() if p.requires_grad)


def test_generate_keeps_the_callers_length_limits():
    pm = dt.get_peft_model(tiny_llama(), dt.PromptTuningConfig(num_virtual_tokens=N))
    ids = torch.randint(3, 97, (1, 5))
    out = pm.generate(input_ids=ids, max_length=9, min_length=9, do_sample=False)
    assert out.shape == (1, 9) and torch.equal(out[:, :5], ids)


def test_prompt_and_lora_adapters_share_a_model_and_apply_together(tmp_path):
    pm = dt.get_peft_model(
        tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    pm.add_adapter("prompt", dt.PromptTuningConfig(num_virtual_tokens=N))
    ids = torch.randint(1, 97, (2, 5))
    mask = torch.ones_like(ids)
    pm.set_adapter(["default", "prompt"])
    both = pm(input_ids=ids, attention_mask=mask).logits
    rows = pm.adapter_state_dict("prompt")["prompt_embeddings"]
    pm.set_adapter("default")
    lora_only = pm(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(both, _by_hand(pm, rows, ids, mask).logits, rtol=1e-5, atol=1e-6)  # LoRA reads them
    assert lora_only.shape[1] == 5 and not torch.allclose(both[:, N:], lora_only)
    pm.save_pretrained(tmp_path)
    loaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    loaded.load_adapter(tmp_path / "prompt", "prompt")
    loaded.set_adapter(["default", "prompt"])
    pm.set_adapter(["default", "prompt"])
    both = pm.eval()(input_ids=ids, attention_mask=mask).logits  # both in eval: the same arithmetic, bit for bit
    torch.testing.assert_close(loaded.eval()(input_ids=ids, attention_mask=mask).logits, both, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="one layer method and one input method"):
        pm.add_adapter("p2", dt.PrefixTuningConfig(num_virtual_tokens=2))


@pytest.mark.parametrize(
    "config",
    [
        dt.PromptTuningConfig(num_virtual_tokens=64),
        dt.PrefixTuningConfig(num_virtual_tokens=1000),
        dt.PromptEncoderConfig(num_virtual_tokens=10**6, encoder_hidden_size=8),
    ],
    ids=["prompt", "prefix", "p-tuning"],
)
def test_virtual_tokens_that_fill_the_context_are_refused_and_the_model_is_untouched(config):
    base = tiny_llama()  # max_position_embeddings = 64
    before = {k: v.clone() for k, v in base.state_dict().items()}
    modules = [type(m) for m in base.modules()]
    with pytest.raises(ConfigError, match=r"num_virtual_tokens=\d+ leaves no room.*at most 64 positions"):
        dt.get_peft_model(base, config)
    assert [type(m) for m in base.modules()] == modules
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
