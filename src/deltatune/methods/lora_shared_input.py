"""LoRA linears that read one input (q/k/v of an attention block, gate/up of a SwiGLU MLP) compute their down-
projections together in training: one matmul over the stacked A matrices, one dropout mask for all of them, one
input gradient instead of one per module (issue 24: these thin products and masks are most of LoRA's cost above the
frozen-base floor on a CPU).

Groups are fixed when an adapter is added: siblings under one parent module whose names are projections of one input
by the usual naming (`SHARED_INPUT_NAMES`; an attention's output projection has the same width but another input, so
width alone is not enough). Sharing is decided per call: the first member called with a tensor computes every
eligible member's h = dropout(x) A^T, and a member called with the *same* tensor (same object, unmodified, weights
unchanged) takes its slice. A member called with another tensor (cross-attention's keys and values) computes its
own. So the grouping is deterministic in the call order, which keeps activation checkpointing's recomputation
identical to the first pass. Eval, merged, disabled and variant (DoRA) adapters never go through here. The saved
adapter is untouched: only the schedule of the arithmetic changes (and q/k/v sharing one dropout draw of their
common input).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from deltatune.functional.lora import lora_down

if TYPE_CHECKING:
    from deltatune.methods.lora_layer import LoraLinear


@dataclass
class _Computed:
    """The last joint down-projection, until every member took its slice. `h` is held (not weakly: whether a
    member reuses it must not depend on when the garbage collector runs, or checkpointing's recomputation could
    take other dropout masks than the first pass); `x` weakly, as it only identifies the input."""

    x: weakref.ref
    x_version: int
    name: str
    h: Tensor
    waiting: dict[int, tuple[int, int, int]]  # id(member) -> (start, stop, its A's version when computed)


class SharedInputGroup:
    """Sibling LoRA linears of one parent module with the same input width (see the module docstring)."""

    def __init__(self, members: list[LoraLinear]) -> None:
        self.members = members
        self._last: _Computed | None = None

    def __getstate__(self) -> dict:  # copies and pickles keep the members, not the last call's tensors
        return {"members": self.members, "_last": None}

    def down(self, layer: LoraLinear, name: str, x: Tensor, dropout: float) -> Tensor:
        """dropout(x) A^T of `layer`'s adapter `name` (no 1/(1-p)), from the joint computation when one covers it."""
        last = self._last
        if last is not None and last.x() is x and last.x_version == x._version and last.name == name:
            entry = last.waiting.pop(id(layer), None)
            if not last.waiting:
                self._last = None  # all served: hold nothing past the last member's call
            if entry is not None and entry[2] == layer.lora_A[name].weight._version:
                return last.h[..., entry[0] : entry[1]]
        self._last = None  # another input (or a stale one): what waited on the last one will not be asked for
        members = [m for m in self.members if m is layer or m.shares_down(name, x, dropout)]
        if len(members) == 1 or not any(m is layer for m in members):  # alone, or a replica (DataParallel) that
            return lora_down(x, _weight_as(layer, name, x), dropout)  # shares its original's group: its own
        h = lora_down(x, torch.cat([_weight_as(m, name, x) for m in members]), dropout)
        waiting, start = {}, 0
        for m in members:
            waiting[id(m)] = (start, start + m.r[name], m.lora_A[name].weight._version)
            start += m.r[name]
        begin, end, _ = waiting.pop(id(layer))
        self._last = _Computed(weakref.ref(x), x._version, name, h, waiting)
        return h[..., begin:end]


def _weight_as(layer: LoraLinear, name: str, x: Tensor) -> Tensor:
    a = layer.lora_A[name].weight
    return a if a.dtype == x.dtype else a.to(x.dtype)  # cast the small adapter, never the activation


SHARED_INPUT_NAMES: tuple[frozenset[str], ...] = (
    frozenset({"q_proj", "k_proj", "v_proj"}),  # LLaMA, Mistral, Qwen, OPT, BART, Whisper, ...
    frozenset({"query", "key", "value"}),  # BERT, RoBERTa, ViT
    frozenset({"q", "k", "v"}),  # T5 (cross-attention's k and v read the encoder: they share with each other)
    frozenset({"to_q", "to_k", "to_v"}),  # diffusers attention
    frozenset({"q_lin", "k_lin", "v_lin"}),  # DistilBERT
    frozenset({"gate_proj", "up_proj"}),  # SwiGLU MLPs
    frozenset({"w1", "w3"}),  # Mixtral experts
    frozenset({"wi_0", "wi_1"}),  # T5 v1.1 gated MLP
)
"""Sibling module names that, by the usual naming, are projections of one input; a wrong guess only costs work
(each call checks that the input really is the same tensor)."""


def link_shared_inputs(model: nn.Module, layer_cls: type[nn.Module]) -> None:
    """Give every `layer_cls` module its sibling group (children of one parent, `SHARED_INPUT_NAMES`, same input
    width), or None; regrouped from scratch on each call (one walk of the model), so adapters added later join."""
    groups: dict[tuple[str, int, int], list] = {}
    for path, module in model.named_modules():
        if not isinstance(module, layer_cls):
            continue
        module.input_group = None
        parent, _, child_name = path.rpartition(".")
        family = next((i for i, names in enumerate(SHARED_INPUT_NAMES) if child_name in names), None)
        if family is not None:
            groups.setdefault((parent, family, module.in_features), []).append(module)
    for members in groups.values():
        if len(members) > 1:
            group = SharedInputGroup(members)
            for member in members:
                member.input_group = group
