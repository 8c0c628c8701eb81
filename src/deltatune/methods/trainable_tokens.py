"""Trainable tokens (peft's `trainable_token_indices` on `LoraConfig`): train only some rows of an embedding table,
e.g. the vectors of newly added special tokens, instead of the whole table (`modules_to_save`).

Per adapter the layer holds the chosen rows' vectors (`trainable_tokens_delta`, initialised from the table); the
forward uses the table with those rows replaced: E' = E with E'[i] = delta[k] for the k-th index i. Saved as peft
does: `<path>.token_adapter.trainable_tokens_delta` (n_tokens, dim). When the output head shares the embedding's
weight (tied embeddings), it is wrapped too and uses the same rows (one tensor, saved once), so the new tokens are
both read and predicted with their trained vectors; merging writes the rows into the shared table once.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.errors import AdapterError, ConfigError
from deltatune.inject import replace_module, resolve_modules_to_save
from deltatune.layers import AdapterLayer, TrainableCopy


class TrainableTokensLayer(AdapterLayer):
    """Wraps an nn.Embedding (or the nn.Linear output head tied to it); see the module doc."""

    adapter_param_names = ("trainable_tokens_delta",)
    adapter_other_names = ("token_indices", "tied")

    def __init__(self, base_layer: nn.Module) -> None:
        if not isinstance(base_layer, (nn.Embedding, nn.Linear)):
            raise ConfigError(
                f"trainable_token_indices targets an embedding (or its tied output head), not a "
                f"{type(base_layer).__name__}; name the embedding module."
            )
        super().__init__(base_layer)
        if isinstance(base_layer, nn.Embedding):  # peft's names for the layer's sizes
            self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.token_adapter = nn.Module()
        self.token_adapter.trainable_tokens_delta = nn.ParameterDict()
        self.token_indices: dict[str, list[int]] = {}
        self.tied: dict[str, bool] = {}  # adapter -> its rows belong to another layer (saved there)

    @property
    def trainable_tokens_delta(self) -> nn.ParameterDict:
        return self.token_adapter.trainable_tokens_delta

    def add_adapter(self, name: str, *, token_indices: list[int], tied_to: TrainableTokensLayer | None = None) -> None:
        rows = self.base_layer.weight.shape[0]
        if not token_indices or len(set(token_indices)) != len(token_indices):
            raise ConfigError(f"trainable_token_indices must be distinct token ids, got {token_indices!r}.")
        if any(not isinstance(i, int) or not 0 <= i < rows for i in token_indices):
            raise ConfigError(f"trainable_token_indices {token_indices!r} must lie in [0, {rows}) for this table.")
        self.token_indices[name] = list(token_indices)
        if tied_to is not None:
            if tied_to.token_indices[name] != self.token_indices[name]:
                raise ConfigError("tied layers must train the same token indices.")
            self.trainable_tokens_delta[name] = tied_to.trainable_tokens_delta[name]  # one tensor for both
            self.tied[name] = True
            return
        start = self.base_layer.weight.detach()[self.rows(name, self.base_layer.weight.device)].float().clone()
        self.trainable_tokens_delta[name] = nn.Parameter(start)
        self.tied[name] = False

    def rows(self, name: str, device: torch.device) -> Tensor:
        """Adapter `name`'s token ids as an index tensor on `device` (kept until the layer moves)."""
        cached = self.adapter_cache.get(name)
        if cached is None or cached.device != device:
            cached = self.adapter_cache[name] = torch.tensor(self.token_indices[name], device=device)
        return cached

    def adapter_state(self, name: str) -> dict[str, Tensor]:
        if self.tied.get(name) or name not in self.trainable_tokens_delta:
            return {}
        return {"token_adapter.trainable_tokens_delta": self.trainable_tokens_delta[name]}

    def set_active(self, names: Any) -> None:
        super().set_active(names)
        seen: set[int] = set()
        for name in self.active_adapters:
            rows = set(self.token_indices[name])
            if rows & seen:
                raise AdapterError(f"active adapters train the same token rows {sorted(rows & seen)}; activate one.")
            seen |= rows

    def compose(self, name: str, weight: Tensor) -> Tensor:
        delta = self.trainable_tokens_delta[name]
        return weight.index_copy(0, self.rows(name, weight.device), delta.to(weight))

    def decompose(self, name: str, weight: Tensor) -> Tensor:
        # the replaced rows cannot be computed back: merge's exact-restore record keeps the originals
        return weight

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        names = self.unmerged_active()
        if not names:
            return self.base_layer(x, *args, **kwargs)
        base = self.base_layer
        weight = base.weight
        for name in names:
            delta = self.trainable_tokens_delta[name].to(weight.dtype)
            weight = weight.index_copy(0, self.rows(name, weight.device), delta)
        if isinstance(base, nn.Linear):
            return F.linear(x, weight, base.bias)
        out = F.embedding(
            x, weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
        )
        scale = getattr(base, "embed_scale", None)  # scaled embeddings (e.g. Gemma's) multiply in their forward
        return out * scale.to(out.dtype) if isinstance(scale, Tensor) else out


def _path_of(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def _input_embedding_path(model: nn.Module) -> str:
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    if embeddings is None:
        raise ConfigError(
            "trainable_token_indices as a list needs a model with get_input_embeddings(); give a dict "
            '{"<embedding module name>": [token ids]} instead.'
        )
    return _path_of(model, embeddings)


def _plain_weight(module: nn.Module) -> Tensor | None:
    """The module's own weight, seen through an adapter wrapper or a `modules_to_save` copy."""
    if isinstance(module, AdapterLayer):
        module = module.get_base_layer()
    elif isinstance(module, TrainableCopy):
        module = module.original_module
    return getattr(module, "weight", None)


def add_trainable_tokens(model: nn.Module, adapter_name: str, config: Any) -> None:
    """Wrap the embedding(s) named by `config.trainable_token_indices` (and a tied output head) for adapter
    `adapter_name`. Checks: not also in modules_to_save, not adapted otherwise, tied indices agree."""
    indices = config.trainable_token_indices
    if indices is None:
        return
    if isinstance(indices, dict):
        targets = {path: list(ids) for key, ids in indices.items() for path in resolve_modules_to_save(model, [key])}
    else:
        targets = {_input_embedding_path(model): list(indices)}
    saved_whole = set(resolve_modules_to_save(model, config.modules_to_save or []))
    if saved_whole & set(targets):
        raise ConfigError(
            f"{sorted(saved_whole & set(targets))} are in both modules_to_save (whole table trained) and "
            "trainable_token_indices (some rows trained); keep one."
        )
    embedding_path = next(iter(targets))
    head = getattr(model, "get_output_embeddings", lambda: None)()
    head_path = _path_of(model, head) if head is not None else None
    tied = head_path is not None and _plain_weight(head) is _plain_weight(model.get_submodule(embedding_path))
    if config.ensure_weight_tying and not tied:
        warnings.warn(
            "ensure_weight_tying=True but the model's output head is not tied to the embedding.", stacklevel=3
        )
    tie_head = tied and (head_path not in targets or targets[head_path] == targets[embedding_path])
    if tied and not tie_head and config.ensure_weight_tying:
        raise ConfigError(
            f"ensure_weight_tying=True, but the tied {embedding_path} and {head_path} are given different token "
            "indices; give both the same ones or drop one."
        )
    layers: dict[str, TrainableTokensLayer] = {}
    for path, ids in targets.items():
        if tie_head and path == head_path:
            continue
        layers[path] = _wrapped(model, path)
        layers[path].add_adapter(adapter_name, token_indices=ids)
    if tie_head:
        _wrapped(model, head_path).add_adapter(
            adapter_name, token_indices=targets[embedding_path], tied_to=layers[embedding_path]
        )


def _wrapped(model: nn.Module, path: str) -> TrainableTokensLayer:
    module = model.get_submodule(path)
    if isinstance(module, TrainableTokensLayer):
        return module
    if isinstance(module, AdapterLayer):
        raise ConfigError(
            f"{path} is adapted already ({type(module).__name__}); trainable_token_indices cannot also train its rows: "
            "drop it from target_modules or from trainable_token_indices."
        )
    layer = TrainableTokensLayer(module)
    replace_module(model, path, layer)
    return layer


def tie_saved_copies(model: nn.Module, adapter_name: str, config: Any) -> None:
    """`ensure_weight_tying` with `modules_to_save`: when the output head shares the input embedding's weight and
    either is saved whole, both get a trainable copy and the two copies share one weight (peft's behaviour; without
    it the head keeps the frozen table while the embedding's copy trains). Both are saved, as peft saves them."""
    saved = set(resolve_modules_to_save(model, config.modules_to_save or []))
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if embeddings is None or head is None:
        return
    paths = {_path_of(model, embeddings), _path_of(model, head)}
    if not paths & saved:
        return

    if _plain_weight(embeddings) is not _plain_weight(head):
        warnings.warn(
            "ensure_weight_tying=True but the model's output head is not tied to the embedding.", stacklevel=3
        )
        return
    copies = []
    for path in sorted(paths):  # the embedding and the head, each wrapped once
        module = model.get_submodule(path)
        if not isinstance(module, TrainableCopy):
            module = TrainableCopy(module)
            replace_module(model, path, module)
        if adapter_name not in module.modules_to_save:
            module.add_adapter(adapter_name)
        copies.append(module.modules_to_save[adapter_name])
    copies[1].weight = copies[0].weight  # one trainable table for both
