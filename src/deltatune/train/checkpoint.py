"""Resumable training state: adapter + optimizer + scheduler + RNG + step, in safetensors and JSON (no pickles).

Each checkpoint is written to a temporary folder, flushed to disk and renamed into place, then `latest` is rewritten
atomically, so an interrupted save (a kill, a full disk, a power cut) never replaces the last good checkpoint.
`trainer_state.json`, written last, lists every other file's size and SHA-256: a checkpoint whose files do not match
(damaged after it was written) is skipped on resume, with a warning, for the newest one that does.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
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
        meta["files"] = {f.name: _fingerprint(f) for f in sorted(tmp.iterdir())}
        (tmp / STATE_NAME).write_text(json.dumps(meta, indent=1))
    io.atomic_write_bytes(root / "latest", final.name.encode())
    for old in _steps(root)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*"):  # the temporary folders of saves a kill interrupted
        shutil.rmtree(stale, ignore_errors=True)
    return final


STATE_NAME = "trainer_state.json"


def _fingerprint(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _steps(root: Path) -> list[Path]:
    """The finished checkpoint folders under `root`, oldest first."""
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def check_checkpoint(path: Path) -> None:
    """Raise CheckpointError unless every file `trainer_state.json` lists is there with its recorded size and hash."""
    try:
        files = json.loads((path / STATE_NAME).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} has no readable {STATE_NAME} ({type(exc).__name__}).") from None
    for name, expected in files.items():
        if not (path / name).is_file() or _fingerprint(path / name) != expected:
            raise CheckpointError(f"checkpoint {path}: {name} is missing or differs from what was written.")


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest intact checkpoint of `run_dir` (None when there is none at all). A damaged newer one is skipped
    with a warning naming it; when every one is damaged, CheckpointError says why the newest is. (`latest` names
    the newest for people and tools; a kill between a checkpoint's rename and the pointer's can leave it one behind.)"""
    root = run_dir / "checkpoints"
    candidates = list(reversed(_steps(root)))
    problems = []
    for path in candidates:
        try:
            check_checkpoint(path)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        if problems:
            warnings.warn(f"{problems[0]} Resuming from the older {path.name} instead.", stacklevel=2)
        return path
    if problems:
        raise CheckpointError(f"{problems[0]} No intact checkpoint is left; delete {root} to start over.")
    return None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor], dict]:
    """(adapter tensors, optimizer state_dict, rng states, trainer metadata)."""
    try:
        meta = json.loads((path / STATE_NAME).read_text())
        meta.pop("files", None)
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
