"""Compare the two runs of peft's tests (scripts/peft_suite.sh) and write the results table.

usage: report.py PEFT_LOG DELTATUNE_LOG OUT.md --commit SHA --versions "..."
Counts per method and file: tests run (shared methods only), passed under peft, passed under deltatune among
those, and every deltatune failure of a test peft passes, in one bucket: missing import path, peft-internal
structure a test inspects, method we do not have, or behavioural difference. Known causes are explained by
`EXPLAINED` (a pattern on the test id or error, its bucket, why); the rest are bucketed by their error's type.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

BUCKETS = ("missing import path", "peft internals", "method we do not have", "behaviour")
# (regex matched against "<test id> <error>", bucket, explanation): the reviewed causes, most specific first
EXPLAINED: list[tuple[str, str, str]] = [
    (
        r"test_mixed_adapter_batches_lora_with_dora_raises",
        "behaviour",
        "on purpose: adapter_names= works with DoRA adapters (each group runs its own forward; peft refuses them)",
    ),
    (
        r"test_add_adapter_rejects_duplicate_name_without_mutation\[True\]",
        "behaviour",
        "on purpose: get_peft_model(mixed=True) is refused by name (deltatune has no PeftMixedModel)",
    ),
    (
        r"test_non_existing_model_card",
        "behaviour",
        "on purpose: save_pretrained writes the model card's header (peft's fields), not peft's template prose",
    ),
    (
        r"test_ia3_is_feedforward_subset_invalid_config",
        "behaviour",
        "wording: the test anchors peft's sentence at both ends; deltatune's error names the modules not targeted",
    ),
    (
        r"test_prompt_encoder_warning_num_layers",
        "peft internals",
        "builds peft's PromptEncoder(config) directly; deltatune's encoder is built by the method from its fields",
    ),
    (
        r"test_mixed_adapter_batches_training_mode_raises",
        "behaviour",
        "on purpose: adapter_names= works in training mode, each adapter learning from its rows (peft refuses it)",
    ),
    (
        r"TestPeftConfig::test_set_attributes",
        "behaviour",
        "on purpose: a config given another method's peft_type is refused by name (peft keeps the wrong one)",
    ),
    (
        r"monteclora_config|with Monteclora",
        "method we do not have",
        "MonteCLoRA (LoraConfig.monteclora_config): not in deltatune",
    ),
    (
        r"test_config_layers_to_transform_index_zero",
        "behaviour",
        "harness: the test's ids number the config classes of the library under test, so deltatune's ids differ "
        "(each of its configs with layer selection passes under its own id)",
    ),
    (
        r"test_adalora_config_invalid_total_step_raises",
        "behaviour",
        "on purpose: AdaLoraConfig(total_step=None) is accepted (`deltatune train` fills it from the run's length); "
        "get_peft_model refuses it for training, by name",
    ),
    (
        r"test_safe_merge\[Conv2d 1 AdaLoRA",
        "behaviour",
        "tolerance: the test gives LoRA configs on convolutions 1e-3 by issubclass(config, LoraConfig), which "
        "peft's AdaLoraConfig is and deltatune's is not; at 1e-6 merging a conv misses in peft too (1.18x the "
        "tolerance over 10 seeds; deltatune 1.27x)",
    ),
    (
        r"test_delete_adapter_multiple_adapters_with_modules_to_save",
        "behaviour",
        "on purpose: deleting the last adapter that saves a module gives the original module back (peft keeps an "
        "empty ModulesToSaveWrapper)",
    ),
    (
        r"TestDynamicDispatch::",
        "peft internals",
        "registers a user subclass of peft's LoraLayer for a custom module type (config._register_custom_module); "
        "deltatune's layers are its own classes",
    ),
    (
        r"test_merge_layers\[Embedding \+ transformers Conv1D 1 LoRA trainable_tokens",
        "peft internals",
        "the test perturbs the tokens through peft's TrainableTokensWrapper class and its token_adapter attribute; "
        "deltatune's trainable tokens are one layer",
    ),
    (
        r"test_multiple_active_adapters_with_same_trainable_token_indices_raises",
        "behaviour",
        "wording: refused with a ValueError as in peft, in deltatune's words (peft's names its TrainableTokensWrapper)",
    ),
    (
        r"test_only_params_are_updated\[Embedding \+ transformers Conv1D 2 LoRA-",
        "behaviour",
        "chance: 3 SGD steps move lora_embedding_B by less than the 1e-4 tolerance for most draws of the init, in "
        "peft too (the same model and steps fail for 15 of 20 seeds under peft, 16 under deltatune)",
    ),
    (
        r"test_save_pretrained_with_target_modules",
        "behaviour",
        "on purpose: target_modules stays the list it was given (peft turns a list into a set)",
    ),
    (
        r"test_requires_grad_adalora_(same|different)_targets",
        "behaviour",
        "on purpose: set_adapter keeps an adapter added for inference (inference_mode=True) frozen unless "
        "inference_mode=False is passed (peft makes any adapter it activates trainable)",
    ),
    (
        r"LN tuning runs one adapter at a time",
        "behaviour",
        "on purpose: several active LN tuning adapters are refused when activated (peft accepts them and raises at "
        "the next forward)",
    ),
    (r"safe_serialization=False", "behaviour", "by design: deltatune never writes or reads pickles (.bin)"),
    (
        r"test_set_adapter_non_overlapping_modules",
        "behaviour",
        "on purpose: a layer lists only the active adapters it holds (peft lists the model's active names, held or "
        "not)",
    ),
    (
        r"has no attribute '_restore_weights'",
        "peft internals",
        "peft's MHA wrapper re-registers the weights it deletes while merging (_restore_weights); deltatune never "
        "deletes them",
    ),
    (
        r"test_mixed_adapter_batches_mha_raises",
        "behaviour",
        "wording: mixed batches in nn.MultiheadAttention are refused with a TypeError as in peft, in deltatune's words",
    ),
    (
        r"is not supported for LoRA on nn.MultiheadAttention",
        "behaviour",
        "on purpose: lora_dropout on nn.MultiheadAttention is refused by name (peft ignores it there: the LoRA changes "
        "the attention's weights, so there is no input to drop)",
    ),
    (r"is neither a local folder nor in the Hub", "behaviour", "needs a Hub download (offline here)"),
    (
        r"use_dora=True on a grouped",
        "behaviour",
        "DoRA on grouped convolutions: refused by name (its norm needs a merged weight the grouped one cannot hold)",
    ),
    (
        r"test_disable_adapters_exiting_context_irregular_state",
        "behaviour",
        "on purpose: disable_adapter() gives each layer its own state back (peft warns and turns all on)",
    ),
    (
        r"test_peft_version_warn_when_commit_hash_errors",
        "behaviour",
        "on purpose: the warning names deltatune, not 'A dev version of PEFT'",
    ),
    (
        r"test_save_load_roundtrip_fsdp_wrapped_learnable_bias",
        "behaviour",
        "on purpose: biases in a state dict whose config trains none are refused by name (peft loads them quietly)",
    ),
    (
        r"requires_grad_set_correctly\[True-AdaLoraConfig\]",
        "behaviour",
        "on purpose: several trainable AdaLoRA adapters are accepted, each with its own budget (peft allows one)",
    ),
    (r"PEFT_TYPE_TO_TUNER_MAPPING", "peft internals", "peft's tuner class registry (deltatune has deltatune.registry)"),
    (r"has no attribute '__version__'", "peft internals", "tests monkeypatch peft.config.__version__"),
    (r"'str' object has no attribute 'value'", "peft internals", "peft_type as peft's enum (deltatune: a string)"),
    (r"_all_available_adapter_names|has no attribute '_adapters'", "peft internals", "private peft layer fields"),
]


def _records(path: Path) -> dict[str, dict]:
    """Per test id, its one record that decides the outcome (a failing setup or teardown counts as failed)."""
    out: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec["outcome"] == "not_shared":
            continue
        prev = out.get(rec["id"])
        if prev is None or prev["outcome"] == "passed" or rec["outcome"] == "failed":
            out[rec["id"]] = rec
    return out


def bucket_of(rec: dict) -> tuple[str, str]:
    text = f"{rec['id']} {rec.get('error', '')}"
    for pattern, bucket, why in EXPLAINED:
        if re.search(pattern, text):
            return bucket, why
    error = rec.get("error", "")
    if "without a deltatune counterpart" in error or "No module named 'peft" in error or "ImportError" in error:
        name = re.search(r"counterpart: ([\w.]+)", error)
        path = name.group(1) if name else error[:80]
        if re.search(r"\.\w+(Config|Model|Embedding|Encoder)\b", path) and "Peft" not in path:
            return "method we do not have", path
        return "missing import path", path
    if error.startswith(("AttributeError", "KeyError")) or "has no attribute" in error:
        return "peft internals", "(unreviewed) " + error[:120]
    return "behaviour", "(unreviewed) " + error[:160]


def _file_of(test_id: str) -> str:
    return test_id.split("::")[0].rpartition("/")[2]


def summarise(peft_log: Path, deltatune_log: Path) -> dict:
    peft, ours = _records(peft_log), _records(deltatune_log)
    rows: dict[tuple[str, str], Counter] = defaultdict(Counter)
    causes: dict[tuple[str, str], list[str]] = defaultdict(list)
    for test_id, rec in peft.items():
        key = (rec["method"], _file_of(test_id))
        rows[key]["run"] += 1
        if rec["outcome"] != "passed":
            continue
        rows[key]["peft"] += 1
        mine = ours.get(test_id, {"outcome": "failed", "error": "not run under deltatune", "id": test_id})
        if mine["outcome"] == "passed":
            rows[key]["deltatune"] += 1
            continue
        if mine["outcome"] == "skipped":
            mine = {**mine, "error": "skipped under deltatune: " + mine.get("error", "")}
        bucket, why = bucket_of(mine)
        rows[key][bucket] += 1
        causes[(bucket, why)].append(test_id)
    return {"rows": rows, "causes": causes}


def render(summary: dict, commit: str, versions: str) -> str:
    rows, causes = summary["rows"], summary["causes"]
    total = sum((c for c in rows.values()), Counter())
    share = 100.0 * total["deltatune"] / max(total["peft"], 1)
    lines = [
        "# peft's own tests against deltatune",
        "",
        f"commit `{commit}`; {versions}. Made by `make peft-suite` (scripts/peft_suite.sh).",
        "",
        f"**{total['deltatune']} of {total['peft']} tests that pass under peft pass under deltatune ({share:.1f} %)**; "
        f"{total['run']} tests run for the shared methods (the rest of each file is deselected: methods deltatune does "
        "not implement).",
        "",
        "| method | file | run | pass (peft) | pass (deltatune) | " + " | ".join(BUCKETS) + " |",
        "|---|---|---:|---:|---:|" + "---:|" * len(BUCKETS),
    ]
    for (method, file), c in sorted(rows.items(), key=lambda kv: (kv[0][0] or "", kv[0][1])):
        cells = [method, file, c["run"], c["peft"], c["deltatune"], *(c[b] for b in BUCKETS)]
        lines.append("| " + " | ".join(str(x) for x in cells) + " |")
    cells = ["**all**", "", total["run"], total["peft"], total["deltatune"], *(total[b] for b in BUCKETS)]
    lines += ["| " + " | ".join(str(x) for x in cells) + " |", "", "## Each failure, by cause", ""]
    for (bucket, why), ids in sorted(causes.items(), key=lambda kv: (BUCKETS.index(kv[0][0]), -len(kv[1]))):
        example = ids[0].split("::", 1)[1]
        lines.append(f"- **{bucket}** ({len(ids)} tests, e.g. `{example[:110]}`): {why}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("peft_log", type=Path)
    parser.add_argument("deltatune_log", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--versions", default="")
    args = parser.parse_args()
    text = render(summarise(args.peft_log, args.deltatune_log), args.commit, args.versions)
    args.out.write_text(text)
    print(text.split("## Each failure")[0])


if __name__ == "__main__":
    main()
