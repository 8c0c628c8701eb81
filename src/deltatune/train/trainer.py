"""`train()`: setup -> loop -> eval -> save, one linear function of small steps.

Any registered method trains here; method-specific behaviour would come only through its `MethodSpec.hooks`.
Distributed data parallel runs when launched by `torchrun` (gloo on CPU, nccl on CUDA); rank 0 alone writes.
Loss is the sum of response-token cross-entropies divided by the number of response tokens in the whole global
batch, so 1 process with batch 2B and 2 processes with batch B compute the same gradient.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from torch import nn

from deltatune import io
from deltatune.adapter_model import task_class
from deltatune.config import TrainingContext
from deltatune.errors import CheckpointError, ConfigError, TrainingDiverged
from deltatune.model import PeftModel, get_peft_model
from deltatune.registry import get_method
from deltatune.train import checkpoint as ckpt
from deltatune.train.config import TrainConfig, adapter_config
from deltatune.train.data import read_records, step_indices
from deltatune.train.objectives import (
    CausalLMObjective,
    ClassificationObjective,
    eval_loss,
)
from deltatune.train.optim import build_optimizer, build_scheduler
from deltatune.train.progress import TrainProgress, plot_losses
from deltatune.train.scoring import generation_sets, report_scores, score_all
from deltatune.train.seq2seq import objective_for


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    steps: int
    losses: list[float]
    eval_loss: float | None = None
    metric_before: float | None = None
    """Score of the main held-out set (`data.eval`) before training (exact match), when generate_eval > 0."""
    metric_after: float | None = None
    samples: list[dict[str, str]] = field(default_factory=list)
    """The main held-out set's prompts, references and answers before/after."""
    scores: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Every scored set (generation: held-out, extra_eval sets, general prompts; classification: held-out accuracy):
    name -> (before, after)."""
    scored_by: str = "generation (greedy)"
    """How `scores` were scored: "generation (greedy)" or "predicted label"."""
    set_samples: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    answers_before: dict[str, list[str]] = field(default_factory=dict)
    """Each generation set's answers before training, in record order."""
    starts_as_identity: bool | None = None
    """Whether the fresh adapter left the model's outputs unchanged (checked when `train(base_answers=...)` is given
    and there are generation sets; None otherwise): then `answers_before` are the base model's, what
    `train(base_answers=...)` takes."""
    trainable: int = 0
    total: int = 0
    adapter_bytes: int = 0
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    """Wall seconds per phase: "setup" (data, model load, adapter), "score before", "train", "held-out loss",
    "score after", "save"."""
    model: PeftModel | None = field(default=None, repr=False)
    """The trained model (adapter still separate, active)."""
    rank: int = 0
    """This process's rank under torchrun (only rank 0 saves and reports)."""


@dataclass
class _Run:
    cfg: TrainConfig
    model: PeftModel
    ddp: nn.Module
    tokenizer: Any
    train_set: list
    eval_set: list
    eval_records: list
    generation_sets: list
    optimizer: torch.optim.Optimizer
    scheduler: Any
    device: torch.device
    rank: int
    world: int
    run_dir: Path
    objective: CausalLMObjective | ClassificationObjective
    start_step: int = 0
    losses: list[float] = field(default_factory=list)
    predictions: dict[str, list[str]] = field(default_factory=dict)
    """classification: the held-out predictions "before" and "after" training."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _distributed() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"process LOCAL_RANK={local_rank} has no GPU of its own ({torch.cuda.device_count()} visible): start "
                f"at most that many processes per node, or set CUDA_VISIBLE_DEVICES= to train on CPU."
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return rank, world, device


def _check_output_dir(path: Path) -> None:
    """Fail before any model is loaded if the run directory cannot be written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".deltatune-write-check"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"output_dir {path} is not writable ({exc.strerror}); choose another output_dir.") from None


@dataclass
class _Inputs:
    """The run's data, read and checked before any model is loaded (bad data fails in seconds)."""

    train_records: list
    eval_source: str | None
    eval_records: list
    generation_sets: list


def _read_inputs(cfg: TrainConfig, objective: CausalLMObjective | ClassificationObjective, rank: int) -> _Inputs:
    train_records = read_records(cfg.data.train, "train")
    objective.check(train_records, cfg.data.train)
    eval_source = cfg.data.eval or (cfg.data.train if cfg.data.train.startswith("bundled:") else None)
    eval_records = read_records(eval_source, "test")[: cfg.data.eval_limit] if eval_source else []
    if eval_source:
        objective.check(eval_records, eval_source)
    if rank == 0:
        _check_output_dir(Path(cfg.output_dir))
    # objectives that score their own predictions (classification, seq2seq) have no chat-generation sets
    scored = generation_sets(cfg, eval_records) if rank == 0 and not objective.scores_predictions else []
    return _Inputs(train_records, eval_source, eval_records, scored)


def _build_model(
    cfg: TrainConfig, objective, model: nn.Module, tokenizer: Any, inputs: _Inputs, device: torch.device
) -> tuple[PeftModel, list, list]:
    """(the model with the run's adapter, training examples, held-out examples); the objective then lays its
    batches out for that model and method (`objective.prepare`)."""
    train_set = objective.examples(inputs.train_records, tokenizer, cfg.data.train)
    method = _method_config(cfg, objective, model, train_set, tokenizer, device)
    peft_model = _peft_model(model.to(device), method, cfg.load_adapters)
    objective.prepare(peft_model, get_method(method.peft_type))
    if cfg.optim.gradient_checkpointing:  # non-reentrant: no need for input embeddings that require grad
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    eval_set = objective.examples(inputs.eval_records, tokenizer, inputs.eval_source) if inputs.eval_records else []
    return peft_model, train_set, eval_set


def _setup(cfg: TrainConfig, resume: bool, model: nn.Module | None, tokenizer: Any) -> _Run:
    """inputs -> model -> adapter and objective -> optimizer: each step takes the previous steps' outputs."""
    rank, world, device = _distributed()
    torch.manual_seed(cfg.seed)
    objective = objective_for(cfg)
    inputs = _read_inputs(cfg, objective, rank)
    if model is None:
        model, tokenizer = objective.load_model()
    peft_model, train_set, eval_set = _build_model(cfg, objective, model, tokenizer, inputs, device)
    ddp = _wrap(peft_model, model, world, cfg.distributed, device)
    optim = cfg.optim
    optimizer = build_optimizer(peft_model, optim.lr, optim.weight_decay, optim.loraplus_lr_ratio, optim.optimizer)
    scheduler = build_scheduler(optimizer, optim.steps, optim.warmup_steps, optim.schedule)
    run = _Run(
        cfg,
        peft_model,
        ddp,
        tokenizer,
        train_set,
        eval_set,
        inputs.eval_records,
        inputs.generation_sets,
        optimizer,
        scheduler,
        device,
        rank,
        world,
        Path(cfg.output_dir),
        objective,
    )
    if resume:
        _resume(run)
    return run


def _peft_model(model: nn.Module, config, load_adapters: dict[str, str] | None) -> PeftModel:
    """The model with the run's adapter (active, trainable) after the `load_adapters` (frozen) it may combine."""
    if not load_adapters:
        return get_peft_model(model, config)
    peft_model = task_class(config.task_type)(model)
    for name, path in load_adapters.items():
        _load_adapter_body(peft_model, name, path)
    peft_model.add_adapter("default", config)
    peft_model.set_adapter("default")
    return peft_model


def _load_adapter_body(peft_model: PeftModel, name: str, path: str) -> None:
    """A saved adapter without its task head (that head was trained for the source task's own labels)."""
    from deltatune import io
    from deltatune.config import AdapterConfig
    from deltatune.hub import adapter_dir

    directory = adapter_dir(path, None, None)
    source = AdapterConfig.from_pretrained(directory)
    heads = set(type(peft_model).task_heads)
    kept = [m for m in source.modules_to_save or [] if m not in heads]
    body = source.replace(modules_to_save=kept or None, task_type=None)
    tensors = {k: v for k, v in io.read_tensors(directory).items() if not heads & set(k.split("."))}
    peft_model.add_adapter(name, body)
    peft_model.load_adapter_tensors(name, tensors)


def _method_config(cfg: TrainConfig, objective, model: nn.Module, train_set: list, tokenizer: Any, device):
    """The adapter config, completed for this run by the method itself (`AdapterConfig.for_training`): it may use
    the run's length and the first 4 batches of the run's data order (e.g. to allocate ranks)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    size = cfg.optim.batch_size

    def calibration_batches() -> list[dict[str, torch.Tensor]]:
        order = step_indices(len(train_set), 4 * size, 0, cfg.seed)
        return [
            {k: v.to(device) for k, v in objective.collate([train_set[i] for i in order[s : s + size]], pad).items()}
            for s in range(0, len(order), size)
        ]

    context = TrainingContext(
        total_steps=cfg.optim.steps,
        model=model,
        calibration_batches=calibration_batches,
        loss_fn=lambda m, b: objective.loss_sum(m, b, "fp32") / objective.count(b),
    )
    return adapter_config(cfg.method).for_training(context)


def _wrap(peft_model: PeftModel, base: nn.Module, world: int, strategy: str, device: torch.device) -> nn.Module:
    """The module the loop calls: the model itself, DDP around it, or the model sharded in place by FSDP2."""
    if world == 1:
        return peft_model
    if strategy == "ddp":
        return nn.parallel.DistributedDataParallel(peft_model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from deltatune.models import find_layer_list

    mesh = init_device_mesh(device.type, (world,))
    for layer in find_layer_list(base)[1]:  # one FSDP unit per transformer block (adapters inside it)
        fully_shard(layer, mesh=mesh)
    fully_shard(peft_model, mesh=mesh)
    return peft_model


def _no_sync(run: _Run):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if run.world == 1:
        return contextlib.nullcontext()
    if run.cfg.distributed == "ddp":
        return run.ddp.no_sync()
    return _fsdp_no_sync(run.ddp)


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _full_adapter_state(run: _Run) -> dict[str, torch.Tensor]:
    """The adapter's tensors, gathered from their shards under FSDP (a collective: every rank calls it)."""
    state = run.model.adapter_state_dict(run.model.active_adapter)
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state.items()}


def _resume(run: _Run) -> None:
    path = ckpt.latest_checkpoint(run.run_dir)
    if path is None:
        raise ConfigError(f"--resume: no checkpoint under {run.run_dir}/checkpoints (set save_every to write some).")
    adapter, optimizer, rng, meta = ckpt.load_checkpoint(path)
    run.model.load_training_state_dict(adapter)
    run.optimizer.load_state_dict(optimizer)
    run.scheduler.load_state_dict(meta["scheduler"])
    ckpt.restore_rng(rng)
    run.start_step, run.losses = meta["step"], meta["losses"]
    if run.is_main:
        _forget_metrics_after(run.run_dir / "metrics.jsonl", run.start_step)


def _forget_metrics_after(path: Path, step: int) -> None:
    """Drop the records of steps after `step` (the interrupted run's, about to be redone), so none is logged twice."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the line a kill cut short
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line + "\n")
    io.atomic_write_bytes(path, "".join(kept).encode())


def _micro_batches(run: _Run, step: int) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches of optimizer step `step` (a contiguous slice of the global batch)."""
    local = run.cfg.optim.batch_size * run.cfg.optim.grad_accum
    indices = step_indices(len(run.train_set), local * run.world, step, run.cfg.seed)[run.rank * local :][:local]
    pad = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else 0
    size = run.cfg.optim.batch_size
    return [
        {
            k: v.to(run.device)
            for k, v in run.objective.collate([run.train_set[i] for i in indices[s : s + size]], pad).items()
        }
        for s in range(0, local, size)
    ]


def _all_sum(value: float, run: _Run) -> float:
    if run.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=run.device)
    dist.all_reduce(t)
    return float(t.item())


def _train_step(run: _Run, step: int) -> tuple[float, int]:
    """One optimizer step (with gradient accumulation); returns (mean loss over the global batch, tokens processed
    by this rank)."""
    micro = _micro_batches(run, step)
    global_tokens = _all_sum(sum(run.objective.count(b) for b in micro), run)
    hooks = get_method(run.model.active_peft_type).hooks
    loss_total = 0.0
    for i, batch in enumerate(micro):
        sync = i == len(micro) - 1 or run.world == 1
        with contextlib.nullcontext() if sync else _no_sync(run):
            loss = run.objective.loss_sum(run.ddp, batch, run.cfg.optim.precision)
            objective = loss * run.world / global_tokens  # DDP averages over ranks: undo it
            if hooks is not None:  # a method's regulariser (e.g. an orthogonality penalty), once per step
                objective = objective + hooks.extra_loss(run.model) / len(micro)
            objective.backward()
        loss_total += loss.item()
    mean_loss = _all_sum(loss_total, run) / global_tokens
    if not math.isfinite(mean_loss):
        run.optimizer.zero_grad(set_to_none=True)
        try:
            last = ckpt.latest_checkpoint(run.run_dir)
        except CheckpointError:
            last = None
        raise TrainingDiverged(
            f"loss became {mean_loss} at step {step + 1}; no update was applied. Last good "
            f"checkpoint: {last or 'none'}. Lower optim.lr or use precision=fp32."
        )
    if run.cfg.optim.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(
            [p for p in run.model.parameters() if p.requires_grad], run.cfg.optim.max_grad_norm
        )
    run.optimizer.step()
    if hooks is not None:  # after the update, while gradients still exist (importance scores need them)
        hooks.on_step(run.model, step)
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return mean_loss, sum(int(b["attention_mask"].sum()) for b in micro)


def _log(run: _Run, record: dict[str, Any]) -> None:
    if run.is_main:
        with open(run.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")


ESTIMATE_AFTER = 3
"""Steps timed (after the first, which warms up) before the run prints how long its training will take."""


def _loop(run: _Run, console: Console, after: float = 0.0) -> None:
    """The training steps; after the first few, an estimate of the time left (`after`: seconds still to come once
    the steps are done, e.g. scoring after training)."""
    cfg = run.cfg
    timed: list[float] = []
    with TrainProgress(console, cfg.optim.steps, run.start_step, enabled=run.is_main) as progress:
        for step in range(run.start_step, cfg.optim.steps):
            t0 = time.perf_counter()
            loss, tokens = _train_step(run, step)
            run.losses.append(loss)
            seconds = time.perf_counter() - t0
            tok_s = tokens * run.world / seconds
            lr = run.scheduler.get_last_lr()[0]
            progress.update(step + 1, loss, lr, tok_s)
            if step > run.start_step and len(timed) < ESTIMATE_AFTER:
                timed.append(seconds)
                if len(timed) == ESTIMATE_AFTER and step + 1 < cfg.optim.steps:
                    left = (cfg.optim.steps - step - 1) * sum(timed) / len(timed)
                    progress.note(left, after)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.optim.steps:
                _log(run, {"step": step + 1, "loss": loss, "lr": lr, "tokens_per_s": tok_s})
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and run.eval_set:
                _log(run, {"step": step + 1, "eval_loss": _eval_loss(run)})
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and run.is_main:
                ckpt.save_checkpoint(
                    run.run_dir,
                    step + 1,
                    run.model.training_state_dict(),
                    run.optimizer,
                    run.scheduler,
                    {"losses": run.losses},
                )


def _eval_loss(run: _Run) -> float:
    pad = run.tokenizer.pad_token_id or 0
    value = eval_loss(run.objective, run.model, run.eval_set, pad, run.cfg.optim.batch_size, run.device)
    run.model.train()
    return value


def _score_before(run: _Run, base_answers: dict[str, list[str]] | None) -> bool | None:
    """The generation sets' answers before training: the given base answers where they cover every set and the
    adapter starts as the identity, else generated. Returns whether it starts as the identity (None: no sets)."""
    sets = run.generation_sets
    if base_answers is None:  # a run on its own: nothing to reuse, no check to pay for
        score_all(run, "before")
        return None
    identity = _starts_as_identity(run) if sets else None
    known = all(len(base_answers.get(s.name, [])) == len(s.records) for s in sets)
    if identity and known:
        for gen_set in sets:
            gen_set.before = list(base_answers[gen_set.name])
        return identity
    score_all(run, "before")
    return identity


@torch.no_grad()
def _starts_as_identity(run: _Run) -> bool:
    """Whether the fresh adapter leaves the loss of (up to 8) held-out examples as the base model gives it (exactly,
    up to float noise): then the model's greedy answers are the base's. Methods that add virtual tokens or start
    from a random edit do not."""
    examples = (run.eval_set or run.train_set)[:8]
    if not examples:
        return False
    pad = run.tokenizer.pad_token_id or 0
    with run.objective.training_layout(run.model):
        adapted = eval_loss(run.objective, run.model, examples, pad, len(examples), run.device)
        with run.model.disable_adapter():
            base = eval_loss(run.objective, run.model, examples, pad, len(examples), run.device)
    run.model.train()
    return abs(adapted - base) <= 1e-6 * max(1.0, abs(base))


def _timed(fn: Callable[..., Any], *args: Any) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def _final_eval_loss(run: _Run, result: TrainResult) -> None:
    result.eval_loss = _eval_loss(run)
    _log(run, {"step": run.cfg.optim.steps, "eval_loss": result.eval_loss})


def train(
    cfg: TrainConfig,
    resume: bool = False,
    console: Console | None = None,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    around_loop: Callable[[], contextlib.AbstractContextManager] | None = None,
    base_answers: dict[str, list[str]] | None = None,
) -> TrainResult:
    """Fine-tune `cfg.model` (or the given model/tokenizer) with the adapter `cfg.method`; see TrainConfig.

    `around_loop` (optional) makes a context entered around the training steps only, after the model is loaded:
    the command line uses it for process-wide host tuning (`train.host.freed_memory_kept`), which a library call
    never applies by itself. `base_answers` (optional): the base model's answers to this run's generation sets (a
    previous run's `answers_before` on the same model and sets); used as the "before" answers when the fresh
    adapter leaves the model's outputs unchanged (checked on held-out examples), so a comparison of many methods
    generates them once. An empty dict asks for the check only (`TrainResult.starts_as_identity`), None for
    neither."""
    console = console or Console()
    started = time.perf_counter()
    run = _setup(cfg, resume, model, tokenizer)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    if run.is_main and not resume:
        (run.run_dir / "metrics.jsonl").write_text("")
        (run.run_dir / "train_config.json").write_text(cfg.model_dump_json(indent=2))
    result = TrainResult(run.run_dir, run.run_dir / "adapter", cfg.optim.steps, run.losses)
    result.trainable, result.total = run.model.get_nb_trainable_parameters()
    phases = result.phases
    phases["setup"] = time.perf_counter() - started
    t_before = time.perf_counter()
    result.starts_as_identity = _score_before(run, base_answers)
    phases["score before"] = time.perf_counter() - t_before
    with around_loop() if around_loop else contextlib.nullcontext(), run.objective.training_layout(run.model):
        phases["train"] = _timed(_loop, run, console, phases["score before"])
        if run.eval_set:
            phases["held-out loss"] = _timed(_final_eval_loss, run, result)
    phases["score after"] = _timed(score_all, run, "after")
    t_save = time.perf_counter()
    report_scores(run, result)
    state = _full_adapter_state(run)
    if run.is_main:
        run.model.save_pretrained(result.adapter_dir, state_dict=state, selected_adapters=[run.model.active_adapter])
        if run.objective.scores_predictions:  # e.g. which output of a classification head is which label
            for name, text in run.objective.adapter_files().items():
                (result.adapter_dir / name).write_text(text)
        result.adapter_bytes = (result.adapter_dir / "adapter_model.safetensors").stat().st_size
        plot_losses(run.losses, run.run_dir / "loss.png")
    phases["save"] = time.perf_counter() - t_save
    if run.world > 1:
        dist.barrier()  # every rank is done with collectives before any process group is torn down
    result.seconds = time.perf_counter() - started
    result.model, result.rank = run.model, run.rank
    return result
