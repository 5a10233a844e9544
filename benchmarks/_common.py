"""What every benchmark shares: the machine it ran on, other processes' CPU use, JSON files.

Scripts run as ``python benchmarks/<name>.py`` put the repository root on ``sys.path`` before
importing this module, so ``benchmarks._common`` resolves either way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

import sparsetune
from sparsetune.files import atomic_write

REPO_ROOT = Path(__file__).resolve().parent.parent


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def _cpuinfo_field(name: str) -> str | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    found = re.search(rf"^{name}\s*:\s*(.+)$", text, re.M)
    return found.group(1).strip() if found else None


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or "unknown"


def cpu_simd_flags() -> list[str]:
    flags = set((_cpuinfo_field("flags") or "").split())
    return sorted(f for f in flags if f in {"avx", "avx2", "fma", "avx512f", "avx512_bf16"})


def git(*args: str) -> str | None:
    """``git args`` in the repository, stripped stdout; None when git is not there."""
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _meminfo_bytes(field: str) -> int | None:
    try:
        found = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    except OSError:
        return None
    return int(found.group(1)) * 1024 if found else None


def environment() -> dict[str, Any]:
    """Versions, commit and machine, stored in every results file."""
    import transformers

    status = git("status", "--porcelain", "--", "sparsetune")
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sparsetune": sparsetune.__version__,
        "git_commit": git("rev-parse", "HEAD"),
        "sparsetune_dirty": None if status is None else bool(status),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_simd_flags": cpu_simd_flags(),
        "os_cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "mem_total_bytes": _meminfo_bytes("MemTotal"),
    }


def write_json(path: Path, payload: dict[str, Any], indent: int = 2) -> Path:
    """Write ``payload`` atomically (temporary file in the folder, then rename)."""
    text = json.dumps(payload, indent=indent) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


class CpuGuard:
    """Measures how many cores *other* processes used during a stretch of time (Linux).

    On a 2-core machine one busy neighbour (a test suite, say) makes torch's 2 OpenMP threads
    wait on each other and can slow a parallel kernel down 30-fold, so timings taken then say
    nothing about the code. Rounds during which others used more than ``threshold`` cores are
    thrown away and run again; before each round the scripts wait a while for quiet. A negative
    ``threshold`` turns the guard off.
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.enabled = threshold >= 0 and self._sample() is not None

    @staticmethod
    def _sample() -> tuple[int, int, float] | None:
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
            own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
            v = [int(x) for x in fields]
        except (OSError, ValueError):
            return None
        busy = v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)
        # utime + stime, plus cutime + cstime: a measured child process the script has waited
        # for is its own work, not a neighbour's
        return busy, sum(int(x) for x in own[11:15]), time.monotonic()

    def start(self) -> tuple[int, int, float] | None:
        return self._sample() if self.enabled else None

    def others(self, since: tuple[int, int, float] | None) -> float | None:
        """Average cores used by other processes since ``since`` (None if not measurable)."""
        now = self._sample() if since is not None else None
        if since is None or now is None:
            return None
        elapsed = max(now[2] - since[2], 1e-9)
        other = (now[0] - since[0]) - (now[1] - since[1])
        # /proc counts in ticks (10 ms): forgive 2 ticks of rounding on short stretches
        return max(other - 2, 0) / self.tick / elapsed

    def busy(self, cores: float | None) -> bool:
        return cores is not None and cores > self.threshold

    def wait_quiet(self, max_wait: float, probe: float = 1.0) -> float:
        """Sleep until others use <= threshold cores over ``probe`` s; returns seconds waited."""
        if not self.enabled or max_wait <= 0:
            return 0.0
        t0 = time.monotonic()
        while True:
            mark = self.start()
            time.sleep(probe)
            if not self.busy(self.others(mark)) or time.monotonic() - t0 >= max_wait:
                return time.monotonic() - t0
