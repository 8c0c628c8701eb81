"""Crash safety of training (issue 27): a real `deltatune train` process is killed with SIGKILL mid-step, halfway
through writing a checkpoint, and between a checkpoint and its `latest` pointer; each time `--resume` goes on from
what is on disk, and the final adapter equals an uninterrupted run's byte for byte (data order, RNG, optimizer and
scheduler state all restored)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("crash_worker.py")
REPO = Path(__file__).resolve().parents[2]
STEPS, SAVE_EVERY = 8, 2


def _run(model_dir: Path, out: Path, fault: str, resume: bool) -> subprocess.CompletedProcess:
    args = [
        "train",
        "--set", f"model={model_dir}",
        "--set", f"output_dir={out}",
        "--set", f"optim.steps={STEPS}",
        "--set", f"save_every={SAVE_EVERY}",
        "--set", "optim.batch_size=4",
        "--set", "optim.lr=5e-3",
        "--set", "optim.warmup_steps=1",
        "--set", "data.max_length=200",
        "--set", "method.target_modules=[q_proj, v_proj]",
        "--set", "method.lora_dropout=0.1",  # dropout draws from the RNG: its state must come back too
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(WORKER), fault, *args, *(["--resume"] if resume else [])]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


def _steps_logged(out: Path) -> list[int]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if "loss" in json.loads(line)]


@pytest.mark.timeout(600)
def test_killed_runs_resume_to_the_same_adapter_byte_for_byte(tiny_model_dir, tmp_path):
    reference = _run(tiny_model_dir, tmp_path / "whole", "none", resume=False)
    assert reference.returncode == 0, reference.stderr[-2000:]

    out = tmp_path / "killed"
    for fault, resume in [
        ("step:3", False),  # mid-step 3 (0-based): the step-2 checkpoint on disk, step 3 lost
        ("save:2:optimizer.safetensors", True),  # resumed at 2; killed halfway through step-6's optimizer state
        ("pointer:2", True),  # resumed at 4; step-8 checkpoint complete, `latest` still naming step-6
    ]:
        killed = _run(tiny_model_dir, out, fault, resume)
        assert killed.returncode == -signal.SIGKILL, (fault, killed.stderr[-2000:])
        assert not (out / "adapter").exists()
        if fault.startswith("save"):  # the half-written save is left in its temporary folder, never as step-6
            assert any(p.name.startswith(".step-") for p in (out / "checkpoints").iterdir())
            assert not (out / "checkpoints" / "step-6").exists()
    finished = _run(tiny_model_dir, out, "none", resume=True)
    assert finished.returncode == 0, finished.stderr[-2000:]

    whole = (tmp_path / "whole" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == whole
    assert _steps_logged(out) == _steps_logged(tmp_path / "whole")  # no step logged twice after the resumes
    assert not any(p.name.startswith(".step-") for p in (out / "checkpoints").iterdir())  # cleaned by later saves
