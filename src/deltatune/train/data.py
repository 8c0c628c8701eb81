"""Data: read records, render them with the tokenizer's chat template, mask everything but the responses.

Records are prompt/response pairs or chat `messages`; the loss covers response (assistant) tokens only. The order
of examples is a pure function of (seed, step), so resuming needs nothing but the step number.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deltatune.errors import ConfigError
from deltatune.train.config import DataConfig

IGNORE = -100


def read_records(source: str, split: str = "train") -> list[dict[str, Any]]:
    """Records from a .jsonl/.json/.csv/.parquet file, a `datasets` save_to_disk directory, or "bundled:NAME"."""
    if source.startswith("bundled:"):
        name = source.split(":", 1)[1]
        resource = resources.files("deltatune.data") / f"{name}_{split}.jsonl"
        if not resource.is_file():
            raise ConfigError(f"no bundled dataset {name!r} with a {split!r} split.")
        return [json.loads(line) for line in resource.read_text().splitlines() if line.strip()]
    path = Path(source)
    if path.is_dir():
        import datasets

        return list(datasets.load_from_disk(str(path)))
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = _read_jsonl(path)
    elif suffix == ".json":
        try:
            rows = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}).") from None
        if not isinstance(rows, list):
            raise ConfigError(f"{path}: a .json data file must hold a list of examples, got {type(rows).__name__}.")
    elif suffix == ".csv":
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        raise ConfigError(
            f"{path}: unsupported data format {suffix!r}; use .jsonl, .json, .csv, .parquet or a datasets directory."
        )
    if not rows:
        raise ConfigError(f"{path} holds no examples.")
    return rows


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{path}, line {number}: not valid JSON ({exc.msg} at column {exc.colno}); each line must be one "
                f"JSON object."
            ) from None
        if not isinstance(row, dict):
            raise ConfigError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}.")
        rows.append(row)
    return rows


def check_records(records: list[dict[str, Any]], cfg: DataConfig, source: str) -> None:
    """Every record has the fields `to_messages` needs and at least one assistant turn (checked before any model
    is loaded, so bad data fails in seconds)."""
    if not records:
        raise ConfigError(f"{source} holds no examples.")
    for n, record in enumerate(records):
        try:
            messages = to_messages(record, cfg)
        except ConfigError as exc:
            raise ConfigError(f"{source}: example {n}: {exc}") from None
        if not any(m.get("role") == "assistant" for m in messages):
            raise ConfigError(f"{source}: example {n} has no assistant turn to learn from.")


def _inserts_default_system(tokenizer) -> bool:
    """Whether the chat template puts a system turn of its own before conversations that have none (SmolLM2's
    "You are a helpful AI assistant named SmolLM, ..."): rendering with a sentinel system message then changes only
    that default text into the sentinel."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return False
    if template not in _DEFAULT_SYSTEM:
        user = [{"role": "user", "content": "u"}]
        sentinel = "\x01deltatune-system\x01"
        try:
            plain = tokenizer.apply_chat_template(user, tokenize=False)
            system = [{"role": "system", "content": sentinel}]
            with_system = tokenizer.apply_chat_template([*system, *user], tokenize=False)
        except Exception:  # templates that refuse the system role (Gemma's) insert none either
            _DEFAULT_SYSTEM[template] = False
            return False
        head = len(os.path.commonprefix([plain, with_system]))
        tail = len(os.path.commonprefix([plain[head:][::-1], with_system[head:][::-1]]))
        _DEFAULT_SYSTEM[template] = with_system[head : len(with_system) - tail] == sentinel
    return _DEFAULT_SYSTEM[template]


_DEFAULT_SYSTEM: dict[str, bool] = {}


def render_chat(
    tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False, template_system: bool = False
) -> list[int]:
    """Token ids of `messages` in the tokenizer's chat template (plain "role: content" lines without one).

    A conversation without a system turn gets none: where the template would insert its own default system prompt
    (about 20 tokens on SmolLM2, on every example), an empty system turn takes its place, unless `template_system`.
    Training, scoring and `deltatune generate` all render this way, so a model is asked as it was taught."""
    if getattr(tokenizer, "chat_template", None):
        if not template_system and messages and messages[0]["role"] != "system" and _inserts_default_system(tokenizer):
            messages = [{"role": "system", "content": ""}, *messages]
        out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    if add_generation_prompt:
        text += "assistant: "
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def to_messages(record: dict[str, Any], cfg: DataConfig) -> list[dict[str, str]]:
    """The record as chat messages, after `data.system_prompt` when it is a text and the record has no system turn."""
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    if cfg.messages_field in record:
        messages = list(record[cfg.messages_field])
        return messages if messages and messages[0].get("role") == "system" else [*system, *messages]
    if cfg.prompt_field in record and cfg.response_field in record:
        return [
            *system,
            {"role": "user", "content": str(record[cfg.prompt_field])},
            {"role": "assistant", "content": str(record[cfg.response_field])},
        ]
    raise ConfigError(
        f"example has neither {cfg.messages_field!r} nor {cfg.prompt_field!r}/{cfg.response_field!r}: "
        f"keys {sorted(record)}; set data.prompt_field / data.response_field."
    )


def encode(tokenizer, messages: list[dict[str, str]], template_system: bool = False) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with labels = IGNORE outside assistant turns (rendered as `render_chat` does)."""
    ids = render_chat(tokenizer, messages, template_system=template_system)
    labels = [IGNORE] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render_chat(tokenizer, messages[:i], True, template_system))
        end = len(render_chat(tokenizer, messages[: i + 1], template_system=template_system))
        labels[start:end] = ids[start:end]
    if eos := getattr(tokenizer, "eos_token_id", None):
        if not getattr(tokenizer, "chat_template", None):
            ids, labels = ids + [eos], labels + [eos]
    return ids, labels


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def build_examples(records: list[dict[str, Any]], tokenizer, cfg: DataConfig, source: str) -> list[Example]:
    if not records:
        raise ConfigError(f"{source} holds no examples.")
    examples = []
    for n, record in enumerate(records):
        ids, labels = encode(tokenizer, to_messages(record, cfg), template_system=cfg.system_prompt is None)
        if len(ids) > cfg.max_length:
            raise ConfigError(
                f"{source}: example {n} is {len(ids)} tokens, longer than data.max_length="
                f"{cfg.max_length}; raise max_length or shorten the example."
            )
        if all(label == IGNORE for label in labels):
            raise ConfigError(f"{source}: example {n} has no response tokens to learn from.")
        examples.append(Example(ids, labels))
    return pack(examples, cfg.max_length) if cfg.packing else examples


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Greedy packing into rows of at most max_length tokens, never splitting an example. Attention is not reset at
    example boundaries (transformers' CPU attention has no per-example masks in one row)."""
    rows: list[Example] = []
    for ex in examples:
        if rows and len(rows[-1].input_ids) + len(ex.input_ids) <= max_length:
            rows[-1] = Example(rows[-1].input_ids + ex.input_ids, rows[-1].labels + ex.labels)
        else:
            rows.append(Example(list(ex.input_ids), list(ex.labels)))
    return rows


def collate(examples: list[Example], pad_id: int) -> dict[str, Tensor]:
    """Right-padded batch: input_ids, attention_mask and (unshifted) labels."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
        mask[row, : len(e.input_ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def step_indices(n_examples: int, global_batch: int, step: int, seed: int) -> list[int]:
    """Example indices of optimizer step `step`: epochs are fresh permutations seeded by (seed, epoch)."""
    perms: dict[int, list[int]] = {}
    out = []
    for k in range(step * global_batch, (step + 1) * global_batch):
        epoch, pos = divmod(k, n_examples)
        if epoch not in perms:
            gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
            perms[epoch] = torch.randperm(n_examples, generator=gen).tolist()
        out.append(perms[epoch][pos])
    return out
