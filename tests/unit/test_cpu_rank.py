"""A CPU rank's process set-up: glibc's malloc told to keep freed step-sized blocks for reuse."""

from __future__ import annotations

import platform

import pytest

pytest.importorskip("torch")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_malloc_keeps_freed_blocks_on_glibc():
    from worker.engine.cpu_rank import keep_freed_memory

    assert keep_freed_memory()  # mallopt found through ctypes, and both settings taken (1 from each call)
