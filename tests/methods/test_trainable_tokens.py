"""trainable_token_indices: only the chosen embedding rows train (and a tied output head follows them); saved and
loaded as peft does, outputs equal peft's both ways; merge writes the rows and unmerge restores them exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from tests.conftest import model_output, perturb_trainable, tiny_llama

IDS = {"input_ids": torch.tensor([[1, 3, 5, 7, 9, 11], [7, 2, 3, 40, 5, 6]])}
TOKENS = [3, 5, 7]


@pytest.mark.parametrize("tied", [False, True])
def test_only_the_chosen_rows_train_and_a_tied_head_follows(tied):
    base_embedding = tiny_llama(tied).model.embed_tokens.weight.detach().clone()
    model = dt.get_peft_model(
        tiny_llama(tied), dt.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=TOKENS)
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trainable == {"base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default"}
    perturb_trainable(model)
    delta = model.get_base_model().model.embed_tokens.trainable_tokens_delta["default"].detach()
    embedded = model.get_base_model().model.embed_tokens(torch.arange(97))
    expected = base_embedding.clone()
    expected[TOKENS] = delta  # E' = E with the chosen rows replaced
    torch.testing.assert_close(embedded, expected)
    head = model.get_base_model().lm_head
    hidden = torch.randn(2, 32)
    head_weight = expected if tied else tiny_llama(tied).lm_head.weight.detach()
    torch.testing.assert_close(head(hidden), hidden @ head_weight.T, rtol=1e-5, atol=1e-5)
    # one gradient step touches the chosen rows' vectors only
    loss = model(**IDS, labels=IDS["input_ids"]).loss
    loss.backward()
    assert model.get_base_model().model.embed_tokens.trainable_tokens_delta["default"].grad.abs().sum() > 0


@pytest.mark.parametrize("tied", [False, True])
def test_peft_interop_both_ways_and_the_same_saved_keys(tied, tmp_path):
    peft = pytest.importorskip("peft")
    config = dict(r=2, target_modules=["q_proj"], trainable_token_indices=TOKENS)
    theirs = peft.get_peft_model(tiny_llama(tied), peft.LoraConfig(**config))
    perturb_trainable(theirs)
    theirs.eval()
    theirs.save_pretrained(tmp_path / "theirs")
    ours = dt.PeftModel.from_pretrained(tiny_llama(tied), tmp_path / "theirs")
    torch.testing.assert_close(model_output(ours, IDS), model_output(theirs, IDS), rtol=1e-5, atol=1e-5)

    mine = dt.get_peft_model(tiny_llama(tied), dt.LoraConfig(**config))
    perturb_trainable(mine, seed=5)
    mine.save_pretrained(tmp_path / "ours")
    assert (
        load_file(tmp_path / "ours" / "adapter_model.safetensors").keys()
        == load_file(tmp_path / "theirs" / "adapter_model.safetensors").keys()
    )
    loaded = peft.PeftModel.from_pretrained(tiny_llama(tied), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(model_output(loaded, IDS), model_output(mine.eval(), IDS), rtol=1e-5, atol=1e-5)


def test_merge_writes_the_rows_unmerge_restores_them_and_unload_keeps_the_tie():
    base = tiny_llama(True)
    original = base.model.embed_tokens.weight.detach().clone()
    model = dt.get_peft_model(base, dt.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=TOKENS))
    perturb_trainable(model)
    want = model_output(model, IDS)
    model.merge_adapter()
    torch.testing.assert_close(model_output(model, IDS), want, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    assert torch.equal(model.get_base_model().model.embed_tokens.get_base_layer().weight, original)
    merged = model.merge_and_unload()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    torch.testing.assert_close(model_output(merged, IDS), want, rtol=1e-5, atol=1e-5)


def test_dict_form_and_refusals():
    model = dt.get_peft_model(
        tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [4]})
    )
    assert model.get_base_model().model.embed_tokens.token_indices == {"default": [4]}
    with pytest.raises(dt.ConfigError, match="must lie in"):
        dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[500]))
    with pytest.raises(dt.ConfigError, match="modules_to_save"):
        dt.get_peft_model(
            tiny_llama(),
            dt.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[4], modules_to_save=["embed_tokens"]),
        )
    with pytest.raises(dt.ConfigError, match="adapted already"):
        dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["embed_tokens"], trainable_token_indices=[4]))
    with pytest.raises(dt.ConfigError, match="trainable_token_indices"):
        dt.LoraConfig(trainable_token_indices=["a"])
    with pytest.raises(dt.ConfigError, match="different token"):
        dt.get_peft_model(
            tiny_llama(True),
            dt.LoraConfig(
                target_modules=["q_proj"],
                trainable_token_indices={"embed_tokens": [4], "lm_head": [5]},
                ensure_weight_tying=True,
            ),
        )
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(dt.ConfigError):  # a failed injection leaves the model as it was
        dt.get_peft_model(base, dt.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[3, 3]))
    from deltatune.layers import AdapterLayer

    assert not any(isinstance(m, AdapterLayer) for m in base.modules())
    assert (
        all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
        and base.state_dict().keys() == before.keys()
    )


@pytest.mark.parametrize("saved", [["embed_tokens"], ["lm_head"]])
def test_ensure_weight_tying_keeps_whole_copies_tied_like_peft(saved, tmp_path):
    peft = pytest.importorskip("peft")
    config = dict(r=2, target_modules=["q_proj"], modules_to_save=list(saved), ensure_weight_tying=True)
    ours = dt.get_peft_model(tiny_llama(True), dt.LoraConfig(**config))
    inner = ours.get_base_model()
    head, embedding = inner.lm_head.modules_to_save["default"], inner.model.embed_tokens.modules_to_save["default"]
    assert head.weight is embedding.weight and head.weight.requires_grad  # one trainable table
    perturb_trainable(ours)
    ours.eval()
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(True), str(tmp_path)).eval()
    torch.testing.assert_close(model_output(theirs, IDS), model_output(ours, IDS), rtol=1e-5, atol=1e-5)
    back = dt.PeftModel.from_pretrained(tiny_llama(True), tmp_path)
    torch.testing.assert_close(model_output(back, IDS), model_output(ours, IDS), rtol=1e-5, atol=1e-5)
    merged = ours.merge_and_unload()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
