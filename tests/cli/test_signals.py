"""SIGTERM and SIGHUP end a command as Ctrl-C does: it unwinds (the atomic writer removes its temporary file), says
so in one line and exits with 128 + the signal's number. Real subprocesses, real signals: the process is stopped
inside the PNG writer (Pillow's save is slowed down there), so the signal always lands mid-write."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from _util import REPO

# `gbsd generate` in a child whose PNG writer writes half a file, says so, then waits to be signalled (or, when the
# signal is ignored, finishes the file after 3 s).
CHILD = """
import sys, time
from PIL import Image
real_save = Image.Image.save

def slow_save(self, fp, *a, **kw):
    with open(fp, "wb") as f:
        f.write(b"half a PNG")
    print("writing", flush=True)
    time.sleep(3)
    return real_save(self, fp, *a, **kw)

Image.Image.save = slow_save
from gbsd_core.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def _run_until_writing(argv, tmp_path, preexec=None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=tmp_path, env=env, text=True, preexec_fn=preexec)
    line = proc.stdout.readline()
    assert line == "writing\n", (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)])
def test_a_signal_mid_write_leaves_no_temporary_file(sig, code, tiny_ckpt, tmp_path):
    out = tmp_path / "out" / "image.png"
    out.parent.mkdir()
    proc = _run_until_writing(["generate", "p", "--weights", tiny_ckpt, "--steps", "2", "--size", "64x64", "-q",
                               "-o", out], tmp_path)
    assert [p.name for p in out.parent.iterdir()][0].endswith(".tmp")  # mid-write: the temporary twin exists
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    print(err)
    assert proc.returncode == code  # 128 + the signal, as a shell reports it (Python's default: killed, -15)
    assert os.listdir(out.parent) == []  # neither the image nor its .tmp
    assert err.count("\n") == 1 and "interrupted" in err and "Traceback" not in err
    assert (signal.Signals(sig).name in err) == (sig != signal.SIGINT)


def test_an_ignored_sighup_stays_ignored(tiny_ckpt, tmp_path):
    """Under `nohup` (SIGHUP ignored) a hang-up does not end the run: gbsd takes only signals left at their default."""
    out = tmp_path / "image.png"
    proc = _run_until_writing(["generate", "p", "--weights", tiny_ckpt, "--steps", "2", "--size", "64x64", "-q",
                               "-o", out], tmp_path, preexec=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.is_file() and [p.name for p in tmp_path.iterdir()] == ["image.png"]


def test_handlers_are_restored_after_a_command(tiny_ckpt, tmp_path, capsys):
    """In-process callers (the tests, a Python program) get their own SIGTERM / SIGHUP handlers back."""
    from gbsd_core.cli.main import main

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)
    assert main(["generate", "p", "--weights", str(tiny_ckpt), "--steps", "1", "--size", "64x64", "-q",
                 "-o", str(tmp_path / "o.png")]) == 0
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)) == before
