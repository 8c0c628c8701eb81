"""Run configuration: pydantic models read from YAML, with `--set key=value` overrides.

Unknown or mistyped keys are errors that name the key (`extra="forbid"`), raised as `ConfigError` with one line
per problem.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from deltatune.config import AdapterConfig
from deltatune.errors import ConfigError
from deltatune.methods import DEFAULT_CLASSIFICATION_METHOD, DEFAULT_RUN_METHOD
from deltatune.registry import get_method, list_methods

BUNDLED = "bundled:quickstart"
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "causal_lm": {"model": "smollm2", "train": BUNDLED, "method": DEFAULT_RUN_METHOD, "steps": 80},
    "classification": {
        "model": "minilm",
        "train": "bundled:sentiment",
        "method": DEFAULT_CLASSIFICATION_METHOD,
        "steps": 150,
    },
}
TASK_DEFAULTS["seq2seq"] = {
    "model": None,  # no encoder-decoder model is bundled: the run names one
    "train": BUNDLED,
    "method": {**DEFAULT_CLASSIFICATION_METHOD, "task_type": "SEQ_2_SEQ_LM"},  # LoRA on the family's targets
    "steps": 80,
}
"""What `model`, `data.train`, `method` and `optim.steps` mean when unset, per task: the bundled model, data and
method, and a run length that learns that data."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    train: str | None = None
    """Training data: a .jsonl / .csv / .parquet file, a `datasets` directory saved with save_to_disk, or bundled
    data ("bundled:quickstart", "bundled:sentiment", "bundled:intents"); unset: the task's bundled data."""
    eval: str | None = None
    """Held-out data (same forms); for the bundled data its test split is used when unset."""
    eval_limit: int | None = Field(None, gt=0)
    """Only the first N held-out records (for the held-out loss and the scored held-out set): a quick run on a large
    held-out file. Unset: all of them."""
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    """Chat records: a list of {role, content}; the loss covers assistant turns only."""
    system_prompt: str | None = ""
    """The system turn of records that have none: "" (the default) none at all, so no tokens are spent on the chat
    template's own default system prompt (SmolLM2's is ~20 tokens on every example; an empty system turn takes its
    place); a text: that system message; null: the template's default. Scoring renders prompts the same way."""
    text_field: str = "text"
    """classification: the text of each record."""
    label_field: str = "label"
    """classification: the label of each record (any string; the label set is the training data's)."""
    max_length: int = Field(256, gt=8)
    """Examples longer than this (in tokens) are an error, not silently cut."""
    packing: bool = False
    """Concatenate examples into max_length rows (attention stays per row)."""
    padding_free: bool = True
    """Each micro-batch as one row of its examples end to end, positions restarting and attention per example: the
    loss of the padded batch without computing the padding. Used where the model passes a probe of exactly that
    (transformers models with SDPA or eager attention) and the method reads no per-row prompt positions; padded
    rows otherwise."""
    share_prefixes: bool = True
    """In padding-free rows, compute a prompt prefix that several examples of a micro-batch open with once (the chat
    template's header, a shared instruction): each example attends to the shared tokens as to its own, so the loss
    and gradients are those of the examples apart (27% fewer tokens on the quickstart's data). Only tokens that
    predict nothing are shared."""
    extra_eval: dict[str, str] | None = None
    """More held-out sets scored by generation before/after (name -> source, same forms as `eval`). Unset with the
    bundled data: its "unseen phrasings" set (phrasings and instructions that never occur in training)."""
    general_eval: str | None = "bundled:general"
    """Questions outside the task, scored before/after by generation (a record may say `"match": "contains"`:
    right when the answer contains one of the response's "|"-separated words), to show what the adapter costs
    elsewhere; null to skip. Only with generate_eval > 0, in causal_lm runs."""


class OptimConfig(_Strict):
    steps: int | None = Field(None, gt=0)
    """Optimizer steps; unset: the task's (80 for causal_lm and seq2seq, 150 for classification)."""
    batch_size: int = Field(8, gt=0)
    """Examples per optimizer step per process (before gradient accumulation)."""
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    loraplus_lr_ratio: float | None = Field(None, gt=0)
    """LoRA+: the B matrices learn this many times faster (the paper suggests 16)."""
    warmup_steps: int = Field(5, ge=0)
    schedule: Literal["linear", "cosine", "constant"] = "cosine"
    max_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast precision; adapters stay float32. fp16 needs CUDA."""
    gradient_checkpointing: bool = False
    chunked_loss: bool = True
    """Compute the output head and the cross-entropy a chunk of positions at a time, never the whole logits and
    their gradient (`deltatune.chunked_loss`; same loss and gradients). Used where the head runs on responses only
    and is a plain linear layer whose outputs are the model's logits (checked once); the full head otherwise."""
    optimizer: Literal["adamw", "adamw_offload", "paged_adamw_8bit", "paged_adamw_32bit"] = "adamw"
    """adamw; adamw_offload keeps the AdamW moments (and an fp32 master copy) in CPU memory and steps there;
    paged_adamw_8bit/32bit are bitsandbytes' paged optimizers (CUDA + bitsandbytes)."""


class TrainConfig(_Strict):
    task: Literal["causal_lm", "classification", "seq2seq"] = "causal_lm"
    """causal_lm: learn the responses of prompt/response or chat records; classification: one label per text
    through a new classification head (method task_type SEQ_CLS), scored by accuracy before/after; seq2seq: an
    encoder-decoder model (`model` must name one) learns each record's response from its prompt (method task_type
    SEQ_2_SEQ_LM), the first generate_eval held-out examples scored by exact match and ROUGE-L."""
    model: str | None = None
    """A HF model directory, a .gguf file, "smollm2" (the bundled SmolLM2-135M-Instruct) or "minilm" (the bundled
    all-MiniLM-L6-v2 encoder); unset: smollm2 for causal_lm, minilm for classification."""
    method: dict[str, Any] | None = None
    """Adapter config: `peft_type` plus that method's fields (peft's names); unset: the task's default LoRA."""
    load_adapters: dict[str, str] | None = None
    """Trained adapters loaded (frozen) before the method's adapter is added, name -> adapter directory: what an
    AdapterFusion (`method.fusion_of`) combines."""
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    output_dir: str = "runs/quickstart"
    seed: int = 0
    log_every: int = Field(5, gt=0)
    eval_every: int | None = Field(None, gt=0)
    """Held-out loss every N steps (and always at the end)."""
    save_every: int | None = Field(None, gt=0)
    """Resumable checkpoint every N steps."""
    quantize: Literal["nf4", "fp4"] | None = None
    """Load the base model's linear layers in 4 bits (QLoRA); QuantConfig defaults otherwise (blocks of 64, double
    quantization, bf16 compute on CUDA, fp32 on CPU)."""
    cpu_allocator: Literal["auto", "keep", "default"] = "auto"
    """On CPU (Linux/glibc), for runs started from the command line: "keep" holds freed blocks up to 1 GiB in the
    heap during the steps (+10-14% peak RSS; the quickstart's steps ran at ~255 instead of ~200 tokens/s),
    restored when they end; "default" leaves the allocator alone; "auto" (the default) keeps, except for 4-bit runs,
    which are about memory. The library's train() never changes the process's allocator."""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: DistributedDataParallel, or FSDP2 (`fully_shard` per transformer layer: parameters, grads and
    optimizer state sharded across processes). Ignored in a single process."""
    generate_eval: int = Field(0, ge=0)
    """Score this many held-out examples by greedy generation (exact match) before and after training."""
    max_new_tokens: int = Field(40, gt=0)
    """Generation budget of the scored task sets (held-out and extra_eval); a row stops earlier at end of turn."""
    general_max_new_tokens: int = Field(32, gt=0)
    """Generation budget of the general questions (data.general_eval): their answers are sentences, and one cut
    before its fact ("The largest ocean on Earth is the") would count as a miss."""

    @model_validator(mode="after")
    def _task_defaults(self) -> TrainConfig:
        defaults = TASK_DEFAULTS[self.task]
        if self.task == "seq2seq" and not self.model:
            raise ValueError("task=seq2seq needs model: an encoder-decoder model directory (none is bundled)")
        self.model = self.model or defaults["model"]
        self.data.train = self.data.train or defaults["train"]
        self.optim.steps = self.optim.steps or defaults["steps"]
        self.method = dict(self.method if self.method is not None else defaults["method"])
        if self.task == "classification":
            task_type = str(self.method.setdefault("task_type", "SEQ_CLS")).upper()
            if task_type != "SEQ_CLS":
                raise ValueError(f"method.task_type is {task_type} but task=classification trains SEQ_CLS adapters")
            given = {"generate_eval": self.generate_eval, "quantize": self.quantize, "data.packing": self.data.packing,
                     "data.extra_eval": self.data.extra_eval}  # fmt: skip
            refused = [name for name, value in given.items() if value]
            if refused:
                raise ValueError(f"{refused[0]} is for causal_lm runs; a classification run scores by accuracy")
        if self.task == "seq2seq":
            task_type = str(self.method.setdefault("task_type", "SEQ_2_SEQ_LM")).upper()
            if task_type != "SEQ_2_SEQ_LM":
                raise ValueError(f"method.task_type is {task_type} but task=seq2seq trains SEQ_2_SEQ_LM adapters")
            given = {"quantize": self.quantize, "data.packing": self.data.packing,
                     "data.extra_eval": self.data.extra_eval}  # fmt: skip
            refused = [name for name, value in given.items() if value]
            if refused:
                raise ValueError(f"{refused[0]} is for causal_lm runs; a seq2seq run reads prompt and response apart")
        adapter_config(self.method)  # raises a ConfigError naming the bad field
        return self

    @model_validator(mode="after")
    def _fsdp_limits(self) -> TrainConfig:
        if self.distributed == "fsdp" and self.save_every:
            raise ValueError("save_every (resumable checkpoints) is not available with distributed=fsdp; use ddp")
        if self.distributed == "fsdp" and self.generate_eval:
            raise ValueError("generate_eval runs on one process and is not available with distributed=fsdp")
        return self

    @model_validator(mode="after")
    def _data_files_exist(self) -> TrainConfig:
        for source in (self.data.train, self.data.eval):
            if source and not source.startswith("bundled:") and not Path(source).exists():
                raise ValueError(f"data file {source!r} does not exist")
        return self


def adapter_config(method: dict[str, Any]) -> AdapterConfig:
    """The method's AdapterConfig from a `{peft_type: ..., fields...}` mapping."""
    if "peft_type" not in method:
        names = ", ".join(spec.peft_type for spec in list_methods())
        raise ConfigError(f"method needs a peft_type (one of {names}) and that method's fields.")
    spec = get_method(str(method["peft_type"]).upper())
    data = {**method, "peft_type": spec.peft_type}
    known = set(spec.config_cls.__dataclass_fields__) | {"peft_type"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"method.{unknown[0]} is not a field of {spec.config_cls.__name__}; "
            f"known fields: {', '.join(sorted(known - {'peft_type'}))}."
        )
    return spec.config_cls.from_dict(data)


def _apply_override(tree: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r} (e.g. --set optim.lr=1e-4).")
    key, raw = assignment.split("=", 1)
    node = tree
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part} is not a section.")
    node[parts[-1]] = yaml.safe_load(raw)  # "1e-4" -> float, "[q_proj]" -> list, "true" -> bool


def load_train_config(
    path: str | Path | None = None, overrides: list[str] | None = None, base: dict[str, Any] | None = None
) -> TrainConfig:
    """Defaults, then YAML (optional; sections merge into the defaults, except `method`, which replaces them), then
    `key=value` overrides (which merge into `method` too); validated at the end. All problems become one
    ConfigError."""
    tree: dict[str, Any] = TrainConfig.model_construct(data=DataConfig()).model_dump()  # task defaults unresolved
    _merge(tree, dict(base or {}))
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist.") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of settings, got {type(loaded).__name__}.")
        _merge(tree, loaded)
    for assignment in [a for a in overrides or [] if a.split("=", 1)[0].strip() == "task"]:
        _apply_override(tree, assignment)  # first: the task decides what the unset fields mean
    given_task = tree.get("task")
    task = given_task if isinstance(given_task, str) and given_task in TASK_DEFAULTS else "causal_lm"
    if tree.get("method") is None:  # so that `--set method.r=16` changes the task's default method
        tree["method"] = dict(TASK_DEFAULTS[task]["method"])
    for assignment in overrides or []:
        _apply_override(tree, assignment)
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def _merge(tree: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict) and key != "method":
            _merge(tree[key], value)
        else:
            tree[key] = value


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        what = "unknown key (check the spelling)" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"{where}: {what}")
    return "invalid training config: " + "; ".join(lines)
