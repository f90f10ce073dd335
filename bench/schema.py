"""The JSON a `python -m bench` run writes: a stable, versioned schema (documented field by field in
bench/README.md, and a test checks both ways that every field a run writes is listed here and every field listed
here is documented there), and `derive`, which turns the raw timings into the table's figures.

    {"schema": SCHEMA, "environment": {ENVIRONMENT_FIELDS}, "args": {the command line}, "results": [record, ...],
     "sweep": {...} or null}
    python -m bench.merge adds "sources": [{"path", "environment", "args"}, ...], one per input file.

Fields are only ever added (with a new SCHEMA minor version); a record leaves out what it did not measure.
"""
from __future__ import annotations

from typing import Any

from .peaks import peak_for

SCHEMA = "gbsd-bench/2.2"  # 2.1: "samplers"; 2.2: "cudnn_benchmark"

ENVIRONMENT_FIELDS = {
    "date": "local time the run started",
    "host": "host name",
    "machine": "what the figures were measured on: the GPU's name, else the CPU's (merge groups runs by it)",
    "python": "Python version",
    "torch": "torch.__version__",
    "triton": "triton.__version__ (null if not importable)",
    "diffusers": "diffusers.__version__ (null if not importable)",
    "cuda": "CUDA version torch was built with (GPU runs)",
    "cudnn": "cuDNN version (GPU runs)",
    "driver": "NVIDIA driver version, from NVML or nvidia-smi (GPU runs)",
    "gpu": "torch.cuda.get_device_name (GPU runs)",
    "gpu_count": "visible CUDA devices (GPU runs)",
    "gpu_sm_count": "streaming multiprocessors (GPU runs)",
    "gpu_capability": "compute capability, e.g. '9.0' (GPU runs)",
    "gpu_memory_gb": "total device memory, GiB (GPU runs)",
    "cpu": "CPU model name",
    "cpu_count": "logical CPUs",
    "torch_threads": "torch.get_num_threads() during the run",
    "cudnn_benchmark": "torch.backends.cudnn.benchmark during the run (--cudnn-benchmark; ours and diffusers alike)",
    "load_average": "1/5/15-minute load average at the start",
    "load_average_end": "the same at the end",
}

RECORD_FIELDS = {
    # what ran
    "config": "configuration name (bench/presets.py)",
    "impl": "'ours' or 'diffusers'",
    "recipe": "what the configuration runs, in words",
    "machine": "environment.machine of the run that measured it",
    "source": "merged files only: index into the top-level 'sources' list of the file the record came from",
    "arch": "'sd15', 'sd21' or 'sdxl'",
    "tiny": "tiny stand-in models (smoke runs)",
    "device": "torch device",
    "dtype": "UNet (and text encoder) dtype",
    "vae_dtype": "VAE dtype the decode ran in (after any automatic upcast)",
    "size": "image side in pixels (latent side = size / 8)",
    "batch": "images per prompt (CFG runs the UNet on 2 x batch rows)",
    "steps": "DDIM steps of the loop",
    "cfg": "guidance scale",
    "attention": "attention backend",
    "compile": "torch.compile mode, or null",
    "cuda_graphs": "whether the step replays a CUDA graph (ours, or inductor's in diffusers' reduce-overhead/max)",
    "fast_options": "our FastOptions fields, or null",
    "cudnn_benchmark": "torch.backends.cudnn.benchmark during the run (the table marks the config '[cudnn.benchmark]')",
    "complete": "false if the configuration was cut short (timeout) or failed",
    "skipped": "why it did not run here (e.g. 'needs CUDA')",
    "error": "the exception that stopped it",
    # raw timings (seconds)
    "params": "parameter counts {unet, vae, text_encoder}",
    "build_s": "building the models (and twins, compile wrappers), seconds",
    "step": "one CFG step: {first_s (warm-up: compile, capture), median_s, runs_s[, interleaved]}",
    "loop": "the whole denoise loop: {first_s, median_s, runs_s}",
    "text": "the two text-encoder calls of a CFG run: {first_s, median_s, runs_s}",
    "vae": "VAE decode of the final latents: {first_s, median_s, runs_s}",
    "e2e": "prompt to PIL image (batch 1 only): {first_s, median_s, runs_s}",
    "compile_mode": "diffusers: the torch.compile mode it used",
    "samplers": "ours, --samplers: {sampler: {first_s, median_s, runs_s, schedule, loop_it_s, step_ms, x_ddim}}, the "
                "loop of each sampler timed round-robin; x_ddim = its time per step / DDIM's (bench/samplers.py)",
    # derived (derive())
    "step_ms": "median step, ms",
    "warmup_s": "the first step, s (compilation and CUDA-graph capture land here)",
    "loop_s": "median loop, s",
    "loop_it_s": "loop steps per second (steps / loop_s)",
    "images_s": "images per second of the denoise loop (batch x it/s / steps; text and VAE not included)",
    "images_s_from": "'loop' when the loop was timed, else 'step' (batch / (steps x step time))",
    "text_ms": "median text encoding, ms",
    "vae_ms": "median VAE decode, ms",
    "e2e_s": "median end to end, s",
    "peak_gb": "peak GPU memory PyTorch allocated (CPU: process peak RSS), GiB",
    "flops_per_step": "model FLOPs of one CFG step at this shape (bench/flops.py, FlopCounterMode)",
    "tflops": "achieved TFLOP/s: flops_per_step / median step time",
    "peak_tflops": "dense fp16/bf16 tensor peak of this GPU (bench/peaks.py), when known",
    "peak_source": "where peak_tflops comes from",
    "pct_peak": "tflops as a percentage of peak_tflops",
    "step_vs_diffusers": "diffusers eager step time / this step time, same machine, dtype, size and batch (> 1: faster)",
    "loop_vs_diffusers": "this loop's it/s / diffusers eager's, same machine, dtype, size and batch",
    "loop_vs_diffusers_compile": "this loop's it/s / diffusers+compile's, same machine, dtype, size and batch",
}


def derive(rec: dict[str, Any], gpu: str | None) -> None:
    """Fill the derived fields from the raw timings (and the GPU's name, for % of peak)."""
    steps, batch = rec.get("steps"), rec.get("batch")
    if "step" in rec:
        rec["step_ms"] = rec["step"]["median_s"] * 1e3
        rec["warmup_s"] = rec["step"]["first_s"]
        if rec.get("flops_per_step") and rec["step"]["median_s"] > 0:
            rec["tflops"] = rec["flops_per_step"] / rec["step"]["median_s"] / 1e12
            peak = peak_for(gpu, rec.get("dtype", "")) if str(rec.get("device", "")).startswith("cuda") else None
            if peak is not None:
                rec["peak_tflops"], rec["peak_source"] = peak.tflops, peak.source
                rec["pct_peak"] = 100.0 * rec["tflops"] / peak.tflops
    if rec.get("loop") and rec["loop"].get("median_s"):
        rec["loop_s"] = rec["loop"]["median_s"]
        rec["loop_it_s"] = steps / rec["loop_s"]
    if steps and batch:
        if rec.get("loop_it_s"):
            rec["images_s"], rec["images_s_from"] = batch * rec["loop_it_s"] / steps, "loop"
        elif rec.get("step_ms"):
            rec["images_s"], rec["images_s_from"] = batch / (steps * rec["step_ms"] / 1e3), "step"
    for part in ("text", "vae"):
        if part in rec:
            rec[f"{part}_ms"] = rec[part]["median_s"] * 1e3
    if "e2e" in rec:
        rec["e2e_s"] = rec["e2e"]["median_s"]
