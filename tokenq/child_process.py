"""How tokenq starts the processes it keeps: `tokenq up`'s roles, and every embedded Redis.

Each runs in a process group of its own, so a Ctrl-C in the terminal (a SIGINT to the foreground group)
reaches `tokenq up` alone, and it stops them in order: the gateway, the worker's drain and the batch feeder
together, then the webhooks, Redis last. In one group with it, every child took the Ctrl-C at once: Redis shut down under the draining worker,
and the worker counted the SIGTERM that followed as a second signal and skipped its grace.

Each is also told by the kernel to stop (SIGTERM, so it still stops cleanly) when the thread that started
it exits, so a `tokenq up` killed with SIGKILL leaves no role or Redis running behind it: start children
from the main thread.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

_PR_SET_PDEATHSIG = 1


def _find_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _find_prctl()  # resolved before any fork: the child only calls it


def _stop_with(parent: int) -> Callable[[], None]:
    def in_child() -> None:
        if _PRCTL is not None:
            _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # the parent died before the line above could take effect
            os.kill(os.getpid(), signal.SIGTERM)

    return in_child


def start_child(args: Sequence[str], **popen_args: Any) -> subprocess.Popen:
    """subprocess.Popen(args), in its own process group and stopped when this process dies."""
    return subprocess.Popen(list(args), process_group=0, preexec_fn=_stop_with(os.getpid()), **popen_args)
