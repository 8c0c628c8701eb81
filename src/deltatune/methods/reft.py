"""ReFT: representation fine-tuning (Wu et al. 2024, arXiv:2404.03592). Instead of changing weights, learn a
low-rank edit of the hidden states that chosen blocks output, at chosen prompt positions (math:
`deltatune.functional.reft`).

Each intervened block (from the architecture table's layer list, so every family in it works) is wrapped by a
`ReftBlock` that edits the block's output at the positions of this call: `PeftModel.forward` / `generate` tell the
blocks which ones (the method's `input_context`), from the attention mask and, when given, `prompt_lengths` (tokens
of each row that are prompt: the trainer passes them so response tokens are never edited; unset, the whole input is
the prompt). In `generate()` only the prompt's forward is edited; generated tokens are not (their keys and values
come from the cache, as computed with the edits). R stays orthonormal through training by a parametrization
(`torch.nn.utils.parametrize`: R = the orthonormal-row factor of a stored (r, d) matrix, `orthonormal_rows`), saved
as that matrix (`rotate.parametrizations.weight.original`). torch's own `orthogonal` was not used: its
trivialization keeps a (d, d) buffer per intervention (64 MB at d = 4096) that would have to be saved, and without it
weight decay zeroes columns.

An intervention is position-dependent and (for LoReFT with an activation, DiReFT in general) non-linear in the
hidden state: it cannot be folded into weights, so merging is refused with that reason.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrize import register_parametrization

from deltatune.config import AdapterConfig
from deltatune.errors import AdapterError, ConfigError
from deltatune.functional.reft import direft, loreft, orthonormal_rows, parse_positions, position_masks
from deltatune.layers import AdapterLayer, Unmergeable, module_device
from deltatune.models import arch_for, context_length, is_encoder_decoder, last_linear_width
from deltatune.registry import MethodSpec, register_method

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu}


@dataclass
class ReftConfig(AdapterConfig):
    """Configuration of ReFT interventions (deltatune's `peft_type: REFT`; peft has no such method)."""

    peft_type = "REFT"

    layer_indices: list[int] | str = "all"
    """Blocks whose output is intervened on: indices into the model's layer list, or "all"."""
    r: int = 4
    """Rank of each intervention (the paper's LLaMA runs use 4 or 8)."""
    intervention_type: Literal["loreft", "direft"] = "loreft"
    positions: str = "f7+l7"
    """Prompt positions: the first p and last s tokens ("f7+l7", "f5", "l3")."""
    share_weights: bool = True
    """One intervention per block for all positions (the paper's tied setting); False: one for the first
    positions and one for the last."""
    dropout: float = 0.0
    """Dropout on the edit (Φ(h) − h) while training."""
    act_fn: Literal["relu", "gelu", "tanh", "silu"] | None = None
    """Activation on W h + b (None: linear, the paper's LoReFT)."""
    init_weights: bool = False
    """True: start as the identity (LoReFT: W = R, b = 0; DiReFT: W₂ = 0), so the model starts at the base; False
    (the paper's code): W random, the edit is non-zero from the start."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"r must be a positive integer, got {self.r!r}.")
        indices = self.layer_indices
        if indices != "all" and (
            not isinstance(indices, list) or not indices or not all(isinstance(i, int) for i in indices)
        ):
            raise ConfigError(f'layer_indices must be "all" or a list of block indices, got {indices!r}.')
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}.")
        try:
            parse_positions(self.positions)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def needs_target_modules(self) -> bool:
        return False


def reft_defaults(config: ReftConfig, model_type: str | None) -> ReftConfig:
    """`layer_indices` -> the blocks' module names, from the architecture table (unless target_modules names them)."""
    if config.target_modules:
        return config
    layer_list = arch_for(model_type).layers
    if not layer_list:
        raise ConfigError(
            "ReFT intervenes on the blocks of the model's layer list, and this model family is not in "
            "deltatune.models' table: set target_modules to the block modules (e.g. a regex like 'blocks\\.\\d+')."
        )
    indices = r"\d+" if config.layer_indices == "all" else "|".join(str(i) for i in config.layer_indices)
    return config.replace(target_modules=rf"(.*\.)?{re.escape(layer_list.rsplit('.', 1)[-1])}\.({indices})")


def _block_width(block: nn.Module) -> int:
    """d: the output features of the block's last linear layer (its residual stream width)."""
    width = last_linear_width(block)
    if width is None:
        raise ConfigError(f"{type(block).__name__} holds no linear layer to size a ReFT intervention from.")
    return width


class OrthonormalRows(nn.Module):
    """Parametrization keeping a (r, d) weight's rows orthonormal (`orthonormal_rows` of the stored matrix). Unlike
    torch's `orthogonal` with its trivialization, it stores nothing but the (r, d) matrix: no (d, d) buffer."""

    def forward(self, x: Tensor) -> Tensor:
        return orthonormal_rows(x)

    def right_inverse(self, weight: Tensor) -> Tensor:
        return weight  # an orthonormal weight is its own stored matrix


class Intervention(nn.Module):
    """One LoReFT / DiReFT intervention on rows of width d."""

    def __init__(self, d: int, r: int, kind: str, act_fn: str | None, dropout: float, init_weights: bool, device):
        super().__init__()
        if r > d:
            raise ConfigError(f"r={r} exceeds the hidden size {d}: R cannot have more orthonormal rows than that.")
        self.kind, self.act = kind, _ACTIVATIONS[act_fn] if act_fn else None
        self.learned_source = nn.Linear(d, r, device=device)
        second = nn.Linear(d, r, bias=False, device=device)
        if kind == "loreft":
            if device is None or torch.device(device).type != "meta":
                nn.init.orthogonal_(second.weight)
            self.rotate = register_parametrization(second, "weight", OrthonormalRows())
        else:
            self.project = second
        if init_weights and (device is None or torch.device(device).type != "meta"):
            with torch.no_grad():
                if kind == "loreft":
                    self.learned_source.weight.copy_(self.rotate.weight)
                    self.learned_source.bias.zero_()
                else:
                    self.project.weight.zero_()
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor) -> Tensor:
        w, b = self.learned_source.weight, self.learned_source.bias
        if self.kind == "loreft":
            edited = loreft(h, self.rotate.weight, w, b, self.act)
        else:
            edited = direft(h, w, b, self.project.weight, self.act)
        return h + self.dropout(edited - h)


class ReftBlock(Unmergeable, AdapterLayer):
    """A block whose output hidden states get each active adapter's interventions at this call's positions."""

    merge_refusal = (
        "a ReFT intervention edits hidden states at chosen positions only: it cannot be folded into the weights; keep "
        "it unmerged (a few small matmuls on the prompt's first and last tokens)."
    )

    adapter_param_names = ("reft_interventions",)
    adapter_other_names = ("reft_positions",)
    rows_independent = False  # the positions are the whole batch's: adapter_names= cannot split rows here

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.hidden_size = _block_width(base_layer)
        self.reft_interventions = nn.ModuleDict()
        self.reft_positions: dict[str, tuple[int, int]] = {}
        self.pending: dict[tuple[int, int], tuple[Tensor, Tensor]] | None = None
        """Set by the PeftModel's call context: positions spec -> (first, last) masks (B, T); used once."""

    def add_adapter(
        self, name: str, *, r: int, intervention_type: str, positions: str, share_weights: bool, dropout: float,
        act_fn: str | None, init_weights: bool,
    ) -> None:  # fmt: skip
        device = module_device(self.base_layer)
        groups = ["all"] if share_weights else ["first", "last"]
        self.reft_interventions[name] = nn.ModuleDict(
            {g: Intervention(self.hidden_size, r, intervention_type, act_fn, dropout, init_weights, device)
             for g in groups})  # fmt: skip
        self.reft_positions[name] = parse_positions(positions)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        masks, self.pending = self.pending, None  # only the call's first pass through this block is the prompt
        names = self.unmerged_active()
        if not names or masks is None:
            return out
        hidden = out[0] if isinstance(out, tuple) else out
        for name in names:
            hidden = self._intervene(name, hidden, masks[self.reft_positions[name]])
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    def _intervene(self, name: str, hidden: Tensor, masks: tuple[Tensor, Tensor]) -> Tensor:
        first, last = masks
        if first.shape != hidden.shape[:2]:
            raise AdapterError(
                f"ReFT positions are for a batch of shape {tuple(first.shape)} but the block saw "
                f"{tuple(hidden.shape[:2])}; pass the whole prompt in one forward (with its attention_mask)."
            )
        groups = self.reft_interventions[name]
        pairs = (
            [(groups["all"], first | last)] if "all" in groups else [(groups["first"], first), (groups["last"], last)]
        )
        for module, mask in pairs:
            if mask.any():
                rows = hidden[mask]
                edited = module(rows.to(module.learned_source.weight.dtype)).to(hidden.dtype)
                hidden = hidden.index_put((mask,), edited)
        return hidden


@contextlib.contextmanager
def reft_call_positions(model: nn.Module, args: tuple, kwargs: dict[str, Any], generating: bool) -> Iterator[None]:
    """Around one forward / generate: pop `prompt_lengths` and give every ReftBlock this call's position masks."""
    prompt_lengths = kwargs.pop("prompt_lengths", None)
    blocks = [m for m in model.modules() if isinstance(m, ReftBlock)]
    past = kwargs.get("past_key_values")
    continuing = past is not None and (not hasattr(past, "get_seq_length") or past.get_seq_length() > 0)
    if not blocks or continuing:  # tokens after a cached prompt are not prompt tokens
        yield
        return
    ids = kwargs.get("input_ids", args[0] if args else None)
    tokens = ids if ids is not None else kwargs.get("inputs_embeds")
    if tokens is None:
        raise AdapterError(
            f"ReFT edits token positions, and this call has neither input_ids nor inputs_embeds (it passes "
            f"{sorted(kwargs)}): a model without token inputs (an image model's pixel_values) has none to pick."
        )
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
    if prompt_lengths is not None:
        prompt_lengths = torch.as_tensor(prompt_lengths)
    specs = {spec for block in blocks for spec in block.reft_positions.values()}
    masks = {spec: position_masks(mask, prompt_lengths, *spec) for spec in specs}
    for block in blocks:
        block.pending = masks
    try:
        yield
    finally:
        for block in blocks:
            block.pending = None


def reft_check_positions(config: ReftConfig, model: nn.Module) -> ReftConfig:
    """Refuse `positions` that ask for more first (or last) tokens than the model ever reads: such a count can never
    mean what it says (shorter prompts simply have fewer positions to edit, as in pyreft)."""
    if is_encoder_decoder(model):
        raise ConfigError(
            f"{type(model).__name__} is an encoder-decoder model; ReFT edits the token positions of one stack "
            "(decoder-only or encoder models). Use LoRA, IA3 or prompt tuning on encoder-decoder models."
        )
    context = context_length(model)
    first, last = parse_positions(config.positions)
    if context is not None and max(first, last) > context:
        raise ConfigError(
            f"positions={config.positions!r} asks for {max(first, last)} tokens, but {type(model).__name__} reads at "
            f"most {context} positions; use counts below that (a few are usual, e.g. 'f7+l7')."
        )
    return config


def reft_layer_kwargs(config: ReftConfig, module_path: str) -> dict[str, Any]:
    return {
        "r": config.r,
        "intervention_type": config.intervention_type,
        "positions": config.positions,
        "share_weights": config.share_weights,
        "dropout": config.dropout,
        "act_fn": config.act_fn,
        "init_weights": config.init_weights,
    }


register_method(
    MethodSpec(
        peft_type="REFT",
        mergeable=False,
        config_cls=ReftConfig,
        kind="layer",
        layers={nn.Module: ReftBlock},
        layer_kwargs=reft_layer_kwargs,
        param_prefix="reft_",
        with_defaults=reft_defaults,
        fill_from_model=reft_check_positions,
        input_context=reft_call_positions,
        input_names=("prompt_lengths",),
    )
)
