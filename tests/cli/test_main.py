"""The `gbsd` entry point: `--help` imports nothing heavy and says what --fast turns on, and the console script runs in
a fresh interpreter."""
from __future__ import annotations

import os
import subprocess
import sys

from _cli import TINY
from _util import REPO


def test_help_is_instant_and_imports_no_torch():
    code = (
        "import sys, contextlib, io\n"
        "from gbsd_core.cli.main import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    rc = main(['--help'])\n"
        "assert rc == 0 and 'generate' in out.getvalue(), out.getvalue()\n"
        "print(sorted(m for m in ('torch', 'open_clip', 'PIL', 'huggingface_hub') if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_console_script_subprocess(tiny_ckpt, tmp_path):
    """The real entry point in a fresh interpreter: exit 0 with an image, exit 2 on bad input."""
    out = tmp_path / "sub.png"
    cmd = [sys.executable, "-m", "gbsd_core.cli", "generate", "a cat", "--weights", str(tiny_ckpt), *TINY, "-o",
           str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see _one_thread
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out) and out.exists()
    bad = subprocess.run([*cmd[:-2], "--alpha", "2", "-o", str(tmp_path / "bad.png")], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path, env=env)
    assert bad.returncode == 2 and "alpha" in bad.stderr and not (tmp_path / "bad.png").exists()


def test_the_fast_help_says_the_triton_kernels_stay_off():
    """--fast's help listed "Triton kernels on CUDA", but the CLI never turns them on (FastOptions(triton=...) is
    opt-in, off until a GPU measures the kernels faster than ATen): the help says they stay off."""
    import argparse

    from gbsd_core.cli.generate import add_speed_args

    parser = argparse.ArgumentParser()
    add_speed_args(parser)
    text = " ".join(parser.format_help().split())
    assert "Triton kernels on CUDA" not in text and "Triton kernels stay off" in text
