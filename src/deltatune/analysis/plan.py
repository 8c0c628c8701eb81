"""`plan_memory`: peak training memory of full fine-tuning, LoRA, QLoRA or any registered method, from a model's config
alone (the model is built on the meta device: no weights are loaded, nothing is allocated).

Parts of the peak:
    base weights       every frozen parameter at the compute dtype; QLoRA: the linear layers the 4-bit loader
                       quantizes at 4 bits + their blockwise absmax (double-quantized: 1 byte per 64 values + one fp32
                       per 256 blocks), the rest at the compute dtype
    trainable state    trainable parameters + their gradients + optimizer state. Adapters train in fp32 (4 + 4 bytes
                       per value); full fine-tuning keeps bf16 weights (in "base weights") and grads (2) plus an fp32
                       master copy (4). AdamW: two fp32 moments (8); adamw_8bit: 2; paged / offload: 0 on the device
                       (in host memory)
    activations        what autograd saves in one forward, counted by running the model on the meta device under
                       `saved_tensors_hooks` (parameters and shared storages counted once): the model's real structure,
                       no formula per family; plus backward's workspace, one block's worth (the gradients of the block
                       being differentiated). With gradient checkpointing: each block's input, plus one block's saved
                       tensors (its recomputation in backward) and its workspace
    logits and loss    the logits, their fp32 (shifted) copy, the log-softmax the loss saves, and the logits' gradient;
                       with `chunked_loss` (`deltatune.chunked_loss`): one chunk's logits (fp32 and compute dtype),
                       the hidden states' gradient it keeps, and the head weight's fp32 gradient when the head trains
A peak estimate is the sum: it ignores allocator fragmentation and the CUDA context (~0.3-1 GB), which the GPU-fit
lines leave room for (a GPU "fits" when the estimate is at most 90% of its memory).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.errors import ConfigError

GIB = 2**30
GPUS = {"T4 16GB": 16, "RTX 4090 24GB": 24, "A10 24GB": 24, "L40S 48GB": 48, "A100 40GB": 40, "A100 80GB": 80,
        "H100 80GB": 80, "H200 141GB": 141}  # fmt: skip
PRESETS = {  # model shapes people plan for, built from their published configs
    "llama-7b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "vocab_size": 32000},
    "llama-13b": {"model_type": "llama", "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                  "num_attention_heads": 40, "vocab_size": 32000},
    "llama-3-8b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256},
}  # fmt: skip
DEFAULT_METHODS = ["full", "lora", "qlora"]
MODEL_HELP = " | ".join([*PRESETS, "smollm2", "minilm", "model dir", "config.json"])
METHOD_HELP = "full | lora | qlora | any registered peft_type; repeat to compare (default: full, lora, qlora)"
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_OPTIMIZER_BYTES = {"adamw": 8, "adamw_8bit": 2, "paged": 0, "offload": 0}
_4BIT_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes + double-quantized absmax per value


@dataclass
class MemoryPlan:
    """Bytes of each part of the peak, and what they were computed for."""

    method: str
    batch: int
    seq: int
    dtype: str
    base_weights: int
    trainable_params: int
    trainable_state: int
    activations: int
    logits_and_loss: int
    total_params: int
    adapter_file_bytes: int
    per_example_bytes: int = field(repr=False, default=0)
    """Activations + logits/loss per example (what one more row in the batch costs)."""

    @property
    def peak(self) -> int:
        return self.base_weights + self.trainable_state + self.activations + self.logits_and_loss

    def fits(self, gib: float, headroom: float = 0.9) -> bool:
        return self.peak <= headroom * gib * GIB

    def largest_batch(self, gib: float, headroom: float = 0.9) -> int:
        """The largest batch (same sequence length) whose estimate fits in `gib`; 0 if not even one row does."""
        fixed = self.peak - self.per_example_bytes * self.batch
        return max(0, int((headroom * gib * GIB - fixed) // max(1, self.per_example_bytes)))


def model_config(source: str | Path) -> Any:
    """A transformers config from a preset name, "smollm2" / "minilm" (the bundled models), a model directory or a
    config.json."""
    from transformers import AutoConfig

    name = str(source)
    if name == "minilm":
        from deltatune.pretrained import bundled_encoder_dir

        return AutoConfig.from_pretrained(bundled_encoder_dir())
    if name in PRESETS:
        values = dict(PRESETS[name])
        return AutoConfig.for_model(values.pop("model_type"), **values)
    if name == "smollm2":
        from deltatune.pretrained import resolve_model_path

        return AutoConfig.from_pretrained(resolve_model_path(name))
    path = Path(name)
    if path.is_file() and path.suffix == ".json":
        return AutoConfig.from_pretrained(path.parent)
    if (path / "config.json").is_file():
        return AutoConfig.from_pretrained(path)
    raise ConfigError(
        f"{source}: not a preset ({', '.join(PRESETS)}), 'smollm2', 'minilm', a model directory or a config.json."
    )


def _meta_model(config: Any, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModel, AutoModelForCausalLM

    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
        except ValueError:  # an encoder (BERT): its body
            return AutoModel.from_config(config, dtype=dtype)


def _saved_bytes(model: nn.Module, batch: int, seq: int) -> tuple[int, int]:
    """(bytes autograd saves in a forward of (batch, seq) tokens, bytes the loss saves), on the meta device."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}
    loss_saved: dict[int, int] = {}
    target = saved

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in params:
            target[key] = max(target.get(key, 0), t.untyped_storage().nbytes())
        return t

    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=ids).logits
        target = loss_saved
        nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    for key in loss_saved:
        saved.pop(key, None)
    # the loss also holds the logits themselves, their fp32 copy (shifted), and in backward the logits' gradient
    workspace = logits.numel() * (logits.element_size() + 4 + 4)
    return sum(saved.values()), sum(loss_saved.values()) + workspace


def _apply_method(model: nn.Module, method: str, rank: int, targets: list[str] | None, options: dict[str, Any]):
    """The model with the method applied (meta device); "full" trains every parameter."""
    if method == "full":
        model.requires_grad_(True)
        return model
    from deltatune.registry import get_method

    peft_type = "LORA" if method in ("lora", "qlora") else method.upper()
    spec = get_method(peft_type)
    fields = set(spec.config_cls.__dataclass_fields__)
    values: dict[str, Any] = {k: v for k, v in {"r": rank, "target_modules": targets}.items() if k in fields and v}
    values.update(options)
    from deltatune.model import get_peft_model

    return get_peft_model(model, spec.config_cls(**values))


def _quantized_names(model: nn.Module) -> set[str]:
    from deltatune.quant import QuantConfig
    from deltatune.quant.linear4bit import linears_to_quantize

    return {f"{n}.weight" for n in linears_to_quantize(model, QuantConfig())}


def plan_memory(
    model: str | Path | Any,
    method: str = "lora",
    *,
    rank: int = 8,
    targets: list[str] | None = None,
    batch: int = 1,
    seq: int = 512,
    dtype: str = "bf16",
    gradient_checkpointing: bool = False,
    optimizer: str = "adamw",
    method_options: dict[str, Any] | None = None,
    chunked_loss: bool = False,
) -> MemoryPlan:
    """Estimate the peak training memory (see the module doc). `model`: preset, "smollm2", directory, config.json or a
    transformers config; `method`: "full", "lora", "qlora" or any registered peft_type (fields in `method_options`);
    `rank`: the method's rank where it has one; `chunked_loss`: the loss as `deltatune train` computes it by default
    (the head a chunk of positions at a time, never the whole logits)."""
    if dtype not in _BYTES or optimizer not in _OPTIMIZER_BYTES:
        raise ConfigError(f"dtype must be one of {list(_BYTES)} and optimizer one of {list(_OPTIMIZER_BYTES)}.")
    config = model if hasattr(model, "to_dict") else model_config(model)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    base = _meta_model(config, torch_dtype)
    quantized = _quantized_names(base) if method == "qlora" else set()
    total_params = sum(p.numel() for p in base.parameters())
    adapted = _apply_method(base, method, rank, targets, dict(method_options or {}))
    names = {n.replace("base_layer.", "").replace("base_model.model.", ""): p for n, p in adapted.named_parameters()}
    trainable = sum(p.numel() for p in names.values() if p.requires_grad)
    frozen = {n: p for n, p in names.items() if not p.requires_grad}
    weights = sum(p.numel() * (_4BIT_BYTES if n in quantized else _BYTES[dtype]) for n, p in frozen.items())
    per_value = 8  # an adapter value and its gradient, fp32
    if method == "full":
        weights = total_params * _BYTES[dtype]  # the weights themselves train (their bytes are counted here)
        per_value = _BYTES[dtype] + (4 if dtype != "fp32" else 0)  # grads, + an fp32 master copy in mixed precision
    state = trainable * (per_value + _OPTIMIZER_BYTES[optimizer])
    activations, loss = _activations(adapted, config, torch_dtype, batch, seq, gradient_checkpointing, method)
    if chunked_loss:
        loss = _chunked_loss_bytes(adapted, batch * seq, torch_dtype)
    per_example = (activations + loss) // batch
    return MemoryPlan(method, batch, seq, dtype, int(weights), trainable, int(state), activations, loss,
                      total_params, trainable * 4 if method != "full" else total_params * _BYTES[dtype],
                      per_example)  # fmt: skip


def _chunked_loss_bytes(model: nn.Module, positions: int, dtype: torch.dtype) -> int:
    """What `linear_cross_entropy` holds at its peak: one chunk's logits in the compute dtype and in fp32, the
    (positions x hidden) gradient it computes in the forward and keeps for backward, and the head weight's fp32
    gradient when it trains."""
    from deltatune.chunked_loss import chunk_rows

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is None:
        raise ConfigError(f"{type(base).__name__} has no output head: chunked_loss applies to causal LMs.")
    vocab, hidden = weight.shape
    size = torch.finfo(dtype).bits // 8
    chunk = chunk_rows(vocab) * vocab * (4 + size)
    return chunk + positions * hidden * size + (vocab * hidden * 4 if weight.requires_grad else 0)


def _activations(model, config, dtype, batch: int, seq: int, checkpointed: bool, method: str) -> tuple[int, int]:
    """(saved activations + backward workspace, logits and loss). Backward holds, besides what is still saved, the
    gradients of one block's activations at a time: one block's saved bytes again. Checkpointing keeps each block's
    input (batch x seq x hidden) and recomputes one block at a time."""
    activations, loss, per_block = _traced(model, config, dtype, batch, seq, method)
    if not checkpointed:
        return activations + per_block, loss
    outside = activations - per_block * config.num_hidden_layers
    block_inputs = config.num_hidden_layers * batch * seq * config.hidden_size * torch.finfo(dtype).bits // 8
    return outside + block_inputs + 2 * per_block, loss


_TRACES: dict[tuple, tuple[int, int, int]] = {}
"""Traced (saved activations, loss bytes, one block's saved bytes) per setting: `recommend` plans one adapter with and
without a 4-bit base and with and without checkpointing, which all trace alike (3 meta forwards, ~0.6 s on a 7B)."""


def _traced(model, config, dtype, batch: int, seq: int, method: str) -> tuple[int, int, int]:
    key = (config.to_json_string(), str(dtype), repr(getattr(model, "peft_config", method)), batch, seq)
    if key not in _TRACES:
        activations, loss = _saved_bytes(model, batch, seq)
        one, two = (_with_layers(config, n, dtype, model, method) for n in (1, 2))
        per_block = _saved_bytes(two, batch, seq)[0] - _saved_bytes(one, batch, seq)[0]
        if len(_TRACES) >= 64:
            _TRACES.clear()
        _TRACES[key] = (activations, loss, per_block)
    return _TRACES[key]


def _with_layers(config, n: int, dtype: torch.dtype, like: nn.Module, method: str) -> nn.Module:
    import copy

    small = copy.deepcopy(config)
    small.num_hidden_layers = n
    with contextlib.suppress(AttributeError):
        small.layer_types = small.layer_types[:n]  # configs that list per-layer attention types
    base = _meta_model(small, dtype)
    if hasattr(like, "peft_config"):
        cfg = next(iter(like.peft_config.values()))
        from deltatune.model import get_peft_model

        return get_peft_model(base, cfg)
    return base.requires_grad_(method == "full")
