"""tokenq up's children: a process group of their own, and stopped when their parent dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")

# A parent that starts one child through start_child, prints the child's pid and process group, then waits.
PARENT = """
import os, sys, time
from tokenq.child_process import start_child
child = start_child([sys.executable, "-c", "import time; time.sleep(120)"])
print(child.pid, os.getpgid(child.pid), os.getpgrp(), flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_a_child_has_its_own_process_group_and_stops_when_its_parent_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    child_pid = 0
    try:
        child_pid, child_group, parent_group = map(int, parent.stdout.readline().split())
        assert child_group == child_pid != parent_group  # a Ctrl-C to the parent's group does not reach it
        assert _alive(child_pid)
        parent.kill()
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(child_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child_pid), "the child outlived its parent's SIGKILL"
    finally:
        parent.kill()
        if child_pid and _alive(child_pid):
            os.kill(child_pid, signal.SIGKILL)
