"""Memory of a process from ``/proc/<pid>/status`` (RSS, peak, anonymous and file pages),
a thread that samples a child from outside, and one measured run of a child."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of a process in bytes ({} once it has exited)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in _STATUS_KEYS:
                    out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out


def reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Sampler(threading.Thread):
    """Samples a child's RSS from outside (no GIL of the child's to wait for)."""

    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int, int, int]] = []  # (time, rss, anon, file)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            st = proc_status(self.pid)
            if st:
                self.samples.append(
                    (time.time(), st["VmRSS"], st.get("RssAnon", 0), st.get("RssFile", 0))
                )
            self.stop.wait(self.interval)


@dataclass
class Run:
    mode: str
    report: dict[str, Any]
    samples: list[tuple[float, int, int, int]]
    wall_s: float
    wait4_maxrss: int
    returncode: int

    @property
    def phases(self) -> list[dict[str, Any]]:
        return list(self.report.get("phases", []))

    @property
    def peak(self) -> int:
        """Peak RSS of the whole process: the largest per-phase VmHWM (equals ru_maxrss of
        a run without resets), or the sampled maximum if that is larger."""
        return max([p["peak"] for p in self.phases] + [self.sampled_max])

    @property
    def sampled_max(self) -> int:
        return max((s[1] for s in self.samples), default=0)

    def sampled_in(self, start: float, end: float) -> tuple[int, int, int]:
        """(rss, anon, file) of the largest sample taken in [start, end]."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        best = max(inside, key=lambda s: s[1], default=(0.0, 0, 0, 0))
        return best[1], best[2], best[3]


def mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0
