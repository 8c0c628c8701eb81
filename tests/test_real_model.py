"""End to end on the real SmolLM2-135M-Instruct (slow: loads 135M real weights)."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.layers import AdapterLayer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from deltatune.pretrained import load_causal_lm

    try:
        return load_causal_lm()
    except dt.ConfigError as exc:
        pytest.skip(str(exc))


def test_lora_on_smollm2_counts_merges_and_generates_identically(smollm2, tmp_path):
    from deltatune.pretrained import load_causal_lm

    base, tokenizer = smollm2
    r = 8
    model = dt.get_peft_model(
        base, dt.LoraConfig(r=r, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    )
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    assert len(layers) == 4 * base.config.num_hidden_layers
    expected = sum(r * (m.in_features + m.out_features) for m in layers)
    assert model.get_nb_trainable_parameters()[0] == expected == 921_600
    torch.manual_seed(0)
    with torch.no_grad():
        for m in layers:
            m.lora_B["default"].weight.normal_(std=0.02)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name three colours."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        unmerged = model.generate(**prompt, max_new_tokens=16, do_sample=False)
        logits = model(**prompt).logits
        model.merge_adapter()
        merged = model.generate(**prompt, max_new_tokens=16, do_sample=False)
        torch.testing.assert_close(model(**prompt).logits, logits, rtol=1e-4, atol=1e-4)
        model.unmerge_adapter()
    assert torch.equal(unmerged, merged)
    model.save_pretrained(tmp_path)
    reloaded = dt.PeftModel.from_pretrained(load_causal_lm()[0], tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**prompt).logits, logits, rtol=0, atol=0)
