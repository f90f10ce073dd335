"""What a LoRA costs: the merge (and the per-stage switch, the same merge), and the UNet step after it.

    python -m bench.lora merge --arch sdxl --dtype bf16 --rank 64        # load, place, merge, restore; peak RSS
    python -m bench.lora step --arch sd15 --dtype fp32 --size 256        # one CFG step before vs after a merge

`merge` builds the full-size UNet of `--arch` with seeded random weights (bench.models) and a synthetic kohya LoRA
of `--rank` on what kohya's SD/SDXL LoRA network adapts by default: every Linear of the transformer blocks (q, k, v,
out, the GEGLU MLP) and proj_in / proj_out, stored in fp16 as kohya saves them, alpha = rank / 2. It times
`load_lora` (read, checks, hashes), placing it on the model (`AppliedLoras`), the merge (entering the block: the CPU
backups are made, ΔW computed in fp32, written in place) and the restore (leaving it), `--repeat` times.

`step` times one classifier-free-guided DDIM step (UNet at batch 2) of the plain path and of the fast path (fp32
or bf16, weights prepacked on CPU) with no LoRA and with a LoRA merged, interleaved round by round (this shared VM
drifts by 10-40 % within minutes): merged weights are ordinary weights, so no difference is expected. The first
step after each change is a warm-up (the fast path repacks the changed weights then).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from gbsd_core.bundle import SDBundle
from gbsd_core.family import SD1
from gbsd_core.lora import AppliedLoras, load_lora

from .models import ARCHS, build_bundle, build_unet

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1e6
    return float("nan")


def kohya_targets(unet: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """kohya's default LoRA targets (networks/lora.py: the modules inside Transformer2DModel)."""
    return [(n, tuple(m.weight.shape)) for n, m in unet.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
            and (".transformer_blocks." in n or n.endswith((".proj_in", ".proj_out")))]


def write_lora(unet: torch.nn.Module, rank: int, path: Path, seed: int = 0) -> int:
    """A kohya file on `unet`'s original (sgm) names, fp16; returns its module count."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {}
    targets = kohya_targets(unet)
    for name, (out, inp, *kernel) in targets:
        key = "lora_unet_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = (torch.randn(rank, inp, *kernel, generator=g) * 0.01).half()
        sd[f"{key}.lora_up.weight"] = (torch.randn(out, rank, *([1, 1] if kernel else []), generator=g) * 0.01).half()
        sd[f"{key}.alpha"] = torch.tensor(rank / 2.0, dtype=torch.float16)
    save_file(sd, str(path))
    return len(targets)


def bundle_of(unet: torch.nn.Module) -> SDBundle:
    return SDBundle(unet=unet, vae=None, text_encoder=None, tokenizer=None, family=SD1)


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def run_merge(args: argparse.Namespace) -> dict:
    dtype = DTYPES[args.dtype]
    unet = build_unet(args.arch, "cpu", dtype, tiny=args.tiny)
    params = sum(p.numel() for p in unet.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"rank{args.rank}.safetensors"
        modules = write_lora(unet, args.rank, path)
        size_mb = path.stat().st_size / 1e6
        load_s, lora = timed(lambda: load_lora(path))
        bundle = bundle_of(unet)
        rounds = []
        for _ in range(args.repeat):
            place_s, applied = timed(lambda: AppliedLoras(bundle, [(lora, 1.0)]))
            merge_s, _ = timed(applied.__enter__)
            restore_s, _ = timed(lambda: applied.__exit__(None, None, None))
            rounds.append({"place_s": place_s, "merge_s": merge_s, "restore_s": restore_s,
                           "written": applied.report.written})
    adapted = sum(unet.get_submodule(n).weight.numel() for n, _ in kohya_targets(unet))
    return {"what": "merge", "arch": args.arch, "dtype": args.dtype, "rank": args.rank, "unet_params": params,
            "lora_modules": modules, "lora_file_mb": size_mb, "adapted_params": adapted, "load_s": load_s,
            "rounds": rounds, "peak_rss_gb": peak_rss_gb()}


def run_step(args: argparse.Namespace) -> dict:
    from gbsd_core.fast import FastOptions, make_stepper
    from gbsd_core.samplers import make_sampler
    from gbsd_core.sampling import CFGStep

    dtype = DTYPES[args.dtype]
    bundle = build_bundle(args.arch, "cpu", dtype, tiny=args.tiny)  # the fast path accelerates the VAE too
    unet = bundle.unet
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lora.safetensors"
        write_lora(unet, args.rank, path)
        lora = load_lora(path)
    side = args.size // 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, side, side, generator=g)
    config = unet.config
    ctx = torch.randn(2, 77, config.context_dim, generator=g).to(dtype)
    vector = None if not config.adm_in_channels else torch.randn(2, config.adm_in_channels, generator=g).to(dtype)
    if args.path == "fast":
        step = make_stepper(bundle, FastOptions(dtype=dtype, channels_last=True, fuse_qkv=True), 7.5)
    else:
        step = CFGStep(unet, make_sampler(bundle.noise_schedule, bundle.family.prediction_type), 7.5)
    step.sampler.timesteps(args.steps)
    step.set_context(ctx, vector) if vector is not None else step.set_context(ctx)
    applied = AppliedLoras(bundle, [(lora, 1.0)])
    times: dict[str, list[float]] = {"plain weights": [], "LoRA merged": []}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for state in times:
                applied.__enter__() if state == "LoRA merged" else applied.__exit__(None, None, None)
                step.step(x, 0, None, None)  # warm-up: the fast path repacks changed weights here
                for i in range(args.calls):
                    t = time.perf_counter()
                    step.step(x, i % args.steps, None, None)
                    times[state].append(time.perf_counter() - t)
        applied.__exit__(None, None, None)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"what": "step", "arch": args.arch, "dtype": args.dtype, "path": args.path, "size": args.size,
            "rank": args.rank, "rounds": args.rounds, "calls": args.calls, "step_ms_median": med,
            "after_over_before": med["LoRA merged"] / med["plain weights"], "step_ms_all": times,
            "peak_rss_gb": peak_rss_gb()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lora", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("merge", "step"))
    p.add_argument("--arch", choices=tuple(ARCHS), default="sdxl")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3, help="merge: merge / restore rounds")
    p.add_argument("--size", type=int, default=256, help="step: image side (latent = size / 8)")
    p.add_argument("--path", choices=("plain", "fast"), default="plain", help="step: CFGStep or the fast stepper")
    p.add_argument("--rounds", type=int, default=5, help="step: interleaved rounds")
    p.add_argument("--calls", type=int, default=3, help="step: timed steps per state and round")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="tiny stand-in models (a smoke run: seconds)")
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = (run_merge if args.what == "merge" else run_step)(args)
    result.update(tiny=args.tiny, cpu=cpu_model(), threads=args.threads, torch=torch.__version__, load_average=os.getloadavg(),
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    print(json.dumps({k: v for k, v in result.items() if k != "step_ms_all"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
