"""`deltatune merge`: base + adapter -> a standalone model directory."""

from __future__ import annotations

from pathlib import Path

from deltatune.model import PeftModel
from deltatune.pretrained import load_causal_lm


def merge_to_dir(model: str, adapter: Path, out: Path) -> Path:
    """Load, merge (float32), and save with safetensors; the tokenizer is saved beside it."""
    base, tokenizer = load_causal_lm(model)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload(safe_merge=True)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
