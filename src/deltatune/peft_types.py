"""peft's enums: `TaskType` and `PeftType` (built from the registered methods, so a new method appears by itself)."""

from __future__ import annotations

import enum

from deltatune.registry import list_methods


class TaskType(str, enum.Enum):
    """peft's task types (the `task_type` config field); each selects a task class (`deltatune.tasks`)."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


PeftType = enum.Enum("PeftType", {spec.peft_type: spec.peft_type for spec in list_methods()}, type=str)
PeftType.__doc__ = "The `peft_type` of every method deltatune provides (peft's values)."
