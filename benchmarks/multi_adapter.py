"""Several adapters on one base, against peft in one process: mixed-adapter batches and load_adapter time.

1. Mixed batch: 4 LoRA adapters (r 8, q/k/v/o) on the SmolLM2-135M shape, a batch of 8 rows x 128 tokens, two rows
   per adapter (`adapter_names=`), inference forward; the base model's forward (adapters disabled) is the reference.
   Targets: <= 1.06x the base forward, and <= peft's mixed batch.
2. load_adapter of a ~1 MB adapter (r 4 on q, v) and a ~100 MB adapter (r 80 on every linear): load, then delete.
   Target: <= 0.5x peft's time at both sizes.
Rounds are interleaved (every variant once per round, order rotating); medians with min-max spread.

Run: python benchmarks/multi_adapter.py [--rounds 12]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import distinct, interleaved, provenance, smollm2_shaped, spread, verdict, write_results  # noqa: E402

import deltatune as dt  # noqa: E402

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _with_adapters(lib, n: int):
    model = lib.get_peft_model(smollm2_shaped().eval(), lib.LoraConfig(r=8, target_modules=ATTENTION))
    for i in range(1, n):
        model.add_adapter(f"a{i}", lib.LoraConfig(r=8, target_modules=ATTENTION))
    with torch.no_grad():  # non-zero B, so every adapter really computes something
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    return model.eval()


def mixed_batch(rounds: int) -> tuple[list[str], dict]:
    import peft

    ids = torch.randint(0, 49152, (8, 128), generator=torch.Generator().manual_seed(0))
    names = ["default", "a1", "a2", "a3"] * 2
    ours, theirs = _with_adapters(dt, 4), _with_adapters(peft, 4)
    base = smollm2_shaped().eval()
    torch.set_grad_enabled(False)
    times = interleaved(
        {
            "base forward": lambda: base(input_ids=ids),
            "deltatune mixed": lambda: ours(input_ids=ids, adapter_names=names),
            "peft mixed": lambda: theirs(input_ids=ids, adapter_names=names),
        },
        rounds,
    )
    torch.set_grad_enabled(True)
    ref = statistics_median(times["base forward"])
    ratio = {k: statistics_median(v) / ref for k, v in times.items()}
    lines = [
        "## Mixed-adapter batch: 4 LoRA adapters, 8 rows x 128 tokens (2 rows each), inference forward",
        "",
        "| variant | seconds, median (min-max) | x base forward |",
        "|---|---|---|",
        *[f"| {k} | {spread(v)} | {ratio[k]:.3f} |" for k, v in times.items()],
        "",
        f"- deltatune <= 1.06x the base forward: {verdict(ratio['deltatune mixed'] <= 1.06)} "
        f"({ratio['deltatune mixed']:.3f}x)",
        f"- deltatune <= peft's mixed batch: {verdict(ratio['deltatune mixed'] <= ratio['peft mixed'])} "
        f"({ratio['deltatune mixed'] / ratio['peft mixed']:.3f}x peft's; ranges "
        f"{'distinct' if distinct(times['deltatune mixed'], times['peft mixed']) else 'overlap'})",
    ]
    return lines, {k: v for k, v in times.items()}


def statistics_median(xs: list[float]) -> float:
    import statistics

    return statistics.median(xs)


def load_times(rounds: int) -> tuple[list[str], dict]:
    import peft

    lines = ["## load_adapter: load a saved adapter into a model, then delete it", "",
             "| adapter | file | deltatune s | peft s | deltatune / peft | <= 0.5x |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    data = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, config in [("~1 MB (r 4, q/v)", {"r": 4, "target_modules": ["q_proj", "v_proj"]}),
                              ("~100 MB (r 80, all linear)", {"r": 80, "target_modules": "all-linear"})]:  # fmt: skip
            path = Path(tmp) / label.split()[0].strip("~")
            source = dt.get_peft_model(smollm2_shaped(), dt.LoraConfig(**config))
            source.save_pretrained(path)
            size = (path / "adapter_model.safetensors").stat().st_size
            ours = dt.get_peft_model(smollm2_shaped(), dt.LoraConfig(r=2, target_modules=["q_proj"]))
            theirs = peft.get_peft_model(smollm2_shaped(), peft.LoraConfig(r=2, target_modules=["q_proj"]))

            def load(model, path=path):
                model.load_adapter(str(path), adapter_name="x")
                model.delete_adapter("x")

            times = interleaved({"deltatune": lambda m=ours: load(m), "peft": lambda m=theirs: load(m)}, rounds)
            ratio = statistics_median(times["deltatune"]) / statistics_median(times["peft"])
            data[label] = {"bytes": size, **times}
            lines.append(f"| {label} | {size / 2**20:.1f} MiB | {spread(times['deltatune'])} | {spread(times['peft'])} "
                         f"| {ratio:.3f} | {verdict(ratio <= 0.5)} |")  # fmt: skip
    return lines, data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=12)
    rounds = parser.parse_args().rounds
    torch.manual_seed(0)
    mixed_lines, mixed_data = mixed_batch(rounds)
    load_lines, load_data = load_times(rounds)
    lines = ["# Several adapters on one base: mixed batches and load_adapter, against peft", "",
             *provenance(rounds, "interleaved in one process"), "", *mixed_lines, "", *load_lines]  # fmt: skip
    write_results("multi_adapter", lines, {"mixed": mixed_data, "load": load_data})


if __name__ == "__main__":
    main()
