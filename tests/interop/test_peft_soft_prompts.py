"""peft as an oracle for prompt tuning, P-tuning, prefix tuning and LLaMA-Adapter, both directions: an adapter
saved by one library loads into the other with the same outputs (causal LM and classification)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from tests.conftest import tiny_bert, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}
CASES = {
    "prompt-llama": ("PromptTuningConfig", dict(num_virtual_tokens=4, task_type="CAUSAL_LM")),
    "prompt-gpt2": ("PromptTuningConfig", dict(num_virtual_tokens=4, task_type="CAUSAL_LM")),
    "prompt-bert": ("PromptTuningConfig", dict(num_virtual_tokens=4, task_type="SEQ_CLS")),
    "ptuning-llama": ("PromptEncoderConfig", dict(num_virtual_tokens=4, encoder_hidden_size=8, task_type="CAUSAL_LM")),
    "ptuning-bert": ("PromptEncoderConfig", dict(num_virtual_tokens=4, encoder_hidden_size=8, task_type="SEQ_CLS")),
    "prefix-llama": ("PrefixTuningConfig", dict(num_virtual_tokens=4, task_type="CAUSAL_LM")),  # GQA
    "prefix-gpt2": ("PrefixTuningConfig", dict(num_virtual_tokens=4, task_type="CAUSAL_LM")),
    "adaption-llama": ("AdaptionPromptConfig", dict(adapter_len=4, adapter_layers=2, task_type="CAUSAL_LM")),
}


def _inputs():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 97, (2, 6), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _trained(lib, case):
    """A fresh adapter of `lib`, moved off its init (gates opened, tables and heads perturbed) as training would."""
    config_name, kwargs = CASES[case]
    model = lib.get_peft_model(MODELS[case.split("-")[1]](), getattr(lib, config_name)(**kwargs))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("direction", ["peft->deltatune", "deltatune->peft"])
def test_adapter_moves_between_the_libraries(case, direction, tmp_path):
    source, target = (peft, dt) if direction == "peft->deltatune" else (dt, peft)
    model = _trained(source, case)
    inputs = _inputs()
    want = model(**inputs).logits
    model.save_pretrained(tmp_path)
    loaded = target.PeftModel.from_pretrained(MODELS[case.split("-")[1]](), tmp_path).eval()
    torch.testing.assert_close(loaded(**inputs).logits, want, rtol=1e-5, atol=1e-5)


def test_peft_prefix_file_for_an_encoder_loads_into_deltatune(tmp_path):
    """peft cannot run prefix tuning on BERT with this transformers (its forward looks for `past_key_values`, renamed
    `cache`); its file still loads here, as its table, and runs."""
    config = peft.PrefixTuningConfig(num_virtual_tokens=4, task_type="SEQ_CLS")
    model = peft.get_peft_model(tiny_bert(), config)
    table = torch.randn(4, 2 * 2 * 32)
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.copy_(table)
    model.save_pretrained(tmp_path)
    loaded = dt.PeftModel.from_pretrained(tiny_bert(), tmp_path)
    torch.testing.assert_close(loaded.adapter_state_dict("default")["prompt_embeddings"], table)
    own = dt.get_peft_model(tiny_bert(), dt.PrefixTuningConfig(num_virtual_tokens=4, task_type="SEQ_CLS"))
    own.load_adapter_tensors("default", {k: v for k, v in load_file(tmp_path / "adapter_model.safetensors").items()})
    torch.testing.assert_close(loaded(**_inputs()).logits, own.eval()(**_inputs()).logits, rtol=0, atol=0)
