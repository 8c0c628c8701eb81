"""Resumable training state: adapter + optimizer + scheduler + RNG + step, in safetensors and JSON (no pickles).

Each checkpoint is written to a temporary folder and renamed into place, then `latest` is rewritten atomically, so
an interrupted save never replaces the last good checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from deltatune import io
from deltatune.errors import CheckpointError

KEEP = 2


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    run_dir: Path,
    step: int,
    adapter_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extra: dict[str, Any],
) -> Path:
    """Write `run_dir/checkpoints/step-<step>` and point `latest` at it; keep the newest KEEP checkpoints."""
    root = run_dir / "checkpoints"
    final = root / f"step-{step}"
    with io.atomic_directory(final) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in adapter_state.items()}, tmp / "adapter.safetensors")
        opt_tensors, opt_meta = _optimizer_to_files(optimizer)
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        save_file(rng, tmp / "rng.safetensors")
        meta = {"step": step, "optimizer": opt_meta, "scheduler": scheduler.state_dict(), **extra}
        (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=1))
    io.atomic_write_bytes(root / "latest", final.name.encode())
    for old in sorted((p for p in root.glob("step-*")), key=lambda p: int(p.name[5:]))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor], dict]:
    """(adapter tensors, optimizer state_dict, rng states, trainer metadata)."""
    try:
        meta = json.loads((path / "trainer_state.json").read_text())
        adapter = load_file(path / "adapter.safetensors")
        optimizer = _optimizer_from_files(load_file(path / "optimizer.safetensors"), meta.pop("optimizer"))
        rng = load_file(path / "rng.safetensors")
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); delete it to resume from an older one."
        ) from exc
    return adapter, optimizer, rng, meta


def restore_rng(rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["torch"])
    cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
