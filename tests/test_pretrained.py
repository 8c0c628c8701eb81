"""The bundled model's converted checkpoint: a clean transformers config, migrated for existing caches."""

from __future__ import annotations

import json

from deltatune import pretrained


def test_old_cached_conversions_are_migrated_to_a_clean_config(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path))
    directory = tmp_path / "models" / pretrained.CONVERTED_NAME
    directory.mkdir(parents=True)
    (directory / "model.safetensors").write_bytes(b"")
    gguf = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": gguf}))
    assert pretrained.default_model_dir() == directory  # found, not converted again
    config = json.loads((directory / "config.json").read_text())
    assert config == {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
