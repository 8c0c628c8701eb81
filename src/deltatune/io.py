"""Checkpoint io: safetensors only, peft's key layout, atomic writes, validation before anything changes.

Saved keys are `base_model.model.<module path>.<peft attribute>[.<sub key>]` with the adapter name left out
(`...q_proj.lora_A.weight`); they are built structurally from each wrapper's `adapter_state`, never by editing
strings, so adapter or module names that contain "lora" or "weight" cannot confuse them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_dumps
from torch import Tensor

from deltatune.errors import CheckpointError, WriteError

WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."


def atomic_write_bytes(path: str | Path, payload: bytes) -> None:
    """Write `payload` to `path` via a temp file in the same folder and a rename: readers see old or new, never half."""
    with atomic_file(path) as tmp, open(tmp, "wb") as fh:
        fh.write(payload)


NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextlib.contextmanager
def writing(what: Path) -> Iterator[None]:
    """Turn an OSError raised while writing `what` into a WriteError saying what happened and that nothing
    already saved changed (the callers write to temporary names only)."""
    try:
        yield
    except WriteError:
        raise
    except (OSError, SafetensorError) as exc:
        code = getattr(exc, "errno", None)
        if isinstance(exc, SafetensorError):  # safetensors' writer reports the OS error in its message only
            found = re.search(r"os error (\d+)", str(exc))
            if found is None:
                raise
            code = int(found.group(1))
        full = code in NO_SPACE
        reason = os.strerror(code) if code else str(exc)
        why = "the disk (or quota) is full: free some space" if full else f"{reason}: fix that"
        raise WriteError(
            code or errno.EIO,
            f"writing {what} failed, {why} and write again. The files already there are unchanged and no partial "
            "file was left under the final name.",
        ) from exc


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write a file at; on success it is flushed to disk and renamed over
    `path` (readers see the old file or the new one), on any error it is removed and `path` is untouched."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        tmp = Path(name)
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a plain write would honour the umask
            os.close(fd)
            yield tmp
            _fsync(tmp)
            os.replace(tmp, path)
            _fsync(path.parent)  # the rename itself, so a power cut cannot bring back the old file
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


@contextlib.contextmanager
def staged_directory(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final` for a writer that makes several files (transformers'
    `save_pretrained`); once it returns, each file gets the umask's permissions and is renamed into `final` (other
    files there are kept). A failure while writing (a full disk) leaves `final` exactly as it was."""
    final = Path(final)
    with writing(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
        try:
            yield tmp
            final.mkdir(exist_ok=True)
            staged = sorted(p for p in tmp.rglob("*") if p.is_file())
            mode = 0o666 & ~_umask()
            for src in staged:
                os.chmod(src, mode)  # what a plain write gives (transformers writes its weights via a 0600 temp file)
                _fsync(src)
            for src in staged:
                dest = final / src.relative_to(tmp)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dest)
            _fsync(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def folder_lock(directory: str | Path, exclusive: bool) -> Iterator[None]:
    """Hold an advisory lock on `directory` itself (flock on the folder, so no lock file is left in it): writers of
    an adapter folder take it exclusively, readers shared, so a reader sees one writer's whole set of files. No-op
    where the folder does not exist or the platform has no flock."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `final`; on success it replaces `final` in one rename, on any error it
    is removed and `final` is untouched."""
    with writing(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
        try:
            tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; a plain mkdir would honour the umask
            yield tmp
            for child in tmp.iterdir():  # on disk before the rename: after a power cut the folder is whole or absent
                _fsync(child)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync(final.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask (read by setting it and putting it back: the only portable way)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def dump_tensors(tensors: dict[str, Tensor]) -> bytes:
    """Serialize to safetensors bytes (contiguous CPU copies; peft's `format: pt` metadata)."""
    plain, storages = {}, set()
    for key, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        plain[key] = tensor.clone() if storage in storages else tensor  # safetensors refuses shared memory (tied)
        storages.add(storage)
    return safetensors_dumps(plain, metadata={"format": "pt"})


def read_tensors(directory: str | Path, device: torch.device | None = None) -> dict[str, Tensor]:
    """Load `adapter_model.safetensors` (onto `device`, default cpu); a missing, truncated or corrupt file raises
    CheckpointError."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        other = Path(directory) / "adapter_model.bin"
        why = " (only a pickled adapter_model.bin is there: deltatune never loads pickles; re-save it as safetensors)"
        raise CheckpointError(f"no {WEIGHTS_NAME} in {directory}{why if other.exists() else ''}.")
    try:
        return load_file(str(path), device=str(device or "cpu"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({exc}); it may be truncated. Re-save it."
        ) from exc


SHARED_PREFIX = "base_model."
SHARED_MARK = "<shared>."
"""In-memory marker of method-level tensors shared by all layers of an adapter (e.g. VeRA's projections), which
peft saves as `base_model.<name>` rather than under a module path."""


ROOT_MARK = "<root>."
"""In-memory marker of tensors peft saves at the file's top level, under no module path (the virtual-token table of
methods that adapt the model's input)."""
ROOT_KEYS = frozenset({"prompt_embeddings"})
"""The top-level keys peft writes; any other key without peft's prefix means the file is not in peft's layout."""


def peft_key(relative: str, module_prefix: str = KEY_PREFIX) -> str:
    """The saved key of a module-relative (or shared, or top-level) in-memory key."""
    if relative.startswith(SHARED_MARK):
        return SHARED_PREFIX + relative[len(SHARED_MARK) :]
    if relative.startswith(ROOT_MARK):
        return relative[len(ROOT_MARK) :]
    return module_prefix + relative


def to_peft_keys(relative: dict[str, Tensor], module_prefix: str = KEY_PREFIX) -> dict[str, Tensor]:
    """Add peft's prefix to module-relative keys (`base_model.model.`, or the method's `module_prefix`;
    `base_model.` for shared tensors)."""
    return {peft_key(k, module_prefix): v for k, v in relative.items()}


def from_peft_keys(saved: dict[str, Tensor], module_prefix: str = KEY_PREFIX) -> dict[str, Tensor]:
    """Strip peft's prefix (`module_prefix` for module keys); keys without it are an error (the file was not written
    in peft's layout)."""
    out: dict[str, Tensor] = {}
    for key, value in saved.items():
        if key.startswith(module_prefix):
            out[key[len(module_prefix) :]] = value
        elif key.startswith(SHARED_PREFIX):
            out[SHARED_MARK + key[len(SHARED_PREFIX) :]] = value
        elif key in ROOT_KEYS:
            out[ROOT_MARK + key] = value
        else:
            bad = [k for k in saved if not k.startswith(SHARED_PREFIX) and k not in ROOT_KEYS]
            raise CheckpointError(
                f"key {key!r} does not start with {module_prefix!r}: not a peft-layout adapter file "
                f"({len(bad)} such keys)."
            )
    return out


def drop_mismatched_keys(expected: dict[str, Tensor], found: dict[str, Tensor], source: str) -> None:
    """`ignore_mismatched_sizes=True`: take the keys whose saved shape differs from the model's out of both dicts
    (those tensors keep their initial values), with a warning naming each."""
    mismatched = [k for k, t in found.items() if k in expected and tuple(t.shape) != tuple(expected[k].shape)]
    if mismatched:
        shapes = "; ".join(
            f"{peft_key(k)} {tuple(found[k].shape)} in the file, {tuple(expected[k].shape)} here" for k in mismatched
        )
        warnings.warn(
            f"{source}: ignore_mismatched_sizes=True: {len(mismatched)} tensor(s) not loaded, they keep the new "
            f"adapter's initial values: {shapes}.",
            stacklevel=4,
        )
    for key in mismatched:
        del expected[key], found[key]


def check_state(
    expected: dict[str, Tensor], found: dict[str, Tensor], source: str, drop_mismatched: bool = False
) -> None:
    """Raise CheckpointError naming the first missing key, unexpected key, shape/dtype mismatch or non-finite tensor;
    with `drop_mismatched` (peft's ignore_mismatched_sizes) the tensors of another shape are first taken out of both
    dicts, with a warning (`drop_mismatched_keys`)."""
    if drop_mismatched:
        drop_mismatched_keys(expected, found, source)
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        raise CheckpointError(
            f"{source} lacks {len(missing)} adapter tensor(s), e.g. {peft_key(missing[0])!r}; it was saved from a "
            f"different model or config (check target_modules / layers_to_transform)."
        )
    if unexpected:
        raise CheckpointError(
            f"{source} has {len(unexpected)} tensor(s) this model has no place for, "
            f"e.g. {peft_key(unexpected[0])!r}; was it saved from another architecture?"
        )
    for key, tensor in found.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{source}: size mismatch for {peft_key(key)}: copying a param with shape {tuple(tensor.shape)} from "
                f"checkpoint, the shape in current model is {tuple(expected[key].shape)}; the adapter was trained "
                "with another rank or model size (ignore_mismatched_sizes=True loads the rest, leaving these tensors "
                "as initialised)."
            )
        if tensor.is_floating_point() != expected[key].is_floating_point():  # (a saved module's integer buffers)
            kind = "a float" if expected[key].is_floating_point() else f"an integer ({expected[key].dtype})"
            raise CheckpointError(f"{source}: {peft_key(key)} has dtype {tensor.dtype}, expected {kind} tensor.")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(
                f"{source}: {peft_key(key)} holds {bad} NaN/inf value(s); the run that saved it diverged. Use an "
                "earlier checkpoint (or retrain with a lower learning rate)."
            )
