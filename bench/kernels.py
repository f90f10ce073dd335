"""`python -m bench.kernels`: the Triton GroupNorm+SiLU and GEGLU kernels against ATen at SD1.5's shapes.

This is the measurement that decides `FastOptions(triton=...)`'s default (gbsd_core/fast/kernels/__init__.py): each
row times one implementation on one SD1.5 UNet activation at 512² with CFG (batch 2), checks its result against an
fp32 reference first (rel err, as METHOD.md asks: correct first), and reports the bandwidth it reaches counting the
fewest bytes the op must move (input read once, output written once). GPU timing: `triton.testing.do_bench`
(CUDA events, median). `--tiny` runs small shapes (CPU: under TRITON_INTERPRET=1, which checks the plumbing and
the numbers, not the speed).

    python -m bench.kernels --device cuda --dtype fp16 --json kernels.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .report import write

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# SD1.5 UNet GroupNorm inputs at 512², CFG batch 2 (the widest, the deepest, a skip concat)
GN_SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 1920, 16, 16), (2, 1280, 8, 8)]
# ff.net.0.proj outputs [B, tokens, 2 x 4 x dim] at the three attention levels
GEGLU_SHAPES = [(2, 4096, 2560), (2, 1024, 5120), (2, 256, 10240)]
TINY_GN, TINY_GEGLU = [(1, 64, 8, 8)], [(1, 16, 128)]


def _time(fn: Callable[[], Any], device: torch.device, repeat: int) -> float:
    """Median seconds of fn."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def group_norm_rows(shape, dtype, device, channels_last: bool, repeat: int) -> list[dict[str, Any]]:
    from gbsd_core.fast.kernels import group_norm_silu_reference
    from gbsd_core.fast.kernels.triton_kernels import group_norm_silu_triton

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(device, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = (1 + 0.1 * torch.randn(shape[1], generator=g)).to(device, dtype)
    b = (0.1 * torch.randn(shape[1], generator=g)).to(device, dtype)
    ref = group_norm_silu_reference(x.float(), w.float(), b.float(), 32, 1e-5, True)
    impls = {
        "aten, fp32 round trip (GroupNorm32) + silu": lambda: F.silu(
            F.group_norm(x.float(), 32, w.float(), b.float(), 1e-5).to(dtype)),
        "aten, native half group_norm + silu (KernelGroupNorm)": lambda: F.silu(F.group_norm(x, 32, w, b, 1e-5)),
        "triton group_norm_silu": lambda: group_norm_silu_triton(x, w, b, 32, 1e-5, True),
    }
    return _rows("groupnorm+silu", shape, "channels_last" if channels_last else "nchw", impls, ref,
                 2 * x.numel() * x.element_size(), device, repeat)


def geglu_rows(shape, dtype, device, repeat: int) -> list[dict[str, Any]]:
    from gbsd_core.fast.kernels import geglu_reference
    from gbsd_core.fast.kernels.triton_kernels import geglu_triton

    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)

    def aten() -> torch.Tensor:
        value, gate = x.chunk(2, dim=-1)
        return value * F.gelu(gate)

    impls = {"aten chunk + gelu + mul (GEGLU)": aten, "triton geglu": lambda: geglu_triton(x)}
    return _rows("geglu", shape, "rows", impls, geglu_reference(x.float()), x.numel() * x.element_size() * 3 // 2,
                 device, repeat)


def _rows(op, shape, layout, impls, ref, min_bytes, device, repeat) -> list[dict[str, Any]]:
    rows = []
    for name, fn in impls.items():
        row: dict[str, Any] = {"op": op, "shape": list(shape), "layout": layout, "impl": name, "min_bytes": min_bytes}
        try:
            row["rel_err"] = _rel_err(fn(), ref)
            row["ms"] = _time(fn, device, repeat) * 1e3
            row["gb_s"] = min_bytes / (row["ms"] / 1e3) / 1e9
        except Exception as e:  # one failing implementation must not hide the others
            row["error"] = f"{type(e).__name__}: {e}"[:500]
        rows.append(row)
    base = next((r for r in rows if "native" in r["impl"] or r["impl"].startswith("aten chunk")), None)
    for r in rows:
        if base and r.get("ms") and base.get("ms"):
            r["x_aten"] = base["ms"] / r["ms"]
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| op | shape | layout | implementation | ms | GB/s (min bytes) | rel err vs fp32 | x ATen native |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['shape']} | {r['layout']} | {r['impl']} | {r['error']} | | | |")
            continue
        lines.append(f"| {r['op']} | {'x'.join(map(str, r['shape']))} | {r['layout']} | {r['impl']} | "
                     f"{r['ms']:.4f} | {r['gb_s']:.0f} | {r['rel_err']:.1e} | {r.get('x_aten', 1.0):.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="fp16")
    ap.add_argument("--tiny", action="store_true", help="small shapes (CPU: run under TRITON_INTERPRET=1)")
    ap.add_argument("--repeat", type=int, default=5, help="CPU timing repeats (CUDA: do_bench's own)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        for shape in TINY_GN if args.tiny else GN_SHAPES:
            for channels_last in (False, True):
                rows += group_norm_rows(shape, dtype, device, channels_last, args.repeat)
        for shape in TINY_GEGLU if args.tiny else GEGLU_SHAPES:
            rows += geglu_rows(shape, dtype, device, args.repeat)
    env = {"device": str(device), "dtype": args.dtype, "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    write(args.json, {"environment": env, "kernels": rows})
    print(f"kernels on {env['gpu'] or device}, {args.dtype}, torch {env['torch']}\n")
    print(table(rows))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
