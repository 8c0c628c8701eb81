"""deltatune: parameter-efficient fine-tuning for PyTorch models, with adapters in peft's checkpoint format."""

from deltatune.auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from deltatune.config import AdapterConfig
from deltatune.config import AdapterConfig as PeftConfig  # peft's name for the base config class
from deltatune.errors import (
    AdapterError,
    CheckpointError,
    ConfigError,
    DeltatuneError,
    MergeError,
    MissingConfigKeyError,
    MixedBatchError,
    PeftWarning,
    TargetNotFoundError,
    UnknownFieldWarning,
    UnknownMethodError,
    UnsupportedArgumentError,
    UnsupportedFieldError,
    UnsupportedModuleError,
    WriteError,
)
from deltatune.methods.adalora import AdaLoraConfig
from deltatune.methods.adaption_prompt import AdaptionPromptConfig
from deltatune.methods.bdlora import BdLoraConfig
from deltatune.methods.bottleneck import BottleneckConfig
from deltatune.methods.gralora import GraloraConfig
from deltatune.methods.ia3 import IA3Config
from deltatune.methods.kasa import KasaConfig, kasa_loss
from deltatune.methods.ln_tuning import LNTuningConfig
from deltatune.methods.lora import LoraConfig
from deltatune.methods.lora_hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from deltatune.methods.prefix_tuning import PrefixTuningConfig
from deltatune.methods.prompt_learning import PromptLearningConfig
from deltatune.methods.prompt_tuning import PromptEncoder, PromptEncoderConfig, PromptTuningConfig
from deltatune.methods.reft import ReftConfig
from deltatune.methods.selective import SelectiveConfig
from deltatune.methods.velora import VeloraConfig
from deltatune.methods.vera import VeraConfig
from deltatune.model import PeftModel, get_peft_model, inject_adapter_in_model, load_config
from deltatune.peft_types import PeftType, TaskType
from deltatune.quant import (
    QuantConfig,
    cast_mixed_precision_params,
    dequantize_model,
    prepare_model_for_kbit_training,
    quantize_model,
)
from deltatune.registry import MethodSpec, get_method, list_methods, register_method
from deltatune.state_dict import (
    get_base_model_state_dict,
    get_peft_model_state_dict,
    load_peft_weights,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)
from deltatune.status import get_layer_status, get_model_status
from deltatune.tasks import (
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)

__version__ = "0.1.0"

__all__ = [
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "AdaLoraConfig",
    "AdaptionPromptConfig",
    "AdapterConfig",
    "AdapterError",
    "MissingConfigKeyError",
    "MixedBatchError",
    "PeftWarning",
    "CheckpointError",
    "ConfigError",
    "DeltatuneError",
    "GraloraConfig",
    "LoraConfig",
    "KasaConfig",
    "BdLoraConfig",
    "kasa_loss",
    "VeloraConfig",
    "hotswap_adapter",
    "prepare_model_for_compiled_hotswap",
    "VeraConfig",
    "IA3Config",
    "BottleneckConfig",
    "LNTuningConfig",
    "PrefixTuningConfig",
    "PromptLearningConfig",
    "PromptEncoder",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "ReftConfig",
    "SelectiveConfig",
    "MergeError",
    "MethodSpec",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "TaskType",
    "get_base_model_state_dict",
    "get_peft_model_state_dict",
    "load_peft_weights",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
    "TargetNotFoundError",
    "UnknownFieldWarning",
    "UnknownMethodError",
    "UnsupportedArgumentError",
    "UnsupportedFieldError",
    "UnsupportedModuleError",
    "WriteError",
    "get_method",
    "get_layer_status",
    "get_model_status",
    "get_peft_model",
    "inject_adapter_in_model",
    "list_methods",
    "load_config",
    "register_method",
    "QuantConfig",
    "quantize_model",
    "prepare_model_for_kbit_training",
    "cast_mixed_precision_params",
    "dequantize_model",
]
