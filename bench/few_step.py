"""Few-step models end to end: images/s from prompt to PIL and the share of text encoder, UNet and VAE in it.

    python -m bench few-step --size 256 --steps 1,2,4,8 --batch 1 --threads 2 --json few.json
    python -m bench few-step --device cuda --dtype fp16 --size 512 --steps 1,4 --batch 1,4   # SD-Turbo at 512²

At 1–4 steps the text encoder and the VAE decode are a large part of an image, so the UNet loop's it/s stops being
the figure that matters; images/s end to end is (README "Few-step"). The model is SD-Turbo-shaped: SD 2.1's networks
(`bench.models`' "sd21": OpenCLIP-H text tower, 865M UNet, SD's VAE) with seeded random weights, run with its card's
recipe: Euler ancestral on the trailing spacing, guidance off (one UNet row per step). diffusers' own
StableDiffusionPipeline on the same tensors (`bench.reference`, the parity tests' twin) with
EulerAncestralDiscreteScheduler(timestep_spacing="trailing") and guidance_scale=0.0 does the same in the same run.

Per steps x batch, both sides are timed round-robin (ours, diffusers, ours, ...; this shared VM drifts within
minutes) after one untimed warm-up call each:

    e2e_s     one call making `batch` images from the prompt: ours `few_step_images` (generate's route at batch B:
              the prompt's and the negative prompt's conditioning as generate encodes them, denoise, decode_latents);
              diffusers `pipe(prompt, num_images_per_prompt=batch, guidance_scale=0.0, output_type="pil")`
    images_s  batch / median e2e_s
    text, unet, vae   seconds inside the text encoder's forward, the UNet's forwards (the loop's model calls) and
              the VAE's decode, from hooks on the same modules on both sides (each call synchronised on CUDA)
    other     e2e_s minus those three: tokenizer, sampler updates, noise, latents <-> PIL
    shares    each of text / unet / vae / other over e2e_s, medians of the per-call shares (they sum to ~1)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from gbsd_core.bundle import SDBundle
from gbsd_core.family import SD_TURBO
from gbsd_core.samplers import make_sampler
from gbsd_core.sampling import CFGStep, Stage, denoise

from . import arg_types
from .arg_types import DTYPES
from .models import build_bundle
from .report import environment

PROMPT = "a cinematic photo of a fox in the snow"
PARTS = ("text", "unet", "vae")


def few_step_images(bundle: SDBundle, steps: int, batch: int, size: int, seed: int) -> list[Image.Image]:
    """`batch` images of the prompt by `pipeline.generate`'s route with the turbo recipe (Euler a, trailing, cfg 0):
    generate makes one image; this is the same calls at B rows (tests/bench/test_few_step.py: at B = 1, generate's
    pixels)."""
    device = next(bundle.unet.parameters()).device
    with torch.inference_mode():
        # generate encodes the negative prompt even when guidance is off (pipeline._start); so does this, to time it
        bundle.conditioning("", (size, size), negative=True)
        cond = bundle.conditioning(PROMPT, (size, size)).map(lambda t: t.to(device, torch.float32))
        rows = cond.map(lambda t: t.expand(batch, *t.shape[1:]))
        sampler = make_sampler(bundle.noise_schedule, bundle.family.prediction_type, "euler_a", spacing="trailing")
        timesteps = sampler.timesteps(steps)
        generator = torch.Generator("cpu").manual_seed(seed)
        shape = bundle.limits().latent_shape(size, size)
        x_T = torch.randn((batch, *shape[1:]), generator=generator, dtype=torch.float32)
        latents = sampler.start_latents(x_T.to(device))
        step = CFGStep(bundle.unet, sampler, None)
        for state in denoise(step, latents, timesteps, [Stage("global", range(steps), rows)], generator=generator):
            latents = state.latents
        return bundle.decode_latents(latents)


def diffusers_images(pipe, steps: int, batch: int, size: int, seed: int) -> list[Image.Image]:
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=0.0, height=size, width=size,
                num_images_per_prompt=batch, generator=torch.Generator("cpu").manual_seed(seed),
                output_type="pil").images


class PartClock:
    """Seconds spent inside the text encoder's forward, the UNet's forwards and the VAE's decode during one call."""

    def __init__(self, text: torch.nn.Module, unet: torch.nn.Module, vae: torch.nn.Module, cuda: bool) -> None:
        self.modules = {"text": text, "unet": unet}
        self.vae = vae
        self.cuda = cuda
        self.seconds = dict.fromkeys(PARTS, 0.0)

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextmanager
    def attached(self) -> Iterator[PartClock]:
        starts: dict[str, float] = {}
        handles = []
        for name, module in self.modules.items():
            handles.append(module.register_forward_pre_hook(lambda _m, _a, n=name: starts.__setitem__(n, self._now())))
            handles.append(module.register_forward_hook(
                lambda _m, _a, _o, n=name: self.seconds.__setitem__(n, self.seconds[n] + self._now() - starts[n])))
        decode = self.vae.decode

        def timed_decode(*args: Any, **kwargs: Any) -> Any:  # decode is a method, not forward: wrapped on the instance
            t = self._now()
            out = decode(*args, **kwargs)
            self.seconds["vae"] += self._now() - t
            return out

        self.vae.decode = timed_decode
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            del self.vae.decode  # the class' method again

    def call(self, fn: Callable[[], Any]) -> dict[str, float]:
        """One timed call: e2e_s and the parts' seconds."""
        self.seconds = dict.fromkeys(PARTS, 0.0)
        with self.attached():
            t = self._now()
            fn()
            e2e = self._now() - t
        return {"e2e_s": e2e, **{f"{p}_s": self.seconds[p] for p in PARTS},
                "other_s": e2e - sum(self.seconds.values())}


def summarise(calls: list[dict[str, float]], batch: int) -> dict[str, Any]:
    e2e = statistics.median(c["e2e_s"] for c in calls)
    shares = {p: statistics.median(c[f"{p}_s"] / c["e2e_s"] for c in calls) for p in (*PARTS, "other")}
    return {"e2e_s": e2e, "images_s": batch / e2e, "shares": shares, "calls": calls}


def build(args: argparse.Namespace, tmp: Path):
    """(our bundle, diffusers' pipeline on the same tensors), SD-Turbo-shaped."""
    from diffusers import EulerAncestralDiscreteScheduler

    from .reference import diffusers_sd_pipeline

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    bundle = replace(build_bundle("sd21", device, dtype, tiny=args.tiny, seed=args.seed), family=SD_TURBO)
    pipe = diffusers_sd_pipeline(bundle, tmp, share=True, attn_implementation="sdpa")
    # SD-Turbo's shipped scheduler: SD's scaled-linear betas, the trailing spacing (README "Few-step")
    pipe.scheduler = EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                     num_train_timesteps=1000, prediction_type="epsilon",
                                                     steps_offset=1, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)
    return bundle, pipe


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads) if args.threads else None
    out: dict[str, Any] = {"what": "few-step end to end", "model": "SD-Turbo-shaped (SD 2.1 networks, seeded random "
                           "weights)" + (", tiny" if args.tiny else ""), "recipe": "Euler a, trailing, guidance off",
                           "args": vars(args), "environment": environment(torch.device(args.device)), "results": []}
    with tempfile.TemporaryDirectory(prefix="gbsd-bench-") as tmp:
        bundle, pipe = build(args, Path(tmp))
    cuda = args.device.startswith("cuda")
    sides = {"ours": (PartClock(bundle.text_encoder, bundle.unet, bundle.vae, cuda),
                      lambda n, b: few_step_images(bundle, n, b, args.size, args.seed)),
             "diffusers": (PartClock(pipe.text_encoder, pipe.unet, pipe.vae, cuda),
                           lambda n, b: diffusers_images(pipe, n, b, args.size, args.seed))}
    with torch.inference_mode():
        for batch in args.batch:
            for n in args.steps:
                print(f"[bench] few-step {n} steps batch {batch} {args.size}px ...", file=sys.stderr, flush=True)
                calls: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
                for side, (clock, make) in sides.items():
                    clock.call(lambda: make(n, batch))  # warm-up
                for _ in range(args.repeat):  # round-robin: drift hits both sides alike
                    for side, (clock, make) in sides.items():
                        calls[side].append(clock.call(lambda: make(n, batch)))
                for side in sides:
                    out["results"].append({"impl": side, "steps": n, "batch": batch, "size": args.size,
                                           **summarise(calls[side], batch)})
                if args.json:
                    Path(args.json).write_text(json.dumps(out, indent=1))
    out["environment"]["load_average_end"] = environment(torch.device(args.device))["load_average"]
    return out


def table(out: dict[str, Any]) -> str:
    rows = ["| steps | batch | impl | images/s | e2e s | text | UNet | VAE | other |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in out["results"]:
        s = r["shares"]
        rows.append(f"| {r['steps']} | {r['batch']} | {r['impl']} | {r['images_s']:.3f} | {r['e2e_s']:.3f} | "
                    f"{s['text']:.0%} | {s['unet']:.0%} | {s['vae']:.0%} | {s['other']:.0%} |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from gbsd_core.cli.common import Parser



    ap = Parser(prog="python -m bench few-step", description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=arg_types.int_list, default=[1, 2, 4, 8], help="step counts, comma-separated (1,2,4,8)")
    ap.add_argument("--batch", type=arg_types.int_list, default=[1], help="images per call, comma-separated (1)")
    ap.add_argument("--size", type=arg_types.at_least(8), default=512, help="image side in pixels (512; tiny: 64)")
    ap.add_argument("--device", type=arg_types.device, default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    ap.add_argument("--repeat", type=arg_types.at_least(1), default=3, help="timed calls per side and shape (median)")
    ap.add_argument("--threads", type=arg_types.at_least(1), default=None, help="torch.set_num_threads")
    ap.add_argument("--seed", type=arg_types.at_least(0), default=0)
    ap.add_argument("--tiny", action="store_true", help="tiny models of the same structure (smoke test)")
    ap.add_argument("--json", type=arg_types.output, default=None, help="write the results here (after each shape)")
    args = ap.parse_args(argv)
    if args.size % 8:
        ap.error(f"--size must be a multiple of 8 (the VAE downsamples by 8), got {args.size}")
    if any(n > 1000 for n in args.steps):
        ap.error(f"--steps {args.steps}: at most 1000")
    args.dtype = args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")
    return args


def main(args: argparse.Namespace) -> int:
    """Run parsed arguments (`python -m bench few-step`: bench/__main__.py parses, and handles the signals)."""
    out = run(args)
    env = out["environment"]
    print(f"{out['model']}, {out['recipe']}, {args.size}², {args.dtype}, "
          f"{env.get('gpu') or env['cpu']} ({env['torch_threads']} threads), torch {env['torch']}, diffusers "
          f"{env['diffusers']}, load average {env['load_average']} -> {env['load_average_end']}")
    print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args(sys.argv[1:])))
