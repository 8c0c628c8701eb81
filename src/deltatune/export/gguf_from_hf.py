"""`export_gguf_from_hf`: a transformers model directory (optionally with an adapter merged in) as a standalone GGUF
for llama.cpp / Ollama, written with the `gguf` package: no llama.cpp scripts at run time.

What is written: the architecture's hyperparameters under llama.cpp's keys (block count, context length, widths,
heads and key/value heads, rotary base and dimension, RMS-norm epsilon, vocabulary size), the tokenizer (a byte-level
BPE `tokenizer.json`: tokens in id order, their types (control for special added tokens, user-defined for other added
ones), merges, bos/eos/unk/pad ids, whether to add bos, the chat template) and every weight under the names of gguf's
tensor-name map, LLaMA-family q/k rows permuted into llama.cpp's rotary layout. Norms and other 1-D tensors are f32,
matrices `outtype` (f16 by default; f32, bf16, q8_0). A tied output head is left out (llama.cpp reuses the token
embeddings).

The pre-tokenizer must be one llama.cpp knows how to reproduce: byte-level with GPT-2's split ("gpt-2"), or with
digits split one by one first ("smollm"); anything else is refused by name rather than written as a tokenizer that
would split text differently from the model's own.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from deltatune.errors import ConfigError

FROM_HF_OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def _pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for the pre-tokenizer in a tokenizer.json, or ConfigError."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [(s.get("type"), s.get("individual_digits"), s.get("use_regex", True)) for s in steps]
    if kinds == [("ByteLevel", None, True)]:
        return "gpt-2"
    if kinds == [("Digits", True, True), ("ByteLevel", None, True)]:
        return "smollm"
    raise ConfigError(
        f"the tokenizer's pre-tokenizer {json.dumps(pre)[:200]} is not one deltatune maps to llama.cpp (byte-level "
        "GPT-2, optionally with single digits): convert this model with llama.cpp's convert_hf_to_gguf.py instead."
    )


def _add_tokenizer(writer, gguf, model_dir: Path, tokenizer, vocab_size: int) -> None:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"{model_dir} has no tokenizer.json (a fast tokenizer): GGUF export needs it.")
    data = json.loads(path.read_text())
    if data["model"]["type"] != "BPE":
        raise ConfigError(f"tokenizer model {data['model']['type']!r}: GGUF export supports byte-level BPE tokenizers.")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {a["id"]: a["special"] for a in data.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        if i not in by_id:
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            types.append(gguf.TokenType.CONTROL if added[i] else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(data))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{name}_token_id")(token_id)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    writer.add_add_space_prefix(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _add_hyperparameters(writer, config, family_name: str) -> None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    rope = getattr(text, "rope_parameters", None) or {}
    writer.add_name(str(getattr(config, "_name_or_path", "") or family_name))
    writer.add_block_count(text.num_hidden_layers)
    writer.add_context_length(text.max_position_embeddings)
    writer.add_embedding_length(text.hidden_size)
    writer.add_feed_forward_length(text.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(text, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(text, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(float(text.rms_norm_eps))
    writer.add_vocab_size(text.vocab_size)
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"rope_type {rope['rope_type']!r}: GGUF export writes plain rotary positions only.")


def _tensor_data(values: torch.Tensor, outtype: str, gguf):
    array = values.detach().float().numpy()
    if array.ndim == 1 or outtype == "f32":
        return array.astype(np.float32), None
    if outtype == "f16":
        return array.astype(np.float16), None
    kind = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]
    return gguf.quants.quantize(array, kind), kind


def export_gguf_from_hf(
    model_dir: str | Path, out: str | Path, adapter_dir: str | Path | None = None, outtype: str = "f16"
) -> Path:
    """Write the model in `model_dir` (with the adapter in `adapter_dir` merged in, if given) to the GGUF `out`, and
    an Ollama `Modelfile` beside it."""
    from deltatune.export.gguf_adapter import _ARCHS, gguf_row_order, require_gguf
    from deltatune.export.gguf_merged import finish_model_file
    from deltatune.model import PeftModel
    from deltatune.pretrained import load_causal_lm

    gguf = require_gguf()
    model_dir, out = Path(model_dir), Path(out)
    if outtype not in FROM_HF_OUTTYPES:
        raise ConfigError(f"outtype {outtype!r} is not one of {', '.join(FROM_HF_OUTTYPES)}.")
    model, tokenizer = load_causal_lm(model_dir)
    family = model.config.model_type
    if family not in _ARCHS:
        raise ConfigError(f"model_type {family!r}: GGUF export knows {sorted(_ARCHS)}.")
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()  # any method that merges
    arch = getattr(gguf.MODEL_ARCH, _ARCHS[family])
    config = model.config
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type("model")
    _add_hyperparameters(writer, config, family)
    writer.add_file_type({"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, gguf, model_dir, tokenizer, config.vocab_size)
    tied, config_dict = bool(getattr(config, "tie_word_embeddings", False)), config.to_dict()
    for name, tensor in model.state_dict().items():
        if tied and name.startswith("lm_head."):
            continue  # llama.cpp uses token_embd for a model without output.weight
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ConfigError(f"{name}: no GGUF tensor name for it in gguf's map of {family!r}.")
        module, _, leaf = name.rpartition(".")
        if leaf == "weight":
            tensor = gguf_row_order(tensor, module, family, config_dict)
        data, kind = _tensor_data(tensor, outtype, gguf)
        writer.add_tensor(target, data, raw_dtype=kind)
    return finish_model_file(writer, out)
