"""LoRA on torch's `nn.MultiheadAttention` (CLIP-style and hand-written transformers use it), in peft's layout.

The attention keeps its packed query/key/value projection as a bare parameter (`in_proj_weight`, (3E, E)) and reads
its output projection's weight directly, never calling that module's forward; so no wrapper around a submodule can
add a term. This wrapper holds a LoRA pair for the packed projection and puts a `LoraLinear` on `out_proj` (peft's
keys: `<mha>.lora_A/B.weight` and `<mha>.base_layer.out_proj.lora_A/B.weight`), and its forward runs the attention
with the effective weights, base + s·B·A of every active unmerged adapter, in place of the base's for that one call
(the attention's own forward run on a shallow view of it that holds them): differentiable, nothing written to the
base (peft merges and unmerges the weights around each forward), and it holds when FSDP has turned the parameters
into plain tensors. Merging folds each pair into its weight like any LoRA layer.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from torch import Tensor, nn

from deltatune.errors import UnsupportedModuleError
from deltatune.functional.lora import lora_delta
from deltatune.methods.lora_layer import LoraLinear, _LoraLayer
from deltatune.methods.lora_options import init_pair
from deltatune.registry import register_layer


class LoraMultiheadAttention(_LoraLayer):
    """LoRA on an `nn.MultiheadAttention` with one packed q/k/v projection (`kdim == vdim == embed_dim`)."""

    rows_independent = False  # the batch may be dimension 1 (batch_first=False): rows cannot be split here
    printed_name = "MultiheadAttention"

    def __init__(self, base_layer: nn.MultiheadAttention) -> None:
        if not base_layer._qkv_same_embed_dim:
            raise UnsupportedModuleError(
                "LoRA on nn.MultiheadAttention needs one packed q/k/v projection (kdim and vdim equal to embed_dim); "
                "this one has separate q/k/v weights: exclude it (exclude_modules)."
            )
        super().__init__(base_layer)
        self.embed_dim = base_layer.embed_dim
        self.in_features, self.out_features = self.embed_dim, 3 * self.embed_dim  # the packed projection's (peft's)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        if not isinstance(base_layer.out_proj, LoraLinear):
            base_layer.out_proj = LoraLinear(base_layer.out_proj)

    _FROM_BASE = ("num_heads", "head_dim", "batch_first", "kdim", "vdim", "in_proj_weight", "in_proj_bias",
                  "bias_k", "bias_v", "add_zero_attn", "merge_masks")  # fmt: skip
    """What code around an attention reads from it (torch's transformer layers, user code): the base's."""

    def __getattr__(self, name: str) -> Any:
        if name in LoraMultiheadAttention._FROM_BASE:
            return getattr(self._modules["base_layer"], name)
        return super().__getattr__(name)

    @property
    def _qkv_same_embed_dim(self) -> bool:
        # False on purpose: torch's nn.TransformerEncoderLayer takes a fused fast path in inference that reads the
        # attention's weights itself and would skip this forward (and the adapter); it checks this flag first
        return False

    @property
    def base_weight(self) -> nn.Parameter:
        return self.base_layer.in_proj_weight

    @property
    def out_proj(self) -> LoraLinear:
        return self.base_layer.out_proj

    def add_adapter(self, name: str, **kwargs: Any) -> None:
        """The pair on the packed projection, and the same adapter on `out_proj` (peft adapts both together)."""
        refused = {
            "lora_dropout": "dropout acts on a layer's input, and this LoRA changes the attention's weights instead",
            "variant": "the LoRA variants (DoRA, VeLoRA) act on one linear weight; this layer packs several",
            "lora_bias": "the packed projection has no LoRA bias in peft's layout",
        }
        for key, why in refused.items():
            if kwargs.get(key):
                raise UnsupportedModuleError(
                    f"{key}={kwargs[key]!r} is not supported for LoRA on nn.MultiheadAttention ({why}); set it off "
                    "or exclude the module (exclude_modules)."
                )
        super().add_adapter(name, **kwargs)
        self.out_proj.add_adapter(name, **kwargs)

    def _create_weights(self, name: str, r: int, init_lora_weights: bool | str) -> None:
        width = self.embed_dim
        self.lora_A[name] = nn.Linear(width, r, bias=False, device=self._device())
        self.lora_B[name] = nn.Linear(r, 3 * width, bias=False, device=self._device())
        init_pair(self.lora_A[name].weight, self.lora_B[name].weight, init_lora_weights, r)

    def delta_weight(self, name: str) -> Tensor:
        """s · B A for the packed projection, (3E, E), float32."""
        return lora_delta(self.lora_A[name].weight.float(), self.lora_B[name].weight.float(), self.scaling[name])

    def set_active(self, names) -> None:
        super().set_active(names)
        self.out_proj.set_active(names)

    def forward(self, query: Tensor, *args: Any, **kwargs: Any) -> Any:
        """The attention with each weight's active, unmerged adapters folded in for this call."""
        inner, outer = self.unmerged_active(), self.out_proj.unmerged_active()
        if not inner and not outer:
            return self.base_layer(query, *args, **kwargs)
        base = self.base_layer
        view = object.__new__(type(base))  # the attention's state, shared, with the two weights replaced
        view.__dict__.update(base.__dict__, _parameters=dict(base._parameters), _modules=dict(base._modules))
        if inner:
            weight = self.base_weight
            del view._parameters["in_proj_weight"]
            view.__dict__["in_proj_weight"] = weight + sum(self.delta_weight(n) for n in inner).to(weight.dtype)
        if outer:
            weight = self.out_proj.base_weight
            delta = sum(self.out_proj.delta_weight(n) for n in outer).to(weight.dtype)
            view._modules["out_proj"] = SimpleNamespace(weight=weight + delta, bias=self.out_proj.bias)
        return type(base).forward(view, query, *args, **kwargs)


register_layer("LORA", nn.MultiheadAttention, LoraMultiheadAttention)
