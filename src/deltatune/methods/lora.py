"""LoRA: low-rank adaptation (Hu et al. 2021, arXiv:2106.09685, §4.1).

    h = W0 x + s · B A dropout(x),   s = lora_alpha / r   (rsLoRA, arXiv:2312.03732: s = lora_alpha / sqrt(r))
    A: (r, d_in) kaiming-uniform, B: (d_out, r) zeros, so the adapted model starts equal to the base.
    trainable params per adapted matrix: r · (d_in + d_out); merge: W' = W0 + s · B A (no inference latency).

Mirrors peft's `LoraConfig` fields and parameter names (`lora_A`, `lora_B`, `lora_embedding_A`, `lora_embedding_B`).
Layers: nn.Linear, transformers' GPT-2 Conv1D (weight stored (d_in, d_out), i.e. fan_in_fan_out), nn.Conv1d/2d/3d,
nn.Embedding.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune.config import AdapterConfig, TrainingContext
from deltatune.errors import ConfigError, UnsupportedFieldError
from deltatune.layers import AdapterLayer, bias_parameters
from deltatune.methods.bdlora import BdLoraConfig
from deltatune.methods.kasa import KasaConfig
from deltatune.methods.lora_layer import (
    INIT_STARTS,
    LoraConv,
    LoraEmbedding,
    LoraLinear,
    _LoraLayer,
    base_rewriting_init,
    lora_layer_kwargs,
)
from deltatune.methods.lora_options import (
    lora_prepare_model,
    lora_relative_to_initial,
)
from deltatune.methods.lora_parameter import add_parameter_targets
from deltatune.methods.lora_shared_input import link_shared_inputs
from deltatune.methods.trainable_tokens import add_trainable_tokens, tie_saved_copies
from deltatune.methods.velora import VeloraConfig
from deltatune.models import default_lora_targets
from deltatune.quant.linear4bit import Linear4bit
from deltatune.registry import MethodSpec, register_method


@dataclass
class LoraConfig(AdapterConfig):
    """Configuration of a LoRA adapter (field names and defaults are peft's)."""

    peft_type = "LORA"
    regex_excludes_layer_selection = True
    # peft options deltatune does not implement (yet): loading an adapter that turns one on is an error, not a guess.
    unsupported_fields = (
        "use_qalora",
        "megatron_config",
        "eva_config",
        "corda_config",
        "alora_invocation_tokens",
        "arrow_config",
        "lora_ga_config",
        "monteclora_config",
    )
    inert_fields = ("megatron_core", "qalora_group_size")

    r: int = 8
    """Rank of the update B·A."""
    lora_alpha: float = 8
    """Scale numerator: the update is multiplied by lora_alpha / r (or / sqrt(r) with use_rslora)."""
    lora_dropout: float = 0.0
    """Dropout probability on the adapter's input (training only)."""
    fan_in_fan_out: bool = False
    """True when the base stores weights as (d_in, d_out); deltatune sets it per layer from the layer type (Conv1D)."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which base biases also train and are saved: none, all biases, or those of adapted layers."""
    use_rslora: bool = False
    """Rank-stabilised scaling lora_alpha / sqrt(r)."""
    init_lora_weights: bool | str = True
    """True: kaiming-uniform A, zero B. "gaussian": A ~ N(0, 1/r), zero B. "orthogonal" (even r): both non-zero,
    B A = 0. "pissa" / "pissa_niter_N" / "olora": the adapter takes W's principal (SVD) / QR components and the base
    keeps the residual (Linear layers; the base weights change: save with `path_initial_model_for_weight_conversion`
    for a plain LoRA on the original base). "mica": B = W's r minor left singular vectors, kept fixed, A = 0 trains
    (Linear and Embedding layers; the base is unchanged). False: both random (for tests)."""
    rank_pattern: dict[str, int] | Literal["auto"] = field(default_factory=dict)
    """Per-module ranks: regex (matched as a name suffix) -> r, e.g. {"down_proj": 16}. "auto": allocated from
    gradient sensitivity at the parameter count of uniform rank r when a training run starts (`for_training`)."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alphas, like rank_pattern."""
    use_dora: bool = False
    """DoRA: decompose the update into magnitude and direction (deltatune.methods.dora)."""
    target_parameters: list[str] | None = None
    """LoRA on parameters instead of modules, by name or dotted suffix (e.g. "mlp.experts.gate_up_proj" for a
    mixture-of-experts stack; deltatune.methods.lora_parameter). With only these, set target_modules=[]."""
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    """Train only these rows of the input embedding (a list), or of named embedding modules (a dict, name ->
    token ids), e.g. new special tokens (deltatune.methods.trainable_tokens); a tied output head follows."""
    ensure_weight_tying: bool = False
    """With tied embeddings: refuse trainable_token_indices that would untie the embedding and the head (peft's
    option; the head follows the embedding whenever the indices agree)."""
    layer_replication: list[list[int]] | None = None
    """Build a new layer stack from [start, end) ranges of the model's layers (copies share the base weights; each
    position gets its own adapter), e.g. [[0, 4], [2, 5]] (deltatune.methods.layer_replication)."""
    loftq_config: dict[str, int] = field(default_factory=dict)
    """With init_lora_weights="loftq": {"loftq_bits": 4, "loftq_iter": N} (peft's LoftQConfig fields)."""
    velora_config: VeloraConfig | dict[str, Any] | None = None
    """VeLoRA (deltatune.methods.velora): A's down-projection keeps num_groups numbers per token for its gradient
    instead of the token, e.g. VeloraConfig(num_groups=64) or the same fields as a dict. Linear layers."""
    kasa_config: KasaConfig | dict[str, Any] | None = None
    """KaSA (deltatune.methods.kasa): the base loses its r smallest singular components (in place) and the update
    is s·B diag(ΔΣ) A with ΔΣ learned; the regularizer weights beta, gamma are read by `kasa_loss`. nn.Linear only."""
    use_bdlora: BdLoraConfig | dict[str, Any] | None = None
    """BD-LoRA (deltatune.methods.bdlora): A or B block-diagonal on the targets its lists name, for sharded serving,
    e.g. BdLoraConfig(target_modules_bd_a=["o_proj", "down_proj"], target_modules_bd_b=["q_proj", ...], nblocks=2)."""
    lora_bias: bool = False
    """B gets a trainable bias (zero at start; saved as `lora_B.bias`): the update becomes s·(B A x + b). Linear
    layers; merging adds s·b to the base bias, so the base layer needs one."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"r must be a positive integer (the LoRA rank), got {self.r!r}; typical values are 4-64.")
        if not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}; a common choice is 2*r.")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f'bias must be "none", "all" or "lora_only", got {self.bias!r}.')
        if self.init_lora_weights not in (True, False, *INIT_STARTS) and base_rewriting_init(self) is None:
            raise UnsupportedFieldError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported; use True, False, "
                '"gaussian", "orthogonal", "pissa", "pissa_niter_<N>", "olora" or "loftq" (the data-driven eva and '
                "corda inits are on the roadmap in docs/methods.md)."
            )
        self._check_loftq()
        tokens = self.trainable_token_indices
        if tokens is not None:
            id_lists = list(tokens.values()) if isinstance(tokens, dict) else [tokens]
            if (
                not isinstance(tokens, (list, dict))
                or not id_lists
                or not all(
                    isinstance(ids, list) and ids and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
                    for ids in id_lists
                )
            ):
                raise ConfigError(
                    "trainable_token_indices must be a list of token ids or a dict {module name: [token ids]}, got "
                    f"{tokens!r}."
                )
        self.velora_config = _sub_config(self.velora_config, VeloraConfig, "velora_config")
        self.kasa_config = _sub_config(self.kasa_config, KasaConfig, "kasa_config")
        self.use_bdlora = _sub_config(self.use_bdlora, BdLoraConfig, "use_bdlora")
        # one variant per adapter; MiCA fixes B (another variant in peft), KaSA rewrites the base as PiSSA & co do
        variants = ("use_dora", "velora_config", "kasa_config", "use_bdlora")
        chosen = [f for f in variants if getattr(self, f) not in (None, False)]
        if self.init_lora_weights == "mica" or (self.kasa_config is not None and base_rewriting_init(self)):
            chosen.append(f"init_lora_weights={self.init_lora_weights!r}")
        if len(chosen) > 1:
            raise UnsupportedFieldError(f"{' with '.join(chosen)} is not supported; use one of them.")
        if self.lora_bias and self.use_dora:
            raise UnsupportedFieldError("lora_bias=True with use_dora=True is not supported; use one of the two.")
        if base_rewriting_init(self) and self.use_dora:
            raise UnsupportedFieldError(
                f"init_lora_weights={self.init_lora_weights!r} with use_dora=True is not supported (DoRA's magnitude "
                "would be taken from the weight before the init rewrites it); use one of the two."
            )
        ranks = [self.r, *(self.rank_pattern.values() if isinstance(self.rank_pattern, dict) else [])]
        if self.init_lora_weights == "orthogonal" and any(int(r) % 2 for r in ranks):
            raise ConfigError(f'init_lora_weights="orthogonal" needs even ranks, got {ranks}; use even values.')
        patterns = [("alpha_pattern", self.alpha_pattern)]
        if self.rank_pattern != "auto":
            patterns.append(("rank_pattern", self.rank_pattern))
        for name, pattern in patterns:
            if not isinstance(pattern, dict) or any(
                not isinstance(v, (int, float)) or v <= 0 for v in pattern.values()
            ):
                raise ConfigError(f"{name} must map module-name regexes to positive numbers, got {pattern!r}.")

    def needs_target_modules(self) -> bool:
        return not self.target_parameters

    def _check_loftq(self) -> None:
        if self.init_lora_weights != "loftq":
            if self.loftq_config:
                raise ConfigError('loftq_config is only read with init_lora_weights="loftq"; set both or neither.')
            return
        unknown = set(self.loftq_config) - {"loftq_bits", "loftq_iter"}
        bits, iters = self.loftq_config.get("loftq_bits", 4), self.loftq_config.get("loftq_iter", 1)
        if unknown or bits != 4 or not isinstance(iters, int) or iters < 1:
            raise UnsupportedFieldError(
                f"loftq_config={self.loftq_config!r}: deltatune's LoftQ quantizes to 4-bit NF4 "
                '({"loftq_bits": 4, "loftq_iter": N >= 1}); 8-bit LoftQ is not implemented.'
            )

    def for_training(self, context: TrainingContext) -> LoraConfig:
        """`rank_pattern="auto"` becomes a gradient-sensitivity allocation (deltatune.analysis.allocate_ranks) at the
        parameter count of uniform rank r, scored on the run's first batches."""
        if self.rank_pattern != "auto":
            return self
        from deltatune.analysis import allocate_ranks

        if context.model is None or context.calibration_batches is None:
            raise ConfigError('rank_pattern="auto" needs the model and a few batches: train with deltatune\'s trainer.')
        pattern = allocate_ranks(
            context.model, context.calibration_batches(), self.target_modules, r=self.r, loss_fn=context.loss_fn
        )
        return self.replace(rank_pattern=pattern)


def _sub_config(value: Any, cls: type, field_name: str) -> Any:
    """A variant's settings given as a dict (as read from a file) become its config class; unknown keys are refused."""
    if not isinstance(value, dict):
        return value
    unknown = set(value) - {f.name for f in fields(cls)}
    if unknown:
        known = ", ".join(f.name for f in fields(cls))
        raise ConfigError(f"{field_name} has unknown fields {sorted(unknown)}; {cls.__name__} takes {known}.")
    return cls(**value)


def lora_extra_modules(model: nn.Module, adapter_name: str, config: LoraConfig) -> None:
    """Parameter targets (`target_parameters`), tied whole copies (`ensure_weight_tying` with `modules_to_save`) and
    trainable token rows (`trainable_token_indices`), after the core has wrapped the target modules; then the
    sibling groups whose down-projections train together (`lora_shared_input`)."""
    add_parameter_targets(model, adapter_name, config)
    if config.ensure_weight_tying and config.modules_to_save:
        tie_saved_copies(model, adapter_name, config)
    add_trainable_tokens(model, adapter_name, config)
    link_shared_inputs(model, LoraLinear)


def lora_extra_trainable(model: nn.Module, config: LoraConfig, adapter_name: str) -> list[str]:
    """Base biases trained with the adapter when `bias` is "all" or "lora_only"."""
    return bias_parameters(model, config.bias, _LoraLayer, adapter_name)


LORA_LAYERS: dict[type[nn.Module], type[AdapterLayer]] = {
    Linear4bit: LoraLinear,  # quantized types first: the first isinstance match wins
    nn.Linear: LoraLinear,
    Conv1D: LoraLinear,
    nn.Conv1d: LoraConv,
    nn.Conv2d: LoraConv,
    nn.Conv3d: LoraConv,
    nn.Embedding: LoraEmbedding,
}

register_method(
    MethodSpec(
        peft_type="LORA",
        config_cls=LoraConfig,
        kind="layer",
        layers=LORA_LAYERS,
        layer_kwargs=lora_layer_kwargs,
        param_prefix="lora_",
        extra_trainable=lora_extra_trainable,
        default_targets=default_lora_targets,
        relative_to_initial=lora_relative_to_initial,
        adapt_extra_modules=lora_extra_modules,
        prepare_model=lora_prepare_model,
    )
)
