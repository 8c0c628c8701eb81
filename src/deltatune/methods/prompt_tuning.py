"""Prompt tuning (Lester et al. 2021) and P-tuning (Liu et al. 2021, "GPT Understands, Too"): n trainable embeddings
put in front of the input's embeddings, so the model reads them as n virtual tokens before the text.

Prompt tuning trains the (n, d) table itself (init: random N(0, 1), rows of sampled vocabulary, or the embeddings of
a text). P-tuning computes the table with a prompt encoder (an MLP, or a bidirectional LSTM and an MLP) from a
trainable (n, d) input, which eases optimisation; the file holds only the encoder's output (`prompt_embeddings`, as
peft saves it), so a loaded P-tuning adapter is that table and trains, if asked to, as the table.

Both sit on the model's input embedding (`deltatune.input_adapter`): forward and `generate()` see ordinary tokens,
with the attention mask, labels (ignored at virtual positions), token types and positions extended by n. Outputs
then have n more positions in front (logits too), as in peft.

On an encoder-decoder model (T5, BART: peft's `num_transformer_submodules=2`) the table has 2n rows, as peft's, and
the first n go in front of the encoder's input (its embeddings, with its attention mask); the decoder, its labels and
its outputs are unchanged. peft keeps the other n rows unused (a P-tuning LSTM still reads all 2n): so does deltatune,
so that files move both ways.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from deltatune.errors import ConfigError
from deltatune.input_adapter import (
    InputAdapter,
    input_call,
    input_embedding_target,
    prepend_encoder_tokens,
    prepend_virtual_tokens,
)
from deltatune.layers import module_device
from deltatune.methods.prompt_learning import (
    SAVED_KEY,
    PromptLearningConfig,
    TrainedTable,
    fill_from_model,
    loaded_table,
    saved_table,
)
from deltatune.models import is_encoder_decoder
from deltatune.registry import MethodSpec, register_method


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """peft's `PromptTuningConfig` (peft_type PROMPT_TUNING)."""

    peft_type = "PROMPT_TUNING"

    prompt_tuning_init: Literal["RANDOM", "SAMPLE_VOCAB", "TEXT"] = "RANDOM"
    """RANDOM: N(0, 1) rows; SAMPLE_VOCAB: embeddings of random vocabulary ids; TEXT: embeddings of the tokens of
    `prompt_tuning_init_text`, repeated or cut to n."""
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    """Tokenizer for the TEXT init (a local folder or a Hub id)."""
    tokenizer_kwargs: dict[str, Any] | None = None
    """Keyword arguments of `AutoTokenizer.from_pretrained` for the TEXT init."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prompt_tuning_init not in ("RANDOM", "SAMPLE_VOCAB", "TEXT"):
            raise ConfigError(
                f"prompt_tuning_init must be RANDOM, SAMPLE_VOCAB or TEXT, got {self.prompt_tuning_init!r}."
            )
        if self.prompt_tuning_init == "TEXT" and not (self.prompt_tuning_init_text and self.tokenizer_name_or_path):
            raise ConfigError(
                'prompt_tuning_init="TEXT" needs prompt_tuning_init_text and tokenizer_name_or_path (the tokenizer '
                "that turns the text into tokens whose embeddings start the prompt)."
            )
        if self.prompt_tuning_init != "TEXT" and self.tokenizer_kwargs:
            raise ConfigError('tokenizer_kwargs is only used with prompt_tuning_init="TEXT"; remove it.')


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """peft's `PromptEncoderConfig` (peft_type P_TUNING)."""

    peft_type = "P_TUNING"

    encoder_reparameterization_type: Literal["MLP", "LSTM"] = "MLP"
    encoder_hidden_size: int | None = None
    """h: the encoder's width (None: the model's hidden size, as peft)."""
    encoder_num_layers: int = 2
    """LSTM: its layers. MLP: its hidden layers (2 gives peft's MLP, d -> h -> h -> d; peft ignores other values)."""
    encoder_dropout: float = 0.0
    """Dropout between the LSTM's layers; for the MLP, after each hidden activation (peft's MLP has none)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encoder_reparameterization_type not in ("MLP", "LSTM"):
            raise ConfigError(
                f"encoder_reparameterization_type must be MLP or LSTM, got {self.encoder_reparameterization_type!r}."
            )
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
            raise ConfigError(
                f"encoder_hidden_size must be a positive integer or None, got {self.encoder_hidden_size}."
            )
        if not isinstance(self.encoder_num_layers, int) or self.encoder_num_layers < 1:
            raise ConfigError(f"encoder_num_layers must be a positive integer, got {self.encoder_num_layers!r}.")
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ConfigError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout}.")


class PromptEncoder(nn.Module):
    """P-tuning's encoder: (n, d) trainable inputs -> an MLP, or a bidirectional LSTM then an MLP -> (n, d)."""

    def __init__(self, n: int, d: int, kind: str, hidden: int, num_layers: int, dropout: float, device) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(n, d, device=device))
        if kind == "LSTM":
            self.lstm_head = nn.LSTM(
                d, hidden, num_layers=num_layers, dropout=dropout, bidirectional=True, batch_first=True, device=device
            )
            self.mlp_head = nn.Sequential(
                nn.Linear(2 * hidden, 2 * hidden, device=device), nn.ReLU(), nn.Linear(2 * hidden, d, device=device)
            )
        else:
            self.lstm_head = None
            widths = [d] + [hidden] * num_layers
            layers: list[nn.Module] = []
            for d_in, d_out in zip(widths[:-1], widths[1:], strict=True):
                layers += [nn.Linear(d_in, d_out, device=device), nn.ReLU(), nn.Dropout(dropout)]
            self.mlp_head = nn.Sequential(*layers, nn.Linear(hidden, d, device=device))

    def forward(self) -> Tensor:
        x = self.embedding
        if self.lstm_head is not None:
            x = self.lstm_head(x.unsqueeze(0))[0].squeeze(0)
        return self.mlp_head(x)


class VirtualTokens(InputAdapter):
    """The input embedding; per adapter, the module giving its (n, d) virtual token embeddings."""

    adapter_param_names = ("prompt_embeddings",)
    adapter_other_names = ("virtual_tokens",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.prompt_embeddings = nn.ModuleDict()
        self.virtual_tokens: dict[str, int] = {}
        """Per adapter: n, the virtual tokens one input gets (the table has 2n rows on encoder-decoder models)."""

    def add_adapter(self, name: str, *, source: Any, num_virtual_tokens: int) -> None:
        self.prompt_embeddings[name] = source(self.base_layer, module_device(self.base_layer))
        self.virtual_tokens[name] = num_virtual_tokens

    def adapter_state(self, name: str) -> dict[str, Tensor]:
        return saved_table(self.prompt_embeddings[name]) if name in self.prompt_embeddings else {}

    def load_adapter_state(self, name: str, tensors: dict[str, Tensor]) -> None:
        self.prompt_embeddings[name] = loaded_table(tensors, self.prompt_embeddings[name])

    def prepare(self, name: str, call: dict[str, Any], generating: bool, model: nn.Module) -> int:
        rows = self.prompt_embeddings[name]()[: self.virtual_tokens[name]]
        if is_encoder_decoder(model):
            prepend_encoder_tokens(call, rows, self.base_layer)
            return 0
        placeholders = prepend_virtual_tokens(call, rows, generating, model)
        if placeholders:
            self.pending_rows = rows
        return placeholders


def _check_width(embedding: nn.Module, config: PromptLearningConfig) -> int:
    width = embedding.weight.shape[1]
    if config.token_dim != width:
        raise ConfigError(f"token_dim={config.token_dim} but the model's input embeddings have width {width}.")
    return width


def table_rows(config: PromptLearningConfig) -> int:
    """Rows of the virtual-token table: n per transformer submodule (2n on encoder-decoder models), as peft's."""
    return config.num_virtual_tokens * (config.num_transformer_submodules or 1)


def _initial_rows(config: PromptTuningConfig, embedding: nn.Module, device) -> Tensor:
    n, d = table_rows(config), _check_width(embedding, config)
    if config.inference_mode or config.prompt_tuning_init == "RANDOM":  # a loaded adapter's rows come from its file
        return torch.randn(n, d, device=device)
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        ids = torch.randint(0, embedding.weight.shape[0], (n,), device=embedding.weight.device)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **(config.tokenizer_kwargs or {}))
        text_ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
        text_ids = (text_ids * math.ceil(n / len(text_ids)))[:n]  # repeated or cut to n tokens, as peft does
        ids = torch.tensor(text_ids, device=embedding.weight.device)
    with torch.no_grad():
        return embedding(ids).detach().float().clone().to(device)


def prompt_tuning_kwargs(config: PromptTuningConfig, module_path: str) -> dict[str, Any]:
    return {
        "source": lambda embedding, device: TrainedTable(_initial_rows(config, embedding, device)),
        "num_virtual_tokens": config.num_virtual_tokens,
    }


def p_tuning_kwargs(config: PromptEncoderConfig, module_path: str) -> dict[str, Any]:
    def source(embedding: nn.Module, device) -> nn.Module:
        d = _check_width(embedding, config)
        return PromptEncoder(
            table_rows(config),
            d,
            config.encoder_reparameterization_type,
            config.encoder_hidden_size or d,
            config.encoder_num_layers,
            config.encoder_dropout,
            device,
        )

    return {"source": source, "num_virtual_tokens": config.num_virtual_tokens}


for _peft_type, _config_cls, _kwargs in [
    ("PROMPT_TUNING", PromptTuningConfig, prompt_tuning_kwargs),
    ("P_TUNING", PromptEncoderConfig, p_tuning_kwargs),
]:
    register_method(
        MethodSpec(
            peft_type=_peft_type,
            mergeable=False,
            config_cls=_config_cls,
            kind="input",
            module_key_prefix="base_model.",
            layers={nn.Module: VirtualTokens},
            layer_kwargs=_kwargs,
            param_prefix=SAVED_KEY,
            fill_from_model=fill_from_model,
            with_defaults=lambda config, model_type: config,
            select_targets=input_embedding_target,
            input_context=input_call,
        )
    )
