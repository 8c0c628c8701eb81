"""`AdapterLayer`: the wrapper that replaces one target module, and `TrainableCopy` for `modules_to_save`.

A method subclass declares its per-adapter state as data (`adapter_param_names`) and implements `add_adapter`,
`forward`, `compose` and `decompose`; the base class drives merge/unmerge (casting, the finite check, the merged
stack), deletion, activation and the structural state-dict mapping used by checkpoint io.
"""

from __future__ import annotations

import abc
import copy
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.errors import AdapterError, MergeError
from deltatune.mixed_batch import split_rows

_SIZE_ATTRS = {
    "in_features": ("in_features", "in_channels", "num_embeddings", "embed_dim", "normalized_shape", "num_features"),
    "out_features": ("out_features", "out_channels", "embedding_dim", "embed_dim", "normalized_shape", "num_features"),
}
"""peft's size attributes of a tuner layer, and where each base module type keeps them."""


def _base_size(module: nn.Module, names: tuple[str, ...]) -> int | None:
    for attr in names:
        value = getattr(module, attr, None)
        if isinstance(value, (tuple, list, torch.Size)) and value:
            value = value[-1]  # a norm's normalized_shape: the features it normalizes
        if isinstance(value, int):
            return value
    return None


class AdapterLayer(nn.Module, metaclass=abc.ABCMeta):
    """Base of every layer-method wrapper. `base_layer` is frozen and never replaced.

    Subclasses implement:
        add_adapter(name, **flat_args): create the adapter's parameters.
        forward(x): base_layer(x) plus the method's term for every active, unmerged adapter.
        compose(name, W) -> W': the merged weight (float32 in, float32 out).
        decompose(name, W') -> W: the exact inverse of `compose`.
    """

    adapter_param_names: tuple[str, ...] = ()
    """Attributes holding per-adapter tensors (ModuleDict or ParameterDict keyed by adapter name), in peft's names."""
    adapter_other_names: tuple[str, ...] = ()
    """Attributes holding per-adapter plain values (dicts keyed by adapter name), e.g. scaling."""
    param_roles: dict[str, str] = {}
    """Attribute -> role for optimizers that treat factors differently: "up" for the factor mapping the low-rank
    space back to the output (B in B·A; LoRA+ gives it a higher learning rate), "embedding" for an embedding's
    input-side factor."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__:  # every method's forward honours per-row adapters (deltatune.mixed_batch)
            cls.forward = split_rows(cls.__dict__["forward"])

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.row_adapters: list[str] | None = None
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.adapter_cache: dict[str, Any] = {}
        """Per adapter: values derived from its tensors (e.g. DoRA's eval-mode norm). Dropped when the adapter is
        deleted or the layer moves (`.to()`, `.double()`, ...), so nothing derived outlives what it came from."""
        self.merge_state: dict[str, dict[str, Tensor]] = {}
        """Per merged adapter: what `unmerge` needs to restore the base exactly; moves with the layer."""
        self.frozen_params: dict[str, tuple[str, ...]] = {}
        """Per adapter: attributes (of `adapter_param_names`) saved with it but never trained."""
        for p in base_layer.parameters():
            p.requires_grad_(False)

    # -- adapter bookkeeping ------------------------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        """Adapters this layer holds, in insertion order."""
        first = getattr(self, self.adapter_param_names[0])
        return list(first.keys())

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def unmerged_active(self) -> list[str]:
        """Active adapters whose term the forward must add (none while disabled)."""
        if self.disabled:
            return []
        return [n for n in self.active_adapters if n in self.adapter_names and n not in self.merged_adapters]

    def set_active(self, names: Iterable[str]) -> None:
        self.active_adapters = [n for n in names if n in self.adapter_names]

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise AdapterError(f"adapter {name!r} is merged into the base weights; unmerge it before deleting.")
        for attr in self.adapter_param_names + self.adapter_other_names:
            container = getattr(self, attr)
            if name in container:
                del container[name]
        self.adapter_cache.pop(name, None)
        self.frozen_params.pop(name, None)
        self.__dict__.get("configured_scaling", {}).pop(name, None)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def _apply(self, fn, *args, **kwargs):
        # a move or cast invalidates derived values and carries the merge records along with the weights
        self.adapter_cache.clear()
        for state in self.merge_state.values():
            for key, tensor in state.items():
                state[key] = fn(tensor)
        return super()._apply(fn, *args, **kwargs)

    def adapter_parameters(self, name: str, skip: tuple[str, ...] = ()) -> list[nn.Parameter]:
        """Adapter `name`'s parameters (those of the attributes in `skip` left out)."""
        return [
            p
            for attr in self.adapter_param_names
            if attr not in skip and name in (c := getattr(self, attr))
            for p in _params(c[name])
        ]

    def trainable_parameters(self, name: str) -> list[nn.Parameter]:
        """The parameters of adapter `name` that train when it does: all but those its method keeps fixed
        (`frozen_params`, e.g. MiCA's B)."""
        return self.adapter_parameters(name, self.frozen_params.get(name, ()))

    # -- peft's layer API (what quantization code, other libraries and user loops touch) ------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in _SIZE_ATTRS:  # peft's layers all answer these; wrappers that do not set them read the base's
                size = _base_size(self.get_base_layer(), _SIZE_ATTRS[name])
                if size is not None:
                    return size
            raise

    def get_base_layer(self) -> nn.Module:
        """The original module this wrapper (and any wrapper inside it) adapts."""
        base = self.base_layer
        while isinstance(base, AdapterLayer):
            base = base.base_layer
        return base

    @property
    def weight(self) -> Tensor:
        """The base layer's weight (read-only proxy, as in peft)."""
        return self.get_base_layer().weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.get_base_layer(), "bias", None)

    @property
    def active_adapter(self) -> str | list[str]:
        """peft's form: the active adapter's name, or the list when several are active."""
        return self.active_adapters[0] if len(self.active_adapters) == 1 else list(self.active_adapters)

    @property
    def adapter_layer_names(self) -> tuple[str, ...]:
        """peft's name for `adapter_param_names`."""
        return tuple(self.adapter_param_names)

    @property
    def other_param_names(self) -> tuple[str, ...]:
        """peft's name for `adapter_other_names` (per-adapter plain values: rank, scale, ...)."""
        return tuple(self.adapter_other_names)

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """peft's per-layer switch: `adapter_names` become this layer's active adapters, their tensors trainable
        (frozen with `inference_mode`), every other adapter's frozen. The model's `set_adapter` is the usual way."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in self.adapter_names:
            for param in self.adapter_parameters(name):
                param.requires_grad_(False)
            for param in self.trainable_parameters(name):
                param.requires_grad_(name in names and not inference_mode)
        self.set_active(names)

    @property
    def disable_adapters(self) -> bool:
        """True while the adapters are off (peft's flag)."""
        return self.disabled

    def enable_adapters(self, enabled: bool) -> None:
        """Turn this layer's adapters on or off (peft's switch)."""
        self.disabled = not enabled

    # -- scale (peft's LoRA-family API; for methods whose layers keep a per-adapter `scaling`) ---------------------
    def _scaling(self, adapter: str | None = None) -> dict[str, float]:
        scaling = getattr(self, "scaling", None)
        if not isinstance(scaling, dict):
            raise AdapterError(f"{type(self).__name__} has no adapter scale to change.")
        if self.merged:
            raise MergeError("the adapter is merged into the base weight; unmerge it before changing its scale.")
        configured = self.__dict__.setdefault("configured_scaling", {})
        for name in [adapter] if adapter is not None else self.active_adapters:
            configured.setdefault(name, scaling[name])  # first change: remember what the config gave
        return scaling

    def set_scale(self, adapter: str, scale: float) -> None:
        """The adapter's scale becomes `scale` times the one its config gives (alpha / r for LoRA)."""
        if adapter not in self.adapter_names:
            return  # as in peft: a layer without this adapter is left alone
        scaling = self._scaling(adapter)
        scaling[adapter] = scale * self.configured_scaling[adapter]

    def scale_layer(self, scale: float) -> None:
        """Multiply the active adapters' scales by `scale`."""
        scaling = self._scaling()
        for name in self.active_adapters:
            scaling[name] *= scale

    def unscale_layer(self, scale: float | None = None) -> None:
        """Divide the active adapters' scales by `scale`; with None, give them back their configured scale."""
        scaling = self._scaling()
        for name in self.active_adapters:
            scaling[name] = self.configured_scaling[name] if scale is None else scaling[name] / scale

    @torch.no_grad()
    def get_delta_weight(self, adapter: str) -> Tensor:
        """What merging `adapter` adds to the base weight, in the base weight's layout, float32."""
        weight = self.base_weight.detach().float()
        return self.compose_unrecorded(adapter, weight) - weight

    def compose_unrecorded(self, name: str, weight: Tensor) -> Tensor:
        """`compose` for a look only (a check, a delta): whatever it records for an unmerge is put back as it was."""
        before = self.merge_state.get(name)
        kept = dict(before) if before is not None else None
        try:
            return self.compose(name, weight)
        finally:
            if kept is None:
                self.merge_state.pop(name, None)
            else:
                self.merge_state[name] = kept

    # -- state for checkpoints (structural: no string surgery on adapter names) --------------------------------------
    def adapter_state(self, name: str) -> dict[str, Tensor]:
        """Tensors of adapter `name`, keyed relative to this layer without the adapter name (peft's saved keys)."""
        out: dict[str, Tensor] = {}
        for attr in self.adapter_param_names:
            container = getattr(self, attr)
            if name not in container:
                continue
            value = container[name]
            if isinstance(value, nn.Module):
                out.update({f"{attr}.{k}": t for k, t in value.state_dict().items()})
            else:
                out[attr] = value
        return out

    @torch.no_grad()
    def load_adapter_state(self, name: str, tensors: dict[str, Tensor]) -> None:
        """Overwrite adapter `name`'s tensors from `tensors` (keys as `adapter_state` gives them, already checked)."""
        own = self.adapter_state(name)
        for key, tensor in tensors.items():
            own[key].copy_(tensor.to(own[key].dtype))

    # -- merging ------------------------------------------------------------------------------------------------------
    @property
    def base_weight(self) -> nn.Parameter:
        return self.base_layer.weight

    @abc.abstractmethod
    def add_adapter(self, name: str, **kwargs) -> None:
        """Create adapter `name`'s parameters from flat keyword arguments."""

    def initialize_from_base(self, name: str) -> None:
        """Run adapter `name`'s initialisation that reads, and may rewrite, the base weight (e.g. from its singular
        vectors). `PeftModel` calls it once the adapter is in place and any checkpoint for it has been validated,
        so a refused load never touches the base; most methods have no such init."""

    @torch.no_grad()
    def write_base_weight(self, weight: Tensor) -> None:
        """Replace the base weight with `weight` (float32, the base's layout), stored in the base's own form."""
        if self._base_stored_otherwise:
            self.base_layer.set_weight(weight)
        else:
            self.base_weight.data.copy_(weight.to(self.base_weight.dtype))

    @abc.abstractmethod
    def compose(self, name: str, weight: Tensor) -> Tensor:
        """The base weight with adapter `name` folded in (float32)."""

    @abc.abstractmethod
    def decompose(self, name: str, weight: Tensor) -> Tensor:
        """The inverse of `compose`."""

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Iterable[str] | None = None) -> None:
        """Fold adapters (default: the active ones) into the base weight (in float32, cast back once); peft's
        signature. `safe_merge` checks finiteness before writing.

        Each merge records what `unmerge` needs to give back the exact bits of the weight it started from: the
        positions where rounding `decompose(compose(W))` to the base dtype misses W, and W's values there (a
        sparse correction, typically well under 1% of the weight); a base stored in another form (4-bit) keeps
        its previous stored tensors instead.
        """
        names = self.active_adapters if adapter_names is None else adapter_names
        names = [n for n in names if n not in self.merged_adapters]
        for name in names:
            if name not in self.adapter_names:
                raise AdapterError(f"adapter {name!r} does not exist on this layer; it holds {self.adapter_names}.")
        for name in names:
            before = self.base_weight.detach()
            new = self.compose(name, before.float())
            if safe_merge and not torch.isfinite(new).all():
                raise MergeError(
                    f"NaNs detected in the merged weights: merging adapter {name!r} gives non-finite values; the base "
                    "was left unchanged."
                )
            new_bias = self._merged_bias(name, safe_merge)
            if self._base_stored_otherwise:
                self.merge_state.setdefault(name, {}).update(self.base_layer.weight_state())
                self.base_layer.set_weight(new)
            else:
                new = new.to(before.dtype)
                record = exact_restore_record(before, self.decompose(name, new.float()))
                self.merge_state.setdefault(name, {}).update(record)
                self.base_weight.data.copy_(new)
            if new_bias is not None:
                bias = self.base_layer.bias
                recovered = self.decompose_bias(name, new_bias.float()).to(bias.dtype)
                record = exact_restore_record(bias.detach(), recovered)
                self.merge_state[name].update({f"bias.{k}": v for k, v in record.items()})
                bias.data.copy_(new_bias)
            self.merged_adapters.append(name)

    def changes_bias(self, name: str) -> bool:
        """Whether merging adapter `name` also changes the base layer's bias (`compose_bias` / `decompose_bias`)."""
        return False

    def compose_bias(self, name: str, bias: Tensor) -> Tensor:
        """The base bias with adapter `name` folded in (float32); only called when `changes_bias(name)`."""
        raise NotImplementedError

    def decompose_bias(self, name: str, bias: Tensor) -> Tensor:
        """The inverse of `compose_bias`."""
        raise NotImplementedError

    def no_bias_to_merge(self, name: str) -> str:
        """The error when adapter `name` changes a bias the base layer does not have."""
        return (
            f"adapter {name!r} trains a bias and this {type(self.base_layer).__name__} has none to merge it into; keep "
            "the adapter unmerged."
        )

    def _merged_bias(self, name: str, safe_merge: bool) -> Tensor | None:
        if not self.changes_bias(name):
            return None
        bias = getattr(self.base_layer, "bias", None)
        if bias is None:
            raise MergeError(self.no_bias_to_merge(name))
        new_bias = self.compose_bias(name, bias.detach().float())
        if safe_merge and not torch.isfinite(new_bias).all():
            raise MergeError(
                f"NaNs detected in the merged bias: merging adapter {name!r} gives non-finite values (NaNs detected "
                "in the merged weights, in peft's words for LoRA); the base was left unchanged."
            )
        return new_bias.to(bias.dtype)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo every merge, newest first; the base weight comes back bit-identical."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            record = self.merge_state[name]
            if self._base_stored_otherwise:
                self.base_layer.load_weight_state(record)
            else:
                weight = self.base_weight
                restored = self.decompose(name, weight.detach().float()).to(weight.dtype)
                restored.view(-1)[record["index"].long()] = record["value"]
                weight.data.copy_(restored)
            if "bias.index" in record:
                bias = self.base_layer.bias
                restored = self.decompose_bias(name, bias.detach().float()).to(bias.dtype)
                restored.view(-1)[record["bias.index"].long()] = record["bias.value"]
                bias.data.copy_(restored)
            del self.merge_state[name]

    @property
    def _base_stored_otherwise(self) -> bool:
        """True when the base keeps its weight in another form (4-bit): merging writes through its `set_weight`
        and unmerging puts its stored tensors back (`weight_state` / `load_weight_state`)."""
        return callable(getattr(self.base_layer, "weight_state", None))

    @property
    def merge_record_bytes(self) -> int:
        """Memory held by the merge records (what exact unmerging costs)."""
        return sum(t.numel() * t.element_size() for state in self.merge_state.values() for t in state.values())


def _bits(t: Tensor) -> Tensor:
    """The tensor's raw bits as integers (so -0.0 != 0.0 and NaN == NaN compare as stored)."""
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def exact_restore_record(original: Tensor, recovered: Tensor) -> dict[str, Tensor]:
    """Where `recovered` (computed in float32) misses `original` once rounded to its dtype: flat positions and the
    original values there. Scattering them into the rounded recovery gives `original` back bit for bit."""
    rounded = recovered.to(original.dtype)
    index = (_bits(rounded) != _bits(original)).view(-1).nonzero().squeeze(1)
    if original.numel() < 2**31:
        index = index.to(torch.int32)
    return {"index": index, "value": original.reshape(-1)[index.long()].clone()}


class Unmergeable:
    """Mixin (before `AdapterLayer`) for wrappers whose change is not a weight change (edits of hidden states,
    virtual tokens, prompt attention): merging, and the base weight it starts from, raise `MergeError` with the
    method's `merge_refusal`."""

    merge_refusal: str = "this adapter cannot be merged into the weights."

    def compose(self, name: str, weight: Tensor) -> Tensor:
        raise MergeError(self.merge_refusal)

    def decompose(self, name: str, weight: Tensor) -> Tensor:
        raise MergeError(self.merge_refusal)

    @property
    def base_weight(self) -> Tensor:
        raise MergeError(self.merge_refusal)  # merging asks for the weight first


class TrainableCopy(nn.Module):
    """`modules_to_save`: a trainable copy of a module per adapter; the original stays frozen and is used when disabled.

    Attribute names (`original_module`, `modules_to_save`) are peft's, so the saved key of adapter `a`'s copy of
    `classifier.weight` is simply `classifier.weight`.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False
        self.row_adapters: list[str] | None = None
        for p in module.parameters():
            p.requires_grad_(False)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    @property
    def adapter_layer_names(self) -> tuple[str, ...]:
        """peft's attribute: the containers holding per-adapter tensors (here the per-adapter copies)."""
        return ("modules_to_save",)

    @property
    def other_param_names(self) -> tuple[str, ...]:
        """peft's attribute: per-adapter plain values (a trainable copy has none)."""
        return ()

    @property
    def _adapters(self) -> set[str]:
        """peft's (private) record of the adapters a wrapper serves; its tests read it after delete_adapter."""
        return set(self.modules_to_save)

    def add_adapter(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def set_active(self, names: Iterable[str]) -> None:
        self.active_adapters = [n for n in names if n in self.modules_to_save]

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.modules_to_save[name].parameters()) if name in self.modules_to_save else []

    trainable_parameters = adapter_parameters

    load_adapter_state = AdapterLayer.load_adapter_state

    def adapter_state(self, name: str) -> dict[str, Tensor]:
        return dict(self.modules_to_save[name].state_dict()) if name in self.modules_to_save else {}

    def selected(self) -> nn.Module:
        """The module the forward uses: the first active copy, else the original."""
        if self.disabled or not self.active_adapters:
            return self.original_module
        return self.modules_to_save[self.active_adapters[0]]

    @property
    def rows_independent(self) -> bool:
        """Whether a mixed-adapter batch may run its rows through separate copies: not where the batch is not the
        first dimension (recurrent and attention modules without batch_first) or rows meet (batch norm training)."""
        module = self.original_module
        if isinstance(module, (nn.RNNBase, nn.MultiheadAttention)):
            return bool(module.batch_first)
        return not (isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training)

    @split_rows
    def forward(self, *args, **kwargs):
        return self.selected()(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name in _OWN_ATTRS or "_modules" not in self.__dict__:
                raise
            # Code outside (e.g. transformers reading `lm_head.weight`) sees the module in use.
            return getattr(self.selected(), name)


_OWN_ATTRS = frozenset({"original_module", "modules_to_save", "active_adapters", "disabled"})


def _params(value: nn.Module | Tensor) -> list[nn.Parameter]:
    if isinstance(value, nn.Module):
        return list(value.parameters())
    return [value] if isinstance(value, nn.Parameter) else []  # a BufferDict's state is not trained


class BufferDict(nn.Module):
    """Per-adapter tensors that are state, not parameters (e.g. VeLoRA's projection): saved with the adapter and moved
    with the layer, never trained. Keyed by adapter name like a ParameterDict (`layer.attr[name]`)."""

    def __getitem__(self, name: str) -> Tensor:
        return self._buffers[name]

    def __setitem__(self, name: str, value: Tensor) -> None:
        self.register_buffer(name, value, persistent=True)

    def __delitem__(self, name: str) -> None:
        del self._buffers[name]

    def __contains__(self, name: object) -> bool:
        return name in self._buffers

    def __iter__(self) -> Iterator[str]:
        return iter(self._buffers)

    def __len__(self) -> int:
        return len(self._buffers)

    def keys(self) -> list[str]:
        return list(self._buffers)


def module_device(module: nn.Module) -> torch.device:
    """Where a module's tensors live (its first parameter or buffer; quantized layers hold only buffers)."""
    return next(t for t in (*module.parameters(), *module.buffers())).device


def bias_parameters(model: nn.Module, bias: str, layer_type: type[nn.Module], adapter_name: str) -> list[str]:
    """Names of the base biases a method trains with adapter `adapter_name`: none; "all" biases; or (any other mode,
    e.g. "lora_only") the biases of the `layer_type` wrappers holding that adapter."""
    if bias == "none":
        return []
    names = [n for n, _ in model.named_parameters() if n.endswith("bias")]
    if bias == "all":
        return names
    wrapped = {n for n, m in model.named_modules() if isinstance(m, layer_type) and adapter_name in m.adapter_names}
    return [n for n in names if n.endswith("base_layer.bias") and n.rsplit(".", 2)[0] in wrapped]
