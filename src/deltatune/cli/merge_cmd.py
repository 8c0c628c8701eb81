"""`deltatune merge`: base + adapter -> a standalone model directory; several adapters + weights -> one combined
adapter (or, with --merged, the model with that combination merged in)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deltatune.errors import ConfigError
from deltatune.io import staged_directory
from deltatune.model import PeftModel
from deltatune.pretrained import load_causal_lm


def merge_to_dir(model: str, adapter: Path, out: Path) -> Path:
    """Load, merge (float32), and save with safetensors; the tokenizer is saved beside it."""
    base, tokenizer = load_causal_lm(model)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload(safe_merge=True)
    save_model_dir(merged, tokenizer, out)
    return out


def save_model_dir(model: Any, tokenizer: Any, out: Path) -> None:
    """The model and tokenizer into `out`, staged beside it first: a full disk leaves `out` as it was."""
    with staged_directory(Path(out)) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)


def combine_to_dir(model: str, adapters: list[Path], weights: list[float], out: Path, merged: bool,
                   **options: Any) -> Path:  # fmt: skip
    """`add_weighted_adapter` over saved adapters (options: combination_type, density, svd_rank, ...): the result is
    saved as an adapter in `out`, or merged into the base and saved as a model when `merged`."""
    if len(weights) != len(adapters):
        raise ConfigError(f"--weights has {len(weights)} values for {len(adapters)} adapters; give one per adapter.")
    base, tokenizer = load_causal_lm(model)
    names = [f"adapter_{i}" for i in range(len(adapters))]
    peft_model = PeftModel.from_pretrained(base, adapters[0], adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:], strict=True):
        peft_model.load_adapter(path, name)
    peft_model.add_weighted_adapter(names, weights, "default", **options)  # "default": saved at the folder's root
    peft_model.set_adapter("default")
    if merged:
        for name in names:
            peft_model.delete_adapter(name)
        save_model_dir(peft_model.merge_and_unload(safe_merge=True), tokenizer, out)
        return out
    peft_model.save_pretrained(out, selected_adapters=["default"])
    return out
