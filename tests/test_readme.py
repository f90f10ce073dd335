"""The README's first lines and its Python snippets are kept true: the snippets run against a tiny checkpoint."""
from __future__ import annotations

import re

from _util import REPO

README = (REPO / "README.md").read_text()

# The snippets are written for a real 512² checkpoint; these substitutions make them tiny. Each must be found, so
# an edited README that drifts from this list fails here rather than silently running less.
TINY = {
    '"weights/v1-5-pruned-emaonly.safetensors"': None,  # replaced by the tiny checkpoint's path
    "steps=30": "steps=4",
    "width=512, height=512": "width=64, height=64",
    "timesteps(30)": "timesteps(5)",
    "range(0, 24)": "range(0, 4)",
    "range(24, 30)": "range(4, 5)",
    "torch.randn(1, 4, 64, 64,": "torch.randn(1, 4, 8, 8,",
}


def test_first_lines_give_the_main_command_and_the_test_command():
    lines = [line.strip() for line in README.splitlines()[1:4] if line.strip()]
    assert lines[0].startswith("gbsd download sd15 && gbsd generate")
    assert lines[1].startswith("python -m pytest -q tests")
    assert "python -m pytest -q tests" in (REPO / ".ci" / "run").read_text()


def test_python_snippets_run(tiny_ckpt, tmp_path, monkeypatch):
    code = "\n".join(re.findall(r"```python\n(.*?)```", README, flags=re.S))
    assert "gbsd_core.load(" in code and "denoise(" in code
    for old, new in TINY.items():
        assert old in code, f"README snippet no longer contains {old!r}: update tests/test_readme.py"
        code = code.replace(old, repr(str(tiny_ckpt)) if new is None else new)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "bokeh.png").exists() and (tmp_path / "fast.png").exists()
    assert sorted(p.name for p in tmp_path.glob("alpha_*.png")) == ["alpha_0.25.png", "alpha_0.5.png", "alpha_0.75.png"]
    assert namespace["image"].size == (64, 64)
    for name in ("trace.png", "trace.webp", "rack.webp", "rack_sheet.png"):  # the trace and rack snippet
        assert (tmp_path / name).exists(), name
    assert len(namespace["rack"].frames) == 12


def test_readme_pictures_exist_and_are_small():
    for name in re.findall(r"\]\((docs/[^)]+)\)", README):
        path = REPO / name
        assert path.is_file(), name
        assert path.stat().st_size < 40_000, name  # a few tens of KB at most
