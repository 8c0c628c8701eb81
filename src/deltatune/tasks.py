"""Task classes (peft's names): a `PeftModel` whose `forward` states the inputs of its task.

`get_peft_model` and `PeftModel.from_pretrained` return the class of the config's `task_type`, as peft does. The
explicit signature is what `transformers.Trainer` reads: `remove_unused_columns` keeps the dataset columns the
forward names, and the parameters with "label" in their name (start/end positions for question answering) become its
`label_names`, so `evaluate()` reports `eval_loss` and `predict()` returns `label_ids`. Everything is passed on to the
base model, which computes the loss. The classification and question-answering classes train and save the task's
head with every adapter (`modules_to_save` gains `classifier` / `score` / `qa_outputs`, whichever the model has), as
peft's do: a freshly initialised head must learn.
"""

from __future__ import annotations

import inspect
from typing import Any

from deltatune.adapter_model import register_task_class
from deltatune.errors import UnsupportedArgumentError
from deltatune.model import PeftModel
from deltatune.peft_types import TaskType

_COMMON_TAIL = ("output_attentions", "output_hidden_states", "return_dict", "task_ids")


def _task_forward(task: str, inputs: tuple[str, ...]):
    """A forward whose signature names `inputs` (each defaulting to None), peft's common tail and **kwargs; the
    given inputs go to `PeftModel.forward` (None means "not given", as in transformers' own forwards)."""
    names = (*inputs, *_COMMON_TAIL)
    signature = inspect.Signature(
        [
            inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            *(inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None) for n in names),
            inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD),
        ]
    )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs).arguments
        extra = bound.pop("kwargs", {})
        if bound.pop("task_ids", None) is not None:
            raise UnsupportedArgumentError(
                "task_ids= selects a task of a multitask prompt-tuning adapter, which deltatune does not provide; "
                "remove it."
            )
        given = {k: v for k, v in bound.items() if k != "self" and v is not None}
        return PeftModel.forward(self, **given, **extra)

    forward.__signature__ = signature
    forward.__qualname__ = f"PeftModelFor{task}.forward"
    forward.__doc__ = f"The base model's forward with its {task} inputs named: {', '.join(inputs)}."
    return forward


_TEXT = ("input_ids", "attention_mask", "inputs_embeds")


class PeftModelForCausalLM(PeftModel):
    forward = _task_forward("CausalLM", (*_TEXT, "labels"))


_CLASSIFIER_HEADS = ("classifier", "score")  # transformers' names of classification heads


class PeftModelForSequenceClassification(PeftModel):
    task_heads = _CLASSIFIER_HEADS
    forward = _task_forward("SequenceClassification", (*_TEXT, "labels"))


class PeftModelForTokenClassification(PeftModel):
    task_heads = _CLASSIFIER_HEADS
    forward = _task_forward("TokenClassification", (*_TEXT, "labels"))


class PeftModelForSeq2SeqLM(PeftModel):
    forward = _task_forward(
        "Seq2SeqLM",
        (*_TEXT, "decoder_input_ids", "decoder_attention_mask", "decoder_inputs_embeds", "labels"),
    )


class PeftModelForQuestionAnswering(PeftModel):
    task_heads = ("qa_outputs",)
    forward = _task_forward(
        "QuestionAnswering",
        (
            "input_ids",
            "attention_mask",
            "token_type_ids",
            "position_ids",
            "inputs_embeds",
            "start_positions",
            "end_positions",
        ),
    )


class PeftModelForFeatureExtraction(PeftModel):
    forward = _task_forward("FeatureExtraction", _TEXT)


TASK_CLASSES: dict[str, type[PeftModel]] = {
    TaskType.CAUSAL_LM.value: PeftModelForCausalLM,
    TaskType.SEQ_CLS.value: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS.value: PeftModelForTokenClassification,
    TaskType.SEQ_2_SEQ_LM.value: PeftModelForSeq2SeqLM,
    TaskType.QUESTION_ANS.value: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION.value: PeftModelForFeatureExtraction,
}


for _task_type, _cls in TASK_CLASSES.items():
    register_task_class(_task_type, _cls)
