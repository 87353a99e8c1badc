"""Tests for trainer/allocator.py: with keep_freed_memory() a freed large buffer stays resident (glibc keeps it in the
heap for the next step); without it, the same buffer goes back to the kernel. Each case in a fresh interpreter,
since the setting is per process.

Run: .venv/bin/pytest tests/test_allocator.py
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from trainer.allocator import keep_freed_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20
CHILD = """
import os, sys
from trainer.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
base = rss()
buf = bytearray(256 << 20)  # malloc'd and zero-filled: every page touched
peak = rss()
del buf
print(kept, peak - base, rss() - base)
"""

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc",
                           reason="mallopt is glibc's; elsewhere keep_freed_memory changes nothing (tested below)")


def _child(mode: str) -> tuple[bool, int, int]:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True,
                         env=env).stdout.split()
    return out[0] == "True", int(out[1]), int(out[2])


@glibc
def test_a_freed_256_mib_buffer_stays_resident_only_when_kept():
    """glibc's default: 256 MiB is mmap'd and unmapped on free (RSS back within 32 MiB of the start);
    kept: it comes from the heap and stays (RSS still >= 200 MiB above the start after the free)."""
    kept, peak, after = _child("default")
    assert not kept and peak >= 200 * MIB and after < 32 * MIB, (peak, after)
    kept, peak, after = _child("keep")
    assert kept and peak >= 200 * MIB and after >= 200 * MIB, (peak, after)


def test_keep_freed_memory_reports_whether_it_applied(monkeypatch):
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    assert keep_freed_memory() is False
