"""`recommend`: a starting configuration from the dataset's size, the task and the model, with the reasons.

The prior (each rule says why in the output):
    examples      method and rank                                targets               epochs
    < 100         (IA)³ (few-shot: Liu et al. 2022 beat LoRA and    its family defaults   10
                  in-context learning with ~0.01% of the weights)
    100 - 1k      LoRA r 8, alpha 16                               attention q,k,v,o     5
    1k - 10k      LoRA r 16, alpha 32                              all linear layers     3
    > 10k         LoRA r 32, alpha 64                              all linear layers     2
    classification adds the head (task_type SEQ_CLS) and uses the family's defaults (BERT: query, value).
Learning rate by model size (adapters on small models tolerate more): < 0.5B params 3e-3, < 3B 1e-3, larger 2e-4
((IA)³ ×3). Steps = epochs × examples / batch. When a memory budget is given and the plan does not fit, the advice
moves to QLoRA, then gradient checkpointing, then a smaller batch, and says which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltatune.analysis.plan import GIB, MemoryPlan, model_config, plan_memory
from deltatune.errors import ConfigError


@dataclass
class Recommendation:
    method: dict[str, Any]
    lr: float
    steps: int
    batch: int
    quantize: str | None
    gradient_checkpointing: bool
    reasons: list[str] = field(default_factory=list)
    plan: MemoryPlan | None = None

    def command(self, task: str, data: str | None) -> str:
        """The `deltatune train` line that runs it."""
        method = "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in self.method.items()) + "}"
        parts = ["deltatune train", f'--set "method={method}"', f"--set optim.lr={self.lr:g}",
                 f"--set optim.steps={self.steps}", f"--set optim.batch_size={self.batch}"]  # fmt: skip
        if task == "classification":
            parts.insert(1, "--set task=classification")
        if data:
            parts.append(f"--set data.train={data}")
        if self.quantize:
            parts.append(f"--quantize {self.quantize}")
        if self.gradient_checkpointing:
            parts.append("--set optim.gradient_checkpointing=true")
        return " ".join(parts)


def _flow(value: Any) -> str:
    """A value as YAML flow style (what `--set` parses)."""
    return "[" + ", ".join(map(str, value)) + "]" if isinstance(value, list) else str(value)


def _method_for(examples: int, task: str) -> tuple[dict[str, Any], int, str]:
    if examples < 100:
        return {"peft_type": "IA3"}, 10, f"{examples} examples: few-shot, where (IA)³ beats LoRA (T-Few)"
    if task == "classification":
        return ({"peft_type": "LORA", "r": 8, "lora_alpha": 16}, 5 if examples < 1000 else 3,
                "classification: LoRA r 8 on the family's attention defaults, the head trains with it")  # fmt: skip
    if examples < 1000:
        attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
        return ({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": attention}, 5,
                f"{examples} examples: a small rank on attention learns a narrow skill")  # fmt: skip
    r = 16 if examples < 10_000 else 32
    return ({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": "all-linear"}, 3 if r == 16 else 2,
            f"{examples} examples: enough data for rank {r} on every linear layer (attention and MLP)")  # fmt: skip


def recommend(
    examples: int, task: str = "chat", model: str | Path = "smollm2", budget_gb: float | None = None, seq: int = 512
) -> Recommendation:
    """A starting point for `examples` training records of `task` ("chat" or "classification") on `model`."""
    if examples <= 0:
        raise ConfigError("the dataset has no examples.")
    if task not in ("chat", "classification"):
        raise ConfigError(f"task must be chat or classification, got {task!r}.")
    method, epochs, why = _method_for(examples, task)
    reasons = [why]
    config = model_config(model)
    params = _param_count(config)
    lr = 3e-3 if params < 5e8 else 1e-3 if params < 3e9 else 2e-4
    if method["peft_type"] == "IA3":
        lr *= 3
    reasons.append(f"{params / 1e9:.2f}B parameters: learning rate {lr:g}")
    batch = 8 if examples >= 64 else max(1, examples // 8)
    steps = max(10, math.ceil(epochs * examples / batch))
    reasons.append(f"{epochs} epochs of {examples} examples at batch {batch}: {steps} steps")
    rec = Recommendation(method, lr, steps, batch, None, False, reasons)
    if task == "chat":
        _fit(rec, config, budget_gb, seq)
    return rec


def _param_count(config: Any) -> int:
    import torch

    from deltatune.analysis.plan import _meta_model

    return sum(p.numel() for p in _meta_model(config, torch.bfloat16).parameters())


def _fit(rec: Recommendation, config: Any, budget_gb: float | None, seq: int) -> None:
    """The memory plan, moved to QLoRA / checkpointing / a smaller batch until it fits the budget."""
    method = "ia3" if rec.method["peft_type"] == "IA3" else "lora"
    targets = rec.method.get("target_modules")

    def plan(kind: str) -> MemoryPlan:
        return plan_memory(config, kind, rank=rec.method.get("r", 8), targets=targets, batch=rec.batch, seq=seq,
                           gradient_checkpointing=rec.gradient_checkpointing)  # fmt: skip

    rec.plan = plan(method)
    if budget_gb is None or rec.plan.fits(budget_gb):
        if budget_gb is not None:
            rec.reasons.append(f"peak {rec.plan.peak / GIB:.1f} GiB fits {budget_gb:g} GB")
        return
    if method == "lora":
        rec.quantize, rec.plan = "nf4", plan("qlora")
        rec.reasons.append(
            f"LoRA does not fit {budget_gb:g} GB: QLoRA (4-bit base), peak {rec.plan.peak / GIB:.1f} GiB"
        )
    if not rec.plan.fits(budget_gb):
        rec.gradient_checkpointing = True
        rec.plan = plan("qlora" if rec.quantize else method)
        rec.reasons.append(f"gradient checkpointing: peak {rec.plan.peak / GIB:.1f} GiB")
    if not rec.plan.fits(budget_gb):
        largest = rec.plan.largest_batch(budget_gb)
        if largest == 0:
            rec.reasons.append(f"even one example of {seq} tokens does not fit {budget_gb:g} GB: shorten the sequences")
            return
        rec.steps = math.ceil(rec.steps * rec.batch / largest)
        rec.batch = largest
        rec.reasons.append(f"batch {largest} fits ({rec.steps} steps for the same epochs)")
