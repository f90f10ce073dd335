"""Timing and memory: CUDA events on the GPU, a monotonic host clock on the CPU; warm-up kept apart; medians.

Why events on the GPU: kernels run asynchronously, so a host clock read right after a launch measures the launch.
Each timed call is bracketed by two events on the current stream and the device is synchronised before the next
call, so calls never overlap and host-side gaps (Python, launches) inside a call are counted, as a user sees them.
"""
from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Timing:
    """Seconds of each call: `first` (warm-up: compilation, graph capture, caches) and the timed `runs` after it."""

    first: float
    runs: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.runs) if self.runs else self.first

    def as_dict(self) -> dict[str, Any]:
        return {"first_s": self.first, "median_s": self.median, "runs_s": self.runs}


class Clock:
    """Times single calls on one device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def once(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        """(seconds, result) of one call, with the device idle before and after."""
        self.sync()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3, out
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out

    def measure(self, fn: Callable[[], Any], repeat: int, warmup: int = 1) -> Timing:
        """`warmup` untimed-for-the-median calls (the first one's time is kept as `first`), then `repeat` timed ones."""
        first, _ = self.once(fn)
        for _ in range(warmup - 1):
            self.once(fn)
        return Timing(first, [self.once(fn)[0] for _ in range(repeat)])

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory_gb(self) -> float:
        """GPU: peak bytes allocated by PyTorch since `reset_peak`. CPU: the process' peak resident set (monotonic over
        the whole process, so later configs report at least the earlier peaks)."""
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
