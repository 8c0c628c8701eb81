"""peft's `peft.utils.hotswap` import path; the implementation is `deltatune.methods.lora_hotswap`."""

from deltatune.methods.lora_hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap

__all__ = ["hotswap_adapter", "prepare_model_for_compiled_hotswap"]
