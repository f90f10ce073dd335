"""`python -m bench`: time our SD sampler against diffusers on identical random weights. See bench/README.md.

    python -m bench --arch sd15 --device cuda --dtype fp16 --size 512 --batch 1,4,8 --steps 50 \
        --configs eager,fast,graphs,graphs+compile,diffusers,diffusers+compile --json out.json
    python -m bench --tiny --steps 3 --size 64          # the smoke test's size
    python -m bench --arch sdxl --device cuda --dtype fp16 --size 1024 --steps 20 \
        --configs fast,graphs,graphs+compile,diffusers,diffusers+compile
    python -m bench --samplers ddim,euler,euler_a,dpmpp_2m --configs eager,fast --parts loop --steps 20
    python -m bench few-step --size 256 --steps 1,2,4,8 --batch 1,2   # images/s end to end (bench/few_step.py)
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import torch

from . import arg_types
from .arg_types import DTYPES
from .flops import step_flops
from .interleave import run_interleaved
from .presets import PRESETS
from .report import add_ratios, environment, sweep_table, table, write
from .run import Settings, describe, run_config
from .samplers import SAMPLERS, samplers_table
from .schema import SCHEMA
from .sweep import run_sweep
from .timing import Clock

PARTS = ("step", "loop", "text", "vae", "e2e")  # measured in this order: step and loop first
NATIVE_SIZE = {"sd15": 512, "sd21": 768, "sdxl": 1024}  # the default --size of each --arch


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from gbsd_core.cli.common import Parser

    presets = "\n".join(f"  {p.name:<22} {p.recipe}" for p in PRESETS.values())
    ap = Parser(prog="python -m bench", description=__doc__.split("\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog=f"configurations (--configs):\n{presets}")
    ap.add_argument("--arch", choices=tuple(NATIVE_SIZE), default="sd15",
                    help="sd15, sd21 (768-v) or sdxl (SDXL 1.0 base, 2.6B UNet, CLIP-L + bigG)")
    ap.add_argument("--device", type=arg_types.device, default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", type=arg_types.dtypes, default=None, help="fp32 | fp16 | bf16, comma-separated for several "
                    "(default: fp16 on CUDA, fp32 on CPU)")
    ap.add_argument("--vae-dtype", choices=tuple(DTYPES), default=None,
                    help="VAE dtype for our fast configs (default: same as --dtype, as diffusers runs it)")
    ap.add_argument("--size", type=arg_types.int_list, default=None,
                    help="image side(s) in pixels, comma-separated, multiples of 8 (default: the arch's native 512 / 768 / 1024; tiny 64)")
    ap.add_argument("--steps", type=arg_types.field("steps", int), default=50, help="DDIM steps")
    ap.add_argument("--cfg", type=arg_types.field("cfg", float), default=7.5, help="guidance scale (CFG doubles the UNet batch)")
    ap.add_argument("--batch", type=arg_types.int_list, default=[1],
                    help="images per prompt, comma-separated (e.g. 1,4,8: where the GPU saturates; e2e at batch 1 "
                         "only)")
    ap.add_argument("--configs", default="eager,fast,diffusers",
                    help=f"comma-separated from: {', '.join(PRESETS)} (or 'none': only --sweep)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"what to time, from: {', '.join(PARTS)}")
    ap.add_argument("--interleave", action="store_true",
                    help="time the step of all --configs round-robin in one pass (needs --parts step; see "
                         "bench/interleave.py): ratios that hold while the machine's speed drifts")
    ap.add_argument("--repeat", type=arg_types.at_least(1), default=5, help="timed calls per measurement (median reported)")
    ap.add_argument("--warmup", type=arg_types.at_least(0), default=1, help="untimed calls before them (the first is reported)")
    ap.add_argument("--loop-repeat", type=arg_types.at_least(1), default=None,
                    help="timed full loops (default: --repeat // 2, >= 1)")
    ap.add_argument("--e2e-repeat", type=arg_types.at_least(0), default=None,
                    help="timed end-to-end calls after the first (default: --repeat // 2, >= 1; 0: the first only)")
    ap.add_argument("--threads", type=arg_types.at_least(1), default=None, help="torch.set_num_threads (default: all cores)")
    ap.add_argument("--cudnn-benchmark", choices=("off", "on"), default="off",
                    help="torch.backends.cudnn.benchmark for the whole run, ours and diffusers alike (off: torch's "
                         "default, cuDNN's heuristics pick each convolution's algorithm; on: the first call of each "
                         "shape times the candidates, which lands in warm-up). Set once per process: cuDNN caches "
                         "its choice per shape, so flipping it mid-run would not re-pick")
    ap.add_argument("--compile-mode", choices=COMPILE_MODES, default=None,
                    help="override the compile presets' torch.compile mode")
    ap.add_argument("--samplers", default=None, metavar="A,B,...",
                    help=f"our configurations also time the loop of each of these samplers, round-robin (from "
                         f"{', '.join(SAMPLERS)}; needs --parts loop)")
    ap.add_argument("--schedule", choices=("normal", "karras"), default="normal",
                    help="the σ samplers' schedule in --samplers (normal)")
    ap.add_argument("--sweep", default="none", help="configuration for the GBSD sweep cost, or 'none'")
    ap.add_argument("--sweep-k", type=arg_types.at_least(1), default=10, help="α values sharing the layout stage (10)")
    ap.add_argument("--sweep-layout", type=arg_types.field("layout", float), default=0.8,
                    help="the layout fraction: the share of steps in the shared layout stage (0.8)")
    ap.add_argument("--sweep-size", type=arg_types.at_least(8), default=None, help="default: --size")
    ap.add_argument("--sweep-steps", type=arg_types.field("steps", int), default=None, help="default: --steps")
    ap.add_argument("--sweep-independent", choices=("measure", "estimate"), default=None,
                    help="run the K independent runs (default on CUDA) or time one and multiply by K")
    ap.add_argument("--tiny", action="store_true", help="tiny models of the same structure (smoke test)")
    ap.add_argument("--seed", type=arg_types.field("seed", int), default=0)
    ap.add_argument("--json", type=arg_types.output, default=None,
                    help="write all results here (rewritten after each configuration)")
    ap.add_argument("--markdown", type=arg_types.output, default=None, help="write the table here too")
    args = ap.parse_args(argv)
    args.config_list = [] if args.configs == "none" else args.configs.split(",")
    unknown = [c for c in args.config_list if c not in PRESETS]
    if unknown:
        ap.error(f"unknown configuration(s) {unknown}; choose from {list(PRESETS)}")
    bad = [p for p in args.parts.split(",") if p not in PARTS]
    if bad:
        ap.error(f"unknown part(s) {bad}; choose from {list(PARTS)}")
    if args.interleave and args.parts != "step":
        ap.error("--interleave times only the step part: pass --parts step")
    if args.sweep != "none" and args.sweep not in PRESETS:
        ap.error(f"--sweep must be 'none' or one of {list(PRESETS)}")
    if args.sweep != "none" and PRESETS[args.sweep].impl != "ours":
        ap.error("--sweep runs GBSD, which only our pipeline has; pick one of our configurations")
    args.sampler_list = [] if args.samplers is None else args.samplers.split(",")
    if [n for n in args.sampler_list if n not in SAMPLERS] or args.samplers == "":
        ap.error(f"--samplers {args.samplers!r}: choose from {', '.join(SAMPLERS)}")
    if args.sampler_list and ("loop" not in args.parts.split(",") or args.interleave):
        ap.error("--samplers times whole loops: it needs 'loop' in --parts, and not --interleave")
    largest = 4 * NATIVE_SIZE[args.arch]  # gbsd's rule for the family: at most 4x its native side
    for flag, sizes in (("--size", args.size or []), ("--sweep-size", [args.sweep_size] if args.sweep_size else [])):
        if any(v % 8 for v in sizes):
            ap.error(f"{flag} must be multiples of 8 (the VAE downsamples by 8), got {sizes}")
        if any(v > largest for v in sizes):
            ap.error(f"{flag} {sizes}: at most {largest} for {args.arch} (4x its native side)")
    # every sampler timed must be able to run --steps (and the sweep's steps) on its own schedule
    from gbsd_core.params import GenerationParams, check_schedule

    for flag, steps in (("--steps", args.steps), ("--sweep-steps", args.sweep_steps)):
        for sampler in dict.fromkeys(["ddim", *args.sampler_list]) if steps is not None else ():
            try:
                check_schedule(GenerationParams("p", steps=steps, sampler=sampler,
                                                schedule=args.schedule if sampler != "ddim" else "normal"), False)
            except ValueError as e:
                ap.error(f"{flag} {steps}: {e}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Parse (bad input: one line, exit 2), then run. Ctrl-C, SIGTERM and SIGHUP end the run as the `gbsd` commands
    do: no temporary file left by the JSON writer, one line, exit 128 + the signal (130, 143, 129).
    `python -m bench few-step ...`: the few-step end-to-end benchmark (bench/few_step.py)."""
    import signal

    from gbsd_core.cli.common import Terminated, signals_as_interrupts

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["few-step"]:
        from . import few_step

        args = few_step.parse_args(argv[1:])
        run_it: Callable[[], int] = lambda: few_step.main(args)
    else:
        args = parse_args(argv)
        run_it = lambda: run(args)
    try:
        with signals_as_interrupts():
            return run_it()
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Terminated) else signal.SIGINT
        print(f"[bench] {signal.Signals(signum).name}: interrupted; --json holds what was measured so far",
              file=sys.stderr)
        return 128 + signum


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark == "on"  # before anything runs a convolution
    dtypes = (args.dtype or ("fp16" if device.type == "cuda" else "fp32")).split(",")
    sizes = args.size or [64 if args.tiny else NATIVE_SIZE[args.arch]]
    shapes = tuple((size, batch) for size in sizes for batch in args.batch)
    clock = Clock(device)
    env = environment(device)
    out: dict[str, Any] = {"schema": SCHEMA, "environment": env, "args": vars(args), "results": [], "sweep": None}
    # FLOPs per step: counted once per shape, on the meta device (bench/flops.py)
    flops = {(size, batch): step_flops(args.arch, args.tiny, size, batch, args.cfg) for size, batch in shapes}

    def flush() -> None:
        add_ratios(out["results"])
        write(args.json, out)
        if args.markdown:
            write(args.markdown, render(out))

    s = None
    for dt in dtypes:
        s = Settings(arch=args.arch, device=device, dtype=DTYPES[dt], size=shapes[0][0], steps=args.steps,
                     cfg=args.cfg, batch=shapes[0][1], repeat=args.repeat, warmup=args.warmup,
                     loop_repeat=args.loop_repeat or max(1, args.repeat // 2),
                     e2e_repeat=max(1, args.repeat // 2) if args.e2e_repeat is None else args.e2e_repeat,
                     tiny=args.tiny, seed=args.seed, compile_mode=args.compile_mode,
                     parts=tuple(p for p in PARTS if p in args.parts.split(",")),
                     vae_dtype=DTYPES[args.vae_dtype] if args.vae_dtype else None, shapes=shapes, flops=flops,
                     machine=env["machine"], gpu=env.get("gpu"), samplers=tuple(args.sampler_list),
                     schedule=args.schedule, cudnn_benchmark=args.cudnn_benchmark == "on")
        if args.interleave:
            for shape in s.each_shape():
                print(f"[bench] {','.join(args.config_list)} {dt} {shape.size}px batch {shape.batch} interleaved ...",
                      file=sys.stderr, flush=True)
                run_interleaved([PRESETS[n] for n in args.config_list], shape, clock, out["results"], flush)
            continue
        for name in args.config_list:
            print(f"[bench] {name} {dt} {args.arch}{' tiny' if args.tiny else ''} sizes {sizes} batches "
                  f"{args.batch} on {device} ...", file=sys.stderr, flush=True)
            recs: list[dict[str, Any]] = []
            for shape in s.each_shape():
                rec: dict[str, Any] = {}
                describe(PRESETS[name], shape, rec)
                recs.append(rec)
                out["results"].append(rec)  # in place, so each partial flush already holds it
            run_config(PRESETS[name], s, clock, recs, lambda _rec: flush())
            for rec in recs:
                if "error" in rec:
                    print(f"[bench] {name} {rec['size']}px batch {rec['batch']}: {rec['error']}", file=sys.stderr,
                          flush=True)
            flush()
    if args.sweep != "none" and s is not None:
        print(f"[bench] GBSD sweep with {args.sweep} ...", file=sys.stderr, flush=True)

        def flush_sweep(rec: dict[str, Any]) -> None:  # after each measurement: a run cut short keeps them
            out["sweep"] = rec
            flush()

        run_sweep(PRESETS[args.sweep], s, clock, k=args.sweep_k, layout=args.sweep_layout,
                  size=args.sweep_size or sizes[0], steps=args.sweep_steps or args.steps,
                  independent=args.sweep_independent or ("measure" if device.type == "cuda" else "estimate"),
                  flush=flush_sweep)
    out["environment"]["load_average_end"] = environment(device)["load_average"]
    flush()
    print(render(out))
    return 1 if all("error" in r for r in out["results"] if "skipped" not in r) and out["results"] else 0


def render(out: dict[str, Any]) -> str:
    """The header line(s), the table (and recipes), the sweep; runs of several machines get a side-by-side table."""
    from .report import compare_table

    sources = out.get("sources") or [{"environment": out["environment"], "args": out["args"]}]
    heads = []
    for src in sources:
        env, a = src["environment"], src["args"]
        where = env.get("gpu") or f"{env['cpu']} ({env['torch_threads']} threads)"
        versions = f"torch {env['torch']}, triton {env.get('triton')}, diffusers {env.get('diffusers')}" + (
            f", CUDA {env.get('cuda')}, driver {env.get('driver')}, cudnn.benchmark "
            f"{'on' if env.get('cudnn_benchmark') else 'off'}" if env.get("gpu") else "")
        heads.append(f"{a['arch']}{' (tiny)' if a['tiny'] else ''}, {where}, {versions}, {a['steps']} DDIM steps, "
                     f"CFG {a['cfg']}, load average {env['load_average']} -> {env.get('load_average_end')}, "
                     f"{env['date']}" + (", steps timed interleaved (round-robin over the configurations)"
                                          if a.get("interleave") else ""))
    parts = list(dict.fromkeys(heads)) + ["", table(out["results"])]
    if samplers_table(out["results"]):
        parts += ["", samplers_table(out["results"])]
    machines = list(dict.fromkeys(r.get("machine") for r in out["results"] if r.get("machine")))
    if len(machines) > 1:
        parts += ["", "Side by side:", "", compare_table(out["results"], machines)]
    if out.get("sweep"):
        parts += ["", sweep_table(out["sweep"])]
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
