"""AdaLoRA: adaptive budget allocation for PEFT (Zhang et al. 2023, arXiv:2303.10512).

    h = W0 x + s · B diag(E) A dropout(x),   s = lora_alpha / (init_r + 1e-5)
    A (r, d_in), B (d_out, r) ~ N(0, 0.02); E (r, 1) = 0. Trainable params per matrix: init_r · (d_in + d_out + 1).

During training the total rank shrinks from Σ init_r to target_r × #matrices on a cubic schedule: after every
optimizer step, `PeftModel.update_and_allocate(step)` (the deltatune trainer calls it) updates the importance EMAs
and zeroes the E entries of the least important triplets; `orth_reg_weight · mean ‖AAᵀ−I‖_F, ‖BᵀB−I‖_F` joins the
loss. The kept triplets are recorded in `rank_pattern` ({"<module>.lora_E": [bool] * init_r}), and the saved file
holds only those (peft's layout), so a pruned adapter reloads at its final ranks. Mirrors peft's `AdaLoraConfig`
(peft_type "ADALORA"); layers: nn.Linear, GPT-2 Conv1D, nn.Conv2d (and 4-bit linears).
"""

from __future__ import annotations

import abc
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from deltatune.config import AdapterConfig, TrainingContext
from deltatune.errors import ConfigError, UnsupportedModuleError
from deltatune.functional.adalora import (
    budget_schedule,
    keep_top,
    orthogonality_penalty,
    svd_delta,
    svd_scale,
    triplet_scores,
    update_importance,
)
from deltatune.functional.lora import lora_branch
from deltatune.layers import AdapterLayer, bias_parameters, module_device
from deltatune.methods.lora import LoraConfig
from deltatune.models import default_lora_targets, linear_features
from deltatune.quant.linear4bit import Linear4bit
from deltatune.registry import MethodSpec, register_method

_UNSET_R = 8  # peft's inherited LoraConfig.r, which AdaLoRA ignores


@dataclass
class AdaLoraConfig(AdapterConfig):
    """Configuration of an AdaLoRA adapter (peft's field names and defaults)."""

    peft_type = "ADALORA"
    regex_excludes_layer_selection = True
    # peft's AdaLoRA inherits these LoRA options; deltatune refuses them rather than silently ignoring them.
    # peft's AdaLoraConfig extends its LoraConfig, so its files carry every LoRA option too
    unsupported_fields = (
        *LoraConfig.unsupported_fields,
        "lora_bias",
        "trainable_token_indices",
        "ensure_weight_tying",
        "layer_replication",
        "loftq_config",
        "target_parameters",
        "use_dora",
        "use_rslora",
        "velora_config",
        "kasa_config",
        "use_bdlora",
        "alpha_pattern",
    )
    inert_fields = LoraConfig.inert_fields

    init_r: int = 12
    """Rank every adapted matrix starts with."""
    target_r: int = 8
    """Average rank per matrix after the schedule: the final budget is target_r × #matrices."""
    tinit: int = 0
    """Warm-up steps with the full budget."""
    tfinal: int = 0
    """Final steps at the target budget with the masks frozen."""
    deltaT: int = 1
    """Re-allocate every deltaT steps during the budget phase."""
    beta1: float = 0.85
    """EMA factor of the sensitivity."""
    beta2: float = 0.85
    """EMA factor of the uncertainty."""
    orth_reg_weight: float = 0.5
    """Weight of the orthogonality penalty on A and B."""
    total_step: int | None = None
    """Optimizer steps of the run (needed to schedule the budget; `deltatune train` fills it from optim.steps)."""
    rank_pattern: dict[str, list[bool]] | None = None
    """Kept triplets per matrix, written by the allocator: {"<module path>.lora_E": [bool] * init_r}."""
    lora_alpha: float = 8
    """Scale numerator: the update is multiplied by lora_alpha / init_r."""
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    """Recorded for peft; derived per layer (GPT-2 Conv1D)."""
    bias: Literal["none", "all", "lora_only"] = "none"
    init_lora_weights: bool = True
    """True: E = 0, A and B ~ N(0, 0.02) (starts at the base model). False: all N(0, 1) (tests)."""
    r: int = _UNSET_R
    """Unused (peft keeps LoRA's field); set init_r instead."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("init_r", "target_r", "deltaT"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
        for name in ("beta1", "beta2"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in (0, 1), got {getattr(self, name)!r}.")
        if self.orth_reg_weight < 0:
            raise ConfigError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f'bias must be "none", "all" or "lora_only", got {self.bias!r}.')
        if self.r != _UNSET_R:
            warnings.warn(
                f"Note that `r` is not used in AdaLora and will be ignored (r={self.r}): its starting rank is "
                f"init_r={self.init_r}.",
                stacklevel=3,
            )
        if self.total_step is not None:
            self._check_schedule()
        if self.rank_pattern is not None and not all(
            isinstance(v, list) and all(isinstance(b, bool) for b in v) for v in self.rank_pattern.values()
        ):
            raise ConfigError("rank_pattern must map '<module>.lora_E' to lists of booleans (the kept triplets).")

    def _check_schedule(self) -> None:
        if not isinstance(self.total_step, int) or self.total_step <= 0:
            raise ConfigError(f"total_step must be a positive integer, got {self.total_step!r}.")
        if not 0 <= self.tinit < self.total_step - self.tfinal or self.tfinal < 0:
            raise ConfigError(
                "The supplied schedule values don't allow for a budgeting phase (peft's words): "
                f"tinit={self.tinit}, tfinal={self.tfinal} leave no budget phase in total_step={self.total_step} "
                f"steps (need 0 <= tinit < total_step - tfinal): lower tinit/tfinal or raise total_step."
            )

    def for_training(self, context: TrainingContext) -> AdaLoraConfig:
        """This config for a training run: total_step defaults to the run's length."""
        return self if self.total_step is not None else self.replace(total_step=context.total_steps)

    def kept(self, module_path: str) -> list[bool] | None:
        """The rank_pattern entry of one module (peft writes `<path>.lora_E`; its in-memory form adds the adapter)."""
        for key, value in (self.rank_pattern or {}).items():
            if key == f"{module_path}.lora_E" or key.startswith(f"{module_path}.lora_E."):
                return value
        return None


def adalora_layer_kwargs(config: AdaLoraConfig, module_path: str) -> dict[str, Any]:
    """A module listed in rank_pattern is built at its kept rank (a pruned, saved adapter), others at init_r."""
    kept = config.kept(module_path)
    return {
        "r": config.init_r if kept is None else sum(kept),
        "ranknum": config.init_r,
        "lora_alpha": float(config.lora_alpha),
        "lora_dropout": float(config.lora_dropout),
        "init_lora_weights": bool(config.init_lora_weights),
    }


class _SvdLayer(AdapterLayer):
    """The triplets (A, E, B) of every adapter and their keep-masks; subclasses give the input shape and forward."""

    adapter_param_names = ("lora_A", "lora_B", "lora_E")
    param_roles = {"lora_B": "up"}
    adapter_other_names = ("r", "scaling", "dropout_p", "rank_mask", "allocator")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A, self.lora_B, self.lora_E = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.dropout_p: dict[str, float] = {}
        self.rank_mask: dict[str, Tensor] = {}  # adapter -> bool (r,), True where the triplet is kept
        self.allocator: dict[str, RankAllocator] = {}  # references only: the PeftModel owns the allocators

    @abc.abstractmethod
    def features(self) -> tuple[int, int]:
        """(d_in of A, d_out of B)."""

    def add_adapter(
        self,
        name: str,
        *,
        r: int,
        ranknum: int,
        lora_alpha: float,
        shared: RankAllocator,
        lora_dropout: float = 0.0,
        init_lora_weights: bool = True,
    ) -> None:
        d_in, d_out = self.features()
        device = module_device(self.base_layer)
        a, e, b = (
            torch.randn(r, d_in, device=device),
            torch.randn(r, 1, device=device),
            torch.randn(d_out, r, device=device),
        )
        if init_lora_weights:
            a.mul_(0.02), b.mul_(0.02), e.zero_()
        self.lora_A[name], self.lora_E[name], self.lora_B[name] = nn.Parameter(a), nn.Parameter(e), nn.Parameter(b)
        self.r[name], self.dropout_p[name] = r, lora_dropout
        self.scaling[name] = svd_scale(lora_alpha, ranknum)
        self.allocator[name] = shared

    @torch.no_grad()
    def set_rank_mask(self, name: str, keep: Tensor) -> None:
        """Keep only the triplets where `keep` is True: the others' E entries become zero (the mask stays on E's
        device, so allocating never waits for the GPU)."""
        keep = keep.detach().to(self.lora_E[name].device, torch.bool).reshape(-1)
        self.lora_E[name].masked_fill_(~keep.view(-1, 1), 0.0)
        self.rank_mask[name] = keep.clone()

    def kept_rank(self, name: str) -> int:
        mask = self.rank_mask.get(name)
        return self.r[name] if mask is None else int(mask.sum())

    def adapter_state(self, name: str) -> dict[str, Tensor]:
        """peft's layout: only the kept triplets (so the file matches `rank_pattern`)."""
        state = super().adapter_state(name)
        mask = self.rank_mask.get(name)
        if mask is None or bool(mask.all()):
            return state
        keep = mask.to(state["lora_A"].device)
        return {"lora_A": state["lora_A"][keep], "lora_E": state["lora_E"][keep], "lora_B": state["lora_B"][:, keep]}

    def _flat_delta(self, name: str) -> Tensor:
        """s · B diag(E) A as (d_out, d_in), float32."""
        return svd_delta(
            self.lora_A[name].float(), self.lora_E[name].float(), self.lora_B[name].float(), self.scaling[name]
        )

    def delta_weight(self, name: str) -> Tensor:
        return self._flat_delta(name).reshape(self.base_weight.shape)

    def compose(self, name: str, weight: Tensor) -> Tensor:
        return weight + self.delta_weight(name)

    def decompose(self, name: str, weight: Tensor) -> Tensor:
        return weight - self.delta_weight(name)

    def _note_training_forward(self, name: str) -> None:
        if self.training and torch.is_grad_enabled():
            self.allocator[name].note_forward()


class SvdLinear(_SvdLayer):
    """AdaLoRA around nn.Linear, GPT-2's Conv1D or a 4-bit linear."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features, self.fan_in_fan_out = linear_features(base_layer)

    def features(self) -> tuple[int, int]:
        return self.in_features, self.out_features

    def delta_weight(self, name: str) -> Tensor:
        delta = self._flat_delta(name)
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in self.unmerged_active():
            self._note_training_forward(name)
            a = (self.lora_A[name] * self.lora_E[name]).to(x.dtype)  # Λ folded into Q: one small (r, d_in) tensor
            b = self.lora_B[name].to(x.dtype)
            branch = lora_branch(x, a, b, self.scaling[name], self.dropout_p[name], self.training)
            result = result + branch.to(result.dtype)
        return result


class SvdConv2d(_SvdLayer):
    """AdaLoRA around nn.Conv2d: A is (r, c_in·kh·kw); the update is applied as one convolution with ΔW (peft's
    form, so its saved shapes match)."""

    def __init__(self, base_layer: nn.Conv2d) -> None:
        if base_layer.groups != 1:
            raise UnsupportedModuleError(
                f"AdaLoRA on grouped convolutions (groups={base_layer.groups}) is not supported; exclude this module."
            )
        super().__init__(base_layer)

    def features(self) -> tuple[int, int]:
        base = self.base_layer
        return base.in_channels * base.kernel_size[0] * base.kernel_size[1], base.out_channels

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        base = self.base_layer
        for name in self.unmerged_active():
            self._note_training_forward(name)
            delta = svd_delta(self.lora_A[name], self.lora_E[name], self.lora_B[name], self.scaling[name])
            xd = F.dropout(x, self.dropout_p[name], self.training)
            branch = F.conv2d(
                xd.to(delta.dtype), delta.reshape(base.weight.shape), None, base.stride, base.padding, base.dilation
            )
            result = result + branch.to(result.dtype)
        return result


_FORWARDS_BEFORE_WARNING = 64


class RankAllocator(nn.Module):
    """One adapter's allocation state: importance EMAs per triplet tensor and the step bookkeeping.

    Owned by the PeftModel (`model.shared[name]`); it holds no persistent tensors, so nothing of it enters the adapter
    file. `update_and_allocate` follows peft's `RankAllocator`, except that masking keeps exactly the budget
    (top-k) where peft's threshold can drop extra triplets on ties.
    """

    def __init__(self, config: AdaLoraConfig, targets: list[nn.Module]) -> None:
        super().__init__()
        if not config.inference_mode and config.total_step is None:
            raise ConfigError(
                "AdaLoRA schedules its rank budget over the run: set total_step (the number of optimizer steps) in "
                "AdaLoraConfig; `deltatune train` fills it from optim.steps."
            )
        if not config.inference_mode and config.target_r > config.init_r:
            raise ConfigError(
                f"target_r ({config.target_r}) exceeds init_r ({config.init_r}): AdaLoRA's budget only shrinks; "
                f"raise init_r or lower target_r."
            )
        self.ema: dict[str, tuple[Tensor, Tensor]] = {}  # "<module>.<lora_A|lora_E|lora_B>" -> (Ī, Ū)
        self.n_layers = len(targets)
        self._layers: dict[str, _SvdLayer] | None = None  # path -> layer, found once (fixed for the adapter's life)
        self.forwards_since_step = 0
        self.warned = False

    def layers(self, model: nn.Module, name: str) -> dict[str, _SvdLayer]:
        """The adapter's layers by module path; searched once, since they change only with the adapter itself."""
        if self._layers is None:
            modules = model.get_base_model().named_modules()
            self._layers = {path: m for path, m in modules if isinstance(m, _SvdLayer) and name in m.r}
        return self._layers

    def note_forward(self) -> None:
        """Count layer forwards in training between allocations, to warn when nobody calls `update_and_allocate`
        (peft's most reported AdaLoRA pitfall: it then silently trains as plain fixed-rank LoRA)."""
        self.forwards_since_step += 1
        if self.forwards_since_step > _FORWARDS_BEFORE_WARNING * self.n_layers and not self.warned:
            self.warned = True
            warnings.warn(
                "AdaLoRA has run many training forwards without a rank allocation: call "
                "model.update_and_allocate(step) after each optimizer.step() (deltatune's trainer does), or it "
                "trains as a fixed-rank adapter.",
                stacklevel=4,
            )

    def update_and_allocate(self, layers: dict[str, _SvdLayer], name: str, config: AdaLoraConfig, step: int) -> None:
        """peft's schedule: EMAs until T − t_final, masks by budget, the final mask at T − t_final, then frozen.

        With t_final = 0 the final mask comes at the run's last step, T − 1 (steps count from 0), so a run of T steps
        always ends at the target budget; peft reaches it there only when deltaT divides T − 1.
        """
        self.forwards_since_step = 0
        final = config.total_step - config.tfinal if config.tfinal > 0 else config.total_step - 1
        if step < final:
            self._update_importance(layers, name, config)
            budget, mask_now = budget_schedule(
                step, self._init_budget(layers, name), config.target_r * len(layers), config.tinit, config.tfinal,
                config.total_step, config.deltaT,
            )  # fmt: skip
            if mask_now:
                self._mask_to_budget(layers, name, config, budget)
        elif step == final:
            self._mask_to_budget(layers, name, config, config.target_r * len(layers))
            self.ema.clear()
        else:  # the final phase: pruned triplets stay pruned whatever the optimizer did to them
            for layer in layers.values():
                if name in layer.rank_mask:
                    layer.set_rank_mask(name, layer.rank_mask[name])

    @staticmethod
    def _init_budget(layers: dict[str, _SvdLayer], name: str) -> int:
        return sum(layer.r[name] for layer in layers.values())

    def _update_importance(self, layers: dict[str, _SvdLayer], name: str, config: AdaLoraConfig) -> None:
        params, grads = [], []
        for path, layer in layers.items():
            for attr in _SvdLayer.adapter_param_names:
                param = getattr(layer, attr)[name]
                key = f"{path}.{attr}"
                if key not in self.ema:
                    self.ema[key] = (torch.zeros_like(param), torch.zeros_like(param))
                params.append(param.detach())
                grads.append(param.grad if param.grad is not None else torch.zeros_like(param))
        emas = [self.ema[f"{path}.{attr}"] for path in layers for attr in _SvdLayer.adapter_param_names]
        update_importance(params, grads, [e[0] for e in emas], [e[1] for e in emas], config.beta1, config.beta2)

    def _mask_to_budget(self, layers: dict[str, _SvdLayer], name: str, config: AdaLoraConfig, budget: int) -> None:
        scores = []
        for path, layer in layers.items():
            element = []
            for attr in ("lora_A", "lora_E", "lora_B"):
                like = getattr(layer, attr)[name]
                ipt, unc = self.ema.get(f"{path}.{attr}", (torch.zeros_like(like), torch.zeros_like(like)))
                element.append(ipt * unc)
            scores.append(triplet_scores(*element))
        keeps = keep_top(scores, budget)
        for layer, keep in zip(layers.values(), keeps, strict=True):
            layer.set_rank_mask(name, keep)
        kept_lists = torch.cat(keeps).cpu().split([k.numel() for k in keeps])  # one device sync per allocation
        config.rank_pattern = {f"{path}.lora_E": k.tolist() for path, k in zip(layers, kept_lists, strict=True)}

    def state_tensors(self, layers: dict[str, _SvdLayer], name: str) -> dict[str, Tensor]:
        """EMAs and masks, for an exact resume."""
        out = {f"ema_ipt.{k}": v[0] for k, v in self.ema.items()} | {f"ema_unc.{k}": v[1] for k, v in self.ema.items()}
        out.update({f"mask.{path}": layer.rank_mask[name] for path, layer in layers.items() if name in layer.rank_mask})
        return out

    def load_state_tensors(
        self, layers: dict[str, _SvdLayer], name: str, config: AdaLoraConfig, tensors: dict[str, Tensor]
    ) -> None:
        devices = {
            f"{path}.{attr}": getattr(m, attr)[name].device
            for path, m in layers.items()
            for attr in _SvdLayer.adapter_param_names
        }
        self.ema = {
            key: (value.to(devices[key], copy=True), tensors["ema_unc." + key].to(devices[key], copy=True))
            for key, value in ((k[len("ema_ipt.") :], v) for k, v in tensors.items() if k.startswith("ema_ipt."))
        }
        masks = {key[len("mask.") :]: value.bool() for key, value in tensors.items() if key.startswith("mask.")}
        for path, keep in masks.items():
            layers[path].set_rank_mask(name, keep)
        if masks:
            config.rank_pattern = {f"{p}.lora_E": [bool(k) for k in keep.tolist()] for p, keep in masks.items()}


def _trained(model: nn.Module) -> list[tuple[str, RankAllocator, AdaLoraConfig, dict[str, _SvdLayer]]]:
    """(name, allocator, config, layers by path) of every active AdaLoRA adapter that is being trained."""
    out = []
    for name in model.active_adapters:
        config = model.peft_config[name]
        if isinstance(config, AdaLoraConfig) and not config.inference_mode:
            allocator = model.shared[name]
            out.append((name, allocator, config, allocator.layers(model, name)))
    return out


class AdaLoraHooks:
    """What the trainer (and `PeftModel.update_and_allocate` / `forward`) call for AdaLoRA adapters."""

    def on_step(self, model: nn.Module, step: int) -> None:
        for name, allocator, config, layers in _trained(model):
            allocator.update_and_allocate(layers, name, config, step)

    def extra_loss(self, model: nn.Module) -> Tensor | float:
        """orth_reg_weight × the mean over adapted A and B matrices of ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F."""
        total: Tensor | float = 0.0
        for name, _, config, layers in _trained(model):
            if config.orth_reg_weight == 0 or not layers:
                continue
            groups: dict[tuple, list[_SvdLayer]] = {}  # same shapes: one batched product per group
            for m in layers.values():
                groups.setdefault((m.lora_A[name].shape, m.lora_B[name].shape), []).append(m)
            penalty = sum(
                orthogonality_penalty(
                    torch.stack([m.lora_A[name] for m in group]), torch.stack([m.lora_B[name] for m in group])
                ).sum()
                for group in groups.values()
            )
            total = total + config.orth_reg_weight * penalty / (2 * len(layers))
        return total

    def state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        out = {}
        for name, allocator, _, layers in _trained(model):
            out.update({f"{name}.{k}": v for k, v in allocator.state_tensors(layers, name).items()})
        return out

    def load_state_dict(self, model: nn.Module, tensors: dict[str, Tensor]) -> None:
        for name, allocator, config, layers in _trained(model):
            own = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(f"{name}.")}
            allocator.load_state_tensors(layers, name, config, own)


def adalora_extra_trainable(model: nn.Module, config: AdaLoraConfig, adapter_name: str) -> list[str]:
    return bias_parameters(model, config.bias, _SvdLayer, adapter_name)


register_method(
    MethodSpec(
        peft_type="ADALORA",
        config_cls=AdaLoraConfig,
        kind="layer",
        layers={Linear4bit: SvdLinear, nn.Linear: SvdLinear, Conv1D: SvdLinear, nn.Conv2d: SvdConv2d},
        layer_kwargs=adalora_layer_kwargs,
        param_prefix="lora_",
        extra_trainable=adalora_extra_trainable,
        hooks=AdaLoraHooks(),
        default_targets=default_lora_targets,
        make_shared=RankAllocator,
    )
)
