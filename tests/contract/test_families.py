"""Method x model family: every cell of docs/methods.md's matrix, checked. A method either runs on the family (a
forward and a backward that reaches its trainable tensors) or is refused when the adapter is added or called, with
an error that says why. The families: a LLaMA-style decoder, GPT-2, BERT, T5 (encoder-decoder), a Stable Diffusion
UNet and a ViT."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.errors import AdapterError, ConfigError
from tests.conftest import tiny_bert, tiny_gpt2, tiny_llama, tiny_seq2seq

diffusers = pytest.importorskip("diffusers")

from tests.interop.test_diffusers import _unet_inputs, tiny_unet  # noqa: E402
from tests.interop.test_peft_vision import bar_images, tiny_vit  # noqa: E402

_IDS = torch.randint(3, 60, (2, 5), generator=torch.Generator().manual_seed(0))
FAMILIES = {
    "llama": (tiny_llama, lambda m: m(input_ids=_IDS).logits, ["q_proj", "v_proj"]),
    "gpt2": (tiny_gpt2, lambda m: m(input_ids=_IDS).logits, ["c_attn"]),
    "bert": (tiny_bert, lambda m: m(input_ids=_IDS).logits, ["query", "value"]),
    "t5": (tiny_seq2seq, lambda m: m(input_ids=_IDS, labels=_IDS[:, :3].contiguous()).logits, ["q", "v"]),
    "unet": (tiny_unet, lambda m: m(*_unet_inputs()[0], **_unet_inputs()[1]).sample, ["to_q", "to_v"]),
    "vit": (tiny_vit, lambda m: m(pixel_values=bar_images(2, 0)[0]).logits, ["q_proj", "v_proj"]),
}
METHODS = {
    "LoRA": lambda t: dt.LoraConfig(r=4, target_modules=t),
    "DoRA": lambda t: dt.LoraConfig(r=4, target_modules=t, use_dora=True),
    "VeRA": lambda t: dt.VeraConfig(r=4, target_modules=t),
    "AdaLoRA": lambda t: dt.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=t),
    "GraLoRA": lambda t: dt.GraloraConfig(r=4, gralora_k=2, target_modules=t),
    "IA3": lambda t: dt.IA3Config(target_modules=t, feedforward_modules=[]),
    "Bottleneck": lambda t: dt.BottleneckConfig(),
    "LN tuning": lambda t: dt.LNTuningConfig(),
    "BitFit": lambda t: dt.SelectiveConfig(),
    "ReFT": lambda t: dt.ReftConfig(r=2),
    "Prompt tuning": lambda t: dt.PromptTuningConfig(num_virtual_tokens=2),
    "P-tuning": lambda t: dt.PromptEncoderConfig(num_virtual_tokens=2, encoder_hidden_size=8),
    "Prefix tuning": lambda t: dt.PrefixTuningConfig(num_virtual_tokens=2),
    "LLaMA-Adapter": lambda t: dt.AdaptionPromptConfig(adapter_len=2, adapter_layers=1),
}
REFUSED = {  # (method, family) -> words of the refusal
    ("BitFit", "llama"): "without biases",
    ("BitFit", "t5"): "without biases",
    ("Bottleneck", "unet"): "set target_modules",
    ("LN tuning", "unet"): "specify `target_modules`",
    ("ReFT", "t5"): "encoder-decoder model; ReFT",
    ("ReFT", "unet"): "set target_modules to the block",
    ("ReFT", "vit"): "neither input_ids nor inputs_embeds",
    **{(m, "unet"): "cannot read the hidden size" for m in ("Prompt tuning", "P-tuning", "Prefix tuning")},
    **{(m, "vit"): "not a table of token embeddings" for m in ("Prompt tuning", "P-tuning", "Prefix tuning")},
    ("LLaMA-Adapter", "gpt2"): "separate q/k/v/o projections",
    ("LLaMA-Adapter", "bert"): "separate q/k/v/o projections",
    ("LLaMA-Adapter", "unet"): "separate q/k/v/o projections",
    ("LLaMA-Adapter", "t5"): "encoder-decoder model; adaption prompts",
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_runs_on_the_family_or_is_refused_with_its_reason(method, family):
    make, run, targets = FAMILIES[family]
    refusal = REFUSED.get((method, family))
    if refusal is not None:
        with pytest.raises((ConfigError, AdapterError), match=refusal):
            run(dt.get_peft_model(make(), METHODS[method](targets)))
        return
    model = dt.get_peft_model(make(), METHODS[method](targets)).train()
    run(model).float().pow(2).mean().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
