"""`deltatune compare` on a tiny model: every family runs for 2 steps, the table has every column, finished runs
are read back (and redone with force), refusals and divergences become rows with their reason."""

from __future__ import annotations

import json

import pytest

from deltatune.analysis import compare as cmp
from deltatune.errors import ConfigError

TINY = ["optim.steps=2", "optim.warmup_steps=0", "generate_eval=2", "max_new_tokens=3", "general_max_new_tokens=3",
        "data.max_length=200"]  # fmt: skip
ONE_PER_FAMILY = ["lora", "ia3", "prompt_tuning", "ln_tuning", "bitfit", "full_ft", "feature_extraction"]


def _compare(model_dir, out, methods, **kw):
    return cmp.compare("quick", methods, out, model=str(model_dir), tasks=["date"], extra=TINY, **kw)


@pytest.fixture(scope="module")
def date_rows(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    return out, _compare(tiny_model_dir, out, ONE_PER_FAMILY)


def test_every_family_runs_and_the_table_has_every_column(date_rows, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    out, rows = date_rows
    by_name = {r.method: r for r in rows}
    assert list(by_name) == ONE_PER_FAMILY
    ran = [r for r in rows if r.status == "ok"]
    assert {r.family for r in ran} == {"reparameterization", "additive", "soft prompt", "selective", "baseline"}
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert by_name["full_ft"].trainable == sum(p.numel() for p in base.parameters())  # every weight, once
    for r in ran:
        assert 0 < r.trainable <= r.total and r.adapter_mb > 0 and r.peak_mb > 0 and r.step_s > 0, r
        assert r.tokens_per_s > 0 and r.metric is not None and r.general_loss_change is not None, r
        assert r.unmerged_overhead > 0 and r.lr == cmp.CATALOG[r.method].lrs[0]
        run_dir = out / "date" / r.method / f"lr{r.lr:g}_seed0"
        assert (run_dir / "adapter" / "adapter_config.json").is_file() and (run_dir / "metrics.jsonl").is_file()
        assert json.loads((out / "date" / r.method / "results.json").read_text())["status"] == "ok"
    assert by_name["lora"].mergeable and not by_name["prompt_tuning"].mergeable
    table = (out / "compare.md").read_text()
    for header, *_ in cmp.COLUMNS:
        assert f"| {header} |" in table or f"| {header}" in table, header
    assert "Best per column" in table and (out / "compare.png").stat().st_size > 1000
    saved = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in saved["rows"]] == ONE_PER_FAMILY and "date" in saved["best"]


def test_methods_that_do_not_fit_are_rows_with_their_reason(date_rows):
    _, rows = date_rows
    by_name = {r.method: r for r in rows}
    assert by_name["bitfit"].status == "refused" and "bias" in by_name["bitfit"].reason  # LLaMA has no biases
    assert by_name["feature_extraction"].status == "refused" and "head" in by_name["feature_extraction"].reason


def test_finished_runs_are_read_back_and_force_redoes_them(date_rows, tiny_model_dir, monkeypatch):
    out, rows = date_rows
    calls = []
    real = cmp._train_once
    monkeypatch.setattr(cmp, "_train_once", lambda *a: (calls.append(a[1]), real(*a))[1])
    again = _compare(tiny_model_dir, out, ["lora", "ia3"])
    assert calls == [] and [r.metric for r in again] == [r.metric for r in rows[:2]]
    redone = _compare(tiny_model_dir, out, ["ia3"], force=True)
    assert len(calls) == 1 and redone[0].status == "ok"
    cmp.compare("quick", ["ia3"], out, model=str(tiny_model_dir), tasks=["date"], extra=[*TINY, "optim.steps=3"])
    assert len(calls) == 2  # another budget is another run, not the stored one


def test_a_diverging_run_is_recorded_not_raised(tiny_model_dir, tmp_path, monkeypatch):
    from deltatune.train.objectives import CausalLMObjective

    real_loss = CausalLMObjective.loss_sum
    monkeypatch.setattr(CausalLMObjective, "loss_sum", lambda *a: real_loss(*a) * float("nan"))
    (row,) = _compare(tiny_model_dir, tmp_path, ["lora"])
    assert row.status == "diverged" and "loss became nan" in row.reason
    assert "**diverged**" in (tmp_path / "compare.md").read_text()


def test_bad_input_is_refused_by_name(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="unknown method.*nope.*choose from: lora"):
        _compare(tiny_model_dir, tmp_path, ["lora", "nope"])
    with pytest.raises(ConfigError, match="unknown preset"):
        cmp.compare("medium", ["lora"], tmp_path)
    with pytest.raises(ConfigError, match="unknown task"):
        cmp.compare("quick", ["lora"], tmp_path, tasks=["dates"])


def test_the_sweep_picks_the_lowest_held_out_loss():
    losses = {1e-3: 2.0, 3e-3: 1.5, 1e-2: float("nan")}
    candidate = cmp.Candidate("additive", {"peft_type": "IA3"}, tuple(losses))
    swept = cmp._sweep(candidate, lambda lr: {"eval_loss": losses[lr]})
    assert swept == {"0.001": 2.0, "0.003": 1.5, "0.01": float("inf")}
    assert min(swept, key=swept.__getitem__) == "0.003"


def test_the_classification_task_scores_accuracy_and_refuses_decoder_only_methods(tiny_model_dir, tmp_path):
    rows = cmp.compare("quick", ["lora", "feature_extraction", "llama_adapter"], tmp_path, model=str(tiny_model_dir),
                       tasks=["classification"], extra=["optim.steps=2", "optim.warmup_steps=0"])  # fmt: skip
    lora, head_only, llama_adapter = rows
    assert lora.status == head_only.status == "ok" and 0.0 <= lora.metric <= 1.0
    assert head_only.trainable < lora.trainable and lora.general_loss_change is None  # no general text to forget
    assert llama_adapter.status == "refused" and "decoder" in llama_adapter.reason
    assert "### classification (accuracy)" in (tmp_path / "compare.md").read_text()


def test_the_command_runs_and_refuses_unknown_methods_in_one_line(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from deltatune.cli import app

    runner = CliRunner()
    bad = runner.invoke(app, ["compare", "--methods", "lora,nope", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "unknown method(s) nope" in bad.output
    args = ["compare", "--methods", "ia3,bitfit", "--model", str(tiny_model_dir), "--task", "date", "--out",
            str(tmp_path), *(x for kv in TINY for x in ("--set", kv))]  # fmt: skip
    ok = runner.invoke(app, args)
    assert ok.exit_code == 0, ok.output
    assert "best:" in ok.output and (tmp_path / "compare.md").is_file()
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["method"], r["status"]) for r in rows] == [("ia3", "ok"), ("bitfit", "refused")]
