"""peft as an oracle, both directions: adapters saved by one library load into the other with the same outputs."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from tests.conftest import TINY_MODELS, model_output, perturb_trainable

peft = pytest.importorskip("peft")

CASES = {
    "llama": dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]),
    "gpt2": dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
    "bert": dict(target_modules=["query", "value"], modules_to_save=["classifier"]),
    "mlp": dict(target_modules=["emb", "conv", "conv1d", "lin0", "lin1"]),
    "llama-rslora-patterns": dict(
        target_modules=["q_proj", "up_proj"], use_rslora=True, rank_pattern={"up_proj": 6}, alpha_pattern={"q_proj": 3}
    ),
    "llama-bias-all": dict(target_modules=["q_proj"], bias="all"),
    "llama-embedding": dict(target_modules=["embed_tokens", "q_proj"]),
    "llama-dora": dict(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True),
    "gpt2-dora": dict(target_modules=["c_attn", "c_fc"], use_dora=True, fan_in_fan_out=True),
    # regression: "all-linear" wrapped embed_tokens too, so peft loaded a different set of modules
    "llama-all-linear": dict(target_modules="all-linear"),
    "gpt2-all-linear": dict(target_modules="all-linear", fan_in_fan_out=True),
    "mlp-dora": dict(target_modules=["emb", "conv", "conv1d", "lin0", "lin1"], use_dora=True),  # embedding + convs
    "gpt2-lora-bias": dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, lora_bias=True),
    "bert-lora-bias": dict(target_modules=["query", "value"], lora_bias=True),
}


def _model_for(case: str):
    return TINY_MODELS[case.split("-")[0]]


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_into_deltatune(case, tmp_path):
    factory, _, inputs_fn = _model_for(case)
    inputs = inputs_fn()
    theirs = peft.get_peft_model(factory(), peft.LoraConfig(r=4, lora_alpha=8, **CASES[case]))
    perturb_trainable(theirs)
    theirs.eval()
    want = model_output(theirs, inputs)
    theirs.save_pretrained(tmp_path)
    ours = dt.PeftModel.from_pretrained(factory(), tmp_path)
    torch.testing.assert_close(model_output(ours, inputs), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_deltatune_adapter_loads_into_peft(case, tmp_path):
    factory, _, inputs_fn = _model_for(case)
    inputs = inputs_fn()
    ours = dt.get_peft_model(factory(), dt.LoraConfig(r=4, lora_alpha=8, **CASES[case]))
    perturb_trainable(ours)
    want = model_output(ours, inputs)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(factory(), tmp_path).eval()
    torch.testing.assert_close(model_output(theirs, inputs), want, rtol=1e-5, atol=1e-5)


def test_keys_shapes_and_config_fields_match_peft_exactly(tmp_path):
    import importlib.metadata
    import json

    from safetensors.torch import load_file

    factory, targets, _ = TINY_MODELS["llama"]
    cfg = dict(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.1, rank_pattern={"q_proj": 2})
    peft.get_peft_model(factory(), peft.LoraConfig(**cfg)).save_pretrained(tmp_path / "peft")
    dt.get_peft_model(factory(), dt.LoraConfig(**cfg)).save_pretrained(tmp_path / "ours")
    theirs, ours = (load_file(tmp_path / f"{lib}/adapter_model.safetensors") for lib in ("peft", "ours"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    their_config, our_config = (
        json.loads((tmp_path / lib / "adapter_config.json").read_text()) for lib in ("peft", "ours")
    )
    # every field we write, peft writes with the same value; what only peft writes is provenance or an option we
    # refuse when it is set (so a file that sets it cannot load silently wrong)
    for config in (their_config, our_config):  # peft writes a set, in any order
        config["target_modules"] = sorted(config["target_modules"])
    # provenance: each library records itself as the writer
    assert their_config.pop("peft_version") == peft.__version__
    assert our_config.pop("peft_version") == f"{importlib.metadata.version('deltatune')}+deltatune"
    assert our_config == {k: their_config[k] for k in our_config}
    known = set(dt.LoraConfig.unsupported_fields) | set(dt.LoraConfig.inert_fields) | {"peft_version", "auto_mapping"}
    assert set(their_config) - set(our_config) <= known


def test_unknown_config_field_warns_by_name(tmp_path):
    import json

    from deltatune.errors import UnknownFieldWarning

    factory, targets, _ = TINY_MODELS["llama"]
    dt.get_peft_model(factory(), dt.LoraConfig(r=2, target_modules=targets)).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "lora_future_option": 0.5}))
    with pytest.warns(UnknownFieldWarning, match="lora_future_option"):
        dt.PeftModel.from_pretrained(factory(), tmp_path)


def test_named_adapters_saved_in_subfolders_load_into_peft(tmp_path):
    factory, targets, inputs_fn = TINY_MODELS["llama"]
    inputs = inputs_fn()
    ours = dt.get_peft_model(factory(), dt.LoraConfig(r=4, target_modules=targets))
    ours.add_adapter("other", dt.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    ours.set_adapter("other")
    want = model_output(ours, inputs)
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "other" / "adapter_config.json").exists()
    theirs = peft.PeftModel.from_pretrained(factory(), tmp_path / "other").eval()
    torch.testing.assert_close(model_output(theirs, inputs), want, rtol=1e-5, atol=1e-5)
