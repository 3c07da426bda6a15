"""Resident memory of this process: now, and the peak since the last reset (Linux's VmHWM)."""

from __future__ import annotations

import resource
from pathlib import Path

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def current_rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024 if STATUS.is_file() else peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident memory since the last reset_peak_rss() (since start where resets fail)."""
    if STATUS.is_file():
        return _status_kib("VmHWM") * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Make the peak start again from the current RSS, so a peak can be credited to one call."""
    try:
        CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int:
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0
