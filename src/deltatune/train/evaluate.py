"""Held-out evaluation by greedy generation, scored by exact match (the loss is the objective's: `objectives.py`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deltatune.train.config import DataConfig
from deltatune.train.data import render_chat, to_messages
from deltatune.train.padding_free import SharedPrefill, shared_prefill_supported


def normalized(text: str) -> Any:
    """A JSON value when the text is JSON (so key spacing does not matter), else the stripped text."""
    text = text.strip()
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return text


def exact_match(prediction: str, reference: str) -> bool:
    return normalized(prediction) == normalized(reference)


def answer_is_right(prediction: str, reference: str, match: str = "exact") -> bool:
    """ "exact" (the default): the answer is the reference; "contains": it contains one of the reference's
    "|"-separated words, case-insensitively (for open questions: "Paris" in "The capital is Paris.")."""
    if match == "contains":
        return any(word.lower() in prediction.lower() for word in reference.split("|"))
    return exact_match(prediction, reference)


def _is_right(record: dict[str, Any], answer: str, cfg: DataConfig) -> bool:
    """Whether `answer` is right for `record`, by the record's own rule (`"match"`, default exact)."""
    return answer_is_right(answer, to_messages(record, cfg)[-1]["content"], record.get("match", "exact"))


@dataclass
class GenerationSet:
    """Held-out records scored by greedy generation before and after training."""

    name: str
    records: list[dict[str, Any]]
    max_new_tokens: int
    before: list[str] = field(default_factory=list)
    after: list[str] = field(default_factory=list)

    def score(self, answers: list[str], cfg: DataConfig) -> float:
        hits = [_is_right(r, a, cfg) for a, r in zip(answers, self.records, strict=True)]
        return sum(hits) / max(1, len(hits))

    def samples(self, cfg: DataConfig) -> list[dict[str, Any]]:
        """Prompt, reference, both answers and whether the answer after training is right, per record."""
        out = []
        for record, b, a in zip(self.records, self.before, self.after, strict=False):
            messages = to_messages(record, cfg)
            prompt, reference = messages[-2]["content"], messages[-1]["content"]
            out.append(
                {"prompt": prompt, "reference": reference, "before": b, "after": a, "right": _is_right(record, a, cfg)}
            )
        return out


def generate_for(
    model: nn.Module,
    tokenizer,
    records: list[dict[str, Any]],
    cfg: DataConfig,
    max_new_tokens: int,
    device,
    share_prefixes: bool = False,
) -> list[str]:
    """Greedy answers to the records' prompts (their last assistant turn left out)."""
    template_system = cfg.system_prompt is None
    prompts = [render_chat(tokenizer, to_messages(r, cfg)[:-1], True, template_system) for r in records]
    return generate_answers(model, tokenizer, prompts, max_new_tokens, device, share_prefixes=share_prefixes)


PLAIN_BATCH = 32
"""Prompts a batch holds by default (left padding is computed, so batches are of similar lengths)."""
SHARED_BATCH = 128
"""Prompts a batch holds by default when their prefixes are shared."""
BATCH_TOKENS = 16_384
"""Most prompt tokens in one batch: the shared prefill computes its tree in one row."""


def _batches(order: list[int], prompts: list[list[int]], size: int) -> list[list[int]]:
    """`order` cut into batches of at most `size` prompts and `BATCH_TOKENS` prompt tokens (at least one prompt)."""
    out: list[list[int]] = []
    tokens = 0
    for i in order:
        if not out or len(out[-1]) == size or tokens + len(prompts[i]) > BATCH_TOKENS:
            out.append([])
            tokens = 0
        out[-1].append(i)
        tokens += len(prompts[i])
    return out


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    device,
    batch_size: int | None = None,
    share_prefixes: bool = False,
) -> list[str]:
    """Greedy completions of already-rendered prompts, in their order: left-padded batches of prompts of similar
    length (so padding costs little), with the KV cache; a row stops at the end-of-turn token. `share_prefixes`, for
    a model that passed `padding_free_supported`: the prompts' cache is computed over their prefix tree, each shared
    prefix once (`SharedPrefill`; the same answers, from half the quickstart's prompt tokens). `batch_size` unset: 32
    prompts, or `SHARED_BATCH` with shared prefixes (padding then costs no prefill, and fewer batches are fewer
    decoding steps); a batch never holds more than `BATCH_TOKENS` prompt tokens."""
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    shared = share_prefixes and all(len(p) > 1 for p in prompts) and shared_prefill_supported(model)
    by_length = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: dict[int, str] = {}
    size = batch_size or (SHARED_BATCH if shared else PLAIN_BATCH)
    for rows in _batches(by_length, prompts, size):
        width = max(len(prompts[i]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(rows):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        cache = (
            SharedPrefill(model, [prompts[i] for i in rows], device).cache_for(range(len(rows)), width - 1)
            if shared
            else {}
        )
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=pad,
            **cache,
        )
        answers.update(zip(rows, tokenizer.batch_decode(out[:, width:], skip_special_tokens=True), strict=True))
    return [answers[i] for i in range(len(prompts))]
