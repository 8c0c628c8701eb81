"""Tiny random-init models shared by the tests (built offline, seeded)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# one intra-op thread per xdist worker: `make test` runs one worker per core, and two workers with a thread per core
# each oversubscribe the cores (OpenMP threads spin waiting for each other: the suite took 5:07 instead of 1:51)
WORKER_THREADS = int(os.environ.get("DELTATUNE_TEST_THREADS", "1"))
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", str(WORKER_THREADS))

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(WORKER_THREADS)


def perturb_trainable(model: nn.Module, seed: int = 3, scale: float = 0.1) -> None:
    """Move every trainable tensor by seeded Gaussian noise (as training would), so an adapter that starts at the base
    really changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=g) * scale)


def tiny_decoder(family: str = "llama", tied: bool = False) -> nn.Module:
    """A 2-block decoder of a LLaMA-like family ("llama", "mistral", "qwen2": Qwen2 adds q/k/v biases) with grouped
    query attention (4 heads, 2 key/value heads); `tied`: the output head shares the embedding's weight."""
    import transformers

    names = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[family]
    config_cls, model_cls = getattr(transformers, f"{names}Config"), getattr(transformers, f"{names}ForCausalLM")
    torch.manual_seed(0)
    cfg = config_cls(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return model_cls(cfg).eval()


def tiny_llama(tied: bool = False) -> nn.Module:
    """A 2-block LLaMA; `tied`: the output head shares the embedding's weight."""
    return tiny_decoder("llama", tied)


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        num_labels=3,
    )
    return BertForSequenceClassification(cfg).eval()


def tiny_seq2seq(family: str = "t5", decoder_layers: int | None = None, init_scale: float = 3.0) -> nn.Module:
    """A 3-layer encoder-decoder ("t5": relative positions, T5's d_kv; "bart": learned positions, scaled embeddings),
    initialised wide enough (T5: `init_scale` x its usual init) that greedy decoding varies from token to token; a
    training test wants `init_scale=1.0` (the wide init makes the loss surface too steep for a steady descent)."""
    import transformers

    torch.manual_seed(0)
    if family == "t5":
        cfg = transformers.T5Config(
            vocab_size=61, d_model=16, d_kv=8, d_ff=32, num_layers=3, num_decoder_layers=decoder_layers,
            num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, initializer_factor=init_scale,
        )  # fmt: skip
        return transformers.T5ForConditionalGeneration(cfg).eval()
    cfg = transformers.BartConfig(
        vocab_size=61, d_model=16, encoder_layers=3, decoder_layers=decoder_layers or 3, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
        scale_embedding=True, init_std=0.5, eos_token_id=1, forced_eos_token_id=None,
    )  # fmt: skip
    return transformers.BartForConditionalGeneration(cfg).eval()


def plus_minus_texts(n: int, seed: int, extra: str = "") -> list[tuple[str, str]]:
    """(text, label) pairs: a shuffled string of '+' and '-' (and `extra`), labelled "up" when it holds more '+'
    than '-', else "down" (never equal)."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        plus = rng.randint(0, 6)
        minus = rng.choice([m for m in range(7) if m != plus])
        chars = list("+" * plus + "-" * minus + extra)
        rng.shuffle(chars)
        rows.append(("".join(chars), "up" if plus > minus else "down"))
    return rows


class TinyMLP(nn.Module):
    """A custom (non-transformers) model with every layer type LoRA supports."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.conv1d = nn.Conv1d(16, 16, 3, padding=1)
        self.lin0 = nn.Linear(16, 24)
        self.lin1 = nn.Linear(24, 8)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids)  # (b, t, 16)
        h = h + self.conv1d(h.transpose(1, 2)).transpose(1, 2)
        img = self.conv(h.unsqueeze(1)).mean(1)  # (b, t, 16)
        return self.lin1(torch.relu(self.lin0(img)))


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return TinyMLP().eval()


class TwoLinear(nn.Module):
    """Two linears, 10 -> 20 -> 6 (the shape of peft's custom-model tests), seeded by `two_linear()`."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(10, 20), nn.Linear(20, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def two_linear() -> nn.Module:
    torch.manual_seed(0)
    return TwoLinear()


# (factory, LoRA targets, input builder) per tiny model; the contract matrix runs every method over these.
def _ids(vocab: int = 97) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, vocab, (2, 7), generator=g)}


TINY_MODELS = {
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"], _ids),
    "gpt2": (tiny_gpt2, ["c_attn", "c_fc"], _ids),
    "bert": (tiny_bert, ["query", "value"], _ids),
    "mlp": (tiny_mlp, ["emb", "conv", "conv1d", "lin0", "lin1"], lambda: _ids(50)),
}


def model_output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny(request):
    """(model name, fresh model, LoRA targets, inputs)."""
    factory, targets, inputs = TINY_MODELS[request.param]
    return request.param, factory(), targets, inputs()


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer():
    """A character-level tokenizer with a chat template (no download): printable ASCII plus a few specials."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|end|>",
        additional_special_tokens=specials[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_causal_lm(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny LLaMA + character tokenizer directory, loadable like any HF model dir."""
    path = tmp_path_factory.mktemp("tiny-llm")
    tokenizer = tiny_tokenizer()
    tiny_causal_lm(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
