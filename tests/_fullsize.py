"""Helpers of the full-size tests: seeded fill of large modules without a slow init, and the peak memory."""
from __future__ import annotations

from pathlib import Path

import torch


def fill_from_pool_(module: torch.nn.Module, seed: int, pool_size: int = 1 << 24) -> torch.nn.Module:
    """Give every parameter seeded N(0, 1) values copied from one pool at random offsets (drawing 2.6 G normals
    takes minutes on two cores; copying takes seconds), scaled as tests/_tiny.randomize_ does: fan-in for matrices,
    1 + 0.1·r for norm weights, 0.1·r for norm biases, 0.05·r for other vectors."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(pool_size, generator=g)
    with torch.no_grad():
        for name, p in module.named_parameters():
            flat, i = p.view(-1), 0
            off = int(torch.randint(0, pool.numel(), (1,), generator=g))
            while i < flat.numel():
                take = min(flat.numel() - i, pool.numel() - off)
                flat[i:i + take] = pool[off:off + take]
                i, off = i + take, 0
            if p.ndim >= 2:
                p.mul_(p[0].numel() ** -0.5)
            elif "norm" in name or ".ln_" in name or "layer_norm" in name:
                p.mul_(0.1).add_(1.0) if name.endswith("weight") else p.mul_(0.1)
            else:
                p.mul_(0.05)
    return module.eval()


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux: write 5 to /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_gb() -> float:
    """Peak resident memory (VmHWM, anonymous and file-backed) since the last reset, in GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1e6
    raise RuntimeError("no VmHWM in /proc/self/status")
