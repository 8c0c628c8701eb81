"""Full disks and concurrent writers (issue 27).

A write that fails part-way is made real by the kernel: RLIMIT_FSIZE caps the size of any file this process
writes, so the writer (Python, safetensors' Rust, gguf, transformers) gets EFBIG in the middle of a file, as it would
get ENOSPC on a full disk; where the machine lets us mount one, a real full tmpfs gives ENOSPC. Each save, checkpoint,
export and merge must then raise WriteError, leave the files that were there byte for byte, and leave nothing
partial behind.
"""

from __future__ import annotations

import contextlib
import errno
import multiprocessing
import os
import resource
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune.train import checkpoint as ckpt
from tests.conftest import perturb_trainable, tiny_llama


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Every file written inside the block fails with EFBIG past `limit` bytes (SIGXFSZ ignored, as a disk-full
    write fails with an error rather than a signal)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _adapter_model(seed: int = 0):
    torch.manual_seed(seed)
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    perturb_trainable(model, seed=seed)
    return model


def _refused_and_intact(folder: Path, write) -> None:
    """`write()` under a small file-size cap: WriteError, and `folder` exactly as before (no temp file either)."""
    before = _contents(folder)
    with file_size_limit(2048), pytest.raises(dt.WriteError, match="unchanged") as info:
        write()
    assert info.value.errno in (errno.EFBIG, errno.ENOSPC) and isinstance(info.value, OSError)
    assert _contents(folder) == before


def test_save_pretrained_on_a_full_disk_keeps_the_previous_adapter(tmp_path):
    _adapter_model(0).save_pretrained(tmp_path)
    _refused_and_intact(tmp_path, lambda: _adapter_model(1).save_pretrained(tmp_path))
    dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)  # still whole


def test_a_checkpoint_on_a_full_disk_keeps_the_previous_one(tmp_path):
    model = _adapter_model()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params)
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = model.training_state_dict()
    ckpt.save_checkpoint(tmp_path, 2, state, optimizer, scheduler, {"losses": []})
    _refused_and_intact(tmp_path, lambda: ckpt.save_checkpoint(tmp_path, 4, state, optimizer, scheduler, {}))
    assert ckpt.latest_checkpoint(tmp_path).name == "step-2"


def test_a_gguf_export_on_a_full_disk_leaves_no_partial_gguf(tmp_path, tiny_model_dir):
    pytest.importorskip("gguf")
    from deltatune.export import export_gguf_adapter

    _adapter_model().save_pretrained(tmp_path / "adapter")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.gguf").write_bytes(b"the previous export")
    _refused_and_intact(out, lambda: export_gguf_adapter(tmp_path / "adapter", out / "a.gguf", model=tiny_model_dir))


def test_a_merge_on_a_full_disk_leaves_the_output_folder_as_it_was(tmp_path, tiny_model_dir):
    from deltatune.cli.merge_cmd import save_model_dir
    from deltatune.pretrained import load_causal_lm

    base, tokenizer = load_causal_lm(tiny_model_dir)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    merged = dt.get_peft_model(base, dt.LoraConfig(target_modules=["q_proj"])).merge_and_unload()
    _refused_and_intact(out, lambda: save_model_dir(merged, tokenizer, out))
    save_model_dir(merged, tokenizer, out)  # with room, it works, and keeps what else is in the folder
    assert (out / "model.safetensors").is_file() and (out / "notes.txt").read_text() == "kept"
    umask = os.umask(0o022)
    os.umask(umask)
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}["model.safetensors"] == 0o666 & ~umask


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 512 KiB tmpfs, where this machine lets the tests mount one (root in a container); else skipped (the
    RLIMIT_FSIZE tests above cover the same paths)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()[:80]})")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_real_full_disk_gives_enospc_and_keeps_the_adapter(small_tmpfs):
    folder = small_tmpfs / "adapter"
    _adapter_model(0).save_pretrained(folder)
    before = _contents(folder)
    with contextlib.suppress(OSError), open(small_tmpfs / "filler", "wb", buffering=0) as fh:  # fill the disk
        while True:
            fh.write(b"\0" * 4096)
    with pytest.raises(dt.WriteError, match="full") as info:
        _adapter_model(1).save_pretrained(folder)
    assert info.value.errno == errno.ENOSPC
    assert _contents(folder) == before and not [p for p in small_tmpfs.iterdir() if p.name.startswith(".")]


# -- two writers ------------------------------------------------------------------------------------------------------


def _write_in_a_loop(folder: Path, rank: int, flags: Path) -> None:
    """A writer process: saves its own adapter (rank `rank`) into `folder` until told to stop."""
    torch.set_num_threads(1)
    torch.manual_seed(rank)
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=rank, target_modules=["q_proj", "v_proj", "o_proj"]))
    (flags / f"ready-{rank}").touch()
    while not (flags / "stop").exists():
        model.save_pretrained(folder)


def _read_while_two_write(folder: Path, flags: Path, rounds: int) -> list[str]:
    problems = []
    for _ in range(rounds):
        try:  # the shapes are checked against the config: a mix of the two writers' files is a CheckpointError
            dt.PeftModel.from_pretrained(tiny_llama(), folder)
        except dt.CheckpointError as exc:
            problems.append(str(exc)[:200])
    return problems


def test_two_writers_and_a_reader_never_see_a_mixed_adapter(tmp_path):
    folder, flags = tmp_path / "shared", tmp_path / "flags"
    flags.mkdir()
    config = dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "o_proj"])
    dt.get_peft_model(tiny_llama(), config).save_pretrained(folder)
    # two processes forked from this one (torch already imported: they start at once)
    fork = multiprocessing.get_context("fork")
    writers = [fork.Process(target=_write_in_a_loop, args=(folder, rank, flags)) for rank in (2, 8)]
    for writer in writers:
        writer.start()
    try:
        deadline = time.monotonic() + 120
        while not all((flags / f"ready-{rank}").exists() for rank in (2, 8)) and time.monotonic() < deadline:
            time.sleep(0.05)
        problems = _read_while_two_write(folder, flags, rounds=60)  # both processes save in a loop meanwhile
    finally:
        (flags / "stop").touch()
        for writer in writers:
            writer.join(timeout=120)
    assert [w.exitcode for w in writers] == [0, 0]
    assert problems == []
    config = dt.load_config(folder)  # the last writer's whole adapter
    assert all(t.shape[0] == config.r for k, t in load_file(folder / "adapter_model.safetensors").items() if "_A" in k)
