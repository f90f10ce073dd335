"""The named configurations of `python -m bench` (`--configs`), each a labelled recipe.

Ours are `gbsd_core.fast.FastOptions` (dtype and vae_dtype come from the command line); diffusers' follow its own
documentation, so the baseline is what a careful diffusers user runs. diffusers' "Accelerate inference" page
(docs/source/en/optimization/fp16.md) gives the recipe: set inductor's `conv_1x1_as_mm`, `coordinate_descent_tuning`,
`coordinate_descent_check_all_directions` and clear `epilogue_fusion`; UNet and VAE channels-last;
`torch.compile(pipeline.unet, mode="max-autotune", fullgraph=True)` and `pipeline.vae.decode` likewise; and, in
its "Fused projection matrices" section, `pipeline.fuse_qkv_projections()`.

- `diffusers+compile-max`: that recipe in full. Its cold compile (max-autotune benchmarks GEMM/conv choices) takes
  minutes on an SD1.5 UNet.
- `diffusers+compile`: the same without the autotuning: `fuse_qkv_projections()`, UNet and VAE channels-last,
  `torch.compile(pipeline.unet, mode="reduce-overhead", fullgraph=True)` (inductor's CUDA graphs without the
  search, the mode of diffusers' PyTorch 2.0 page and of the regional-compilation example on the same page);
  "default" on CPU, where reduce-overhead means nothing.

Ours with and without our CUDA graph (`graphs*`), compiled or not, so each comparison is labelled: `graphs+compile`
(our graph around the compiled step) against `diffusers+compile` (inductor's graphs around the compiled UNet).

`fast-nchw` / `graphs-nchw`: the eager fast paths without channels-last, measured rather than assumed. cuDNN's
convolutions prefer NHWC in half precision, but ATen's CUDA GroupNorm has no channels-last kernel: it copies a
channels-last input to NCHW at each of the UNet's ~61 norms. Which way wins on a given GPU is a measurement (under
torch.compile inductor generates its own norms, so the compiled configurations keep channels-last).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# diffusers' docs (optimization/fp16.md) set these inductor options globally before compiling; passed per compiled
# function here (torch.compile(options=...)), so they never leak into our configurations.
TUTORIAL_INDUCTOR_OPTIONS = (("conv_1x1_as_mm", True), ("coordinate_descent_tuning", True),
                             ("epilogue_fusion", False), ("coordinate_descent_check_all_directions", True))


@dataclass(frozen=True)
class Preset:
    """A named configuration. `fast` holds FastOptions fields (None: the plain readable path); `compile` is a
    torch.compile mode ("" = none); `recipe` says exactly what runs (printed under the table)."""

    name: str
    impl: str  # "ours" | "diffusers"
    fast: dict[str, Any] | None = None
    compile: str = ""
    cuda_only: bool = False
    recipe: str = ""
    full_recipe: bool = False  # diffusers: the docs' inductor options, and vae.decode compiled too


_FAST = dict(channels_last=True, fuse_qkv=True, cache_context_kv=True)
_FAST_DOC = "FastOptions(channels_last, fuse_qkv, cache_context_kv), CPU: oneDNN prepacking"
PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("eager", "ours", None, recipe="ours, the plain readable path (sampling.CFGStep), modules in --dtype, SDPA"),
    Preset("fast", "ours", dict(_FAST), recipe=f"ours, {_FAST_DOC}"),
    Preset("fast-noprepack", "ours", dict(_FAST, cpu_prepack=False),
           recipe="ours, fast without the CPU weight prepacking (what prepacking adds)"),
    Preset("fast-nchw", "ours", dict(_FAST, channels_last=False),
           recipe="ours, fast without channels-last (NCHW; what channels-last adds or costs)"),
    Preset("fast+triton", "ours", dict(_FAST, triton=True), cuda_only=True,
           recipe="ours, fast + the Triton GroupNorm+SiLU / GEGLU kernels (opt-in until measured faster than ATen)"),
    Preset("fast+compile", "ours", dict(_FAST, compile="default"), compile="default",
           recipe="ours, fast + torch.compile(step, fullgraph), mode default: no CUDA graph"),
    Preset("fast+compile-max", "ours", dict(_FAST, compile="max-autotune"), compile="max-autotune",
           recipe="ours, fast + torch.compile(step, mode='max-autotune'): inductor's CUDA graphs (long compile)"),
    Preset("graphs", "ours", dict(_FAST, cuda_graphs=True), cuda_only=True,
           recipe="ours, fast + the whole eager CFG+DDIM step captured in our CUDA graph"),
    Preset("graphs-nchw", "ours", dict(_FAST, channels_last=False, cuda_graphs=True), cuda_only=True,
           recipe="ours, graphs without channels-last (NCHW)"),
    Preset("graphs+compile", "ours", dict(_FAST, compile="default", cuda_graphs=True), compile="default",
           cuda_only=True, recipe="ours, fast + torch.compile(step, mode default) captured in our CUDA graph"),
    Preset("graphs+compile-max", "ours", dict(_FAST, compile="max-autotune-no-cudagraphs", cuda_graphs=True),
           compile="max-autotune-no-cudagraphs", cuda_only=True,
           recipe="ours, fast + torch.compile(step, mode='max-autotune-no-cudagraphs') in our CUDA graph"),
    Preset("diffusers", "diffusers", recipe="diffusers 0.42 StableDiffusionPipeline (--arch sdxl: "
                                            "StableDiffusionXLPipeline), eager, SDPA"),
    Preset("diffusers+compile", "diffusers", compile="reduce-overhead",
           recipe="diffusers: fuse_qkv_projections(), UNet+VAE channels-last, torch.compile(unet, fullgraph), "
                  "mode reduce-overhead (inductor's CUDA graphs; CPU: default)"),
    Preset("diffusers+compile-max", "diffusers", compile="max-autotune", full_recipe=True,
           recipe="diffusers docs' recipe (optimization/fp16.md): fuse_qkv_projections(), UNet+VAE channels-last, "
                  "inductor conv_1x1_as_mm + coordinate descent tuning, no epilogue fusion, torch.compile(unet and "
                  "vae.decode, mode max-autotune, fullgraph)"),
]}


def fast_options_kwargs(preset: Preset, compile_override: str | None) -> dict[str, Any] | None:
    """The preset's FastOptions fields (without dtypes), the compile mode overridden where it compiles."""
    if preset.fast is None:
        return None
    kw = dict(preset.fast)
    if compile_override and kw.get("compile"):
        kw["compile"] = compile_override
    return kw


def compile_mode(preset: Preset, compile_override: str | None, device_type: str) -> str:
    """The torch.compile mode a preset runs ("" = none)."""
    mode = compile_override or preset.compile if preset.compile else ""
    if preset.impl == "diffusers" and mode == "reduce-overhead" and device_type != "cuda":
        mode = "default"  # reduce-overhead means CUDA graphs; on CPU it is the default mode plus warnings
    return mode
