"""`scripts.memory`: with freed memory kept, or with huge pages, a network's forward passes fault in far fewer pages."""

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BUNDLES

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
# a fresh process as a user starts it: not the variable an in-process bundle test may have set in this one
FRESH_ENV = {key: value for key, value in os.environ.items() if key != "THP_MEM_ALLOC_ENABLE"}


@functools.cache
def _faults(setting: str | None) -> int:
    """Page faults of one forward pass after a warm-up, in a fresh process, with `setting` on (None: neither)."""
    enable = f"from scripts.memory import {setting}; print({setting}(True))" if setting else "print(False)"
    code = PROBE.format(bundle=str(BUNDLES / "swin_unetr_btcv"), enable=enable)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=FRESH_ENV
    ).stdout.split()
    assert out[0] == str(setting is not None)
    return int(out[1])


PROBE = """
import resource, sys, torch
sys.path.insert(0, {bundle!r})
{enable}
from monai.networks.nets import SwinUNETR
net = SwinUNETR(1, 14, feature_size=12).eval()
x = torch.rand(1, 1, 64, 64, 64)
with torch.no_grad():
    net(x)  # warm-up: the first pass maps what the process will reuse
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    net(x)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's; elsewhere the setting is a no-op")
def test_pool_removes_most_page_faults_of_repeated_forward_passes():
    # measured: about 0.6 million without the pool, none with it
    assert _faults(None) > 200_000
    assert _faults("keep_freed_memory") < _faults(None) / 5


ARENAS = """
import ctypes, sys, threading, torch
sys.path.insert(0, {bundle!r})
from scripts.memory import keep_freed_memory
print(keep_freed_memory({enabled}))
def allocate():
    [torch.ones(100_000) for _ in range(50)]
threads = [threading.Thread(target=allocate) for _ in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
ctypes.CDLL(None).malloc_stats()  # one "Arena N:" block per glibc arena, on stderr
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's; elsewhere the setting is a no-op")
def test_pool_keeps_the_freed_memory_of_all_threads_in_one_heap():
    """Per-thread arenas would each keep their own freed memory: more peak memory and fewer reuses."""
    arenas = {}
    for enabled in (False, True):
        code = ARENAS.format(bundle=str(BUNDLES / "swin_unetr_btcv"), enabled=enabled)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=FRESH_ENV)
        assert proc.stdout.split() == [str(enabled)]
        arenas[enabled] = sum(line.startswith("Arena ") for line in proc.stderr.splitlines())
    assert arenas[False] >= 4  # glibc gives each new allocating thread an arena of its own (measured: 9)
    assert arenas[True] == 1


@pytest.mark.skipif(
    not THP_MODE.is_file() or "[never]" in THP_MODE.read_text(), reason="this kernel has no transparent huge pages"
)
def test_huge_pages_remove_most_page_faults():
    # measured: about 0.6 million without huge pages, 0.015 million with them
    assert _faults(None) > 200_000
    assert _faults("use_huge_pages") < _faults(None) / 5


def test_huge_pages_report_when_set_too_late():
    """PyTorch reads THP_MEM_ALLOC_ENABLE once, at its first CPU allocation: afterwards the setting cannot work."""
    code = f"""
import sys, torch
torch.ones(1)
sys.path.insert(0, {str(BUNDLES / "swin_unetr_btcv")!r})
import logging; logging.basicConfig(level=logging.INFO)
from scripts.memory import use_huge_pages
print(use_huge_pages(True))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=FRESH_ENV)
    assert proc.stdout.split() == ["False"]
    assert "cpu_huge_pages: PyTorch did not take THP_MEM_ALLOC_ENABLE" in proc.stderr
