"""A short LoRA tour on the real SmolLM2-135M-Instruct: counts, a few training steps, merge check, save/load check."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from deltatune.layers import AdapterLayer
from deltatune.methods.lora import LoraConfig
from deltatune.model import PeftModel, get_peft_model
from deltatune.pretrained import load_causal_lm

PROMPTS = ["Translate to French: good morning", "What is the capital of Italy?"]
ANSWERS = ["Bonjour.", "Rome."]


@dataclass
class DemoReport:
    trainable: int
    expected_trainable: int
    total: int
    losses: list[float]
    merged_max_abs_diff: float
    merged_same_tokens: bool
    reload_max_abs_diff: float
    adapter_bytes: int
    out_dir: Path


def _batch(tokenizer):
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}, {"role": "assistant", "content": a}], tokenize=False
        )
        for p, a in zip(PROMPTS, ANSWERS, strict=True)
    ]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {**enc, "labels": labels}


def _expected_lora_count(model: PeftModel) -> int:
    """Σ over adapted layers of r·(d_in + d_out), from the base weights' shapes."""
    return sum(m.r["default"] * sum(m.base_weight.shape) for m in model.modules() if isinstance(m, AdapterLayer))


def run_demo(out_dir: str | Path = "runs/lora-demo", steps: int = 6, console: Console | None = None) -> DemoReport:
    console = console or Console()
    t0 = time.time()
    base, tokenizer = load_causal_lm()
    console.print(f"[bold]Base model[/] {base.config._name_or_path} loaded in {time.time() - t0:.1f}s")
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(base, config)
    trainable, total = model.get_nb_trainable_parameters()
    model.print_trainable_parameters()

    batch = _batch(tokenizer)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    console.print("loss over", steps, "steps:", " -> ".join(f"{v:.3f}" for v in losses))

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        unmerged = model(**batch).logits
        tokens = model.generate(**prompt, max_new_tokens=12, do_sample=False)
        model.merge_adapter()
        merged = model(**batch).logits
        merged_tokens = model.generate(**prompt, max_new_tokens=12, do_sample=False)
        model.unmerge_adapter()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    reloaded = PeftModel.from_pretrained(load_causal_lm()[0], out_dir)
    with torch.no_grad():
        reload_diff = (reloaded(**batch).logits - unmerged).abs().max().item()
    report = DemoReport(
        trainable,
        _expected_lora_count(model),
        total,
        losses,
        (merged - unmerged).abs().max().item(),
        bool(torch.equal(tokens, merged_tokens)),
        reload_diff,
        (out_dir / "adapter_model.safetensors").stat().st_size,
        out_dir,
    )
    _print_report(
        console, report, tokenizer.decode(tokens[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    )
    console.print(f"done in {time.time() - t0:.1f}s")
    return report


def _print_report(console: Console, r: DemoReport, sample: str) -> None:
    table = Table(title="LoRA on SmolLM2-135M-Instruct (r=8, q/k/v/o)")
    table.add_column("check")
    table.add_column("result")
    table.add_row("trainable / all params", f"{r.trainable:,} / {r.total:,} ({100 * r.trainable / r.total:.3f}%)")
    table.add_row(
        "expected Σ r·(d_in+d_out)",
        f"{r.expected_trainable:,} ({'ok' if r.expected_trainable == r.trainable else 'MISMATCH'})",
    )
    table.add_row("merged vs unmerged logits", f"max |Δ| = {r.merged_max_abs_diff:.2e}")
    table.add_row("greedy tokens merged == unmerged", str(r.merged_same_tokens))
    table.add_row("save -> load logits", f"max |Δ| = {r.reload_max_abs_diff:.2e}")
    table.add_row("adapter file", f"{r.adapter_bytes / 1e6:.2f} MB in {r.out_dir}")
    table.add_row("sample (after training)", repr(sample))
    console.print(table)
