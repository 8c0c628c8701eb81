"""Every bundled method; importing a module registers it (one line per method)."""

from deltatune.methods import (
    adalora,  # noqa: F401
    adaption_prompt,  # noqa: F401
    bdlora,  # noqa: F401
    bottleneck,  # noqa: F401
    dora,  # noqa: F401
    gralora,  # noqa: F401
    ia3,  # noqa: F401
    kasa,  # noqa: F401
    ln_tuning,  # noqa: F401
    lora,  # noqa: F401
    lora_combine,  # noqa: F401
    lora_mha,  # noqa: F401
    prefix_tuning,  # noqa: F401
    prompt_tuning,  # noqa: F401
    reft,  # noqa: F401
    selective,  # noqa: F401
    velora,  # noqa: F401
    vera,  # noqa: F401
)

DEFAULT_RUN_METHOD = {
    "peft_type": "LORA",
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
"""The method a training run uses when its config names none (the quickstart's)."""

DEFAULT_CLASSIFICATION_METHOD = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.05}
"""The method of a classification run that names none: LoRA on the family's default targets (BERT: query and
value), the classification head trained with it."""
