"""What a run learns: next-token prediction on responses (`causal_lm`), one label per text (`classification`), or
an encoder-decoder's response to each prompt (`seq2seq`, in `train.seq2seq`).

An objective owns the task's side of the loop: checking and encoding records, loading the model, collating, the
summed loss and the number of terms it sums (the trainer divides by the global count, so gradient accumulation and
data parallelism compute the same gradient), and, for classification, scoring by predicted label.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.chunked_loss import head_returns_inputs, linear_cross_entropy, plain_output_head
from deltatune.errors import ConfigError
from deltatune.registry import MethodSpec
from deltatune.train.config import TrainConfig
from deltatune.train.data import IGNORE, Example, build_examples, check_records, collate
from deltatune.train.padding_free import collate_flat, model_inputs, padding_free_supported, segment_attention


def autocast_for(batch: dict[str, Tensor], precision: str):
    """The autocast context of `optim.precision` on the batch's device (none for fp32)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    device_type = batch["input_ids"].device.type
    return torch.autocast(device_type, dtype=dtype) if dtype else contextlib.nullcontext()


class CausalLMObjective:
    """Cross-entropy of the next token over response (assistant) tokens."""

    scores_predictions = False

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.extra_inputs: tuple[str, ...] = ()
        """Inputs the adapter's method reads besides the base model's (`PeftModel.input_names`); "prompt_lengths"
        (tokens before each row's first response token, e.g. for ReFT's positions) is the one this objective has."""
        self.head_on_responses = False
        """Compute the output head only where a response token is predicted (transformers' boolean `logits_to_keep`):
        the head of a small LLM is a fifth of its FLOPs and responses are a fifth of the tokens. Set by the trainer for
        models that take it and methods that add no virtual positions (`head_on_responses_supported`)."""
        self.chunked_head: nn.Linear | None = None
        """The output head applied chunk by chunk with the loss (`deltatune.chunked_loss`): set by `prepare` where
        `optim.chunked_loss` holds, the head runs on responses only, and it is a plain linear layer."""
        self.padding_free = False
        """Collate a micro-batch as one row without padding, each example attending to itself only
        (`train.padding_free`); set by the trainer where `data.padding_free` holds and the model passes the probe."""

    def check(self, records: list[dict[str, Any]], source: str) -> None:
        check_records(records, self.cfg.data, source)

    def load_model(self) -> tuple[nn.Module, Any]:
        from deltatune.pretrained import load_causal_lm
        from deltatune.quant import QuantConfig

        quant = QuantConfig(quant_type=self.cfg.quantize) if self.cfg.quantize else None
        return load_causal_lm(self.cfg.model, quantize=quant)

    def examples(self, records: list[dict[str, Any]], tokenizer: Any, source: str) -> list[Example]:
        return build_examples(records, tokenizer, self.cfg.data, source)

    def prepare(self, model: nn.Module, spec: MethodSpec) -> None:
        """Lay batches out for this model and method: the inputs the method reads, the output head only at response
        positions, padding-free rows; refuses packing where the method reads rows as rows."""
        self.extra_inputs = model.input_names
        adds_positions = spec.kind == "input"
        per_row = adds_positions or "prompt_lengths" in self.extra_inputs
        if per_row and self.cfg.data.packing:
            why = "puts virtual tokens before each row" if adds_positions else "reads each row's prompt positions"
            raise ConfigError(f"{spec.peft_type} {why}; set data.packing=false.")
        self.head_on_responses = not adds_positions and head_on_responses_supported(model)
        chunked = self.head_on_responses and self.cfg.optim.chunked_loss
        self.chunked_head = plain_output_head(model) if chunked else None
        self.padding_free = self.cfg.data.padding_free and not per_row and padding_free_supported(model)

    def collate(self, examples: list[Example], pad_id: int) -> dict[str, Tensor]:
        if self.padding_free:
            return collate_flat(examples, IGNORE, share_prefixes=self.cfg.data.share_prefixes)
        batch = collate(examples, pad_id)
        if "prompt_lengths" in self.extra_inputs:
            firsts = [next(i for i, label in enumerate(e.labels) if label != IGNORE) for e in examples]
            batch["prompt_lengths"] = torch.tensor(firsts)
        return batch

    def loss_sum(self, model: nn.Module, batch: dict[str, Tensor], precision: str) -> Tensor:
        """Sum of next-token cross-entropies over response tokens (float32)."""
        extra = {name: batch[name] for name in self.extra_inputs if name in batch}
        if "next_targets" in batch:  # one padding-free row: positions restart and attention stays per example
            inputs = {**model_inputs(batch), **extra}
        else:
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], **extra}
        targets = next_targets(batch)
        if self.head_on_responses:
            predicts = targets != IGNORE
            if self.chunked_head is not None:
                return self._chunked_loss_sum(model, inputs, predicts, targets[predicts], batch, precision)
            with autocast_for(batch, precision):
                logits = model(**inputs, logits_to_keep=predicts).logits
            if logits.shape[:-1] != (int(predicts.sum()),):
                shape = tuple(logits.shape)
                raise RuntimeError(f"the model ignored a boolean logits_to_keep (logits of shape {shape})")
            return nn.functional.cross_entropy(logits.float(), targets[predicts], reduction="sum")
        with autocast_for(batch, precision):
            logits = model(**inputs).logits
        logits = logits[:, -targets.shape[1] :]  # a model may put virtual positions first (peft's outputs)
        return nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum"
        )

    def _chunked_loss_sum(self, model, inputs, predicts: Tensor, targets: Tensor, batch, precision: str) -> Tensor:
        head = self.chunked_head
        with autocast_for(batch, precision):
            with head_returns_inputs(head):
                hidden = model(**inputs, logits_to_keep=predicts).logits
            return linear_cross_entropy(hidden, head.weight, targets, head.bias)

    @staticmethod
    def count(batch: dict[str, Tensor]) -> int:
        return int((next_targets(batch) != IGNORE).sum())

    def training_layout(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """The context the loss is computed in: per-example attention for padding-free rows."""
        return segment_attention(model.get_base_model()) if self.padding_free else contextlib.nullcontext()


def next_targets(batch: dict[str, Tensor]) -> Tensor:
    """The label each position predicts (IGNORE where none): a one-row layout carries them; a padded batch's are its
    labels shifted by one (position t predicts the label at t + 1)."""
    if "next_targets" in batch:
        return batch["next_targets"]
    return nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)


def head_on_responses_supported(model: nn.Module) -> bool:
    """Whether `model`'s forward takes a boolean (batch, positions) `logits_to_keep` (transformers >= 5 models with
    `slice_logits_to_keep`; earlier versions read a tensor as one list of positions for every row)."""
    try:
        from transformers.modeling_utils import slice_logits_to_keep  # noqa: F401
    except ImportError:
        return False
    if hasattr(model, "get_base_model"):  # a PeftModel passes the keyword on to the model it wraps
        model = model.get_base_model()
    forward = getattr(model, "forward", None)
    try:
        return forward is not None and "logits_to_keep" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


@dataclass
class ClassificationObjective:
    """Cross-entropy of one label per text (`data.text_field`, `data.label_field`) through a fresh classification
    head (trained and saved with the adapter). The label set is the training data's, in sorted order."""

    cfg: TrainConfig
    labels: list[str] = field(default_factory=list)
    scores_predictions = True

    def check(self, records: list[dict[str, Any]], source: str) -> None:
        data = self.cfg.data
        for n, record in enumerate(records):
            missing = [f for f in (data.text_field, data.label_field) if f not in record]
            if missing:
                raise ConfigError(
                    f"{source}: example {n} has no {missing[0]!r} field (keys {sorted(record)}); set "
                    f"data.text_field / data.label_field."
                )
        if not self.labels:
            self.labels = sorted({str(r[data.label_field]) for r in records})
            if len(self.labels) < 2:
                raise ConfigError(f"{source}: a classification task needs at least 2 labels, found {self.labels}.")
        unknown = sorted({str(r[data.label_field]) for r in records} - set(self.labels))
        if unknown:
            raise ConfigError(f"{source}: labels {unknown} do not occur in the training data ({self.labels}).")

    def load_model(self) -> tuple[nn.Module, Any]:
        from deltatune.pretrained import load_sequence_classifier

        return load_sequence_classifier(self.cfg.model, self.labels)

    def examples(self, records: list[dict[str, Any]], tokenizer: Any, source: str) -> list[Example]:
        data, out = self.cfg.data, []
        for n, record in enumerate(records):
            ids = tokenizer(str(record[data.text_field]))["input_ids"]
            if len(ids) > data.max_length:
                raise ConfigError(
                    f"{source}: example {n} is {len(ids)} tokens, longer than data.max_length={data.max_length}."
                )
            out.append(Example(ids, [self.labels.index(str(record[data.label_field]))]))
        return out

    def prepare(self, model: nn.Module, spec: MethodSpec) -> None:
        """Nothing to lay out: one padded row per text, one label each."""

    def collate(self, examples: list[Example], pad_id: int) -> dict[str, Tensor]:
        batch = collate([Example(e.input_ids, [IGNORE] * len(e.input_ids)) for e in examples], pad_id)
        batch["labels"] = torch.tensor([e.labels[0] for e in examples], dtype=torch.long)
        return batch

    def loss_sum(self, model: nn.Module, batch: dict[str, Tensor], precision: str) -> Tensor:
        with autocast_for(batch, precision):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum")

    @staticmethod
    def count(batch: dict[str, Tensor]) -> int:
        return len(batch["labels"])

    def training_layout(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def score_predictions(
        self, records: list[dict[str, Any]], before: list[str], after: list[str]
    ) -> tuple[dict[str, tuple[float, float]], list[dict[str, Any]], str]:
        """(held-out accuracy before and after; each example's predictions; how they were scored)."""
        data = self.cfg.data
        references = [str(r[data.label_field]) for r in records]
        accuracy = [
            sum(p == r for p, r in zip(preds, references, strict=True)) / len(references) for preds in (before, after)
        ]
        samples = [
            {"prompt": str(record[data.text_field]), "reference": ref, "before": b, "after": a, "right": a == ref}
            for record, ref, b, a in zip(records, references, before, after, strict=True)
        ]
        return {"held-out accuracy": (accuracy[0], accuracy[1])}, samples, "predicted label"

    def adapter_files(self) -> dict[str, str]:
        """Files saved beside the adapter: which output of the head is which label."""
        return {"labels.json": json.dumps(self.labels)}

    @torch.no_grad()
    def predict(self, model: nn.Module, examples: list[Example], pad_id: int, batch_size: int, device) -> list[str]:
        """The predicted label of each example."""
        model.eval()
        out: list[str] = []
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in self.collate(examples[start : start + batch_size], pad_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            out += [self.labels[i] for i in logits.argmax(-1).tolist()]
        return out


@torch.no_grad()
def eval_loss(objective, model: nn.Module, examples: list[Example], pad_id: int, batch_size: int, device) -> float:
    """Mean loss per term (response token, or example) over held-out examples."""
    total, count = 0.0, 0
    model.eval()
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in objective.collate(examples[start : start + batch_size], pad_id).items()}
        total += objective.loss_sum(model, batch, "fp32").item()
        count += objective.count(batch)
    return total / max(1, count)
