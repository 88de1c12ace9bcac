"""This process's resident memory as Linux reports it in /proc/self: current and peak RSS, and a peak reset."""

from __future__ import annotations


def status_kib(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM, ...) in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(f"/proc/self/status has no {field} line")


def reset_peak_rss() -> None:
    """Set the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0), to measure the peak of what follows."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
