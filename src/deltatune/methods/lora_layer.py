"""The LoRA layers: the wrappers of Linear / GPT-2 Conv1D / Conv1d-3d / Embedding and their forward, the variant
table (DoRA registers itself there), and the translation of a LoraConfig into one target's layer arguments.

    h = W0 x + s · B A dropout(x),   s = lora_alpha / r   (rsLoRA: lora_alpha / sqrt(r))

`methods/lora.py` holds the config and registers the method; the options that change how an adapter starts or what
else it trains live in `lora_options.py`, `lora_parameter.py` and `trainable_tokens.py`.
"""

from __future__ import annotations

import abc
import dataclasses
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.errors import ConfigError, MergeError, PeftWarning, UnsupportedModuleError
from deltatune.functional.init import (
    loftq_factors,
    mica_factors,
    olora_factors,
    orthogonal_factors,
    pissa_factors,
)
from deltatune.functional.lora import (
    embedding_lora_delta,
    lora_branch,
    lora_delta,
    lora_scale,
    lora_up,
)
from deltatune.layers import AdapterLayer, module_device
from deltatune.methods.lora_options import init_pair, nf4_round_trip
from deltatune.models import linear_features

if TYPE_CHECKING:
    from deltatune.methods.lora import LoraConfig
    from deltatune.methods.lora_shared_input import SharedInputGroup


def _pattern_value(pattern: dict[str, Any], module_path: str, default: Any) -> Any:
    """The value of the first pattern that matches the end of `module_path` (peft's rule), else `default`."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


INIT_STARTS = ("gaussian", "orthogonal", "mica")
"""Initialisations of the adapter alone (besides True/False); base-rewriting ones are `base_rewriting_init`'s."""


def base_rewriting_init(config: LoraConfig) -> str | None:
    """ "pissa", "pissa_niter_<N>", "olora" or "loftq" when the config asks for an init that rewrites the base."""
    init = config.init_lora_weights
    if isinstance(init, str) and (init in ("pissa", "olora", "loftq") or re.fullmatch(r"pissa_niter_\d+", init)):
        return init
    return None


def lora_layer_kwargs(config: LoraConfig, module_path: str) -> dict[str, Any]:
    """Flat arguments for one target's `add_adapter` (rank/alpha patterns resolved here, not in the layer)."""
    variant = next((flag for flag in LORA_VARIANTS if getattr(config, flag, None)), None)
    value = getattr(config, variant) if variant else None
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
        "variant": variant,
        "variant_options": (
            {**dataclasses.asdict(value), "target_name": module_path} if dataclasses.is_dataclass(value) else None
        ),
    }


def lora_module_scale(config: LoraConfig, module_path: str) -> float:
    """s in W + s·B A for `module_path`: its rank / alpha pattern and rsLoRA applied."""
    return lora_scale(*(lora_layer_kwargs(config, module_path)[k] for k in ("lora_alpha", "r", "use_rslora")))


class LoraVariant(Protocol):
    """A LoRA variant (e.g. DoRA, VeLoRA) selected by a config field, for one wrapper type; it may own one extra
    per-adapter tensor (`param_name`, else None), held in a `container()` (a ParameterDict for a trained tensor, a
    BufferDict for a state). Its sub-config's fields and the target's module path ("target_name") reach `init`."""

    param_name: str | None

    def container(self) -> nn.Module: ...

    def init(self, layer: _LoraLayer, name: str, options: dict[str, Any]) -> None: ...

    def forward(self, layer: _LoraLayer, name: str, x: Tensor, result: Tensor) -> Tensor: ...

    # Optional, where the merged weight is not W + delta_weight (DoRA rescales it):
    #   compose(layer, name, weight) -> Tensor and decompose(layer, name, weight) -> Tensor


LORA_VARIANTS: dict[str, dict[type[nn.Module], LoraVariant]] = {}
"""Config field (e.g. "use_dora", "velora_config") -> wrapper class -> variant; variant modules register themselves
here. A flag turns its variant on when set (True, or a sub-config); a sub-config's fields reach `init` as options."""


def register_lora_variant(flag: str, layer_cls: type[nn.Module], variant: LoraVariant) -> None:
    LORA_VARIANTS.setdefault(flag, {})[layer_cls] = variant


def _variant_containers() -> dict[str, LoraVariant]:
    """The variants' tensor attribute names, each with one variant that builds its container."""
    return {v.param_name: v for _, table in sorted(LORA_VARIANTS.items()) for v in table.values() if v.param_name}


def _variant_param_names() -> list[str]:
    return sorted(_variant_containers())


def _mica(weight: Tensor, r: int, base: nn.Module) -> tuple[Tensor, Tensor]:
    try:
        return mica_factors(weight, r)
    except ValueError as exc:
        raise UnsupportedModuleError(
            f"init_lora_weights='mica' on this {type(base).__name__}: {exc}; lower r for it (rank_pattern) or exclude "
            "it (exclude_modules)."
        ) from None


class _LiveView(Mapping):
    """A read-only mapping computed from the layer's state at each access, so one held across `delete_adapter` (or
    any change) never shows an adapter the layer no longer has."""

    def __init__(self, compute: Callable[[], dict]) -> None:
        self._compute = compute

    def __getitem__(self, key: str) -> Any:
        return self._compute()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._compute())

    def __len__(self) -> int:
        return len(self._compute())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._compute()!r})"


class _LoraLayer(AdapterLayer):
    """Shared bookkeeping of the LoRA wrappers: per-adapter rank, scale, dropout and variant (e.g. DoRA)."""

    lora_param_names: tuple[str, ...] = ("lora_A", "lora_B")
    param_roles = {"lora_B": "up"}
    printed_name = "Linear"
    """peft's name of this kind of LoRA layer: printed models read `lora.Linear(...)`, `lora.Conv2d(...)` as in peft."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.dropout_p: dict[str, float] = {}
        self.variant: dict[str, str] = {}  # adapter name -> variant flag, for adapters that use one
        self.init_from_base: dict[str, str] = {}  # adapter name -> pending base-rewriting init (PiSSA, OLoRA)
        self.variant_options: dict[str, dict[str, Any]] = {}  # adapter name -> its variant's sub-config fields
        for param_name, variant in _variant_containers().items():
            setattr(self, param_name, variant.container())

    def _get_name(self) -> str:  # what nn.Module's repr prints
        return f"lora.{self.printed_name}"

    @property
    def adapter_param_names(self) -> tuple[str, ...]:
        return (*self.lora_param_names, *_variant_param_names())

    @property
    def adapter_names(self) -> list[str]:  # read on every forward: skip building adapter_param_names
        return list(getattr(self, self.lora_param_names[0]).keys())

    @property
    def use_dora(self) -> Mapping[str, bool]:
        """peft's per-adapter flag: does the adapter use DoRA (a live view of `variant`)."""
        return _LiveView(lambda: {name: self.variant.get(name) == "use_dora" for name in self.adapter_names})

    @property
    def lora_dropout(self) -> Mapping[str, nn.Module]:
        """peft's per-adapter dropout modules (a live view: the rate lives in `dropout_p`)."""
        return _LiveView(lambda: {n: nn.Dropout(p) if p > 0 else nn.Identity() for n, p in self.dropout_p.items()})

    @property
    def adapter_other_names(self) -> tuple[str, ...]:
        return ("r", "lora_alpha", "scaling", "dropout_p", "variant", "variant_options", "init_from_base")

    def _init_variant(self, name: str, flag: str | None, options: dict[str, Any] | None = None) -> None:
        if flag is None:
            return
        if self._variant_for(flag) is None:
            raise UnsupportedModuleError(
                f"{flag} is not supported on {type(self.base_layer).__name__} layers; exclude those modules "
                f"(exclude_modules) or turn {flag} off."
            )
        self.variant[name] = flag
        self.variant_options[name] = dict(options or {})
        self._variant_for(flag).init(self, name, self.variant_options[name])

    def _check_variant_mix(self, name: str, flag: str | None) -> None:
        """A variant that rewrites the base (`changes_base`, KaSA) shares a layer only with adapters of its kind:
        the others would train against a base it changed."""
        others = {self.variant.get(n) for n in self.adapter_names if n != name}
        for kind in {flag, *others}:
            if kind is not None and getattr(self._variant_for(kind), "changes_base", False) and others - {flag}:
                raise UnsupportedModuleError(
                    f"adapter {name!r} ({flag or 'plain LoRA'}) cannot join this layer's adapters "
                    f"({', '.join(sorted(o or 'plain LoRA' for o in others))}): {kind} rewrites the base weights, so "
                    "adapters of another kind would see a different base. Use a separate model for each kind."
                )

    def _variant_for(self, flag: str) -> LoraVariant | None:
        return next((v for cls, v in LORA_VARIANTS.get(flag, {}).items() if isinstance(self, cls)), None)

    def variant_of(self, name: str) -> LoraVariant | None:
        """The variant adapter `name` uses, or None for plain LoRA."""
        return self._variant_for(self.variant[name]) if name in self.variant else None

    def compose(self, name: str, weight: Tensor) -> Tensor:
        own = getattr(self.variant_of(name), "compose", None)
        return own(self, name, weight) if own else weight + self.delta_weight(name)

    def decompose(self, name: str, weight: Tensor) -> Tensor:
        own = getattr(self.variant_of(name), "decompose", None)
        return own(self, name, weight) if own else weight - self.delta_weight(name)

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
        variant_options: dict[str, Any] | None = None,
        lora_bias: bool = False,
    ) -> None:
        self._check_variant_mix(name, variant)
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
        if lora_bias and not isinstance(self, _BiasedUp):
            raise UnsupportedModuleError(
                f"lora_bias=True is for linear and convolution layers, not {type(self.base_layer).__name__}; exclude "
                "those modules."
            )
        if lora_bias and getattr(self.base_layer, "bias", None) is None:
            warnings.warn(  # peft's warning: it trains, but merging has no bias to fold s·b into
                f"`lora_bias=True` was passed but the targeted layer of type {type(self.base_layer).__name__} has no "
                f"bias: adapter {name!r} trains, but cannot be merged.",
                PeftWarning,
                stacklevel=2,
            )
        self._create_weights(name, r, True if rewriting else init_lora_weights)
        if lora_bias:
            self.lora_B[name].bias = nn.Parameter(torch.zeros(self.out_features, device=self._device()))
        if rewriting:
            self.init_from_base[name] = rewriting
        self._init_variant(name, variant, variant_options)

    @abc.abstractmethod
    def _create_weights(self, name: str, r: int, init_lora_weights: bool | str) -> None:
        """Adapter `name`'s two low-rank factors, in this wrapper's form."""

    def _device(self) -> torch.device:
        return module_device(self.base_layer)


class _AdditiveLora(_LoraLayer):
    """A wrapper whose output is W0 x plus one additive term per adapter (Linear, Conv, Embedding)."""

    @abc.abstractmethod
    def lora_output(self, name: str, x: Tensor) -> Tensor:
        """Adapter `name`'s term for the input `x`: s · B A dropout(x), in this wrapper's form."""

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """W0 x plus the term of every active unmerged adapter (a variant, e.g. DoRA, composes its own)."""
        result = self.base_layer(x, *args, **kwargs)
        for name in self.unmerged_active():
            if name in self.variant:
                result = self.variant_of(name).forward(self, name, x, result)
                continue
            term = self.lora_output(name, x)
            result = result + (term if term.dtype == result.dtype else term.to(result.dtype))
        return result


class _BiasedUp:
    """`lora_bias`: B (a module: a linear layer or a 1x1 conv) has a bias, added as s·bias and merged into the base's
    bias."""

    lora_B: nn.ModuleDict
    scaling: dict[str, float]

    def changes_bias(self, name: str) -> bool:
        return self.lora_B[name].bias is not None

    def no_bias_to_merge(self, name: str) -> str:
        generic = super().no_bias_to_merge(name)  # type: ignore[misc]  # the wrapper's (a mixin: AdapterLayer follows)
        return f"Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias: {generic}"

    def compose_bias(self, name: str, bias: Tensor) -> Tensor:
        return bias + self.scaling[name] * self.lora_B[name].bias.detach().float()

    def decompose_bias(self, name: str, bias: Tensor) -> Tensor:
        return bias - self.scaling[name] * self.lora_B[name].bias.detach().float()


class LoraLinear(_BiasedUp, _AdditiveLora):
    """LoRA around nn.Linear or GPT-2's Conv1D (which computes x W + b with W stored (d_in, d_out))."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features, self.fan_in_fan_out = linear_features(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.input_group: SharedInputGroup | None = None  # siblings reading the same input (lora_shared_input.py)

    def _create_weights(self, name: str, r: int, init_lora_weights: bool | str) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=self._device())
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=self._device())
        if init_lora_weights in ("orthogonal", "mica"):
            if init_lora_weights == "mica":
                lora_a, lora_b = _mica(self.weight_out_in(), r, self.base_layer)
                self.frozen_params[name] = ("lora_B",)
            else:
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
        if init == "variant":  # a variant that rewrites the base (KaSA)
            self.variant_of(name).initialize_from_base(self, name)
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

    def lora_output(self, name: str, x: Tensor) -> Tensor:
        """s·B A dropout(x) (+ s·lora_bias) of adapter `name`; in training, the down-projection from the sibling
        group's joint computation when one covers `x`."""
        return self._lora_term(name, x, self.input_group)

    def shares_down(self, name: str, x: Tensor, dropout: float) -> bool:
        """Whether this layer's adapter `name` can join a joint down-projection of `x` with dropout `dropout`."""
        return (
            self.training
            and name in self.unmerged_active()
            and name not in self.variant
            and self.dropout_p[name] == dropout
            and self.lora_A[name].weight.device == x.device
        )

    def _lora_term(self, name: str, x: Tensor, group: SharedInputGroup | None) -> Tensor:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        if a.dtype != x.dtype:  # cast the small adapter, never the activation
            a, b = a.to(x.dtype), b.to(x.dtype)
        scale, dropout = self.scaling[name], self.dropout_p[name]
        if group is not None and self.training and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            branch = lora_up(group.down(self, name, x, dropout), b, scale, dropout)
        else:
            branch = lora_branch(x, a, b, scale, dropout, self.training)
        return self.with_lora_bias(name, branch)

    def with_lora_bias(self, name: str, term: Tensor) -> Tensor:
        """`term` (s·B A x of adapter `name`) plus s·b when B has a bias (`lora_bias`)."""
        bias = self.lora_B[name].bias
        return term if bias is None else term + self.scaling[name] * bias.to(term.dtype)

    def forward_rows(self, groups: list[tuple[str, Tensor]], x: Tensor, *args: Any, **kwargs: Any) -> Tensor | None:
        """Mixed-adapter batch: the base once on every row, each group's LoRA term on its rows (variants: None)."""
        names = [n for n, _ in groups if n in self.adapter_names and not self.disabled]
        if self.merged or any(n in self.variant for n in names):
            return None
        result = self.base_layer(x, *args, **kwargs)
        # each group's term computed as a forward under set_adapter computes it, on that group's rows (equal to that
        # forward's rows up to the last bit a matmul over fewer rows may round differently)
        for name, rows in groups:
            if name not in names:
                continue  # "__base__" rows, or an adapter this layer does not hold
            add = result.index_add_ if not torch.is_grad_enabled() else result.index_add  # in place: no full copy
            term = self._lora_term(name, x.index_select(0, rows), None)  # each row subset is its own tensor
            result = add(0, rows, term.to(result.dtype))
        return result

    def delta_weight(self, name: str) -> Tensor:
        """s · B A in the base weight's layout, float32 (a variant with another update form, e.g. KaSA's
        s · B diag(ΔΣ) A, gives its own)."""
        own = getattr(self.variant_of(name), "delta_weight", None)
        if own is not None:
            return own(self, name)
        a, b = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        return lora_delta(a, b, self.scaling[name], self.fan_in_fan_out)


class LoraConv(_BiasedUp, _AdditiveLora):
    """LoRA around nn.Conv1d/2d/3d: A is a conv with the base's kernel, stride and padding; B is a 1x1 conv (with a
    bias under `lora_bias`, which the conv adds before the scale: s·(B A x + b)).

    On a grouped convolution (groups g > 1) B is grouped too, as in peft (r must be a multiple of g), while A reads
    every input channel: the adapter's change is dense, which the grouped weight cannot hold, so it is never merged
    (refused by name) and DoRA, which needs that merged weight's norm, is refused on such layers."""

    @property
    def printed_name(self) -> str:  # lora.Conv1d / lora.Conv2d / lora.Conv3d
        return type(self.base_layer).__name__

    def __init__(self, base_layer: nn.modules.conv._ConvNd) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels  # peft's names
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _create_weights(self, name: str, r: int, init_lora_weights: bool | str) -> None:
        base, conv_cls = self.base_layer, type(self.base_layer)
        ones = (1,) * len(base.kernel_size)
        if r % base.groups:
            raise UnsupportedModuleError(
                f"LoRA on a {type(base).__name__} with groups={base.groups} needs a rank divisible by {base.groups}, "
                f"got r={r}; choose such a rank (rank_pattern can set it for this module) or exclude the module."
            )
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
        self.lora_B[name] = conv_cls(
            r, base.out_channels, ones, ones, groups=base.groups, bias=False, device=self._device()
        )
        init_pair(self.lora_A[name].weight, self.lora_B[name].weight, init_lora_weights, r)

    def _init_variant(self, name: str, flag: str | None, options: dict[str, Any] | None = None) -> None:
        if flag is not None and self.base_layer.groups > 1:
            raise UnsupportedModuleError(
                f"{flag}=True on a grouped {type(self.base_layer).__name__} (groups={self.base_layer.groups}) is not "
                f"supported: its weight cannot hold the adapter's dense change. Exclude the module or set {flag}=False."
            )
        super()._init_variant(name, flag, options)

    def lora_output(self, name: str, x: Tensor) -> Tensor:
        xd = F.dropout(x, self.dropout_p[name], self.training)
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        return lora_b(lora_a(xd.to(lora_a.weight.dtype))) * self.scaling[name]

    def delta_weight(self, name: str) -> Tensor:
        if self.base_layer.groups > 1:
            raise MergeError(
                f"adapter {name!r} on a grouped {type(self.base_layer).__name__} (groups={self.base_layer.groups}) "
                "changes it densely, which its grouped weight cannot hold: it is not merged. Keep it unmerged."
            )
        a, b = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        return lora_delta(a, b, self.scaling[name])


class LoraEmbedding(_AdditiveLora):
    """LoRA around nn.Embedding: E' = E + s · (B A)^T, A (r, num_embeddings) zero-initialised, B (dim, r) normal."""

    lora_param_names = ("lora_embedding_A", "lora_embedding_B")
    param_roles = {"lora_embedding_B": "up", "lora_embedding_A": "embedding"}
    printed_name = "Embedding"

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim  # peft's names
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def _create_weights(self, name: str, r: int, init_lora_weights: bool | str) -> None:
        num, dim = self.base_layer.weight.shape
        a = torch.randn(r, num, device=self._device())
        b = torch.randn(dim, r, device=self._device())
        if init_lora_weights == "mica":  # the table read as a (dim, num) projection
            a, b = _mica(self.base_layer.weight.detach().float().T, r, self.base_layer)
            self.frozen_params[name] = ("lora_embedding_B",)
        elif init_lora_weights is not False:  # reversed w.r.t. Linear, as in peft: A = 0, B ~ N(0, 1)
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

    def delta_weight(self, name: str) -> Tensor:
        a, b = self.lora_embedding_A[name].float(), self.lora_embedding_B[name].float()
        return embedding_lora_delta(a, b, self.scaling[name])
