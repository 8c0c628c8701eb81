"""LoRA: low-rank adaptation (Hu et al. 2021, arXiv:2106.09685, §4.1).

    h = W0 x + s · B A dropout(x),   s = lora_alpha / r   (rsLoRA, arXiv:2312.03732: s = lora_alpha / sqrt(r))
    A: (r, d_in) kaiming-uniform, B: (d_out, r) zeros, so the adapted model starts equal to the base.
    trainable params per adapted matrix: r · (d_in + d_out); merge: W' = W0 + s · B A (no inference latency).

Mirrors peft's `LoraConfig` fields and parameter names (`lora_A`, `lora_B`, `lora_embedding_A`, `lora_embedding_B`).
Layers: nn.Linear, transformers' GPT-2 Conv1D (weight stored (d_in, d_out), i.e. fan_in_fan_out), nn.Conv1d/2d/3d,
nn.Embedding.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from deltatune.config import AdapterConfig, TrainingContext
from deltatune.errors import ConfigError, UnsupportedFieldError, UnsupportedModuleError
from deltatune.functional.init import (
    loftq_factors,
    olora_factors,
    orthogonal_factors,
    pissa_factors,
)
from deltatune.functional.lora import (
    embedding_lora_delta,
    gathered_lora_rows,
    lora_branch,
    lora_delta,
    lora_scale,
)
from deltatune.layers import AdapterLayer, bias_parameters, module_device
from deltatune.methods.lora_options import (
    init_pair,
    lora_extra_modules,
    lora_prepare_model,
    lora_relative_to_initial,
    nf4_round_trip,
)
from deltatune.models import default_lora_targets, linear_features
from deltatune.quant.linear4bit import Linear4bit
from deltatune.registry import MethodSpec, register_method


@dataclass
class LoraConfig(AdapterConfig):
    """Configuration of a LoRA adapter (field names and defaults are peft's)."""

    peft_type = "LORA"
    # peft options deltatune does not implement (yet): loading an adapter that turns one on is an error, not a guess.
    unsupported_fields = (
        "use_qalora",
        "megatron_config",
        "eva_config",
        "corda_config",
        "alora_invocation_tokens",
        "arrow_config",
        "kasa_config",
        "lora_ga_config",
        "monteclora_config",
        "use_bdlora",
        "velora_config",
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
    for a plain LoRA on the original base). False: both random (for tests)."""
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
            if not isinstance(tokens, (list, dict)) or not all(
                isinstance(ids, list) and ids and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
                for ids in id_lists
            ):
                raise ConfigError(
                    "trainable_token_indices must be a list of token ids or a dict {module name: [token ids]}, got "
                    f"{tokens!r}."
                )
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


def _pattern_value(pattern: dict[str, Any], module_path: str, default: Any) -> Any:
    """The value of the first pattern that matches the end of `module_path` (peft's rule), else `default`."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


INIT_STARTS = ("gaussian", "orthogonal")
"""Initialisations of the adapter alone (besides True/False); base-rewriting ones are `base_rewriting_init`'s."""


def base_rewriting_init(config: LoraConfig) -> str | None:
    """ "pissa", "pissa_niter_<N>", "olora" or "loftq" when the config asks for an init that rewrites the base."""
    init = config.init_lora_weights
    if isinstance(init, str) and (init in ("pissa", "olora", "loftq") or re.fullmatch(r"pissa_niter_\d+", init)):
        return init
    return None


def lora_layer_kwargs(config: LoraConfig, module_path: str) -> dict[str, Any]:
    """Flat arguments for one target's `add_adapter` (rank/alpha patterns resolved here, not in the layer)."""
    if config.rank_pattern == "auto":
        raise ConfigError(
            'rank_pattern="auto" is resolved when a training run starts (config.for_training(...), which '
            "deltatune's trainer calls); give explicit ranks to build a model outside it."
        )
    return {
        "r": int(_pattern_value(config.rank_pattern, module_path, config.r)),
        "lora_alpha": float(_pattern_value(config.alpha_pattern, module_path, config.lora_alpha)),
        "lora_dropout": float(config.lora_dropout),
        "use_rslora": bool(config.use_rslora),
        "init_lora_weights": (
            f"loftq_iter_{config.loftq_config.get('loftq_iter', 1)}"  # the layer's form: iterations included
            if config.init_lora_weights == "loftq"
            else config.init_lora_weights
        ),
        "lora_bias": bool(config.lora_bias),
        "variant": next((flag for flag in LORA_VARIANTS if getattr(config, flag, False)), None),
    }


def lora_module_scale(config: LoraConfig, module_path: str) -> float:
    """s in W + s·B A for `module_path`: its rank / alpha pattern and rsLoRA applied."""
    return lora_scale(*(lora_layer_kwargs(config, module_path)[k] for k in ("lora_alpha", "r", "use_rslora")))


class LoraVariant(Protocol):
    """A LoRA variant (e.g. DoRA) selected by a config flag, for one wrapper type; it owns one extra per-adapter
    parameter."""

    param_name: str

    def init(self, layer: _LoraLayer, name: str) -> None: ...

    def forward(self, layer: _LoraLayer, name: str, x: Tensor, result: Tensor) -> Tensor: ...

    def compose(self, layer: _LoraLayer, name: str, weight: Tensor) -> Tensor: ...

    def decompose(self, layer: _LoraLayer, name: str, weight: Tensor) -> Tensor: ...


LORA_VARIANTS: dict[str, dict[type[nn.Module], LoraVariant]] = {}
"""Config flag (e.g. "use_dora") -> wrapper class -> variant; variant modules register themselves here."""


def register_lora_variant(flag: str, layer_cls: type[nn.Module], variant: LoraVariant) -> None:
    LORA_VARIANTS.setdefault(flag, {})[layer_cls] = variant


def _variant_param_names() -> list[str]:
    return sorted({v.param_name for table in LORA_VARIANTS.values() for v in table.values()})


class _LoraLayer(AdapterLayer):
    """Shared bookkeeping of the LoRA wrappers: per-adapter rank, scale, dropout and variant (e.g. DoRA)."""

    lora_param_names: tuple[str, ...] = ("lora_A", "lora_B")
    param_roles = {"lora_B": "up"}

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.dropout_p: dict[str, float] = {}
        self.variant: dict[str, str] = {}  # adapter name -> variant flag, for adapters that use one
        self.init_from_base: dict[str, str] = {}  # adapter name -> pending base-rewriting init (PiSSA, OLoRA)
        for param_name in _variant_param_names():
            setattr(self, param_name, nn.ParameterDict())

    @property
    def adapter_param_names(self) -> tuple[str, ...]:
        return (*self.lora_param_names, *_variant_param_names())

    @property
    def adapter_names(self) -> list[str]:  # read on every forward: skip building adapter_param_names
        return list(getattr(self, self.lora_param_names[0]).keys())

    @property
    def use_dora(self) -> dict[str, bool]:
        """peft's per-adapter flag: does the adapter use DoRA."""
        return {name: self.variant.get(name) == "use_dora" for name in self.adapter_names}

    @property
    def lora_dropout(self) -> nn.ModuleDict:
        """peft's per-adapter dropout modules (a view: the rate lives in `dropout_p`)."""
        return nn.ModuleDict({n: nn.Dropout(p) if p > 0 else nn.Identity() for n, p in self.dropout_p.items()})

    @property
    def adapter_other_names(self) -> tuple[str, ...]:
        return ("r", "lora_alpha", "scaling", "dropout_p", "variant", "init_from_base")

    def _init_variant(self, name: str, flag: str | None) -> None:
        if flag is None:
            return
        if self._variant_for(flag) is None:
            raise UnsupportedModuleError(
                f"{flag}=True is not supported on {type(self.base_layer).__name__} layers; exclude those modules "
                f"(exclude_modules) or set {flag}=False."
            )
        self.variant[name] = flag
        self._variant_for(flag).init(self, name)

    def _variant_for(self, flag: str) -> LoraVariant | None:
        return next((v for cls, v in LORA_VARIANTS.get(flag, {}).items() if isinstance(self, cls)), None)

    def variant_of(self, name: str) -> LoraVariant | None:
        """The variant adapter `name` uses, or None for plain LoRA."""
        return self._variant_for(self.variant[name]) if name in self.variant else None

    def compose(self, name: str, weight: Tensor) -> Tensor:
        variant = self.variant_of(name)
        return variant.compose(self, name, weight) if variant else weight + self.delta_weight(name)

    def decompose(self, name: str, weight: Tensor) -> Tensor:
        variant = self.variant_of(name)
        return variant.decompose(self, name, weight) if variant else weight - self.delta_weight(name)

    def add_adapter(
        self,
        name: str,
        *,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        variant: str | None = None,
        lora_bias: bool = False,
    ) -> None:
        self.r[name], self.lora_alpha[name], self.dropout_p[name] = r, lora_alpha, lora_dropout
        self.scaling[name] = lora_scale(lora_alpha, r, use_rslora)
        rewriting = (
            init_lora_weights
            if isinstance(init_lora_weights, str) and init_lora_weights[:5] in ("pissa", "olora", "loftq")
            else None
        )
        if rewriting is not None and not isinstance(self, LoraLinear):
            raise UnsupportedModuleError(
                f"init_lora_weights={rewriting!r} is for linear layers, not {type(self.base_layer).__name__}; "
                "exclude those modules (exclude_modules) or use another init."
            )
        if lora_bias and not isinstance(self, LoraLinear):
            raise UnsupportedModuleError(
                f"lora_bias=True is for linear layers, not {type(self.base_layer).__name__}; exclude those modules."
            )
        self._create_weights(name, r, True if rewriting else init_lora_weights)
        if lora_bias:
            self.lora_B[name].bias = nn.Parameter(torch.zeros(self.out_features, device=self._device()))
        if rewriting:
            self.init_from_base[name] = rewriting
        self._init_variant(name, variant)

    @abc.abstractmethod
    def _create_weights(self, name: str, r: int, init_lora_weights: bool | str) -> None:
        """Adapter `name`'s two low-rank factors, in this wrapper's form."""

    def _device(self) -> torch.device:
        return module_device(self.base_layer)


class LoraLinear(_LoraLayer):
    """LoRA around nn.Linear or GPT-2's Conv1D (which computes x W + b with W stored (d_in, d_out))."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features, self.fan_in_fan_out = linear_features(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _create_weights(self, name: str, r: int, init_lora_weights: bool | str) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=self._device())
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=self._device())
        if init_lora_weights == "orthogonal":
            lora_a, lora_b = orthogonal_factors(self.in_features, self.out_features, r)
            with torch.no_grad():
                self.lora_A[name].weight.copy_(lora_a)
                self.lora_B[name].weight.copy_(lora_b)
            return
        init_pair(self.lora_A[name].weight, self.lora_B[name].weight, init_lora_weights, r)

    def weight_out_in(self) -> Tensor:
        """The base weight as (d_out, d_in), float32 (dequantized if the base stores it otherwise)."""
        weight = self.base_weight.float()
        return weight.T if self.fan_in_fan_out else weight

    @torch.no_grad()
    def initialize_from_base(self, name: str) -> None:
        """PiSSA / OLoRA: A and B from the base weight's SVD / QR; the base keeps W - s·B A (same output).
        LoftQ: the base takes W's NF4 value Q (dequantized; `quantize_model` later stores exactly Q) and B A fits
        W - Q."""
        init = self.init_from_base.pop(name, None)
        if init is None:
            return
        weight, scale, r = self.weight_out_in(), self.scaling[name], self.r[name]
        if init.startswith("loftq"):
            if self._base_stored_otherwise:
                raise UnsupportedModuleError(
                    "LoftQ needs the full-precision weights: add the adapter before quantize_model, then quantize."
                )
            quantized, lora_a, lora_b = loftq_factors(weight, r, int(init.rsplit("_", 1)[1]), nf4_round_trip)
            self.lora_A[name].weight.copy_(lora_a)
            self.lora_B[name].weight.copy_(lora_b)
            self.write_base_weight(quantized.T if self.fan_in_fan_out else quantized)
            return
        if init == "olora":
            lora_a, lora_b = olora_factors(weight, r)
        else:
            niter = int(init.rsplit("_", 1)[1]) if init.startswith("pissa_niter_") else None
            lora_a, lora_b = pissa_factors(weight, r, scale, niter)
        self.lora_A[name].weight.copy_(lora_a)
        self.lora_B[name].weight.copy_(lora_b)
        residual = weight - scale * (lora_b @ lora_a)
        self.write_base_weight(residual.T if self.fan_in_fan_out else residual)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in self.unmerged_active():
            if name in self.variant:
                result = self.variant_of(name).forward(self, name, x, result)
                continue
            branch = self._lora_term(name, x)
            result = result + (branch if branch.dtype == result.dtype else branch.to(result.dtype))
        return result

    def _lora_term(self, name: str, x: Tensor) -> Tensor:
        """s·B A dropout(x) (+ s·lora_bias) of adapter `name`."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        if a.dtype != x.dtype:  # cast the small adapter, never the activation
            a, b = a.to(x.dtype), b.to(x.dtype)
        branch = lora_branch(x, a, b, self.scaling[name], self.dropout_p[name], self.training)
        if self.lora_B[name].bias is not None:  # lora_bias
            branch = branch + self.scaling[name] * self.lora_B[name].bias.to(branch.dtype)
        return branch

    def forward_rows(self, groups: list[tuple[str, Tensor]], x: Tensor, *args: Any, **kwargs: Any) -> Tensor | None:
        """Mixed-adapter batch: the base once on every row, each group's LoRA term on its rows (variants: None)."""
        names = [n for n, _ in groups if n in self.adapter_names and not self.disabled]
        if self.merged or any(n in self.variant for n in names):
            return None
        result = self.base_layer(x, *args, **kwargs)
        if not any(self.dropout_p[n] and self.training or self.lora_B[n].bias is not None for n in names):
            factors = [(rows, self.lora_A[n].weight * self.scaling[n], self.lora_B[n].weight) for n, rows in groups
                       if n in names]  # fmt: skip
            return result + gathered_lora_rows(x, factors, self.out_features).to(result.dtype)
        for name, rows in groups:
            if name not in names:
                continue  # "__base__" rows, or an adapter this layer does not hold
            add = result.index_add_ if not torch.is_grad_enabled() else result.index_add  # in place: no full copy
            result = add(0, rows, self._lora_term(name, x.index_select(0, rows)).to(result.dtype))
        return result

    def changes_bias(self, name: str) -> bool:
        return self.lora_B[name].bias is not None  # lora_bias

    def compose_bias(self, name: str, bias: Tensor) -> Tensor:
        return bias + self.scaling[name] * self.lora_B[name].bias.detach().float()

    def decompose_bias(self, name: str, bias: Tensor) -> Tensor:
        return bias - self.scaling[name] * self.lora_B[name].bias.detach().float()

    def delta_weight(self, name: str) -> Tensor:
        """s · B A in the base weight's layout, float32."""
        a, b = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        return lora_delta(a, b, self.scaling[name], self.fan_in_fan_out)


class LoraConv(_LoraLayer):
    """LoRA around nn.Conv1d/2d/3d: A is a conv with the base's kernel, stride and padding; B is a 1x1 conv."""

    def __init__(self, base_layer: nn.modules.conv._ConvNd) -> None:
        if base_layer.groups != 1:
            raise UnsupportedModuleError(
                f"LoRA on grouped convolutions (groups={base_layer.groups}) is not supported; exclude this module."
            )
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _create_weights(self, name: str, r: int, init_lora_weights: bool | str) -> None:
        base, conv_cls = self.base_layer, type(self.base_layer)
        ones = (1,) * len(base.kernel_size)
        self.lora_A[name] = conv_cls(
            base.in_channels,
            r,
            base.kernel_size,
            base.stride,
            base.padding,
            base.dilation,
            bias=False,
            padding_mode=base.padding_mode,
            device=self._device(),
        )
        self.lora_B[name] = conv_cls(r, base.out_channels, ones, ones, bias=False, device=self._device())
        init_pair(self.lora_A[name].weight, self.lora_B[name].weight, init_lora_weights, r)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in self.unmerged_active():
            if name in self.variant:
                result = self.variant_of(name).forward(self, name, x, result)
                continue
            xd = F.dropout(x, self.dropout_p[name], self.training)
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            branch = lora_b(lora_a(xd.to(lora_a.weight.dtype))) * self.scaling[name]
            result = result + branch.to(result.dtype)
        return result

    def delta_weight(self, name: str) -> Tensor:
        a, b = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        return lora_delta(a, b, self.scaling[name])


class LoraEmbedding(_LoraLayer):
    """LoRA around nn.Embedding: E' = E + s · (B A)^T, A (r, num_embeddings) zero-initialised, B (dim, r) normal."""

    lora_param_names = ("lora_embedding_A", "lora_embedding_B")
    param_roles = {"lora_embedding_B": "up", "lora_embedding_A": "embedding"}

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def _create_weights(self, name: str, r: int, init_lora_weights: bool | str) -> None:
        num, dim = self.base_layer.weight.shape
        a = torch.randn(r, num, device=self._device())
        b = torch.randn(dim, r, device=self._device())
        if init_lora_weights is not False:  # reversed w.r.t. Linear, as in peft: A = 0, B ~ N(0, 1)
            a.zero_()
        self.lora_embedding_A[name] = nn.Parameter(a)
        self.lora_embedding_B[name] = nn.Parameter(b)

    def lora_output(self, name: str, x: Tensor) -> Tensor:
        """s · B A looked up for the token ids `x`: (..., dim)."""
        base = self.base_layer
        a = self.lora_embedding_A[name]
        after_a = F.embedding(
            x, a.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
        )
        return (after_a @ self.lora_embedding_B[name].T) * self.scaling[name]

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in self.unmerged_active():
            if name in self.variant:
                result = self.variant_of(name).forward(self, name, x, result)
                continue
            result = result + self.lora_output(name, x).to(result.dtype)
        return result

    def delta_weight(self, name: str) -> Tensor:
        a, b = self.lora_embedding_A[name].float(), self.lora_embedding_B[name].float()
        return embedding_lora_delta(a, b, self.scaling[name])


def lora_extra_trainable(model: nn.Module, config: LoraConfig) -> list[str]:
    """Base biases trained with the adapter when `bias` is "all" or "lora_only"."""
    return bias_parameters(model, config.bias, _LoraLayer)


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
