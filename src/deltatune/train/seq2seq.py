"""The `seq2seq` task: an encoder-decoder model (T5, BART) learns to write each record's response from its prompt.

The encoder reads the prompt (`data.prompt_field`), the decoder is trained on the response (`data.response_field`,
ending with the tokenizer's end-of-sequence token so the model learns to stop), the loss is the decoder's summed
cross-entropy over response tokens. Held-out examples (the first `generate_eval`) are scored by greedy generation
before and after training: exact match and ROUGE-L (word-level longest common subsequence F1).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.errors import ConfigError
from deltatune.registry import MethodSpec
from deltatune.train.config import TrainConfig
from deltatune.train.data import IGNORE, Example
from deltatune.train.evaluate import exact_match
from deltatune.train.objectives import CausalLMObjective, ClassificationObjective, autocast_for


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over words: the longest common subsequence of the two word lists (lower-cased runs of letters and
    digits, as the `rouge-score` package tokenizes), as precision over the prediction's words and recall over the
    reference's, combined as 2PR / (P + R); 0 when either has no word."""
    predicted, wanted = (re.findall(r"[a-z0-9]+", text.lower()) for text in (prediction, reference))
    if not predicted or not wanted:
        return 0.0
    previous = [0] * (len(wanted) + 1)  # one row of the LCS table at a time
    for word in predicted:
        row = [0]
        for j, other in enumerate(wanted):
            row.append(previous[j] + 1 if word == other else max(previous[j + 1], row[j]))
        previous = row
    common = previous[-1]
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(wanted)
    return 2 * precision * recall / (precision + recall)


@dataclass
class Seq2SeqObjective:
    """Cross-entropy of the decoder over the response tokens, the prompt read by the encoder."""

    cfg: TrainConfig
    scores_predictions = True
    pad_id: int = 0
    eos_id: int | None = None
    tokenizer: Any = None

    def check(self, records: list[dict[str, Any]], source: str) -> None:
        data = self.cfg.data
        for n, record in enumerate(records):
            missing = [f for f in (data.prompt_field, data.response_field) if not isinstance(record.get(f), str)]
            if missing:
                raise ConfigError(
                    f"{source}: example {n} has no text field {missing[0]!r} (keys {sorted(record)}); a seq2seq "
                    "record is {prompt, response}: set data.prompt_field / data.response_field to your names "
                    "(e.g. input / target)."
                )

    def load_model(self) -> tuple[nn.Module, Any]:
        from deltatune.pretrained import load_seq2seq_lm

        return load_seq2seq_lm(self.cfg.model)

    def examples(self, records: list[dict[str, Any]], tokenizer: Any, source: str) -> list[Example]:
        """Example(prompt ids, response ids + end of sequence) per record (the two sides have their own lengths)."""
        data, out = self.cfg.data, []
        self.tokenizer, self.pad_id, self.eos_id = tokenizer, tokenizer.pad_token_id or 0, tokenizer.eos_token_id
        for n, record in enumerate(records):
            prompt = tokenizer(record[data.prompt_field])["input_ids"]
            target = tokenizer(text_target=record[data.response_field])["input_ids"]
            if self.eos_id is not None and (not target or target[-1] != self.eos_id):
                target = [*target, self.eos_id]  # T5's tokenizer adds it; others may not
            longest = max(len(prompt), len(target))
            if longest > data.max_length:
                raise ConfigError(
                    f"{source}: example {n} has {longest} tokens on one side, more than data.max_length="
                    f"{data.max_length}."
                )
            out.append(Example(prompt, target))
        return out

    def prepare(self, model: nn.Module, spec: MethodSpec) -> None:
        """Nothing to lay out: padded rows on both sides (virtual tokens go in front of the encoder's input)."""

    def collate(self, examples: list[Example], pad_id: int) -> dict[str, Tensor]:
        """Right-padded prompts with their attention mask; responses padded with IGNORE as `labels` (the model
        makes its decoder inputs from them, shifted right)."""
        prompts = nn.utils.rnn.pad_sequence(
            [torch.tensor(e.input_ids) for e in examples], batch_first=True, padding_value=pad_id
        )
        mask = nn.utils.rnn.pad_sequence(
            [torch.ones(len(e.input_ids), dtype=torch.long) for e in examples], batch_first=True
        )
        labels = nn.utils.rnn.pad_sequence(
            [torch.tensor(e.labels) for e in examples], batch_first=True, padding_value=IGNORE
        )
        return {"input_ids": prompts, "attention_mask": mask, "labels": labels}

    def loss_sum(self, model: nn.Module, batch: dict[str, Tensor], precision: str) -> Tensor:
        with autocast_for(batch, precision):
            logits = model(**batch).logits
        return nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE, reduction="sum"
        )

    @staticmethod
    def count(batch: dict[str, Tensor]) -> int:
        return int((batch["labels"] != IGNORE).sum())

    def training_layout(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @torch.no_grad()
    def predict(self, model: nn.Module, examples: list[Example], pad_id: int, batch_size: int, device) -> list[str]:
        """Greedy generations for the first `generate_eval` held-out examples (at most max_new_tokens each)."""
        model.eval()
        out: list[str] = []
        scored = examples[: self.cfg.generate_eval]
        for start in range(0, len(scored), batch_size):
            batch = self.collate(scored[start : start + batch_size], pad_id)
            generated = model.generate(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                max_new_tokens=self.cfg.max_new_tokens,
                do_sample=False,
            )
            out += [text.strip() for text in self.tokenizer.batch_decode(generated, skip_special_tokens=True)]
        return out

    def score_predictions(
        self, records: list[dict[str, Any]], before: list[str], after: list[str]
    ) -> tuple[dict[str, tuple[float, float]], list[dict[str, Any]], str]:
        """(scores: held-out exact match and ROUGE-L, before and after; samples; how they were scored)."""
        data = self.cfg.data
        references = [str(r[data.response_field]) for r in records[: len(before)]]

        def mean(metric, predictions: list[str]) -> float:
            return sum(metric(p, r) for p, r in zip(predictions, references, strict=True)) / max(1, len(references))

        scores = {
            "held-out exact match": (mean(exact_match, before), mean(exact_match, after)),
            "held-out ROUGE-L": (mean(rouge_l, before), mean(rouge_l, after)),
        }
        samples = [
            {"prompt": str(r[data.prompt_field]), "reference": ref, "before": b, "after": a,
             "right": exact_match(a, ref)}
            for r, ref, b, a in zip(records, references, before, after, strict=False)
        ]  # fmt: skip
        return scores, samples, "generation (greedy)"

    def adapter_files(self) -> dict[str, str]:
        return {}


def objective_for(cfg: TrainConfig) -> CausalLMObjective | ClassificationObjective | Seq2SeqObjective:
    """The objective of `cfg.task` (`causal_lm` and `classification` in `train.objectives`, `seq2seq` here)."""
    objectives = {
        "causal_lm": CausalLMObjective,
        "classification": ClassificationObjective,
        "seq2seq": Seq2SeqObjective,
    }
    return objectives[cfg.task](cfg)
