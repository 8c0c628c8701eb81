"""Auto classes (peft's names): open an adapter directory and get base + adapter in one call.

    model = deltatune.AutoPeftModelForCausalLM.from_pretrained("out/")   # base from base_model_name_or_path

The base model comes from the config's `base_model_name_or_path` through the transformers auto class of the
adapter's `task_type`; an adapter without one names its base class in `auto_mapping` (written on save, as peft
does), and only classes from `transformers` are imported from it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from deltatune.config import AdapterConfig
from deltatune.errors import ConfigError
from deltatune.model import PeftModel
from deltatune.peft_types import TaskType

_AUTO_CLASS_OF_TASK = {
    TaskType.CAUSAL_LM.value: "AutoModelForCausalLM",
    TaskType.SEQ_CLS.value: "AutoModelForSequenceClassification",
    TaskType.SEQ_2_SEQ_LM.value: "AutoModelForSeq2SeqLM",
    TaskType.TOKEN_CLS.value: "AutoModelForTokenClassification",
    TaskType.QUESTION_ANS.value: "AutoModelForQuestionAnswering",
    TaskType.FEATURE_EXTRACTION.value: "AutoModel",
}


class AutoPeftModel:
    """Base + adapter from an adapter directory; the subclasses fix the task."""

    task_type: str | None = None

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: AdapterConfig | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Load the base named in the adapter's config (extra keyword arguments go to the base's
        `from_pretrained`, e.g. `dtype`), then the adapter onto it."""
        config = config or AdapterConfig.from_pretrained(pretrained_model_name_or_path)
        if not config.base_model_name_or_path:
            raise ConfigError(f"{pretrained_model_name_or_path}: its config has no base_model_name_or_path to load.")
        base = cls._base_class(config, pretrained_model_name_or_path).from_pretrained(
            config.base_model_name_or_path, **kwargs
        )
        return PeftModel.from_pretrained(
            base, pretrained_model_name_or_path, adapter_name=adapter_name, is_trainable=is_trainable, config=config
        )

    @classmethod
    def _base_class(cls, config: AdapterConfig, where: str | Path) -> type:
        import transformers

        task = config.task_type.value if isinstance(config.task_type, TaskType) else config.task_type
        if cls.task_type is not None:
            if task is not None and task != cls.task_type:
                raise ConfigError(f"{where} is a {task} adapter; open it with the auto class of that task.")
            return getattr(transformers, _AUTO_CLASS_OF_TASK[cls.task_type])
        if task is not None:
            return getattr(transformers, _AUTO_CLASS_OF_TASK[task])
        mapping = _saved_auto_mapping(where)
        if not mapping:
            raise ConfigError(f"{where}: no task_type and no auto_mapping; use the auto class of the adapter's task.")
        library = mapping.get("parent_library", "")
        if library != "transformers" and not library.startswith("transformers."):
            raise ConfigError(f"{where}: auto_mapping names {library!r}; only transformers classes are imported.")
        return getattr(importlib.import_module(library), mapping["base_model_class"])


def _saved_auto_mapping(where: str | Path) -> dict[str, str] | None:
    from deltatune.config import read_config_dict

    return read_config_dict(where).get("auto_mapping")


def _auto_for(task: TaskType) -> type[AutoPeftModel]:
    name = {
        TaskType.CAUSAL_LM: "AutoPeftModelForCausalLM",
        TaskType.SEQ_CLS: "AutoPeftModelForSequenceClassification",
        TaskType.SEQ_2_SEQ_LM: "AutoPeftModelForSeq2SeqLM",
        TaskType.TOKEN_CLS: "AutoPeftModelForTokenClassification",
        TaskType.QUESTION_ANS: "AutoPeftModelForQuestionAnswering",
        TaskType.FEATURE_EXTRACTION: "AutoPeftModelForFeatureExtraction",
    }[task]
    return type(name, (AutoPeftModel,), {"task_type": task.value, "__doc__": f"{AutoPeftModel.__doc__} ({task.value})"})


AutoPeftModelForCausalLM = _auto_for(TaskType.CAUSAL_LM)
AutoPeftModelForSequenceClassification = _auto_for(TaskType.SEQ_CLS)
AutoPeftModelForSeq2SeqLM = _auto_for(TaskType.SEQ_2_SEQ_LM)
AutoPeftModelForTokenClassification = _auto_for(TaskType.TOKEN_CLS)
AutoPeftModelForQuestionAnswering = _auto_for(TaskType.QUESTION_ANS)
AutoPeftModelForFeatureExtraction = _auto_for(TaskType.FEATURE_EXTRACTION)
