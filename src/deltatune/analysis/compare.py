"""`deltatune compare`: every PEFT family and the classic baselines trained on the same task, data, steps and batch,
one run folder per method, and one table: trainable share, adapter size, peak memory, speed, held-out quality,
forgetting, and whether the adapter merges (with its unmerged inference overhead).

Each method trains at its own learning rate: the catalog's default, or (preset `full`) the best of a small sweep
on the held-out loss, recorded per row. Runs that finished are read back from their folder (`results.json`), so an
interrupted comparison resumes; `force` redoes them. A method that does not fit the model is reported with its
reason and the rest still run; a run whose loss diverges is recorded as diverged.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltatune.errors import ConfigError, DeltatuneError
from deltatune.registry import get_method

FAMILIES = ("reparameterization", "additive", "soft prompt", "selective", "baseline")


@dataclass(frozen=True)
class Candidate:
    """One row of the comparison: a method config and the learning rates it may train at (the first: default)."""

    family: str
    method: dict[str, Any]
    lrs: tuple[float, ...]
    refusal: dict[str, str] = field(default_factory=dict)
    """task kind -> why the method does not apply to that kind of model (reported, not run); it applies elsewhere."""


_LORA = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.05}
CATALOG: dict[str, Candidate] = {
    "lora": Candidate("reparameterization", _LORA, (3e-3, 1e-3, 1e-2)),
    "dora": Candidate("reparameterization", {**_LORA, "use_dora": True}, (3e-3, 1e-3, 1e-2)),
    "rslora": Candidate("reparameterization", {**_LORA, "use_rslora": True}, (1e-3, 3e-4, 3e-3)),
    "vera": Candidate("reparameterization", {"peft_type": "VERA", "r": 64}, (1e-2, 3e-3, 3e-2)),
    "ia3": Candidate("additive", {"peft_type": "IA3"}, (1e-2, 3e-3, 3e-2)),
    "bottleneck": Candidate("additive", {"peft_type": "BOTTLENECK", "adapter_type": "houlsby"}, (3e-3, 1e-3, 1e-2)),
    "reft": Candidate("additive", {"peft_type": "REFT", "r": 4}, (3e-3, 1e-3, 1e-2)),
    "prompt_tuning": Candidate(
        "soft prompt", {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 16}, (3e-2, 1e-2, 1e-1)
    ),
    "prefix_tuning": Candidate(
        "soft prompt", {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 16}, (1e-2, 3e-3, 3e-2)
    ),
    "p_tuning": Candidate(
        "soft prompt",
        {"peft_type": "P_TUNING", "num_virtual_tokens": 16, "encoder_hidden_size": 128},
        (3e-3, 1e-3, 1e-2),
    ),
    "llama_adapter": Candidate(
        "soft prompt",
        {"peft_type": "ADAPTION_PROMPT", "adapter_len": 10, "adapter_layers": 8},
        (1e-2, 3e-3, 3e-2),
        refusal={"classification": "LLaMA-Adapter's adaption prompts are decoder attention layers' (LLaMA-style)."},
    ),
    "ln_tuning": Candidate("selective", {"peft_type": "LN_TUNING"}, (1e-2, 3e-3, 3e-2)),
    "bitfit": Candidate("selective", {"peft_type": "SELECTIVE"}, (1e-2, 3e-3, 3e-2)),
    "full_ft": Candidate(
        "baseline",
        {"peft_type": "SELECTIVE", "train_parameters": ["weight", "bias"], "train_output_head": True},
        (5e-5, 2e-5, 1e-4),
    ),
    "partial_ft": Candidate(
        "baseline",
        {"peft_type": "SELECTIVE", "train_parameters": ["weight", "bias"], "top_k_layers": 1},
        (3e-4, 1e-4, 1e-3),
    ),  # fmt: skip
    "feature_extraction": Candidate(
        "baseline",
        {"peft_type": "SELECTIVE", "train_parameters": ["bias"], "select_modules": [], "train_output_head": True},
        (1e-2, 3e-3, 3e-2),
        refusal={
            "causal_lm": "feature extraction trains a task head on frozen features; a causal LM's head is its "
            "vocabulary projection, which is the whole model's output (that is partial_ft's job)."
        },
    ),  # fmt: skip
}


@dataclass(frozen=True)
class Task:
    name: str
    kind: str
    """The run config's `task`: causal_lm or classification."""
    overrides: tuple[str, ...]
    metric: str

    @property
    def run_overrides(self) -> list[str]:
        return [f"task={self.kind}", *self.overrides]


@dataclass(frozen=True)
class Preset:
    tasks: tuple[Task, ...]
    seeds: tuple[int, ...]
    sweep: bool
    methods: tuple[str, ...] | None = None
    """What runs without --methods (None: the whole catalog)."""


QUICK_METHODS = ("lora", "ia3", "bottleneck", "reft", "prompt_tuning", "llama_adapter", "ln_tuning", "bitfit",
                 "full_ft", "partial_ft", "feature_extraction")  # fmt: skip
"""What the quick preset runs by default (its time budget): LoRA for the reparameterizations, every additive kind,
two soft prompts, both selective methods and every baseline; the rest with --methods or in the full preset."""


_DATE = ("generate_eval=16", "max_new_tokens=12", "general_max_new_tokens=16", "data.extra_eval={}")
PRESETS: dict[str, Preset] = {
    "quick": Preset(
        (
            Task("date", "causal_lm", (*_DATE, "optim.steps=12", "optim.batch_size=4"), "exact match"),
            Task("classification", "classification", ("optim.steps=150",), "accuracy"),
        ),
        seeds=(0,),
        sweep=False,
        methods=QUICK_METHODS,
    ),
    "full": Preset(
        (
            Task("date", "causal_lm", (*_DATE, "generate_eval=64", "optim.steps=80"), "exact match"),
            Task("classification", "classification", ("optim.steps=400",), "accuracy"),
        ),
        seeds=(0, 1, 2),
        sweep=True,
    ),
}


def select_methods(names: list[str] | None) -> dict[str, Candidate]:
    """The catalog entries named (all when None), refusing unknown names with the list of known ones."""
    if not names:
        return dict(CATALOG)
    unknown = [n for n in names if n not in CATALOG]
    if unknown:
        raise ConfigError(f"unknown method(s) {', '.join(unknown)}; choose from: {', '.join(CATALOG)}.")
    return {n: CATALOG[n] for n in names}


@dataclass
class Row:
    """One method on one task (what the table shows and results.json holds)."""

    method: str
    task: str
    family: str
    status: str = "ok"
    """ok, diverged (the loss became NaN/inf), refused (the method does not fit this model), or failed."""
    reason: str = ""
    lr: float | None = None
    seeds: list[int] = field(default_factory=list)
    trainable: int = 0
    total: int = 0
    """The base model's parameters (tied ones once): what trainable % is of (copies a method trains are not added)."""
    adapter_mb: float = 0.0
    peak_mb: float = 0.0
    step_s: float = 0.0
    tokens_per_s: float = 0.0
    metric: float | None = None
    metric_spread: float | None = None
    metric_before: float | None = None
    general_loss_change: float | None = None
    general_score: float | None = None
    general_score_before: float | None = None
    mergeable: bool = False
    unmerged_overhead: float | None = None
    """Forward time with the adapter unmerged over the base model's (same batch, interleaved)."""
    sweep: dict[str, float] = field(default_factory=dict)
    """lr -> held-out loss, when the learning rate came from a sweep."""
    seconds: float = 0.0

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0


@contextmanager
def peak_memory() -> Iterator[dict[str, float]]:
    """Peak memory while the block runs, in MiB: CUDA's allocated peak on a GPU, else the process's peak RSS (Linux
    VmHWM, reset at entry through /proc/self/clear_refs; where that is unavailable, the lifetime peak)."""
    out: dict[str, float] = {}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        yield out
        out["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    yield out
    try:
        status = Path("/proc/self/status").read_text()
        out["peak_mb"] = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024
    except (OSError, AttributeError):
        import resource

        out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _interleaved_ratio(model, batch: dict[str, torch.Tensor], rounds: int = 5) -> float:
    """Median over rounds of forward time with the adapter over forward time with it disabled (no grad)."""
    ratios = []
    model.eval()
    with torch.no_grad():
        for _ in range(rounds):
            t0 = time.perf_counter()
            model(**batch)
            t1 = time.perf_counter()
            with model.disable_adapter():
                model(**batch)
            ratios.append((t1 - t0) / (time.perf_counter() - t1))
    return statistics.median(ratios[1:] if len(ratios) > 2 else ratios)


def _run_config(task: Task, candidate: Candidate, lr: float, seed: int, run_dir: Path, extra: list[str]):
    from deltatune.train import load_train_config

    overrides = [*task.run_overrides, *extra, f"method={json.dumps(candidate.method)}", f"optim.lr={lr}",
                 f"seed={seed}", f"output_dir={run_dir}", "log_every=1"]  # fmt: skip
    return load_train_config(None, overrides)


_BASE_ANSWERS: dict[str, dict[str, list[str]]] = {}
"""Within one `compare` call, per run setting (model, data, scoring budgets): the base model's greedy answers to the
scored sets ("before" of every method that starts as the identity) and to the general questions (the forgetting
measure's text); generated by the first run that needs them, reused by the others."""


def _base_key(cfg: Any, kind: str) -> str:
    scoring = (cfg.model, cfg.data.model_dump_json(), cfg.generate_eval, cfg.max_new_tokens, cfg.general_max_new_tokens)
    return f"{kind}:{json.dumps(scoring)}"


def _train_once(task: Task, candidate: Candidate, lr: float, seed: int, run_dir: Path, extra: list[str]) -> dict:
    """One training run, measured: its TrainResult's numbers plus peak memory, forgetting and unmerged overhead."""
    from rich.console import Console

    from deltatune.train import train
    from deltatune.train.data import read_records
    from deltatune.train.host import release_freed_memory
    from deltatune.train.seq2seq import objective_for

    release_freed_memory()  # one run's peak RSS is not the previous run's leftovers
    cfg = _run_config(task, candidate, lr, seed, run_dir, extra)
    objective = objective_for(cfg)
    objective.check(read_records(cfg.data.train, "train"), cfg.data.train)  # a classifier's labels, before its head
    model, tokenizer = objective.load_model()
    base_total = sum(p.numel() for p in model.parameters())  # tied weights once; a classifier's new head included
    memory: dict[str, float] = {}

    @contextmanager
    def measured() -> Iterator[None]:
        with peak_memory() as peak:
            yield
        memory.update(peak)

    key = _base_key(cfg, "scored")
    result = train(cfg, console=Console(quiet=True), model=model, tokenizer=tokenizer, around_loop=measured,
                   base_answers=_BASE_ANSWERS.get(key, {}))  # fmt: skip
    if result.starts_as_identity and key not in _BASE_ANSWERS:
        _BASE_ANSWERS[key] = result.answers_before
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    speeds = [r["tokens_per_s"] for r in logged if "tokens_per_s" in r][1:] or [0.0]  # the first step warms up
    out = {
        "trainable": result.trainable, "total": base_total, "adapter_mb": result.adapter_bytes / 2**20,
        "peak_mb": memory.get("peak_mb", 0.0), "step_s": result.phases["train"] / max(1, result.steps),
        "tokens_per_s": statistics.median(speeds), "metric": result.metric_after,
        "metric_before": result.metric_before, "eval_loss": result.eval_loss,
    }  # fmt: skip
    general = result.scores.get("general questions")
    if general is not None:
        out["general_score_before"], out["general_score"] = general
    out.update(_forgetting_and_overhead(cfg, objective, result.model, tokenizer))
    result.model = None
    return out


def _forgetting_and_overhead(cfg, objective, model, tokenizer) -> dict[str, float]:
    """Forgetting (causal LMs): the mean loss of the base model's own greedy answers to the general questions (text
    the base knew by construction; generated with the adapter disabled) with the adapter, minus without it; and the
    unmerged forward's time over the base's, on a batch of held-out examples."""
    from deltatune.train.data import collate, read_records
    from deltatune.train.evaluate import generate_for
    from deltatune.train.objectives import eval_loss

    out: dict[str, float] = {}
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id or 0
    if cfg.task == "causal_lm" and cfg.data.general_eval:
        questions = read_records(cfg.data.general_eval, "test")
        key = _base_key(cfg, "general")
        if key not in _BASE_ANSWERS:  # the base's answers: the same for every method
            with model.disable_adapter():
                _BASE_ANSWERS[key] = {"answers": generate_for(model, tokenizer, questions, cfg.data,
                                                              cfg.general_max_new_tokens, device)}  # fmt: skip
        answers = _BASE_ANSWERS[key]["answers"]
        field = cfg.data.response_field
        records = [{**q, field: a} for q, a in zip(questions, answers, strict=True) if a.strip()]
        examples = objective.examples(records, tokenizer, "general questions (the base's answers)")
        with objective.training_layout(model):  # padding-free rows need the layout they were laid out for
            tuned = eval_loss(objective, model, examples, pad, cfg.optim.batch_size, device)
            with model.disable_adapter():
                base = eval_loss(objective, model, examples, pad, cfg.optim.batch_size, device)
        out["general_loss_change"] = tuned - base
    source = cfg.data.eval or cfg.data.train
    split = "test" if source.startswith("bundled:") and not cfg.data.eval else "train"
    examples = objective.examples(read_records(source, split)[:8], tokenizer, source)
    batch = collate(examples, pad)
    inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
    out["unmerged_overhead"] = _interleaved_ratio(model, inputs)
    return out


def _measure_method(name: str, candidate: Candidate, task: Task, preset: Preset, folder: Path, extra: list[str]) -> Row:
    """The method's row: its learning rate (default, or swept on held-out loss), then one run per seed."""
    row = Row(name, task.name, candidate.family, mergeable=get_method(candidate.method["peft_type"]).mergeable)
    started = time.perf_counter()
    runs: dict[tuple[float, int], dict] = {}

    def run(lr: float, seed: int) -> dict:
        if (lr, seed) not in runs:
            runs[lr, seed] = _train_once(task, candidate, lr, seed, folder / f"lr{lr:g}_seed{seed}", extra)
        return runs[lr, seed]

    lr = candidate.lrs[0]
    if preset.sweep:
        row.sweep = _sweep(candidate, lambda candidate_lr: run(candidate_lr, preset.seeds[0]))
        lr = float(min(row.sweep, key=row.sweep.__getitem__))
    measured = [run(lr, seed) for seed in preset.seeds]
    first = measured[0]
    for key in ("trainable", "total", "adapter_mb", "peak_mb", "step_s", "tokens_per_s", "metric_before",
                "general_loss_change", "general_score", "general_score_before", "unmerged_overhead"):  # fmt: skip
        setattr(row, key, first.get(key))
    metrics = [m["metric"] for m in measured if m.get("metric") is not None]
    if metrics:
        row.metric = statistics.fmean(metrics)
        row.metric_spread = max(metrics) - min(metrics) if len(metrics) > 1 else None
    row.lr, row.seeds, row.seconds = lr, list(preset.seeds), time.perf_counter() - started
    return row


def _sweep(candidate: Candidate, run: Callable[[float], dict]) -> dict[str, float]:
    """lr -> held-out loss for each of the candidate's learning rates (inf where it diverged); all diverging
    re-raises the last divergence."""
    from deltatune.errors import TrainingDiverged

    losses, last = {}, None
    for lr in candidate.lrs:
        try:
            loss = run(lr)["eval_loss"]
        except TrainingDiverged as exc:
            loss, last = math.inf, exc
        losses[f"{lr:g}"] = loss if loss is not None and math.isfinite(loss) else math.inf
    if last is not None and all(math.isinf(v) for v in losses.values()):
        raise last
    return losses


def compare_one(name: str, task: Task, preset: Preset, out: Path, extra: list[str], force: bool) -> Row:
    """A finished method's row read back from its folder, or the method run now; refusals and divergences become
    rows with their reason (the comparison goes on)."""
    import shutil

    from deltatune.errors import TrainingDiverged

    candidate = CATALOG[name]
    folder = out / task.name / name
    saved = folder / "results.json"
    spec = {"method": candidate.method, "lrs": list(candidate.lrs), "task": task.run_overrides, "extra": extra,
            "seeds": list(preset.seeds), "sweep": preset.sweep}  # fmt: skip
    if saved.is_file() and not force:
        stored = json.loads(saved.read_text())
        if stored.get("spec") == spec:  # the same runs: read back (another budget or config: run again)
            return Row(**{k: v for k, v in stored.items() if k not in ("trainable_pct", "spec")})
    if folder.exists():
        shutil.rmtree(folder)  # force, or an unfinished run: start the method over
    folder.mkdir(parents=True)
    try:
        if task.kind in candidate.refusal:
            raise ConfigError(candidate.refusal[task.kind])
        row = _measure_method(name, candidate, task, preset, folder, extra)
    except TrainingDiverged as exc:
        row = Row(name, task.name, candidate.family, status="diverged", reason=str(exc))
    except DeltatuneError as exc:  # the method does not fit this model (e.g. BitFit without biases)
        row = Row(name, task.name, candidate.family, status="refused", reason=str(exc))
    except (RuntimeError, ValueError, TypeError) as exc:  # a bug or a crash in one run: recorded, the rest go on
        row = Row(name, task.name, candidate.family, status="failed", reason=f"{type(exc).__name__}: {exc}")
    saved.write_text(json.dumps({**asdict(row), "trainable_pct": row.trainable_pct, "spec": spec}, indent=2))
    return row


def compare(
    preset: str = "quick",
    methods: list[str] | None = None,
    out: Path = Path("runs/compare"),
    model: str | None = None,
    data: str | None = None,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
    tasks: list[str] | None = None,
    extra: list[str] | None = None,
) -> list[Row]:
    """Run (or read back) every selected method on every task of the preset; writes `out/results.json`,
    `out/compare.md` and `out/compare.png`. `model` / `data` replace the tasks' model and training data (then give
    `tasks` to pick the one they fit); `extra` are further `key=value` run-config overrides for every run."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from: {', '.join(PRESETS)}.")
    spec = PRESETS[preset]
    chosen = select_methods(methods or (list(spec.methods) if spec.methods else None))
    picked = [t for t in spec.tasks if tasks is None or t.name in tasks]
    if tasks is not None and len(picked) != len(set(tasks)):
        raise ConfigError(f"unknown task in {tasks}; the {preset} preset has: {', '.join(t.name for t in spec.tasks)}.")
    overrides = [*([f"model={model}"] if model else []), *([f"data.train={data}"] if data else []), *(extra or [])]
    _BASE_ANSWERS.clear()  # a model or data file may have changed since an earlier call
    t0 = time.perf_counter()
    rows = []
    for task in picked:
        for name in chosen:
            if progress:
                progress(f"{task.name}: {name}")
            rows.append(compare_one(name, task, spec, out, overrides, force))
    seconds = time.perf_counter() - t0
    write_report(rows, out, preset, seconds, {t.name: t.metric for t in picked})
    return rows


COLUMNS: list[tuple[str, str, Callable[[Row], Any], str | None]] = [
    # header, format, value, which end is best ("max" / "min"; None: not ranked)
    ("trainable", "{:,}", lambda r: r.trainable, None),
    ("trainable %", "{:.3f}", lambda r: r.trainable_pct, "min"),
    ("adapter MB", "{:.2f}", lambda r: r.adapter_mb, "min"),
    ("peak MiB", "{:.0f}", lambda r: r.peak_mb, "min"),
    ("step s", "{:.2f}", lambda r: r.step_s, "min"),
    ("tokens/s", "{:.0f}", lambda r: r.tokens_per_s, "max"),
    ("metric before → after", "{}", lambda r: _before_after(r.metric_before, r.metric, r.metric_spread), None),
    ("metric", "{:.3f}", lambda r: r.metric, "max"),
    ("general loss Δ", "{:+.3f}", lambda r: r.general_loss_change, "min"),
    ("general Qs before → after", "{}", lambda r: _before_after(r.general_score_before, r.general_score), None),
    ("merges", "{}", lambda r: "yes" if r.mergeable else "no", None),
    ("unmerged fwd vs base", "{:.2f}x", lambda r: r.unmerged_overhead, "min"),
    ("lr", "{:g}", lambda r: r.lr, None),
]


def _before_after(before: float | None, after: float | None, spread: float | None = None) -> str | None:
    if after is None:
        return None
    text = f"{'?' if before is None else f'{before:.1%}'} → {after:.1%}"
    return text + (f" (±{spread / 2:.1%})" if spread else "")


def best_per_column(rows: list[Row]) -> dict[str, dict[str, str]]:
    """task -> column header -> the method that is best there (finished runs only)."""
    best: dict[str, dict[str, str]] = {}
    for task in dict.fromkeys(r.task for r in rows):
        done = [r for r in rows if r.task == task and r.status == "ok"]
        for header, _, value, end in COLUMNS:
            scored = [(value(r), r.method) for r in done if end and value(r) is not None]
            if scored:
                pick = max(scored) if end == "max" else min(scored)
                best.setdefault(task, {})[header] = pick[1]
    return best


def markdown_table(rows: list[Row], metrics: dict[str, str]) -> str:
    """One table per task: a row per method, then the best method per column."""
    parts = []
    best = best_per_column(rows)
    for task in dict.fromkeys(r.task for r in rows):
        parts.append(f"### {task} ({metrics.get(task, 'metric')})\n")
        parts.append("| method | family | " + " | ".join(h for h, *_ in COLUMNS) + " |")
        parts.append("|---|---|" + "---|" * len(COLUMNS))
        for r in (r for r in rows if r.task == task):
            if r.status != "ok":
                reason = r.reason.replace("|", "/").replace("\n", " ")
                parts.append(f"| {r.method} | {r.family} | **{r.status}**: {reason} |" + " |" * (len(COLUMNS) - 1))
                continue
            cells = [_cell(fmt, value(r)) for _, fmt, value, _ in COLUMNS]
            parts.append(f"| {r.method} | {r.family} | " + " | ".join(cells) + " |")
        winners = best.get(task, {})
        parts.append("\nBest per column: " + "; ".join(f"{h}: **{m}**" for h, m in winners.items()) + ".\n")
    return "\n".join(parts)


def _cell(fmt: str, value: Any) -> str:
    return "—" if value is None else fmt.format(value)


def write_report(rows: list[Row], out: Path, preset: str, seconds: float, metrics: dict[str, str]) -> None:
    """results.json (every row), compare.md (the tables) and compare.png (quality vs trainable share)."""
    out.mkdir(parents=True, exist_ok=True)
    table = [{**asdict(r), "trainable_pct": r.trainable_pct} for r in rows]
    payload = {"preset": preset, "seconds": seconds, "rows": table, "best": best_per_column(rows)}
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    runs = sum(r.seconds for r in rows) / 60
    header = f"# deltatune compare ({preset} preset; the runs took {runs:.1f} min, this call {seconds / 60:.1f})\n\n"
    (out / "compare.md").write_text(header + markdown_table(rows, metrics))
    plot_comparison(rows, out / "compare.png", metrics)


def plot_comparison(rows: list[Row], path: Path, metrics: dict[str, str]) -> None:
    """Per task: held-out metric against trainable share (log scale), marker area proportional to peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r.task for r in rows))
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(6.5 * max(1, len(tasks)), 5), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=False):
        done = [r for r in rows if r.task == task and r.status == "ok" and r.metric is not None and r.trainable]
        largest = max((r.peak_mb for r in done), default=1.0) or 1.0
        for r in done:
            size = 40 + 400 * r.peak_mb / largest
            ax.scatter(r.trainable_pct, r.metric, s=size, alpha=0.6, color=_family_colour(r.family))
            ax.annotate(r.method, (r.trainable_pct, r.metric), fontsize=8, xytext=(4, 4), textcoords="offset points")
        families = sorted({r.family for r in done}, key=lambda f: FAMILIES.index(f) if f in FAMILIES else 99)
        handles = [plt.Line2D([], [], marker="o", linestyle="", color=_family_colour(f), label=f) for f in families]
        ax.legend(handles=handles, fontsize=8, loc="lower right")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (% of the model, log)")
        ax.set_ylabel(metrics.get(task, "held-out metric"))
        ax.set_title(f"{task}: marker size = peak memory; colour = family")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _family_colour(family: str) -> str:
    return f"C{FAMILIES.index(family) if family in FAMILIES else len(FAMILIES)}"
