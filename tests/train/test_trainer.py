"""The trainer on a tiny LLaMA + character tokenizer (fast), end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune.train import load_train_config, train
from deltatune.train import trainer as trainer_module
from deltatune.train.optim import loraplus_param_groups, lr_factor


def _cfg(model_dir, tmp_path, *extra):
    return load_train_config(
        None,
        [
            f"model={model_dir}",
            f"output_dir={tmp_path / 'run'}",
            "optim.batch_size=4",
            "optim.lr=5e-3",
            "optim.warmup_steps=1",
            "data.max_length=200",
            "method.target_modules=[q_proj, v_proj, down_proj]",
            *extra,
        ],
    )


def _cut_and_resume(model_dir, tmp_path, monkeypatch, args, cut_at):
    """Run under tmp_path/cut, interrupted before step `cut_at`, then resume it to the end."""
    real_step = trainer_module._train_step

    def interrupted(run, step):
        if step == cut_at:
            raise KeyboardInterrupt
        return real_step(run, step)

    monkeypatch.setattr(trainer_module, "_train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(model_dir, tmp_path / "cut", *args))
    monkeypatch.setattr(trainer_module, "_train_step", real_step)
    return train(_cfg(model_dir, tmp_path / "cut", *args), resume=True)


def test_training_lowers_loss_writes_metrics_and_a_loadable_adapter(tiny_model_dir, tmp_path):
    result = train(_cfg(tiny_model_dir, tmp_path, "optim.steps=12", "eval_every=6", "log_every=3"))
    assert len(result.losses) == 12 and all(math.isfinite(v) for v in result.losses)
    assert sum(result.losses[-3:]) / 3 < sum(result.losses[:3]) / 3
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [3, 6, 9, 12]
    assert any("eval_loss" in x for x in lines) and (result.run_dir / "loss.png").stat().st_size > 1000
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir)
    from transformers import AutoModelForCausalLM

    loaded = dt.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), result.adapter_dir)
    assert loaded.peft_config["default"].r == 8


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_offload"])
def test_resume_after_interruption_reproduces_the_losses_exactly(tiny_model_dir, tmp_path, monkeypatch, optimizer):
    """With adamw_offload this is a regression test: its fp32 masters were never refreshed on resume, so the first
    step after it reverted the adapter to its pre-resume values."""
    args = (
        "optim.steps=6",
        "save_every=3",
        "method.lora_dropout=0.1",
        "optim.grad_accum=2",
        f"optim.optimizer={optimizer}",
    )
    full = train(_cfg(tiny_model_dir, tmp_path / "full", *args)).losses

    resumed = _cut_and_resume(tiny_model_dir, tmp_path, monkeypatch, args, cut_at=4)
    assert resumed.losses == full  # bit-identical: same data order, RNG, optimizer and scheduler state
    a = load_file(tmp_path / "full" / "run" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "run" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_stops_without_applying_the_update(tiny_model_dir, tmp_path, monkeypatch):
    from deltatune.train.objectives import CausalLMObjective

    real_loss = CausalLMObjective.loss_sum
    calls = {"n": 0}

    def poisoned(self, model, batch, precision):
        calls["n"] += 1
        loss = real_loss(self, model, batch, precision)
        return loss * float("nan") if calls["n"] > 2 else loss

    monkeypatch.setattr(CausalLMObjective, "loss_sum", poisoned)
    with pytest.raises(dt.DeltatuneError, match="loss became nan at step 3.*Last good checkpoint: .*step-2"):
        train(_cfg(tiny_model_dir, tmp_path, "optim.steps=5", "save_every=2"))


def test_bf16_autocast_and_gradient_checkpointing_train(tiny_model_dir, tmp_path):
    result = train(
        _cfg(tiny_model_dir, tmp_path, "optim.steps=3", "optim.precision=bf16", "optim.gradient_checkpointing=true")
    )
    assert all(math.isfinite(v) for v in result.losses)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir, dropout):
    """Checkpointed layers recompute their forward in backward; with the RNG state preserved the dropout masks are
    the same, so the adapter's gradients must equal a plain run's, not just be finite."""
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        torch.manual_seed(1)
        pm = dt.get_peft_model(
            base, dt.LoraConfig(r=4, lora_dropout=dropout, target_modules=["q_proj", "v_proj", "down_proj"])
        )
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.1)
        if checkpointing:
            if hasattr(base, "activation_checkpointing_enable"):
                base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        pm.train()
        torch.manual_seed(2)
        pm(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7)


def test_packing_makes_fewer_longer_rows(tiny_model_dir, tmp_path):
    from deltatune.train.config import DataConfig
    from deltatune.train.data import build_examples, read_records
    from tests.conftest import tiny_tokenizer

    records = read_records("bundled:quickstart")[:20]
    plain = build_examples(records, tiny_tokenizer(), DataConfig(max_length=400), "x")
    packed = build_examples(records, tiny_tokenizer(), DataConfig(max_length=400, packing=True), "x")
    assert len(packed) < len(plain) and all(len(e.input_ids) <= 400 for e in packed)
    assert sum(len(e.input_ids) for e in packed) == sum(len(e.input_ids) for e in plain)


def test_loraplus_groups_and_schedules():
    from tests.conftest import tiny_llama

    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    groups = loraplus_param_groups(model, lr=1e-4, loraplus_lr_ratio=16)
    names = {id(p): n for n, p in model.named_parameters()}
    a_group, b_group = groups
    assert a_group["lr"] == 1e-4 and all("lora_A" in names[id(p)] for p in a_group["params"])
    assert b_group["lr"] == pytest.approx(1.6e-3) and all("lora_B" in names[id(p)] for p in b_group["params"])
    assert lr_factor(0, 10, 2, "cosine") == pytest.approx(1 / 3) and lr_factor(10, 10, 2, "cosine") == 0.0
    assert lr_factor(6, 10, 2, "linear") == pytest.approx(0.5) and lr_factor(9, 10, 0, "constant") == 1.0


def test_loraplus_gives_every_methods_up_factor_the_higher_rate():
    """Regression: the groups matched LoRA's parameter names, so GraLoRA's B (and its hybrid B) got A's rate."""
    from tests.conftest import tiny_llama

    attrs = {"gralora_A", "gralora_B", "gralora_A_general", "gralora_B_general", "lora_A", "lora_B", "lora_E"}
    attrs |= {"lora_embedding_A", "lora_embedding_B"}
    cases = [
        (dt.GraloraConfig(r=4, gralora_k=2, hybrid_r=2, target_modules=["q_proj"]), {"gralora_B", "gralora_B_general"}),
        (dt.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj"]), {"lora_B"}),
        (dt.LoraConfig(r=2, target_modules=["embed_tokens"]), {"lora_embedding_B"}),
    ]
    for config, fast in cases:
        model = dt.get_peft_model(tiny_llama(), config)
        groups = loraplus_param_groups(model, lr=1e-4, loraplus_lr_ratio=16, loraplus_lr_embedding=5e-5)
        names = {id(p): n for n, p in model.named_parameters()}
        attr = {
            round(g["lr"], 9): {next(c for c in names[id(p)].split(".") if c in attrs) for p in g["params"]}
            for g in groups
        }
        assert attr[1.6e-3] == fast, config.peft_type
        if "lora_embedding_B" in fast:
            assert attr[5e-5] == {"lora_embedding_A"}


def test_method_hooks_see_gradients_and_add_their_loss(tiny_model_dir, tmp_path, monkeypatch):
    import dataclasses

    from deltatune import registry

    seen = {"steps": [], "grads": []}

    class Hooks:
        def on_step(self, model, step):
            seen["steps"].append(step)
            seen["grads"].append(all(p.grad is not None for p in model.parameters() if p.requires_grad))

        def extra_loss(self, model):
            # pulls every lora_B towards 1: visible in the trained adapter even with a tiny lr
            return sum(((p - 1.0) ** 2).sum() for n, p in model.named_parameters() if "lora_B" in n)

        def state_dict(self, model):
            return {}

        def load_state_dict(self, model, tensors):
            pass

    spec = registry.get_method("LORA")
    monkeypatch.setitem(registry._METHODS, "LORA", dataclasses.replace(spec, hooks=Hooks()))
    result = train(_cfg(tiny_model_dir, tmp_path, "optim.steps=3", "optim.grad_accum=2"))
    assert seen["steps"] == [0, 1, 2] and all(seen["grads"])
    b = [p for n, p in result.model.named_parameters() if "lora_B" in n]
    assert all(p.mean() > 0 for p in b)  # the regulariser moved B away from its zero init, towards 1


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_offload"])
def test_adalora_allocates_during_training_and_resumes_exactly(tiny_model_dir, tmp_path, monkeypatch, optimizer):
    """With adamw_offload this is also a regression test: its masters copied unmasked values back over pruned
    triplets every step."""
    args = (
        f"optim.optimizer={optimizer}",
        "optim.steps=6",
        "save_every=3",
        "method.peft_type=ADALORA",
        "method.init_r=4",
        "method.target_r=2",
        "method.tinit=1",
        "method.tfinal=2",
    )
    full = train(_cfg(tiny_model_dir, tmp_path / "full", *args))
    config = json.loads((full.adapter_dir / "adapter_config.json").read_text())
    assert config["total_step"] == 6  # filled from optim.steps
    assert sum(sum(v) for v in config["rank_pattern"].values()) == 2 * 6  # target_r x 6 adapted matrices
    saved = load_file(full.adapter_dir / "adapter_model.safetensors")
    assert sum(t.shape[0] for k, t in saved.items() if k.endswith("lora_E")) == 12

    # cut in the budget phase: the checkpoint after 3 steps holds the importance averages and masks so far
    resumed = _cut_and_resume(tiny_model_dir, tmp_path, monkeypatch, args, cut_at=4)
    assert resumed.losses == full.losses  # importance averages and masks came back with the checkpoint
    other = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert set(other) == set(saved) and all(torch.equal(saved[k], other[k]) for k in saved)


def test_library_train_never_touches_the_process_allocator(tiny_model_dir, tmp_path, monkeypatch):
    """Regression: train() applied the process-wide glibc setting by default (and so inside the pytest worker)."""
    from deltatune.train import host

    calls = []
    monkeypatch.setattr(host, "_mallopt", lambda option, value: calls.append((option, value)) or True)
    train(_cfg(tiny_model_dir, tmp_path, "cpu_allocator=keep", "optim.steps=1"))
    assert calls == []


def test_kept_memory_is_restored_after_the_loop_and_never_left_partial(monkeypatch):
    from deltatune.train import host

    calls = []
    monkeypatch.setattr(host, "_mallopt", lambda option, value: calls.append((option, value)) or True)
    with host.freed_memory_kept() as applied:
        assert applied and calls == list(host.KEEP.items())
    assert calls[3:] == list(host.glibc_defaults().items())  # all three put back

    calls.clear()
    refused = host._M_MMAP_THRESHOLD  # the third setting fails: the two made are undone at once
    monkeypatch.setattr(host, "_mallopt", lambda option, value: calls.append((option, value)) or option != refused)
    with host.freed_memory_kept() as applied:
        assert not applied
        assert calls[3:] == [(o, v) for o, v in host.glibc_defaults().items() if o != refused]
    assert len(calls) == 5


def test_cli_tunes_the_allocator_only_as_the_setting_says(tiny_model_dir, tmp_path, monkeypatch):
    from deltatune.cli.app import host_tuning
    from deltatune.train import host

    for setting, quantize, expected in [("auto", None, True), ("auto", "nf4", False), ("default", None, False)]:
        extra = [f"cpu_allocator={setting}"] + ([f"quantize={quantize}"] if quantize else [])
        want = host.freed_memory_kept if expected and not torch.cuda.is_available() else None
        assert host_tuning(_cfg(tiny_model_dir, tmp_path, *extra)) is want, (setting, quantize)
    calls = []
    monkeypatch.setattr(host, "_mallopt", lambda option, value: calls.append((option, value)) or True)
    cfg = _cfg(tiny_model_dir, tmp_path, "cpu_allocator=keep", "optim.steps=1")
    train(cfg, around_loop=host_tuning(cfg))
    if not torch.cuda.is_available():
        assert calls == list(host.KEEP.items()) + list(host.glibc_defaults().items())


def test_a_corrupt_checkpoint_raises_checkpoint_error_naming_it(tiny_model_dir, tmp_path):
    from deltatune.errors import CheckpointError
    from deltatune.train import checkpoint as ckpt

    train(_cfg(tiny_model_dir, tmp_path, "optim.steps=2", "save_every=2"))
    path = ckpt.latest_checkpoint(tmp_path / "run")
    (path / "optimizer.safetensors").write_bytes(b"\x07" * 64)
    with pytest.raises(CheckpointError, match="optimizer.safetensors|step-2"):
        train(_cfg(tiny_model_dir, tmp_path, "optim.steps=3", "save_every=2"), resume=True)


def test_a_damaged_newest_checkpoint_is_skipped_for_the_previous_one_with_a_warning(tiny_model_dir, tmp_path):
    from deltatune.train import checkpoint as ckpt

    args = ("optim.steps=4", "save_every=2", "method.lora_dropout=0.0")
    whole = train(_cfg(tiny_model_dir, tmp_path / "whole", *args))
    train(_cfg(tiny_model_dir, tmp_path, *args))
    newest = ckpt.latest_checkpoint(tmp_path / "run")
    assert newest.name == "step-4"
    adapter = newest / "adapter.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-8] + b"\x00" * 8)  # same size, last values changed: only the hash knows
    with pytest.warns(UserWarning, match="step-4.*adapter.safetensors.*older step-2"):
        resumed = train(_cfg(tiny_model_dir, tmp_path, *args), resume=True)
    assert resumed.losses == whole.losses  # steps 3-4 redone from step-2's state


@pytest.mark.parametrize(
    "problem, content, message",
    [
        ("malformed jsonl", '{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": \n', r"data\.jsonl, line 2"),
        ("empty data", "\n\n", "holds no examples"),
        ("missing fields", '{"question": "a", "answer": "b"}\n', r"example 0: .*prompt_field"),
    ],
)
def test_bad_data_is_a_clear_error_before_the_model_loads(tmp_path, monkeypatch, problem, content, message):
    """Regression: bare JSONDecodeError tracebacks, and empty data found only after the model had loaded."""
    import deltatune.pretrained

    monkeypatch.setattr(deltatune.pretrained, "load_causal_lm", lambda *a, **k: pytest.fail("model loaded first"))
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    cfg = load_train_config(None, [f"data.train={data}", f"data.eval={data}", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(dt.ConfigError, match=message):
        train(cfg)


def test_unwritable_output_dir_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    import deltatune.pretrained

    monkeypatch.setattr(deltatune.pretrained, "load_causal_lm", lambda *a, **k: pytest.fail("model loaded first"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg = load_train_config(None, [f"output_dir={blocker / 'run'}"])
    with pytest.raises(dt.ConfigError, match="output_dir .* is not writable"):
        train(cfg)


def test_base_answers_stand_for_before_only_where_the_adapter_starts_as_the_identity(tiny_model_dir, tmp_path):
    """`train(base_answers=...)` (what `compare` passes on): a LoRA run takes them as its "before" answers, since
    B = 0 leaves the outputs unchanged; a prompt-tuning run (virtual tokens change the outputs) generates its own."""
    args = ["optim.steps=1", "generate_eval=3", "max_new_tokens=4", "general_max_new_tokens=4"]
    alone = train(_cfg(tiny_model_dir, tmp_path / "alone", *args))
    assert alone.starts_as_identity is None  # a run on its own pays for no check
    first = train(_cfg(tiny_model_dir, tmp_path / "first", *args), base_answers={})
    assert first.starts_as_identity is True and set(first.answers_before) == set(first.scores)
    assert first.answers_before == alone.answers_before
    stand_ins = {name: [f"stand-in {i}" for i in range(len(a))] for name, a in first.answers_before.items()}
    lora = train(_cfg(tiny_model_dir, tmp_path / "lora", *args), base_answers=stand_ins)
    assert lora.answers_before == stand_ins
    prompt = ["method={peft_type: PROMPT_TUNING, num_virtual_tokens: 2}"]
    tuned = train(_cfg(tiny_model_dir, tmp_path / "prompt", *args, *prompt), base_answers=stand_ins)
    assert tuned.starts_as_identity is False
    assert all(not a.startswith("stand-in") for answers in tuned.answers_before.values() for a in answers)


def test_eval_limit_keeps_the_first_held_out_records(tiny_model_dir, tmp_path):
    """data.eval_limit=2: the held-out loss and the scored held-out set are those of a file of the first 2 records."""
    records = [{"prompt": f"Date {i}?", "response": f"2020-01-0{i}"} for i in range(1, 6)]
    (tmp_path / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "two.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:2]))
    args = ["optim.steps=1", "generate_eval=4", "max_new_tokens=2", "data.general_eval=null"]
    limited = train(
        _cfg(tiny_model_dir, tmp_path / "a", *args, f"data.eval={tmp_path / 'all.jsonl'}", "data.eval_limit=2")
    )
    two = train(_cfg(tiny_model_dir, tmp_path / "b", *args, f"data.eval={tmp_path / 'two.jsonl'}"))
    assert [s["prompt"] for s in limited.samples] == [s["prompt"] for s in two.samples] and len(two.samples) == 2
    assert limited.eval_loss == two.eval_loss
