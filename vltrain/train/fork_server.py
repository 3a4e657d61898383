"""Imported first by the DataLoader workers' fork server (`parallel.WORKER_PRELOAD`): the server ends with the
training process that started it, even when that process is killed (SIGKILL, the OOM killer). Its workers then
see their parent gone and end too (torch's worker watchdog); without this, a killed trainer left the server and
its workers running, holding memory and the trainer's output pipes. Elsewhere, importing this does nothing."""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing.forkserver
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def in_fork_server() -> bool:
    """This import runs inside multiprocessing's fork server (its preload step)."""
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code is multiprocessing.forkserver.main.__code__:
            return True
        frame = frame.f_back
    return False


def end_with_parent() -> None:
    """Linux: the kernel sends SIGKILL to this process when its parent (the trainer's thread that started it)
    ends; if the parent is already gone, end now."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return  # not Linux: the server ends when its last client closes its pipe, as multiprocessing has it
    if os.getppid() != parent:
        os._exit(0)


if in_fork_server():
    end_with_parent()
