"""What every command writes, checked before any weights load: symbolic links that cannot be followed are refused by
name, and every file a command will write (the trace's own files, a rack's frames, eval's and grid's files) is probed
under its own name, so a run never ends half-written. (The wider bad-input table is test_generate.py's.)"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from _cli import EVAL_ARGS, TINY, Loaded, run_cli

from gbsd_core.cli.main import main as cli_main


def _snapshot(d: Path) -> dict[str, object]:
    """Every entry under `d` (links as their target text, so a link replaced by a file shows), with file bytes."""
    return {str(p.relative_to(d)): ("->", os.readlink(p)) if p.is_symlink() else p.read_bytes() if p.is_file()
            else None for p in d.rglob("*")}


# (id, argv with {out}: the path under test, the folder or file the command writes). A model file is added.
WRITERS = [
    ("trace", ["generate", "p", "--trace", "{out}", "-o", "{tmp}/img.png"]),
    ("img2img-trace", ["img2img", "p", "--init", "{img}", "--trace", "{out}", "-o", "{tmp}/img.png"]),
    ("eval", ["eval", "{pairs}", "-o", "{out}"]),
    ("grid", ["grid", "p", "--focus", "f", "-o", "{out}"]),
    ("sweep-folder", ["sweep", "p", "--focus", "f", "--alphas", "0,1", "-o", "{out}"]),
    ("generate-file", ["generate", "p", "-o", "{out}.png"]),
    ("rack-file", ["rack", "p", "--from", "a", "--to", "b", "-o", "{out}.webp"]),
    ("download-dir", ["download", "sd15", "--dir", "{out}"]),
]
LINKS = {  # how the path under test is broken, and what the message must say
    "dangling": ("a symlink to nothing", lambda p, tmp: p.symlink_to(tmp / "nowhere" / "at-all")),
    "loop": ("a symlink loop", lambda p, tmp: (p.symlink_to(tmp / "loop-b"), (tmp / "loop-b").symlink_to(p))),
    "self-loop": ("a symlink loop", lambda p, tmp: p.symlink_to(p.name)),
}


@pytest.mark.parametrize("link", list(LINKS))
@pytest.mark.parametrize("case", WRITERS, ids=[c[0] for c in WRITERS])
def test_an_output_that_is_a_broken_symlink_is_refused_by_name(case, link, tmp_path, capsys, monkeypatch, no_load,
                                                                tiny_ckpt):
    """A link to nothing or a link loop is not a free name (os.path.exists is False for both): refused up front,
    exit 2, one line naming it, nothing written (--trace once failed with exit 1 after writing the image, grid after
    computing every cell)."""
    from _cli import noise_png

    name, argv = case
    needle, make = LINKS[link]
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    if name in ("generate-file", "rack-file"):
        out = work / ("out.png" if name == "generate-file" else "out.webp")
    make(out, work)
    pairs = work / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "p", "focus": "f", "seed": 1}) + "\n")
    subs = {"{out}.png": str(out), "{out}.webp": str(out), "{out}": str(out), "{tmp}": str(work),
            "{img}": str(noise_png(work / "in.png")), "{pairs}": str(pairs)}

    def sub(a: str) -> str:
        for k, v in subs.items():
            a = a.replace(k, v)
        return a

    argv = [sub(a) for a in argv] + ([] if argv[0] == "download" else ["--weights", str(tiny_ckpt)])
    monkeypatch.chdir(work)
    before = _snapshot(tmp_path)
    code, _, err = run_cli(argv, capsys)
    print(f"{name}/{link}: {err.strip()}")
    assert code == 2 and needle in err and err.count("\n") == 1
    assert _snapshot(tmp_path) == before


def test_a_loop_on_the_way_to_the_output_is_named(tmp_path, capsys, no_load, tiny_ckpt):
    """A link loop in a folder above the output: "does not exist" would send the user looking for a missing folder."""
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    for argv in (["generate", "p", "-o", tmp_path / "a" / "x.png"], ["generate", "p", "--trace", tmp_path / "a" / "tr"],
                 ["grid", "p", "--focus", "f", "-o", tmp_path / "a" / "g"]):
        code, _, err = run_cli([*argv, "--weights", tiny_ckpt], capsys)
        print(err.strip())
        assert code == 2 and "symlink loop" in err and err.count("\n") == 1


def test_a_link_to_a_folder_is_a_fine_output_folder(tmp_path, capsys, tiny_ckpt):
    """The refusal is for links that cannot be followed: a link to a real folder is written into."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    code, _, err = run_cli(["generate", "p", "--focus", "f", *TINY, "--weights", tiny_ckpt, "--trace",
                            tmp_path / "link", "-o", tmp_path / "img.png"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(real)) == ["img_trace.png", "img_trace.webp"]


# ------------------------------------------------------------------------------------ every name probed up front

STEM = 235  # bytes: NAME.png fits (with its temporary twin, 14 more: 253 of 255), NAME_trace.webp does not (260)


@pytest.mark.parametrize("trace_dir", ["new", "existing"])
def test_the_trace_files_are_probed_before_loading(trace_dir, tmp_path, capsys, no_load, tiny_ckpt):
    """A long -o: the image's name fits the file system, but the trace's NAME_trace.png / NAME_trace.webp do not.
    Refused before loading, nothing written (it once wrote the image and the trace folder, then failed, exit 1)."""
    stem = "i" * STEM
    trace = tmp_path / "tr"
    if trace_dir == "existing":
        trace.mkdir()
    before = sorted(os.listdir(tmp_path))
    code, _, err = run_cli(["generate", "p", "--weights", tiny_ckpt, "--trace", trace, "-o", tmp_path / f"{stem}.png"],
                           capsys)
    print(err.strip())
    assert code == 2 and "--trace" in err and "too long" in err and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == before and (trace_dir == "new" or os.listdir(trace) == [])


def test_a_long_trace_name_that_fits_runs(tmp_path, capsys, tiny_ckpt):
    """The probe is exact: the longest -o whose trace files still fit is written in full."""
    stem = "i" * (255 - 14 - len("_trace.webp"))
    code, _, err = run_cli(["generate", "p", "--focus", "f", *TINY, "--weights", tiny_ckpt, "--trace",
                            tmp_path / "tr", "-o", tmp_path / f"{stem}.png"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "tr")) == [f"{stem}_trace.png", f"{stem}_trace.webp"]


def test_a_new_output_folder_of_the_longest_name_is_accepted(tmp_path, capsys, no_load, tiny_ckpt):
    """A new folder's name is held to the file system's limit itself (255 bytes), not to its temporary twin's."""
    with pytest.raises(Loaded):
        cli_main(["grid", "p", "--focus", "f", "--weights", str(tiny_ckpt), "-o", str(tmp_path / ("g" * 255))])


def _deep(base: Path, length: int) -> Path:
    """A path of exactly `length` bytes: `base` and folders of at most 200 characters."""
    left = length - len(str(base))
    parts = []
    while left > 402:
        parts.append(200)
        left -= 201
    parts += [left // 2 - 1, left - left // 2 - 1]  # two parts of at least 1 character each, with their "/"
    return base.joinpath(*("d" * k for k in parts))


@pytest.mark.parametrize("argv", [
    ["eval", "{pairs}", "-o", "{deep}"],
    ["grid", "p", "--focus", "f", "-o", "{deep}"],
    ["generate", "p", "--trace", "{deep}", "-o", "{tmp}/i.png"],
], ids=["eval", "grid", "trace"])
def test_a_path_too_long_for_the_files_inside_is_refused(argv, tmp_path, capsys, no_load, tiny_ckpt):
    """A new folder whose own path fits PATH_MAX (4096 bytes with its NUL) but whose files' paths (eval's
    pairs/<id>/heatmap_input.png, grid_overlay.png, NAME_trace.webp, each with its temporary twin) do not: refused
    up front, not after the first pair has run."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "p", "focus": "f", "seed": 1, "id": "x" * 80}) + "\n")
    path_max = os.pathconf(tmp_path, "PC_PATH_MAX")
    deep = _deep(tmp_path, path_max - 1 - 20 - 2) / "o"  # 20 bytes short of the limit: the folder's own probe fits (+16)
    deep.parent.mkdir(parents=True)
    assert len(str(deep)) == path_max - 1 - 20
    argv = [a.replace("{pairs}", str(pairs)).replace("{deep}", str(deep)).replace("{tmp}", str(tmp_path)) for a in argv]
    code, _, err = run_cli([*argv, "--weights", tiny_ckpt, *(EVAL_ARGS if argv[0] == "eval" else [])], capsys)
    print(err.strip()[-200:])
    assert code == 2 and "too long" in err and err.count("\n") == 1
    assert os.listdir(deep.parent) == []


# ------------------------------------------------------------------------------------------------ sweep patterns


def test_folders_the_pattern_writes_itself_are_fine(tmp_path, capsys, tiny_ckpt):
    """The pattern's own separators make folders as before, and a {seed:c} that is a plain character is a name."""
    (tmp_path / "by-seed").mkdir()
    code, out, err = run_cli(["sweep", "p", "--focus", "f", "--alphas", "0,1", "--seed", "65", *TINY,
                              "--weights", tiny_ckpt, "-o", tmp_path / "by-seed" / "{seed:c}_{index}.png"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "by-seed")) == ["A_0.png", "A_1.png"]
