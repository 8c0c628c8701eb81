"""`deltatune generate`: one chat turn from a base model plus an optional adapter."""

from __future__ import annotations

from pathlib import Path

import torch

from deltatune.model import PeftModel
from deltatune.pretrained import load_causal_lm
from deltatune.train.data import render_chat


def generate_text(
    model: str,
    adapter: Path | None,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    stream: bool = False,
    system: str = "",
) -> str:
    """The assistant's reply; with `stream`, tokens are printed as they are generated. The prompt is rendered as
    training renders it (`render_chat`): with `system` as its system turn, and without the chat template's own
    default system prompt when `system` is empty."""
    from transformers import TextStreamer

    lm, tokenizer = load_causal_lm(model)
    if adapter is not None:
        lm = PeftModel.from_pretrained(lm, adapter)
    messages = [*([{"role": "system", "content": system}] if system else []), {"role": "user", "content": prompt}]
    ids = torch.tensor([render_chat(tokenizer, messages, add_generation_prompt=True)])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    with torch.no_grad():
        out = lm.generate(
            **inputs, max_new_tokens=max_new_tokens, streamer=streamer, pad_token_id=tokenizer.pad_token_id, **sampling
        )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
