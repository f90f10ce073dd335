"""Triton kernels (gbsd_core.fast.kernels) against their torch references, and the references against PyTorch's own ops.

No GPU in CI, so the kernels run under Triton's CPU interpreter. Triton decides interpreted-vs-compiled when a kernel is
defined, i.e. from the env at import, so the kernel cases run in ONE subprocess started with TRITON_INTERPRET=1 (this
file run as a script); it reports every case's error as JSON and the parametrized tests below check them one by one.
On a CUDA machine the same cases also run compiled, in-process.

Tolerances (max |kernel - reference| / max |reference|, both outputs in the input dtype): fp32 1e-5; fp16 2e-3 (an
output ulp is 2**-11 relative); bf16 2e-2. Note the interpreter converts fp32 -> bf16 by truncation, where the GPU
rounds to nearest, so interpreted bf16 results may sit one bf16 ulp (2**-8 relative) off the reference.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if __name__ == "__main__":  # run as the interpreter subprocess: tests/ on the path, as conftest.py puts it
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from _util import REPO, rel_err  # noqa: E402

TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-2}
DTYPES = ("float32", "float16", "bfloat16")


def _gn_case(name: str, dtype: str, c: int = 40, groups: int = 4, hw: tuple[int, int] = (7, 5), eps: float = 1e-5,
             silu: bool = True, layout: str = "nchw", block: int | None = None, offset: float = 0.0,
             batch: int = 2) -> dict:
    return dict(name=f"gn-{name}-{dtype}", dtype=dtype, c=c, groups=groups, hw=hw, eps=eps, silu=silu, layout=layout,
                block=block, offset=offset, batch=batch)


# Group sizes that are not powers of two (10 channels x 35 pixels = 350; 10 x 64 = 640), odd spatial sizes, both eps,
# both layouts, tiles smaller than a plane (the partials' merge and masked tails), a large mean (the tiles' deviations
# from their own mean, merged with Chan et al.'s formula, stay accurate) and a
# strided input (the .contiguous() fallback).
GN_CASES = (
    [_gn_case(f"c40g4-7x5-silu{int(s)}", dt, silu=s) for dt in DTYPES for s in (False, True)]
    # SD's 32 groups of a 320-channel level; batch 1 since the interpreter runs its 32 programs one by one.
    + [_gn_case(f"c320g32-8x8-eps1e-6-silu{int(s)}", dt, c=320, groups=32, hw=(8, 8), eps=1e-6, silu=s, batch=1)
       for dt, s in (("float32", False), ("float32", True), ("float16", True), ("bfloat16", True))]
    + [_gn_case("channels-last", dt, eps=1e-6, layout="channels_last") for dt in DTYPES]
    # blocks smaller than the plane: several partials per channel (the merge) and a masked tail tile
    + [_gn_case("block16-tail", dt, block=16) for dt in ("float32", "float16")]
    + [_gn_case("block16-tail-channels-last", "float32", block=16, layout="channels_last"),
       # more channels than one channels-last tile holds (64): several channel blocks, the last one masked
       _gn_case("c160g32-block4-channels-last", "float32", c=160, groups=32, block=4, layout="channels_last",
                batch=1),
       _gn_case("c320g32-8x8-block16", "bfloat16", c=320, groups=32, hw=(8, 8), block=16, batch=1),
       _gn_case("mean50", "float32", silu=False, offset=50.0),
       _gn_case("mean50-channels-last", "float32", silu=False, offset=50.0, layout="channels_last", block=8),
       _gn_case("strided", "float32", layout="strided")]
)
GEGLU_CASES = (
    [dict(name=f"geglu-d40-{dt}", dtype=dt, shape=(2, 3, 80), block=None, strided=False) for dt in DTYPES]
    + [dict(name=f"geglu-d160-block64-{dt}", dtype=dt, shape=(2, 3, 320), block=64, strided=False) for dt in DTYPES]
    + [dict(name="geglu-d24-2d-rowstrided-float32", dtype="float32", shape=(5, 48), block=None, strided=True)]
)


def _gn_inputs(case: dict, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    h, w = case["hw"]
    dtype = getattr(torch, case["dtype"])
    width = w * 2 if case["layout"] == "strided" else w
    x = torch.randn(case["batch"], case["c"], h, width, generator=g) + case["offset"]
    weight = 1.0 + 0.5 * torch.randn(case["c"], generator=g)
    bias = 0.5 * torch.randn(case["c"], generator=g)
    x, weight, bias = (t.to(device=device, dtype=dtype) for t in (x, weight, bias))
    if case["layout"] == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif case["layout"] == "strided":
        x = x[..., ::2]                          # neither NCHW- nor channels_last-contiguous
    return x, weight, bias


def run_gn_case(case: dict, device: str) -> float:
    """Triton (forced) vs the torch reference on the same input; also checks dtype, shape and memory format."""
    from gbsd_core.fast.kernels import group_norm_silu, group_norm_silu_reference
    from gbsd_core.fast.kernels.triton_kernels import group_norm_silu_triton

    x, weight, bias = _gn_inputs(case, device)
    args = (x, weight, bias, case["groups"], case["eps"], case["silu"])
    if case["block"]:
        ours = group_norm_silu_triton(*args, block=case["block"])
    else:
        ours = group_norm_silu(*args, use_triton=True)
    ref = group_norm_silu_reference(*args)
    assert ours.dtype == x.dtype and ours.shape == x.shape
    if case["layout"] == "channels_last":
        assert ours.is_contiguous(memory_format=torch.channels_last)
    return rel_err(ours.cpu(), ref.cpu())


def run_geglu_case(case: dict, device: str) -> float:
    from gbsd_core.fast.kernels import geglu, geglu_reference
    from gbsd_core.fast.kernels.triton_kernels import geglu_triton

    g = torch.Generator().manual_seed(1)
    shape = case["shape"]
    x = torch.randn(*shape[:-1], shape[-1] + 6 if case["strided"] else shape[-1], generator=g)
    x = x.to(device=device, dtype=getattr(torch, case["dtype"]))
    if case["strided"]:
        x = x[..., : shape[-1]]                  # rows strided by 2D + 6
    ours = geglu_triton(x, block=case["block"]) if case["block"] else geglu(x, use_triton=True)
    ref = geglu_reference(x)
    assert ours.dtype == x.dtype and ours.shape == (*shape[:-1], shape[-1] // 2)
    return rel_err(ours.cpu(), ref.cpu())


def _interpreter_main() -> None:
    """Entry of the TRITON_INTERPRET=1 subprocess: run every case on CPU, print one JSON line."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import gbsd_core.fast.kernels as kernels
    assert "triton" not in sys.modules, "importing gbsd_core.fast.kernels must not import triton"
    report = {"triton_available_cpu": kernels.triton_available("cpu"), "errors": {}}
    for case in GN_CASES:
        report["errors"][case["name"]] = run_gn_case(case, "cpu")
    for case in GEGLU_CASES:
        report["errors"][case["name"]] = run_geglu_case(case, "cpu")
    # Automatic dispatch (use_triton=None) must pick the kernels on CPU tensors when interpreting: count their calls.
    import gbsd_core.fast.kernels.triton_kernels as tk
    calls = []
    real_gn, real_geglu = tk.group_norm_silu_triton, tk.geglu_triton
    tk.group_norm_silu_triton = lambda *a: calls.append("gn") or real_gn(*a)
    tk.geglu_triton = lambda *a: calls.append("geglu") or real_geglu(*a)
    x = torch.randn(1, 8, 3, 3)
    kernels.group_norm_silu(x, torch.ones(8), torch.zeros(8), 2, 1e-5, True)
    kernels.geglu(torch.randn(2, 6))
    os.environ["GBSD_TRITON"] = "0"                 # read at call time: these two must take the references
    kernels.group_norm_silu(x, torch.ones(8), torch.zeros(8), 2, 1e-5, True)
    kernels.geglu(torch.randn(2, 6))
    report["auto_calls"] = calls
    print("JSON:" + json.dumps(report))


@pytest.fixture(scope="module")
def interpreted() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GBSD_TRITON"}
    env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("JSON:")]
    assert proc.returncode == 0 and lines, f"interpreter run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1][5:])


@pytest.mark.parametrize("case", GN_CASES + GEGLU_CASES, ids=lambda c: c["name"])
def test_kernel_interpreted_vs_reference(interpreted: dict, case: dict) -> None:
    err = interpreted["errors"][case["name"]]
    print(f"{case['name']}: rel_err {err:.3g} (tol {TOL[case['dtype']]})")
    assert err <= TOL[case["dtype"]]


def test_interpreted_auto_dispatch(interpreted: dict) -> None:
    assert interpreted["triton_available_cpu"] is True
    assert interpreted["auto_calls"] == ["gn", "geglu"]    # and none after GBSD_TRITON=0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the interpreter tests carry the proof on CPU)")
@pytest.mark.parametrize("case", GN_CASES + GEGLU_CASES, ids=lambda c: c["name"])
def test_kernel_cuda_vs_reference(case: dict) -> None:
    err = (run_gn_case if case["name"].startswith("gn-") else run_geglu_case)(case, "cuda")
    print(f"cuda {case['name']}: rel_err {err:.3g}")
    assert err <= TOL[case["dtype"]]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="needs compiled (non-interpreted) kernels")
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_kernels_compile_for_gpu_without_one(dtype: str) -> None:
    """Compile every kernel variant ahead of time to cubin for sm_80 (A100) and sm_90 (H100), no GPU needed.

    The interpreter is lenient where the compiler is not (e.g. non-constexpr globals, type rules of the code generator),
    so this catches kernels that would only fail on a GPU. Uses triton's ASTSource/compile API (triton 3.x).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import gbsd_core.fast.kernels.triton_kernels as tk

    x, f = f"*{dtype}", "*fp32"
    stats_nchw = {"x_ptr": x, "cnt_ptr": f, "mean_ptr": f, "m2_ptr": f, "HW": "i32", "SPLITS": "i32",
                  "BLOCK": "constexpr"}
    stats_cl = {"x_ptr": x, "cnt_ptr": f, "mean_ptr": f, "m2_ptr": f, "C": "i32", "HW": "i32", "SPLITS": "i32",
                "BLOCK_P": "constexpr", "BLOCK_C": "constexpr"}
    finalize = {"cnt_ptr": f, "mean_ptr": f, "m2_ptr": f, "w_ptr": x, "b_ptr": x, "scale_ptr": f, "shift_ptr": f,
                "C": "i32", "CPG": "i32", "GROUPS": "i32", "SPLITS": "i32", "eps": "fp32", "BLOCK": "constexpr",
                "BLOCK_C": "constexpr"}
    apply_nchw = {"x_ptr": x, "y_ptr": x, "scale_ptr": f, "shift_ptr": f, "HW": "i32", "SILU": "constexpr",
                  "BLOCK": "constexpr"}
    apply_cl = {"x_ptr": x, "y_ptr": x, "scale_ptr": f, "shift_ptr": f, "C": "i32", "HW": "i32", "SILU": "constexpr",
                "BLOCK_P": "constexpr", "BLOCK_C": "constexpr"}
    gn_kernels = [
        (tk._gn_stats_nchw_kernel, stats_nchw, {"BLOCK": 4096}, 8),
        (tk._gn_stats_cl_kernel, stats_cl, {"BLOCK_P": 64, "BLOCK_C": 64}, 8),
        (tk._gn_finalize_kernel, finalize, {"BLOCK": 1024, "BLOCK_C": 16}, 4),
        (tk._gn_apply_nchw_kernel, apply_nchw, {"SILU": True, "BLOCK": 4096}, 8),
        (tk._gn_apply_cl_kernel, apply_cl, {"SILU": True, "BLOCK_P": 64, "BLOCK_C": 64}, 8),
    ]
    geglu_sig = {"x_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "D": "i32", "stride_row": "i32", "BLOCK": "constexpr"}
    for arch in (80, 90):
        target = GPUTarget("cuda", arch, 32)
        for fn, sig, constexprs, warps in gn_kernels:
            src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
            assert triton.compile(src, target=target, options={"num_warps": warps}).asm["cubin"], fn.__name__
        src = ASTSource(fn=tk._geglu_kernel, signature=geglu_sig, constexprs={"BLOCK": 1024})
        assert triton.compile(src, target=target, options={"num_warps": 4}).asm["cubin"]


# SD1.5 UNet GroupNorm inputs at 512² with CFG (batch 2): the widest and the deepest levels, and the skip concats.
SD_SHAPES = [(2, 320, 64, 64), (2, 640, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 1920, 16, 16),
             (2, 1280, 8, 8), (2, 2560, 8, 8)]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", SD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_group_norm_launches_fill_a_big_gpu(shape, channels_last):
    """Issue item 11: the first kernel ran one program per (image, group), 64 for a CFG image on 132 SMs, each
    walking its whole group twice. The statistics and the apply pass now run on a full grid (the per-group merge is
    a tiny launch): at least 2 programs per SM of an H100/H200 at every SD size, each with at most 4096 elements."""
    from gbsd_core.fast.kernels.triton_kernels import plan_group_norm

    plan = plan_group_norm(shape, 32, channels_last)
    programs = math.prod(plan.stats_grid)
    assert plan.apply_grid == plan.stats_grid and programs >= 2 * 132, plan
    assert plan.block * plan.block_c <= 4096 and plan.finalize_grid == (shape[0] * 32,)
    assert programs * plan.block * plan.block_c >= math.prod(shape)  # the tiles cover the tensor (tails masked)


if __name__ == "__main__":
    _interpreter_main()
