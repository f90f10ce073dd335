"""bench/wheels.py, the preparation of a device call: .whl/ holds exactly the listed wheels, each installable on the
device, every requirement met there, and they import. On small wheels made here (no network); the download itself
is pip's."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
from _util import REPO

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import wheels  # noqa: E402


def _wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = (), requires_python: str | None = None,
           tag: str = "py3-none-any") -> Path:
    """A minimal wheel of one module `name` (its __version__ = version)."""
    dist = f"{name}-{version}.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += f"Requires-Python: {requires_python}\n" if requires_python else ""
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    files = {f"{name}/__init__.py": f"__version__ = {version!r}\n", f"{dist}/METADATA": meta,
             f"{dist}/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n"}
    files[f"{dist}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{dist}/RECORD,,\n"
    path = folder / f"{name}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return path


def _list(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "wheels.txt"
    path.write_text("# comment\n" + "\n".join(lines) + "\n")
    return path


def _ready(tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "whl"
    folder.mkdir()
    _wheel(folder, "alpha", "1.0", ("beta>=2", "torch>=2.0", "regex", "importlib_metadata", "numpy; extra == 'x'",
                                    "zzz-old-python-only; python_version < '3.8'"))
    _wheel(folder, "beta", "2.1", requires_python=">=3.9")
    return folder, _list(tmp_path, "alpha==1.0  # import alpha", "beta==2.1  # import beta")


def test_a_ready_folder_passes_and_its_wheels_import(tmp_path, capsys):
    folder, listed = _ready(tmp_path)
    rc = wheels.main(["--folder", str(folder), "--list", str(listed), "--pyproject", "none", "--no-download"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "alpha 1.0 needs beta>=2: carried 2.1" in out
    assert "alpha 1.0 needs torch>=2.0: device 2.11.0" in out  # the device's recorded version, not this machine's
    assert "alpha 1.0 needs regex: on the device (no version recorded here" in out
    assert "alpha 1.0 needs importlib_metadata: not needed: diffusers imports it only on Python < 3.8" in out
    assert "numpy" not in out and "zzz" not in out  # an extra's, and one for another Python
    assert "imports: alpha 1.0, beta 2.1 (beside torch" in out and out.rstrip().endswith("ready for bench/gpu.sh")


def test_on_the_device_it_checks_what_is_installed(tmp_path, capsys, monkeypatch):
    """--installed SITE (what gpu.sh runs there): requirements against the running interpreter's packages, imports
    from SITE."""
    folder, listed = _ready(tmp_path)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
                    *map(str, folder.glob("*.whl"))], check=True)
    monkeypatch.syspath_prepend(str(site))
    rc = wheels.main(["--folder", str(folder), "--list", str(listed), "--pyproject", "none", "--installed", str(site)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"alpha 1.0 needs torch>=2.0: installed {version('torch')}" in out and "imports: alpha 1.0" in out


def test_every_problem_is_named_and_fails_the_check(tmp_path, capsys):
    folder = tmp_path / "whl"
    folder.mkdir()
    _wheel(folder, "alpha", "0.9")  # another version than the list's
    _wheel(folder, "beta", "2.1", ("torch>=3", "nosuchpackage"))
    _wheel(folder, "gamma", "1.0", tag="cp311-cp311-manylinux_2_17_x86_64")  # not for the device's CPython 3.12
    _wheel(folder, "eps", "1.0", requires_python="<3.12")
    listed = _list(tmp_path, "alpha==1.0  # import alpha", "beta==2.1  # import beta", "gamma==1.0  # import gamma",
                   "eps==1.0  # import eps")
    rc = wheels.main(["--folder", str(folder), "--list", str(listed), "--pyproject", "none", "--no-download"])
    out = capsys.readouterr().out
    assert rc == 1
    for problem in ("FAIL  alpha-0.9-py3-none-any.whl: not in", "FAIL  alpha==1.0: no wheel in",
                    "FAIL  gamma-1.0-cp311-cp311-manylinux_2_17_x86_64.whl: its tags do not match CPython 3.12",
                    "FAIL  eps-1.0-py3-none-any.whl: Requires-Python <3.12 excludes 3.12.3",
                    "FAIL  beta 2.1 needs torch>=3: device has 2.11.0",
                    "FAIL  beta 2.1 needs nosuchpackage: neither carried nor on the device"):
        assert problem in out, problem
    assert "imports:" not in out  # nothing is imported from a folder that failed


def test_the_list_is_read_strictly(tmp_path):
    for bad in ("diffusers>=0.42  # import diffusers", "diffusers==0.42.1", "diffusers==0.42.1  # diffusers"):
        with pytest.raises(ValueError, match="expected 'name==version  # import module'"):
            wheels.read_list(_list(tmp_path, bad))


def test_the_real_list_matches_the_project_and_gpu_sh():
    """The list pins what pyproject's test extra pins (diffusers), and gpu.sh installs .whl/ and runs the check."""
    listed = wheels.read_list()
    assert str(listed["diffusers"][0]) == "0.42.1" and "diffusers==0.42.1" in (REPO / "pyproject.toml").read_text()
    assert {module for _, module in listed.values()} == {"diffusers", "open_clip", "ftfy", "wcwidth"}
    script = (REPO / "bench" / "gpu.sh").read_text()
    assert ".whl/*.whl" in script and '-m bench.wheels --installed "$SITE"' in script
