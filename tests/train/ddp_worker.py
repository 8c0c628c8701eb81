"""Run by test_distributed through torchrun: trains the tiny model once per strategy named (in one process group),
saves this rank's in-memory adapter and losses under OUT/STRATEGY."""

import os
import sys
from pathlib import Path

import torch.distributed as dist
from safetensors.torch import save_file

from deltatune.train import load_train_config, train


def run(model_dir: str, out: Path, batch: str, strategy: str) -> None:
    cfg = load_train_config(
        None,
        [
            f"model={model_dir}",
            f"output_dir={out / 'run'}",
            f"optim.batch_size={batch}",
            "optim.steps=3",
            "optim.lr=5e-3",
            "method.lora_dropout=0.0",
            "data.max_length=200",
            "method.target_modules=[q_proj, v_proj]",
            f"distributed={strategy}",
        ],
    )
    result = train(cfg)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if dist.is_initialized():  # how the model was spread: FSDP shards parameters into DTensors, DDP replicates them
        sharded = any(hasattr(p, "full_tensor") for p in result.model.parameters())
        (out / f"strategy-{rank}.txt").write_text("fsdp" if sharded else "ddp")
    state = {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().contiguous()
        for k, v in result.model.adapter_state_dict("default").items()
    }
    save_file(state, out / f"adapter-{rank}.safetensors")
    (out / f"losses-{rank}.txt").write_text(" ".join(repr(v) for v in result.losses))


if __name__ == "__main__":
    model_dir, out, batch, strategies = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4].split(",")
    for strategy in strategies:  # the trainer joins the process group once and leaves it to its caller
        (out / strategy).mkdir(parents=True, exist_ok=True)
        run(model_dir, out / strategy, batch, strategy)
    if dist.is_initialized():
        dist.barrier()  # every rank wrote its files and is done with collectives
        # then leave without the interpreter's teardown: under load, gloo's threads and the process group's
        # destructors at exit have aborted a finished rank ("terminate called without an active exception",
        # SIGABRT) once in CI
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
