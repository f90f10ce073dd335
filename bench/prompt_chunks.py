"""`python -m bench.prompt_chunks`: what a long prompt costs per UNet step -- one CFG step with a context of 77·k
positions (a prompt of k 75-token chunks, gbsd_core/prompts/) against 77, on a full-size model with seeded random
weights (bench/models.py).

What grows with k: every cross-attention (attn2) reads 77·k keys and values instead of 77. The plain step
(`sampling.CFGStep`) projects the context to K and V at every step (to_k / to_v: [2B, 77·k, 768] @ [768, C]) and
attends over it; the fast step (`gbsd_core.fast`, K/V cached per stage) projects once per stage, so per step only the
scores q·kᵀ and the weighted sum grow: 2·(2B)·Nq·(77·k)·C multiply-adds per attn2 layer. Nothing else in the UNet
sees the context. The estimate printed beside the timing counts those FLOPs for the model's attn2 layers at the size.

Two measurements per configuration (plain, fast), each round-robin over the chunk counts (k = 1, k = 3, ..., then
again) after one warm-up, so a drifting shared machine moves them alike:

- `step`: the whole CFG step -- the UNet on [x; x] with [uncond; cond] of the same length (a run's contexts are
  brought to one length, prompts/chunks.py) and the DDIM update; median of `--repeat` rounds, and the median of the
  per-round ratios to k = 1 (`x_first`).
- `attn2`: what changes, alone: every cross-attention module of the UNet called on the input it gets in the step
  (captured once) and the k-chunk context, timed call by call and summed per round (the fast path's K/V are cached
  for the context first, outside the timing, as once per stage); median of `--attn-repeat` rounds. Its extra time
  over k = 1, divided by the step's median time, is the per-step cost of the longer prompt (`attn2_extra_of_step`),
  a small difference measured where it happens instead of read off two noisy 10-second steps.

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

from gbsd_core.attention_sites import attention_sites
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
    for site in attention_sites(unet, cross=True):
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


def attn2_times(unet: UNetModel, step, x: torch.Tensor, contexts: dict[int, torch.Tensor],
                vector: torch.Tensor | None, repeat: int, cached: bool) -> dict[int, list[float]]:
    """Seconds the UNet's cross-attention modules take per step, summed, for each chunk count (module docstring)."""
    from gbsd_core.fast.attention import set_context_kv

    sites = list(attention_sites(unet, cross=True))
    inputs: dict[str, torch.Tensor] = {}
    def keep(name: str):
        def pre_hook(module: torch.nn.Module, args: tuple) -> None:  # returns None: the call goes on unchanged
            inputs.setdefault(name, args[0].clone())
        return pre_hook

    hooks = [s.module.register_forward_pre_hook(keep(s.name)) for s in sites]
    first = contexts[next(iter(contexts))]
    if vector is None:
        step.set_context(first)
    else:
        step.set_context(first, vector)
    with torch.inference_mode():
        step.step(x, 0, None, None)  # one step, to see each attn2's input
    for h in hooks:
        h.remove()
    times: dict[int, list[float]] = {k: [] for k in contexts}
    dtype = next(unet.parameters()).dtype
    with torch.inference_mode():
        for round_ in range(repeat + 1):
            for k, ctx in contexts.items():
                ctx = ctx.to(dtype)
                if cached:
                    set_context_kv(unet, ctx)
                total = 0.0
                for site in sites:
                    t0 = time.perf_counter()
                    site.module(inputs[site.name], ctx)
                    total += time.perf_counter() - t0
                if round_:
                    times[k].append(total)
        if cached:
            set_context_kv(unet, None)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.prompt_chunks", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="sd15", choices=("sd15", "sd21", "sdxl"))
    p.add_argument("--tiny", action="store_true", help="the tiny stand-in (a smoke run)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels (512: a 64x64 latent)")
    p.add_argument("--chunks", default="1,3", help="chunk counts k, context 77·k (1,3)")
    p.add_argument("--repeat", type=int, default=3, help="timed rounds of the whole step after the warm-up (3)")
    p.add_argument("--attn-repeat", type=int, default=20, help="timed rounds of the cross-attention alone (20)")
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
    sampler = make_sampler(bundle.noise_schedule, bundle.family.prediction_type)
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
            step.sampler.timesteps(50)
        else:
            raise SystemExit(f"unknown config {config!r}")
        times = time_steps(step, x, contexts, vector, args.repeat)
        attn = attn2_times(unet, step, x, contexts, vector, args.attn_repeat, cached=config == "fast")
        k1 = chunks[0]
        one, attn_one = statistics.median(times[k1]), statistics.median(attn[k1])
        rows = {}
        for k in chunks:
            med = statistics.median(times[k])
            paired = statistics.median(b / a for a, b in zip(times[k1], times[k]))
            extra = attn2_flops(unet, args.size, k) - attn2_flops(unet, args.size, k1)
            attn_med = statistics.median(attn[k])
            rows[k] = {"median_s": med, "runs_s": times[k], "x_first": paired, "attn2_median_s": attn_med,
                       "attn2_runs_s": attn[k], "attn2_extra_of_step": (attn_med - attn_one) / one,
                       "attn2_extra_gflop": extra / 1e9}
            print(f"  {config:5s} k={k} ({77 * k:4d} positions): step {med * 1e3:9.1f} ms (x{paired:.3f} paired), "
                  f"cross-attention {attn_med * 1e3:8.1f} ms = step +{(attn_med - attn_one) / one * 100:.2f} %"
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
