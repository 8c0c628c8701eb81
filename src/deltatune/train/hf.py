"""`transformers.Trainer` integration: the callback that runs a method's per-step hook (AdaLoRA's rank allocation).

    trainer = Trainer(model=peft_model, ..., callbacks=[AdapterHooksCallback()])

Trainer's loss already includes the method's regulariser (`PeftModel.forward` adds it when labels are given).
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback


class AdapterHooksCallback(TrainerCallback):
    """Calls `model.update_and_allocate(step)` after every optimizer step, before gradients are cleared (steps from
    0, as `state.global_step` counts them at that point). A no-op for methods without a per-step hook."""

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        allocate = getattr(model, "update_and_allocate", None)
        if allocate is not None:
            allocate(state.global_step)
