"""Used by test_crash_resume in a forked process: `deltatune train ARGS...` there, killed by SIGKILL at the point
FAULT names (`python tests/train/crash_worker.py FAULT ARGS...` does the same in a process of its own).

FAULT: "none"; "step:N" (a timer fires a few milliseconds into optimizer step N, wherever the step is by then);
"save:N:FILE" (the N-th checkpoint, halfway through writing FILE); "pointer:N" (the N-th checkpoint, renamed into
place but before `latest` points at it). Only the kill is staged: the run, its files and its resume are the real ones.
"""

import os
import signal
import sys
import threading

from deltatune.cli import main
from deltatune.train import checkpoint, trainer


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(fault: str) -> None:
    kind, *rest = fault.split(":")
    if kind == "step":
        real_step, at = trainer._train_step, int(rest[0])

        def step(run, index):
            if index == at:
                threading.Timer(0.003, _die).start()
            return real_step(run, index)

        trainer._train_step = step
    elif kind in ("save", "pointer"):
        saves = {"n": 0}
        real_save, real_save_file = checkpoint.save_checkpoint, checkpoint.save_file
        real_write, target = checkpoint.io.atomic_write_bytes, int(rest[0])

        def save(*args, **kwargs):
            saves["n"] += 1
            return real_save(*args, **kwargs)

        def save_file(tensors, path, *args, **kwargs):
            real_save_file(tensors, path, *args, **kwargs)
            if kind == "save" and saves["n"] == target and str(path).endswith(rest[1]):
                with open(path, "r+b") as fh:
                    fh.truncate(os.path.getsize(path) // 2)
                _die()

        def write(path, payload):
            if kind == "pointer" and saves["n"] == target and str(path).endswith("latest"):
                _die()
            return real_write(path, payload)

        checkpoint.save_checkpoint, checkpoint.save_file, checkpoint.io.atomic_write_bytes = save, save_file, write


if __name__ == "__main__":
    install(sys.argv[1])
    sys.argv = ["deltatune", *sys.argv[2:]]
    main()
