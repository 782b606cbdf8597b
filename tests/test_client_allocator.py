"""hosl.training.memory.return_freed_memory: a micro-batched client's freed transients leave RSS.

Each case runs in its own process (the setting is process-wide and permanent): allocate and free a
16 MiB tensor (glibc raises its mmap threshold to 16 MiB), then an 8 MiB one with a small block
allocated after it, free the 8 MiB one and see how much resident memory stayed.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hosl.training.memory import return_freed_memory

PROBE = r"""
import sys, torch
from hosl.training.memory import return_freed_memory

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

if sys.argv[1] == "fixed":
    print(return_freed_memory(), file=sys.stderr)
big = torch.ones(16 * 2**20 // 4)
del big
base = rss()
mid = torch.ones(8 * 2**20 // 4)
pin = torch.ones(64)
del mid
print(rss() - base)
"""

def _on_glibc() -> bool:
    try:
        return sys.platform.startswith("linux") and bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (AttributeError, ValueError, OSError):
        return False


glibc_linux = pytest.mark.skipif(not _on_glibc(), reason="the setting is glibc's (Linux)")


def _retained(case: str) -> tuple[int, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    out = subprocess.run([sys.executable, "-c", PROBE, case], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip()), out.stderr


@glibc_linux
@pytest.mark.slow
def test_freed_block_below_the_raised_threshold_stays_resident_by_default_and_not_after_the_call():
    default, _ = _retained("default")
    fixed, line = _retained("fixed")
    # glibc's default keeps the 8 MiB block resident (the reason for the setting) ...
    assert default >= 6 * 2**20, f"default allocator retained only {default} bytes: the premise changed"
    # ... with the threshold fixed at 128 KiB it is unmapped on free
    assert fixed < 2 * 2**20, f"{fixed} bytes stayed resident after return_freed_memory()"
    assert "128 KiB" in line


@pytest.mark.parametrize("bad", [0, 100, -1, 1.5, True, "128K"])
def test_threshold_is_checked(bad):
    with pytest.raises(ValueError, match="threshold must be a number of bytes >= 4096"):
        return_freed_memory(bad)


def test_the_plan_keeps_the_runtime_reserve_free():
    from hosl.training.memory import CPU_RUNTIME_RESERVE, plan_micro_batch, runtime_reserve

    parts = dict(weights=1000, scratch=100, output=400, fixed_transient=50, per_row_transient=30, batch_size=64)
    budget = 1000 + 100 + 400 + 50 + 5 * 30 + 29
    assert plan_micro_batch(budget, **parts).micro_batch == 5
    plan = plan_micro_batch(budget, reserve=60, **parts)  # two rows' worth less room
    assert plan.micro_batch == 3 and plan.planned_peak() == 1000 + 100 + 400 + 50 + 3 * 30 + 60
    assert plan.planned_peak() <= budget and "runtime reserve 60 bytes" in plan.describe()
    with pytest.raises(ValueError, match="runtime reserve 200 bytes"):
        plan_micro_batch(budget, reserve=200, **parts)
    assert runtime_reserve("cpu") == CPU_RUNTIME_RESERVE > 0 and runtime_reserve("meta") == 0
