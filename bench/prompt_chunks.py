"""`python -m bench.prompt_chunks`: what a long prompt costs per UNet step -- one CFG step with a context of 77·k
positions (a prompt of k 75-token chunks, gbsd_core/prompts/) against 77, on a full-size model with seeded random
weights (bench/models.py).

What grows with k: every cross-attention (attn2) reads 77·k keys and values instead of 77. The plain step
(`sampling.CFGStep`) projects the context to K and V at every step (to_k / to_v: [2B, 77·k, 768] @ [768, C]) and
attends over it; the fast step (`gbsd_core.fast`, K/V cached per stage) projects once per stage, so per step only the
scores q·kᵀ and the weighted sum grow: 2·(2B)·Nq·(77·k)·C multiply-adds per attn2 layer. Nothing else in the UNet
sees the context. The estimate printed beside the timing counts those FLOPs for the model's attn2 layers at the size.

Each configuration (plain, fast) is timed round-robin over the chunk counts (step with k = 1, with k = 3, ..., then
again), medians of `--repeat` rounds after one warm-up, so a drifting shared machine moves them alike. The step is the
whole CFG step: the UNet on [x; x] with [uncond; cond] of the same length (a run's contexts are brought to one
length, prompts/chunks.py) and the DDIM update.

    python -m bench.prompt_chunks --arch sd15 --size 512 --chunks 1,3 --threads 2 --repeat 3
    python -m bench.prompt_chunks --tiny --size 64 --chunks 1,3 --repeat 2      # seconds: a smoke run
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from gbsd_core.fast import FastOptions, make_stepper
from gbsd_core.samplers import make_sampler
from gbsd_core.sampling import CFGStep
from gbsd_core.unet import UNetModel

from .models import build_bundle


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def attn2_flops(unet: UNetModel, size: int, chunks: int, batch: int = 2) -> float:
    """FLOPs of the attention products (q·kᵀ and the weighted sum over values) of every cross-attention in one UNet
    call on `batch` rows of a size x size image: 2 products x 2 FLOPs per multiply-add x rows x Nq x Nk x inner width."""
    total = 0.0
    latent = size // 8
    for site in unet.attention_sites(cross=True):
        nq = (latent // site.ds) ** 2
        inner = site.module.heads * site.module.dim_head
        total += 2 * 2 * batch * nq * 77 * chunks * inner
    return total


def time_steps(step, x: torch.Tensor, contexts: dict[int, torch.Tensor], vector: torch.Tensor | None,
               repeat: int) -> dict[int, list[float]]:
    """Seconds of one CFG step per chunk count, round-robin: all counts once (warm-up), then `repeat` rounds."""
    times: dict[int, list[float]] = {k: [] for k in contexts}
    for round_ in range(repeat + 1):
        for k, ctx in contexts.items():
            if vector is None:
                step.set_context(ctx)
            else:  # SDXL: the vector y as well
                step.set_context(ctx, vector)
            t0 = time.perf_counter()
            with torch.inference_mode():
                step.step(x, 0, None, None)
            if round_:
                times[k].append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.prompt_chunks", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="sd15", choices=("sd15", "sd21", "sdxl"))
    p.add_argument("--tiny", action="store_true", help="the tiny stand-in (a smoke run)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels (512: a 64x64 latent)")
    p.add_argument("--chunks", default="1,3", help="chunk counts k, context 77·k (1,3)")
    p.add_argument("--repeat", type=int, default=3, help="timed rounds after the warm-up (3)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    p.add_argument("--configs", default="plain,fast", help="plain (CFGStep), fast (K/V cached per stage)")
    p.add_argument("--json", help="write the numbers here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    chunks = [int(c) for c in args.chunks.split(",")]
    bundle = build_bundle(args.arch, tiny=args.tiny)
    unet = bundle.unet
    width = unet.config.context_dim
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, args.size // 8, args.size // 8, generator=g)
    base = torch.randn(2, 77, width, generator=g)  # [uncond; cond], 77 positions
    contexts = {k: base.repeat(1, k, 1) for k in chunks}  # any values do: the cost depends on the length alone
    vector = None
    if unet.config.adm_in_channels:  # SDXL's y
        vector = torch.randn(2, unet.config.adm_in_channels, generator=g)
    sampler = make_sampler(bundle.scheduler, "ddim", "normal")
    sampler.timesteps(50)
    record = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "arch": args.arch, "tiny": args.tiny,
              "size": args.size, "repeat": args.repeat, "torch": torch.__version__, "configs": {}}
    print(f"{args.arch}{' (tiny)' if args.tiny else ''}, {args.size}x{args.size}, CFG batch 2, fp32, "
          f"{record['threads']} threads, {record['cpu']}")
    for config in args.configs.split(","):
        if config == "plain":
            step = CFGStep(unet, sampler, 7.5)
        elif config == "fast":
            step = make_stepper(bundle, FastOptions(channels_last=True, fuse_qkv=True, cache_context_kv=True), 7.5)
            step.scheduler.timesteps(50)
        else:
            raise SystemExit(f"unknown config {config!r}")
        times = time_steps(step, x, contexts, vector, args.repeat)
        one = statistics.median(times[chunks[0]])
        rows = {}
        for k in chunks:
            med = statistics.median(times[k])
            extra = attn2_flops(unet, args.size, k) - attn2_flops(unet, args.size, chunks[0])
            rows[k] = {"median_s": med, "runs_s": times[k], "x_first": med / one, "attn2_extra_gflop": extra / 1e9}
            print(f"  {config:5s} k={k} ({77 * k:4d} positions): {med * 1e3:9.1f} ms/step  x{med / one:.3f}"
                  f"  (attention products +{extra / 1e9:.1f} GFLOP)")
        record["configs"][config] = rows
        if hasattr(step, "close"):
            step.close()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
