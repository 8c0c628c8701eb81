"""The memory planner's estimate against the measured peak of real training steps (CPU: peak RSS).

Each case runs in a fresh process: RSS after imports is the baseline; the model is built (or loaded), the peak is
reset, then two training steps run (forward, fp32 cross-entropy, backward, AdamW step: the second step has the
optimizer state in place). Measured = peak RSS - baseline; the estimate is `plan_memory` for the same model config,
method, batch, sequence length and fp32. Target: within ±15%.

Run: python benchmarks/plan_vs_measured.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import provenance, write_results  # noqa: E402

CASES = [  # (name, model source or shape, method, batch, seq)
    ("SmolLM2-135M, LoRA r=8 q/k/v/o", "smollm2", "lora", 4, 256),
    ("SmolLM2-135M, LoRA r=8 q/k/v/o, chunked loss", "smollm2", "lora+chunked", 4, 256),
    ("SmolLM2-135M, DoRA r=8 q/k/v/o", "smollm2", "dora", 4, 256),
    ("SmolLM2-135M, full fine-tuning", "smollm2", "full", 2, 128),
    ("random LLaMA d=1024 x 8 layers, LoRA r=16 all-linear", {"hidden_size": 1024, "intermediate_size": 2816,
     "num_hidden_layers": 8, "num_attention_heads": 16, "vocab_size": 32000}, "lora", 4, 512),
    ("random LLaMA d=768 x 12 layers (GQA), IA3", {"hidden_size": 768, "intermediate_size": 2048,
     "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 4, "vocab_size": 16000}, "ia3", 8, 256),
]  # fmt: skip
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
TARGETS = {name: QKVO for name, source, *_ in CASES if source == "smollm2" and "full" not in name}


def _child(source, method: str, batch: int, seq: int, targets) -> dict:
    """Runs in its own process: build, reset the peak, two steps; returns the measured and estimated bytes."""
    import torch
    from common import peak_rss_mib, reset_peak_rss
    from transformers import AutoModelForCausalLM, LlamaConfig

    import deltatune as dt
    from deltatune.analysis.plan import plan_memory

    baseline = _rss_mib()  # after every import: the libraries' own memory is not training memory

    if source == "smollm2":
        from deltatune.pretrained import load_causal_lm

        model, _ = load_causal_lm()
        config = model.config
    else:
        config = LlamaConfig(**source)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    chunked, method = method.endswith("+chunked"), method.removesuffix("+chunked")
    options = {"use_dora": True} if method == "dora" else {}
    if method == "full":
        trained = model.train()
    else:
        lora = dt.LoraConfig(r=8 if targets else 16, target_modules=targets or "all-linear", **options)
        trained = dt.get_peft_model(model, {"lora": lora, "dora": lora, "ia3": dt.IA3Config()}[method]).train()
    if chunked:
        from deltatune.chunked_loss import enable_chunked_loss

        enable_chunked_loss(trained)
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    assert reset_peak_rss()
    for _ in range(2):
        if chunked:  # the head and loss a chunk of positions at a time: no full logits
            logits, loss = None, trained(input_ids=ids, labels=ids).loss
        else:
            logits = trained(input_ids=ids).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del logits, loss
    measured = (peak_rss_mib() - baseline) * 2**20
    planned = "lora" if method == "dora" else method
    plan = plan_memory(config, planned, rank=8 if targets else 16, targets=targets or ("all-linear" if planned == "lora"
                       else None), batch=batch, seq=seq, dtype="fp32", method_options=options or None,
                       chunked_loss=chunked)  # fmt: skip
    return {"measured": measured, "estimate": plan.peak, "weights": plan.base_weights, "state": plan.trainable_state,
            "activations": plan.activations, "loss": plan.logits_and_loss}  # fmt: skip


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        name = sys.argv[2]
        source, method, batch, seq = next(c[1:] for c in CASES if c[0] == name)
        print(json.dumps(_child(source, method, batch, seq, TARGETS.get(name))))
        return
    rows, data = [], {}
    for name, _, _method, batch, seq in CASES:
        out = subprocess.run([sys.executable, __file__, "--child", name], capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        error = result["estimate"] / result["measured"] - 1
        data[name] = {**result, "error": error}
        mib = {k: result[k] / 2**20 for k in result}
        rows.append(f"| {name} | {batch} x {seq} | {mib['weights']:.0f} / {mib['state']:.0f} / {mib['activations']:.0f}"
                    f" / {mib['loss']:.0f} | {mib['estimate']:.0f} | {mib['measured']:.0f} | {100 * error:+.1f}% |"
                    f" {'met' if abs(error) <= 0.15 else '**MISSED**'} |")  # fmt: skip
        print(rows[-1], flush=True)
    lines = [
        "# Memory planner: estimate vs measured peak (CPU, fp32)",
        "",
        *provenance(1, "one fresh process per case, two training steps each (peak RSS - RSS after imports)"),
        "- estimate = base weights + trainable state (params, grads, AdamW) + activations (traced on the meta device)"
        " + logits/loss; target: within ±15% of the measured peak",
        "",
        "| case | batch x seq | estimate parts, MiB (weights / state / activations / logits+loss) | estimate MiB |"
        " measured MiB | error | ±15% |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]
    write_results("plan_vs_measured", lines, data)


if __name__ == "__main__":
    main()
