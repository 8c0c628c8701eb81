"""Checkpoint io: keys, atomic writes, and malformed inputs that must fail cleanly without changing anything."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune as dt
from deltatune import io
from deltatune.errors import CheckpointError, ConfigError, UnknownMethodError, UnsupportedFieldError
from tests.conftest import model_output, tiny_llama

IDS = {"input_ids": torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(0))}


def _snapshot(model: torch.nn.Module):
    return (
        {n: type(m) for n, m in model.named_modules()},
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def _assert_same(model, snap):
    types, state, grads = snap
    assert {n: type(m) for n, m in model.named_modules()} == types
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


@pytest.fixture
def saved(tmp_path) -> Path:
    pm = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    pm.save_pretrained(tmp_path / "good")
    return tmp_path / "good"


def _edit_config(path: Path, **changes):
    data = json.loads((path / "adapter_config.json").read_text())
    data.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(data))


def _edit_weights(path: Path, fn):
    tensors = load_file(path / io.WEIGHTS_NAME)
    save_file(fn(tensors), path / io.WEIGHTS_NAME)


def _truncate(path: Path):
    data = (path / io.WEIGHTS_NAME).read_bytes()
    (path / io.WEIGHTS_NAME).write_bytes(data[: len(data) // 2])


def _first_key(tensors):
    return sorted(tensors)[0]


MALFORMED = {
    "truncated safetensors": (_truncate, CheckpointError),
    "garbage safetensors": (lambda p: (p / io.WEIGHTS_NAME).write_bytes(b"\x00" * 40), CheckpointError),
    "weights file missing": (lambda p: (p / io.WEIGHTS_NAME).unlink(), CheckpointError),
    "config missing": (lambda p: (p / "adapter_config.json").unlink(), ConfigError),
    "JSON syntax error": (lambda p: (p / "adapter_config.json").write_text('{"peft_type": "LORA",'), ConfigError),
    "config not an object": (lambda p: (p / "adapter_config.json").write_text("[1, 2]"), ConfigError),
    "no peft_type": (lambda p: (p / "adapter_config.json").write_text('{"r": 4}'), ConfigError),
    "unknown peft_type": (lambda p: _edit_config(p, peft_type="MAGIC"), UnknownMethodError),
    "r=0": (lambda p: _edit_config(p, r=0), ConfigError),
    "negative dropout": (lambda p: _edit_config(p, lora_dropout=-0.5), ConfigError),
    "empty target list": (lambda p: _edit_config(p, target_modules=[]), ConfigError),
    "target matching nothing": (lambda p: _edit_config(p, target_modules=["nope"]), ConfigError),
    "unsupported field": (
        lambda p: _edit_config(p, megatron_config={"tensor_model_parallel_size": 2}),
        UnsupportedFieldError,
    ),
    "wrong rank in config": (lambda p: _edit_config(p, r=8), CheckpointError),
    "wrong shape": (lambda p: _edit_weights(p, lambda t: {**t, _first_key(t): torch.zeros(3, 3)}), CheckpointError),
    "missing key": (
        lambda p: _edit_weights(p, lambda t: {k: v for k, v in t.items() if k != _first_key(t)}),
        CheckpointError,
    ),
    "unexpected key": (
        lambda p: _edit_weights(p, lambda t: {**t, "base_model.model.extra.lora_A.weight": torch.zeros(1)}),
        CheckpointError,
    ),
    "keys without peft prefix": (
        lambda p: _edit_weights(p, lambda t: {k.replace("base_model.model.", ""): v for k, v in t.items()}),
        CheckpointError,
    ),
    "integer tensor": (
        lambda p: _edit_weights(p, lambda t: {**t, _first_key(t): t[_first_key(t)].to(torch.int32)}),
        CheckpointError,
    ),
    "fewer layers than saved": (lambda p: _edit_config(p, layers_to_transform=[0]), CheckpointError),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_adapter_gives_typed_error_and_changes_nothing(case, saved):
    corrupt, error = MALFORMED[case]
    corrupt(saved)
    files_before = {f.name: f.read_bytes() for f in saved.iterdir()}
    model = tiny_llama()
    snap = _snapshot(model)
    with pytest.raises(error) as info:
        dt.PeftModel.from_pretrained(model, saved)
    assert str(info.value)  # a message, not a bare exception
    _assert_same(model, snap)
    assert {f.name: f.read_bytes() for f in saved.iterdir()} == files_before


def test_failed_load_into_existing_peft_model_keeps_its_adapters(saved, tmp_path):
    pm = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    want = model_output(pm, IDS)
    snap = _snapshot(pm.get_base_model())
    _edit_config(saved, r=8)
    with pytest.raises(CheckpointError, match="shape"):
        pm.load_adapter(saved, "other")
    _assert_same(pm.get_base_model(), snap)
    assert list(pm.peft_config) == ["default"]
    torch.testing.assert_close(model_output(pm, IDS), want, rtol=0, atol=0)


def test_pickles_are_never_loaded(tmp_path, saved):
    (saved / io.WEIGHTS_NAME).rename(saved / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="never loads pickles"):
        dt.PeftModel.from_pretrained(tiny_llama(), saved)


def test_crash_mid_save_keeps_previous_files(saved, monkeypatch):
    before = {f.name: f.read_bytes() for f in saved.iterdir()}
    pm = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"]))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        pm.save_pretrained(saved)
    assert {f.name: f.read_bytes() for f in saved.iterdir()} == before  # and no temp file left behind


def test_saved_config_records_base_model_and_inference_mode(tmp_path):
    model = tiny_llama()
    model.config._name_or_path = "/models/tiny"
    dt.get_peft_model(model, dt.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "/models/tiny" and cfg["inference_mode"] is True
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2


def test_load_is_trainable_flag(saved):
    pm = dt.PeftModel.from_pretrained(tiny_llama(), saved, is_trainable=True)
    assert pm.get_nb_trainable_parameters()[0] > 0


def test_load_config_validates_without_a_model(saved):
    assert dt.load_config(saved).r == 4


def test_written_files_honour_the_umask(tmp_path):
    """Regression: the atomic temp-file write kept mkstemp's 0600, so no other user could read an adapter."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "a")
        with io.atomic_directory(tmp_path / "d") as folder:
            (folder / "x").write_text("1")
    finally:
        os.umask(old)
    for path in (tmp_path / "a" / io.WEIGHTS_NAME, tmp_path / "a" / "adapter_config.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
