"""Crash safety of training (issue 27): a real `deltatune train` process (forked from the test's) is killed with
SIGKILL mid-step, halfway through writing a checkpoint, and between a checkpoint and its `latest` pointer; each time
`--resume` goes on from what is on disk, and the final adapter equals an uninterrupted run's byte for byte (data
order, RNG, optimizer and scheduler state all restored). The uninterrupted run and the last resume run in the test's
process."""

from __future__ import annotations

import json
import multiprocessing
import signal
import sys
from pathlib import Path

import pytest
import torch

from tests.train import crash_worker

STEPS, SAVE_EVERY = 8, 2


def _overrides(model_dir: Path, out: Path) -> list[str]:
    return [
        f"model={model_dir}",
        f"output_dir={out}",
        f"optim.steps={STEPS}",
        f"save_every={SAVE_EVERY}",
        "optim.batch_size=4",
        "optim.lr=5e-3",
        "optim.warmup_steps=1",
        "data.max_length=200",
        "method.target_modules=[q_proj, v_proj]",
        "method.lora_dropout=0.1",  # dropout draws from the RNG: its state must come back too
    ]


def _run_killed(model_dir: Path, out: Path, fault: str, resume: bool) -> int | None:
    """`deltatune train` in a process of its own, forked from this one (torch and transformers already imported: no
    start-up to pay for each run), killed where `fault` says; its exit code. One thread, as a DataLoader worker."""
    args = ["train", *(arg for o in _overrides(model_dir, out) for arg in ("--set", o)), *(["--resume"] * resume)]
    child = multiprocessing.get_context("fork").Process(target=_train_with_fault, args=(fault, args))
    child.start()
    child.join(timeout=240)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail(f"the run with fault {fault} did not end in 240 s")
    return child.exitcode


def _train_with_fault(fault: str, args: list[str]) -> None:
    from deltatune.cli import main

    torch.set_num_threads(1)
    crash_worker.install(fault)
    sys.argv = ["deltatune", *args]
    main()


def _run_here(model_dir: Path, out: Path, resume: bool) -> None:
    """The same run in this process, on one thread as the killed ones: same kernels, same bytes."""
    from deltatune.train import load_train_config, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            train(load_train_config(None, _overrides(model_dir, out)), resume=resume)
    finally:
        torch.set_num_threads(threads)


def _steps_logged(out: Path) -> list[int]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if "loss" in json.loads(line)]


@pytest.mark.timeout(600)
def test_killed_runs_resume_to_the_same_adapter_byte_for_byte(tiny_model_dir, tmp_path):
    _run_here(tiny_model_dir, tmp_path / "whole", resume=False)  # the uninterrupted reference

    out = tmp_path / "killed"
    for fault, resume in [
        ("step:3", False),  # mid-step 3 (0-based): the step-2 checkpoint on disk, step 3 lost
        ("save:2:optimizer.safetensors", True),  # resumed at 2; killed halfway through step-6's optimizer state
        ("pointer:2", True),  # resumed at 4; step-8 checkpoint complete, `latest` still naming step-6
    ]:
        assert _run_killed(tiny_model_dir, out, fault, resume) == -signal.SIGKILL, fault  # its output: stderr
        assert not (out / "adapter").exists()
        if fault.startswith("save"):  # the half-written save is left in its temporary folder, never as step-6
            assert any(p.name.startswith(".step-") for p in (out / "checkpoints").iterdir())
            assert not (out / "checkpoints" / "step-6").exists()
    _run_here(tiny_model_dir, out, resume=True)  # the last resume goes on from what the killed processes left

    whole = (tmp_path / "whole" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == whole
    assert _steps_logged(out) == _steps_logged(tmp_path / "whole")  # no step logged twice after the resumes
    assert not any(p.name.startswith(".step-") for p in (out / "checkpoints").iterdir())  # cleaned by later saves
