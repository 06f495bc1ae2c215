"""Training returns the memory of freed activations to the system (glibc's fixed mmap threshold)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# Raises glibc's threshold with a freed 16 MiB block (unless it is fixed), then reports how much of
# an 8 MiB tensor, touched and freed, stays resident.
RESIDENT_AFTER_FREE = """
import os, sys, torch
from finetune.training import return_freed_blocks_to_the_system
if sys.argv[1] == "fixed":
    assert return_freed_blocks_to_the_system()
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
raiser = torch.ones(4 * 2**20)
del raiser
before = resident()
block = torch.ones(2 * 2**20)
del block
print((resident() - before) / 2**20)
"""


def resident_mib_after_free(mode: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", RESIDENT_AFTER_FREE, mode],
        capture_output=True,
        text=True,
        check=True,
        env={"OMP_NUM_THREADS": "1", "PATH": ""},
    )
    return float(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_a_freed_block_goes_back_to_the_system_once_the_threshold_is_fixed() -> None:
    assert resident_mib_after_free("default") > 7  # glibc kept it in its heap
    assert resident_mib_after_free("fixed") < 1
