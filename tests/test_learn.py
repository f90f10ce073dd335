"""The learning route stays true: the walk (gbsd_core/walk.py) is the library bit for bit, and docs/LEARN.md points at
code that exists, runs, and stays small."""
from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import io
import re
import subprocess
import tokenize
from pathlib import Path

import numpy as np
import pytest
import torch

import gbsd_core
from gbsd_core.loading import save_single_file
from gbsd_core.params import GenerationParams
from gbsd_core.pipeline import generate
from gbsd_core.walk import main as walk_main
from gbsd_core.walk import tiny_bundle, walk

from _util import REPO

PROMPT, FOCUS = "a bunny and a carrot in a garden, bokeh", "a carrot"


@pytest.fixture(scope="module")
def sd2_v_ckpt(tmp_path_factory):
    """A tiny SD2-768-v single file (OpenCLIP text, linear proj_in, v-prediction), amplified like the SD1
    `responsive_ckpt` so that the stage switch changes the image."""
    from _tiny import tiny_modules

    modules = tiny_modules(sd2=True, seed=5)
    with torch.no_grad():
        for name, p in modules["unet"].named_parameters():
            if ".attn2.to_v." in name or ".attn2.to_out.0.weight" in name:
                p.mul_(6.0)
        modules["vae"].decoder.conv_out.weight.mul_(5.0)
    return save_single_file(modules, tmp_path_factory.mktemp("sd2v") / "tiny-sd2-v.safetensors")


@pytest.fixture(scope="module", params=["sd1", "sd2-768-v"])
def bundle(request, responsive_ckpt, sd2_v_ckpt):
    if request.param == "sd1":
        return gbsd_core.load(responsive_ckpt)
    return gbsd_core.load(sd2_v_ckpt, family="sd2-768-v")


def _library(bundle, **kw) -> np.ndarray:
    return np.asarray(generate(bundle, GenerationParams(PROMPT, **{"width": 64, "height": 64, **kw})).image)


def _walked(bundle, **kw) -> np.ndarray:
    focus = kw.pop("focus", None)
    size = (kw.pop("width", 64), kw.pop("height", 64))
    return walk(bundle, PROMPT, focus, size=size, **kw)[0].permute(1, 2, 0).numpy()


CASES = [
    dict(steps=5),  # plain SD
    dict(steps=5, focus=FOCUS),  # GBSD with the defaults α = 0.5, layout fraction 0.8 (4 + 1 steps)
    dict(steps=7, focus=FOCUS, alpha=0.3, layout=0.7, cfg=5.0, negative="blurry", seed=3),
    dict(steps=6, focus=FOCUS, alpha=0.15, layout=0.15, seed=11, width=64, height=96),  # 0.15·6 = 0.8999… → 1
]


@pytest.mark.parametrize("case", CASES, ids=["plain", "gbsd", "gbsd-negative", "gbsd-rounding"])
def test_the_walk_is_generate_bit_for_bit(bundle, case):
    ours = _walked(bundle, **dict(case))
    assert np.array_equal(ours, _library(bundle, **case))


def test_the_walk_follows_its_inputs(bundle):
    # The equality above must be able to fail: the walk's image moves with the focus prompt, α and the layout fraction.
    base = _walked(bundle, steps=5, focus=FOCUS)
    for other in (dict(focus="a bunny"), dict(focus=FOCUS, alpha=0.0), dict(focus=FOCUS, layout=0.4)):
        assert not np.array_equal(_walked(bundle, steps=5, **other), base), other


def test_the_walks_defaults_are_generates():
    import inspect

    walk_defaults = {k: v.default for k, v in inspect.signature(walk).parameters.items()
                     if v.default is not inspect.Parameter.empty}
    params = {f.name: f.default for f in dataclasses.fields(GenerationParams)}
    for name in ("focus", "alpha", "layout", "steps", "cfg", "negative", "seed"):
        assert walk_defaults[name] == params[name], name


def test_the_walk_runs_tiny_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "walk.png"
    walk_main([PROMPT, "--focus", FOCUS, "--tiny", "--steps", "3", "-o", str(out)])
    printed = capsys.readouterr().out
    assert "E(global)  [1, 77, 64]" in printed and "image      [1, 3, 64, 64]" in printed
    from PIL import Image

    with Image.open(out) as im:
        assert im.size == (64, 64)
    # the tiny bundle is a real SD1-shaped bundle: the library draws the same image from it
    ours = np.asarray(Image.open(out))
    assert np.array_equal(ours, _library(tiny_bundle(), steps=3, focus=FOCUS))


# ------------------------------------------------------------------------------------------- docs/LEARN.md stays true


LEARN = (REPO / "docs" / "LEARN.md").read_text()
# An anchor: [`gbsd_core/unet.py::UNetModel`](../gbsd_core/unet.py#L186-L306) — the symbol, and the lines it spans.
ANCHOR = re.compile(r"\[`(gbsd_core/[\w/]+\.py)::([\w.]+)`\]\(\.\./\1#L(\d+)-L(\d+)\)")


def _resolve(path: str, symbol: str):
    module = importlib.import_module(path[:-3].replace("/", "."))
    obj = module
    for part in symbol.split("."):
        obj = getattr(obj, part)
    return inspect.unwrap(obj)


def _anchors() -> list[tuple[str, str, int, int]]:
    return [(m[1], m[2], int(m[3]), int(m[4])) for m in ANCHOR.finditer(LEARN)]


def test_every_anchor_resolves_to_the_lines_it_names():
    anchors = _anchors()
    assert len(anchors) >= 10
    # every `path::Symbol` written anywhere is a linked anchor (no bare ones that could drift unchecked)
    assert len(re.findall(r"`gbsd_core/[\w/]+\.py::[\w.]+`", LEARN)) == len(anchors)
    for path, symbol, first, last in anchors:
        if symbol == "__doc__":  # a module's docstring: the lines of its first statement
            doc = ast.parse((REPO / path).read_text()).body[0]
            assert isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant), f"{path} has no docstring"
            assert (first, last) == (doc.lineno, doc.end_lineno), f"{path}::__doc__ spans L{doc.lineno}-L{doc.end_lineno}"
            continue
        obj = _resolve(path, symbol)
        lines, start = inspect.getsourcelines(obj)
        assert inspect.getsourcefile(obj) == str(REPO / path), (path, symbol)
        # decorators are part of what the reader sees
        assert (first, last) == (start, start + len(lines) - 1), f"{path}::{symbol} spans L{start}-L{start + len(lines) - 1}"


def test_the_route_is_at_most_a_thousand_lines():
    lines = {(path, n) for path, _, first, last in _anchors() for n in range(first, last + 1)}
    assert len(lines) <= 1000, len(lines)


def test_every_module_is_on_the_route_or_in_what_to_skip():
    skip = LEARN.split("## What to skip", 1)[1]
    for f in sorted((REPO / "gbsd_core").rglob("*.py")):
        rel = f.relative_to(REPO).as_posix()
        if f.name in ("__init__.py", "__main__.py"):
            continue
        on_route = any(path == rel for path, *_ in _anchors())
        named = re.search(rf"(^|[^\w]){re.escape(f.stem)}(\.py|[^\w]|$)", skip) or any(
            f"{d}/" in skip for d in rel.split("/")[1:-1])
        assert on_route or named, f"{rel} is neither a stop on the route nor in 'What to skip'"


def test_learn_code_blocks_run(tiny_ckpt, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", LEARN, flags=re.S)
    assert blocks
    code = "\n".join(blocks).replace('"weights/v1-5-pruned-emaonly.safetensors"', repr(str(tiny_ckpt)))
    for old, new in (("width=512, height=512", "width=64, height=64"), ("steps=50", "steps=3")):
        assert old in code, f"LEARN.md's code no longer contains {old!r}: update tests/test_learn.py"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/LEARN.md", "exec"), {})


def test_every_test_named_as_proof_exists():
    named = re.findall(r"`(tests/[\w/]+\.py)::(test_\w+)`", LEARN)
    assert len(named) >= 10
    for path, test in named:
        assert re.search(rf"^def {test}\(", (REPO / path).read_text(), flags=re.M), f"{path}::{test} does not exist"


def _code_lines(fn) -> int:
    """Lines of a function that hold code: not blank, not only a comment, not its docstring (Python's tokenizer)."""
    src = inspect.getsource(fn)
    lines: set[int] = set()
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    tokens = list(tokenize.generate_tokens(io.StringIO(src).readline))
    for j, tok in enumerate(tokens):
        if tok.type in skip:
            continue
        before = [t for t in tokens[:j] if t.type not in (tokenize.COMMENT, tokenize.NL)]
        if tok.type == tokenize.STRING and before and before[-1].type in (tokenize.NEWLINE, tokenize.INDENT):
            continue  # a docstring (a string that is a statement of its own)
        lines.update(range(tok.start[0], tok.end[0] + 1))
    return len(lines)


def test_the_walk_is_at_most_60_lines_of_code():
    n = _code_lines(walk)
    print(f"walk(): {n} lines of code")
    assert n <= 60
    assert len((REPO / "gbsd_core" / "walk.py").read_text().splitlines()) <= 150


def test_the_code_line_count_can_fail():
    def three():
        """doc"""
        # a comment

        a = 1
        return (a +
                2)
    assert _code_lines(three) == 4  # def, a = 1, and the two lines of the return


def test_nothing_points_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    outside = re.compile(r"GUIDE\s*§|GUIDE\.md|\.\./shared|/wor[k]/")  # [k]: this line must not match itself
    for name in tracked:
        if name.endswith((".py", ".md", ".sh", ".toml", ".txt")) or name == ".ci/run":
            text = (REPO / name).read_text(errors="replace")
            hits = [line for line in text.splitlines() if outside.search(line)]
            assert not hits, f"{name} points outside the repository: {hits[0].strip()}"


def _trace_the_walk() -> tuple[dict[tuple, int], set[Path]]:
    """Run the walk on the tiny bundle (built first) under a profiler: the call depth below `walk` at which each
    (class, function) of gbsd_core is first reached, and the package's files whose code ran."""
    import sys

    package = str(REPO / "gbsd_core")
    depth_of: dict[tuple, int] = {}
    files: set[Path] = set()
    stack: list[bool] = []

    def profile(frame, event, arg):
        if event == "call":
            code = frame.f_code
            ours = code.co_filename.startswith(package) and not code.co_name.startswith("<")
            stack.append(ours)
            if code.co_filename.startswith(package):
                files.add(Path(code.co_filename))
            if ours:
                depth_of.setdefault((type(frame.f_locals.get("self")), code.co_name), sum(stack) - 1)
        elif event == "return" and stack:
            stack.pop()

    bundle = tiny_bundle()
    sys.setprofile(profile)
    try:
        walk(bundle, PROMPT, FOCUS, steps=2, size=(64, 64))
    finally:
        sys.setprofile(None)
    return depth_of, files


def test_the_walk_reaches_each_landmark_within_its_hops():
    """From the walk, the text encoder, the UNet and the VAE decode are one call away (their calls are on the page,
    as are DDIM's update and the GBSD switch), and a ResBlock and a cross-attention block at most two calls below the
    UNet's forward."""
    from gbsd_core.attention import SpatialTransformer
    from gbsd_core.clip_text import CLIPTextEncoder
    from gbsd_core.unet import UNetModel
    from gbsd_core.unet_blocks import ResBlock
    from gbsd_core.vae import AutoencoderKL

    depth_of, _ = _trace_the_walk()
    assert depth_of[(type(None), "walk")] == 0
    assert depth_of[(CLIPTextEncoder, "forward")] == 1
    assert depth_of[(AutoencoderKL, "decode")] == 1
    unet = depth_of[(UNetModel, "forward")]
    assert unet == 1
    assert depth_of[(ResBlock, "forward")] - unet <= 2
    assert depth_of[(SpatialTransformer, "forward")] - unet <= 2


def test_the_readmes_size_promise_is_measured():
    """README's "N files, M lines" is the walk's path as it stands: the file count exact, the lines within 3%."""
    promise = re.search(r"SD1 \+ GBSD from prompt to pixels, is \*\*(\d+) files, ([\d,]+) lines\*\*",
                        (REPO / "README.md").read_text())
    assert promise, "README lost its size promise"
    _, files = _trace_the_walk()
    lines = sum(len(f.read_text().splitlines()) for f in files)
    print(f"the walk's path: {len(files)} files, {lines} lines: {sorted(f.name for f in files)}")
    assert int(promise[1]) == len(files)
    assert abs(int(promise[2].replace(",", "")) - lines) <= 0.03 * lines
