"""The `gbsd` command: one sub-command per module of this folder, dispatched by `main`.

    gbsd generate | img2img | sweep      generate.py     text/image to image, GBSD sweeps
    gbsd eval                            eval.py         GBSD vs plain SD sharpness table (pairs.py reads the pairs)
    gbsd grid                            grid.py         α × layout-fraction sheets
    gbsd rack                            rack.py         rack focus: pull focus between two objects (trace.py: --trace)
    gbsd download | info                 model_files.py  registry downloads (weights.py), checkpoint facts

Imports of torch and the model code happen inside the commands, so `gbsd --help` is instant. The error contract
(one line, exit 2, nothing written) is common.py's.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from .common import Parser, parse_or_exit, run_main


def build_parser() -> Parser:
    from .eval import add_eval_command  # argparse only; the work is imported on use
    from .generate import add_generate_commands
    from .grid import add_grid_command
    from .model_files import add_model_file_commands
    from .rack import add_rack_command

    parser = Parser(prog="gbsd", description="Generative Bokeh with Stage Diffusion on Stable Diffusion 1.x, 2.x and XL.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_generate_commands(sub)
    add_model_file_commands(sub)
    add_eval_command(sub)
    add_grid_command(sub)
    add_rack_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_or_exit(build_parser(), argv)
    if isinstance(args, int):  # --help, or an argparse error (already printed)
        return args
    return run_main(f"gbsd {args.command}", args.run, args)


if __name__ == "__main__":
    sys.exit(main())
