"""DDP and FSDP2 on CPU (gloo): 2 processes x batch 2 equal 1 process x batch 4; both ranks end with the same
adapter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("ddp_worker.py")


def _run(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if torch.cuda.device_count() < 2:  # nccl needs a GPU per process: with fewer, both ranks train on CPU (gloo)
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=240, cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_processes_match_single_process(tiny_model_dir, tmp_path):
    """DDP and FSDP2 (one after the other in one torchrun launch) each against one single-process run, made here
    (with one process there is nothing to wrap: the same reference serves both)."""
    import runpy

    worker = runpy.run_path(str(WORKER))  # its __main__ block does not run
    with torch.random.fork_rng():
        worker["run"](str(tiny_model_dir), tmp_path / "single", "4", "ddp")
    alone = load_file(tmp_path / "single" / "adapter-0.safetensors")
    losses_single = [float(v) for v in (tmp_path / "single" / "losses-0.txt").read_text().split()]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    _run([*torchrun, str(WORKER), str(tiny_model_dir), str(tmp_path), "2", "ddp,fsdp"], tmp_path)
    for strategy in ("ddp", "fsdp"):
        multi = tmp_path / strategy
        assert [(multi / f"strategy-{rank}.txt").read_text() for rank in (0, 1)] == [strategy] * 2
        rank0, rank1 = load_file(multi / "adapter-0.safetensors"), load_file(multi / "adapter-1.safetensors")
        assert rank0.keys() == rank1.keys() == alone.keys()
        for key in rank0:
            assert torch.equal(rank0[key], rank1[key]), (strategy, key)  # the ranks stay in lockstep
            torch.testing.assert_close(rank0[key], alone[key], rtol=1e-4, atol=1e-5)
        losses_multi = [float(v) for v in (multi / "losses-0.txt").read_text().split()]
        torch.testing.assert_close(torch.tensor(losses_multi), torch.tensor(losses_single), rtol=1e-5, atol=1e-6)
        saved = load_file(multi / "run" / "adapter" / "adapter_model.safetensors")  # written once, by rank 0
        assert all(torch.equal(saved[k], rank0[k]) for k in saved)


HF_WORKER = Path(__file__).with_name("hf_accelerate_worker.py")


def test_transformers_trainer_under_accelerate_launch_saves_an_adapter_that_reloads(tiny_model_dir, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo; CUDA hidden): Trainer trains a deltatune model data-parallel,
    both ranks see the same losses, and the adapter rank 0 saves from the accelerator's state dict reloads onto a
    fresh base and is the trained one. (accelerate turns FSDP on only for accelerator devices: on CPU its
    `--use_fsdp` runs this same DDP; FSDP2 on CPU is the trainer's own `distributed: fsdp`, tested above.)"""
    pytest.importorskip("accelerate")
    import deltatune as dt

    # --multi_gpu is accelerate's multi-process launcher (torchrun); with CUDA hidden each process runs on CPU
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", "0"]  # fmt: skip
    proc = _run([*launch, str(HF_WORKER), str(tiny_model_dir), str(tmp_path)], tmp_path)
    launch_output = f"\n--- the launch's output ---\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    losses = [(tmp_path / f"losses-{rank}.txt").read_text().split() for rank in (0, 1)]
    assert len(losses[0]) == 4 and losses[0] == losses[1], f"losses per rank {losses}{launch_output}"
    wrapped = [(tmp_path / f"wrapped-{rank}.txt").read_text() for rank in (0, 1)]
    assert wrapped == ["MULTI_CPU DistributedDataParallel"] * 2, f"{wrapped}{launch_output}"
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    initial = dt.get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    ).adapter_state_dict("default")
    assert saved.keys() == initial.keys()
    assert any(not torch.equal(saved[k], initial[k]) for k in saved)  # trained
    reloaded = dt.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
    for key, value in reloaded.adapter_state_dict("default").items():
        assert torch.equal(value, saved[key]), key
