"""`Linear4bit`: a linear layer whose weight is stored in 4 bits and dequantized on the fly for each matmul.

The autograd function recomputes the dequantized weight in backward instead of saving it, so training keeps no
full-precision copy of frozen 4-bit weights alive between forward and backward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from deltatune.models import register_linear_type
from deltatune.quant.state import DTYPES, QuantConfig, QuantState, dequantize_4bit, quantize_4bit

_STATE_FIELDS = ("packed", "absmax", "absmax_codes", "absmax_scale", "absmax_offset")


class _Matmul4bit(torch.autograd.Function):
    """y = x Wᵀ with W = dequantize(state); W is frozen, so backward only needs grad_x = grad_y W."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: Linear4bit) -> Tensor:
        ctx.layer = layer
        return x @ layer.dequantize(x.dtype).T

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return grad_out @ ctx.layer.dequantize(grad_out.dtype), None


class Linear4bit(nn.Module):
    """Frozen linear layer with a 4-bit weight (buffers `packed`, `absmax`/`absmax_codes`/...) and an optional bias."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        state: QuantState,
        bias: Tensor | None,
        compute_dtype: str = "fp32",
        backend: str = "torch",
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.blocksize, self.compute_dtype, self.backend = (
            state.quant_type,
            state.blocksize,
            compute_dtype,
            backend,
        )
        for name in _STATE_FIELDS:
            self.register_buffer(name, getattr(state, name))
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig) -> Linear4bit:
        state = quantize_4bit(linear.weight, config.quant_type, config.blocksize, config.double_quant)
        return cls(linear.in_features, linear.out_features, state, linear.bias, config.compute_dtype, config.backend)

    def kernel_for(self, x: Tensor) -> str:
        """The matmul code for this input: "auto" picks bitsandbytes' kernels for CUDA inputs when installed, so a
        layer quantized on the CPU and moved to the GPU uses them too."""
        if self.backend == "auto":
            return "bitsandbytes" if x.is_cuda and _has_bitsandbytes() else "torch"
        return self.backend

    def _apply(self, fn, *args, **kwargs):
        # `.to(dtype)` / `.half()` would cast the float quantization constants and shift every weight: the 4-bit
        # state only follows the device (found by applying `fn` to an empty probe), never a dtype.
        state = {name: self._buffers.pop(name) for name in _STATE_FIELDS if name in self._buffers}
        try:
            super()._apply(fn, *args, **kwargs)
        finally:
            for name, tensor in state.items():
                if tensor is not None:
                    device = fn(torch.empty(0, dtype=tensor.dtype, device=tensor.device)).device
                    tensor = tensor.to(device)
                self._buffers[name] = tensor
        return self

    def weight_state(self) -> dict[str, Tensor]:
        """The stored 4-bit tensors, for `load_weight_state` to put back exactly (an unmerge)."""
        return {name: t for name in _STATE_FIELDS if (t := getattr(self, name)) is not None}

    def load_weight_state(self, state: dict[str, Tensor]) -> None:
        for name in _STATE_FIELDS:
            setattr(self, name, state.get(name))

    def state(self) -> QuantState:
        return QuantState(
            shape=torch.Size((self.out_features, self.in_features)),
            quant_type=self.quant_type,
            blocksize=self.blocksize,
            **{n: getattr(self, n) for n in _STATE_FIELDS},
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_4bit(self.state(), dtype)

    @property
    def stored_weight_numel(self) -> int:
        """Parameters the 4-bit weight stands for (buffers are not counted as parameters by torch)."""
        return self.in_features * self.out_features

    @property
    def weight(self) -> Tensor:
        """The dequantized weight (a fresh float32 tensor; writes go through `set_weight`)."""
        return self.dequantize(torch.float32)

    @torch.no_grad()
    def set_weight(self, weight: Tensor) -> None:
        """Re-quantize from a full-precision weight (used when an adapter is merged into a 4-bit base)."""
        state = quantize_4bit(weight, self.quant_type, self.blocksize, self.absmax_codes is not None)
        for name in _STATE_FIELDS:
            setattr(self, name, getattr(state, name))

    def forward(self, x: Tensor) -> Tensor:
        dtype = DTYPES[self.compute_dtype]
        if self.kernel_for(x) == "bitsandbytes":
            out = _bnb_matmul(x.to(dtype), self)
        else:
            out = _Matmul4bit.apply(x.to(dtype), self)
        if self.bias is not None:
            out = out + self.bias.to(dtype)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {self.quant_type}, "
            f"blocksize={self.blocksize}, double_quant={self.absmax_codes is not None}, "
            f"compute_dtype={self.compute_dtype}, backend={self.backend}"
        )


def linears_to_quantize(model: nn.Module, config: QuantConfig) -> list[str]:
    """Names of the nn.Linear modules a QuantConfig stores in 4 bits: all but `skip_modules`, the output head and the
    adapters' own layers."""
    from deltatune.models import output_head_name

    head = output_head_name(model)
    parts = adapter_prefixes(model)
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and n != head
        and not any(n == s or n.endswith("." + s) for s in config.skip_modules)
        and not in_adapter(n, parts)
    ]


def adapter_prefixes(model: nn.Module) -> list[str]:
    """Name prefixes of what adapter wrappers add (their tensors, `modules_to_save` copies): inside a wrapper only its
    base layer holds base weights. Those stay trainable in full precision."""
    from deltatune.layers import AdapterLayer, TrainableCopy

    out = []
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            out.append(name + ".")
        elif isinstance(module, TrainableCopy):
            out.append(name + ".modules_to_save.")
    return out


def in_adapter(name: str, prefixes: list[str]) -> bool:
    return any(name.startswith(p) and not name.startswith(p + "base_layer") for p in prefixes)


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def _bnb_matmul(x: Tensor, layer: Linear4bit) -> Tensor:
    """bitsandbytes' 4-bit matmul: our packing (high nibble first, absmax per block) is its layout; the absmax
    constants are handed over dequantized (fp32), since its double quantization uses another 8-bit code."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState as BnbState

    from deltatune.functional.nf4 import codebook

    state = BnbState(
        absmax=layer.state().absmax_fp32(),
        shape=torch.Size((layer.out_features, layer.in_features)),
        code=codebook(layer.quant_type, x.device),
        blocksize=layer.blocksize,
        quant_type=layer.quant_type,
        dtype=x.dtype,
    )
    return bnb.matmul_4bit(x, layer.packed.view(-1, 1).t(), quant_state=state)


register_linear_type(Linear4bit)
