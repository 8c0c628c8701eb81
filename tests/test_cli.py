"""The command line: config errors are one clear line with a non-zero exit; commands work on a tiny model."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from deltatune.cli.app import app

runner = CliRunner()


def _invoke(*args: str):
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


@pytest.fixture
def base_args(tiny_model_dir, tmp_path):
    return [
        f"--set=model={tiny_model_dir}",
        f"--set=output_dir={tmp_path / 'run'}",
        "--set=optim.steps=2",
        "--set=optim.batch_size=2",
        "--set=data.max_length=200",
        "--set=method.target_modules=[q_proj]",
    ]


def _yaml(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "case, yaml_text, extra, expected",
    [
        ("unknown key", "optim:\n  lr: 1e-3\n  learning_rate: 1e-3\n", [], "optim.learning_rate: unknown key"),
        ("wrong type", "optim:\n  steps: many\n", [], "optim.steps"),
        ("missing data file", "data:\n  train: nowhere.jsonl\n", [], "does not exist"),
        ("unknown method field", "method:\n  peft_type: LORA\n  rank: 8\n", [], "method.rank is not a field"),
        ("bad override", "", ["--set", "optim.lr"], "--set expects key=value"),
        ("invalid YAML", "optim: [\n", [], "not valid YAML"),
    ],
)
def test_config_errors_are_one_line_without_traceback(case, yaml_text, extra, expected, tmp_path):
    code, out = _invoke("train", _yaml(tmp_path, yaml_text), *extra)
    assert code == 2 and expected in out.replace("\n", " ") and "Traceback" not in out, out


def test_empty_dataset_and_too_long_prompt(tmp_path, base_args):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, out = _invoke("train", *base_args, f"--set=data.train={empty}")
    assert code == 2 and "holds no examples" in " ".join(out.split()) and "Traceback" not in out  # rich wraps lines
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "x" * 500, "response": "y"}) + "\n")
    code, out = _invoke("train", *base_args, f"--set=data.train={long}")
    assert code == 2 and "longer than data.max_length" in out.replace("\n", " ") and "Traceback" not in out


def test_train_inspect_generate_merge(tmp_path, base_args, tiny_model_dir):
    code, out = _invoke("train", *base_args)
    assert code == 0, out
    adapter = tmp_path / "run" / "adapter"
    code, out = _invoke("inspect", str(adapter))
    assert code == 0 and "q_proj" in out and "total" in out
    code, out = _invoke(
        "generate",
        "--model",
        str(tiny_model_dir),
        "--adapter",
        str(adapter),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "3",
        "--no-stream",
    )
    assert code == 0, out
    code, out = _invoke(
        "merge", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--out", str(tmp_path / "merged")
    )
    assert code == 0 and (tmp_path / "merged" / "config.json").exists()
    assert not any(p.suffix == ".bin" for p in (tmp_path / "merged").iterdir())


def test_inspect_summarises_long_rank_masks():
    from deltatune.cli.inspect_cmd import _brief

    masks = {f"m{i}.lora_E": [True, False, True] for i in range(8)}
    assert _brief(masks) == "8 modules; 16 of 24 triplets kept (full masks in the config file)"
    assert _brief({f"m{i}": 4 for i in range(8)}) == "8 entries (see the config file)"
    assert _brief({"q_proj": 4}) == "{'q_proj': 4}"


def test_only_rank_0_prints_the_run_report(tmp_path):
    """Regression: under torchrun every rank printed a report (one said "adapter size 0.00 MB")."""
    from rich.console import Console

    from deltatune.cli.report import print_train_report
    from deltatune.train import TrainResult

    for rank, printed in ((0, True), (1, False)):
        console = Console(record=True, width=120)
        print_train_report(TrainResult(tmp_path, tmp_path / "adapter", 1, [1.0], adapter_bytes=10, rank=rank), console)
        assert ("run summary" in console.export_text()) is printed
