"""`python -m bench.wheels`: put into .whl/ exactly the wheels bench/gpu.sh installs on a lent GPU machine, and check
them here, so that a device call (minutes of a 15-minute lease) is made only when its set-up can work.

    python -m bench.wheels                        # download them (pip, from the package index), then check
    python -m bench.wheels --no-download          # check .whl/ as it is
    python -m bench.wheels --installed /tmp/site  # on the device, after gpu.sh installed them there

The list is bench/gpu-wheels.txt (`name==version  # import module` lines). Each check prints one line; any failure
makes the exit status 1:

1. .whl/ holds exactly those wheels, one version each (two stop pip's install on the device), each installable
   there: its tags match CPython 3.12 on manylinux x86_64 and its Requires-Python admits 3.12.
2. every requirement (Requires-Dist without extras, markers evaluated for the device) of every wheel, and of the
   project itself (pyproject.toml's dependencies and its `test` extra: the device runs the CUDA tests), is met by a
   carried wheel or by a package of the device: at the version recorded for it (DEVICE_VERSIONS), or present with
   no version recorded (DEVICE_PACKAGES: passes by name, and the device's run prints the version it has), or known
   not to be imported there (NOT_NEEDED, with the reason). With --installed: at the version installed in the
   running interpreter, the wheels' folder included.
3. the wheels import: here installed by pip into a temporary folder (as gpu.sh installs them) and imported from there
   beside this machine's torch (not the device's, which is older): each listed module at its pinned version, and
   what the bench uses of them (diffusers' SD and SDXL pipelines, open_clip's tokenizer).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
WHEEL_LIST = REPO / "bench" / "gpu-wheels.txt"
WHEEL_DIR = REPO / ".whl"

# The lent machines (the device tool's KINDS.md, "nvidia-h100-x1" and "nvidia-h200", both the 'cuda' image): python3 is
# CPython 3.12.3 on x86-64 Linux. Versions from a session's `pip list` there (2026-11); the other package names from
# the image's package list (read 2026-11-17), with no version recorded.
DEVICE_PYTHON = "3.12.3"
DEVICE_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                    "manylinux1_x86_64")
DEVICE_VERSIONS = {
    "accelerate": "1.15.0", "huggingface-hub": "1.33.0", "jax": "0.11.2", "numpy": "2.5.2", "onnx": "1.23.1",
    "safetensors": "0.8.0", "sentencepiece": "0.2.2", "tokenizers": "0.23.2", "torch": "2.11.0",
    "torchaudio": "2.11.0", "torchvision": "0.26.0", "transformers": "5.17.0", "triton": "3.6.0",
}
DEVICE_PACKAGES = frozenset(canonicalize_name(n) for n in """
    absl-py aiohttp anyio attrs certifi charset-normalizer click cloudpickle colorama contourpy coverage cycler cython
    einops filelock fonttools fsspec h11 h5py hf-xet httpcore httpx hypothesis idna imageio iniconfig jinja2 joblib
    kiwisolver lazy-loader lxml markdown markdown-it-py markupsafe matplotlib mdurl ml-dtypes mpmath msgpack
    networkx ninja numba opencv-python-headless optax packaging pandas pathspec peft pillow pip pluggy protobuf psutil
    pyarrow pygments pyparsing pytest pytest-timeout pytest-xdist python-dateutil pyyaml regex requests rich
    scikit-image scikit-learn scipy setuptools six sympy tabulate tensorboard threadpoolctl tifffile timm tqdm
    typing-extensions urllib3 wheel wrapt xxhash zipp""".split())
# Requirements the device need not meet: named in a wheel's metadata, never imported there.
NOT_NEEDED = {
    "importlib-metadata": "diffusers imports it only on Python < 3.8 (diffusers/utils/import_utils.py); the device "
                          "runs 3.12",
}
# What the bench uses of a listed module, imported after it (bench/reference*.py, gbsd_core/tokenizer.py).
USES = {
    "diffusers": "from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, "
                 "UNet2DConditionModel",
    "open_clip": "import open_clip.tokenizer; open_clip.tokenizer.SimpleTokenizer()",
}


def read_list(path: Path = WHEEL_LIST) -> dict[str, tuple[Version, str]]:
    """{canonical name: (pinned version, module to import)} from `name==version  # import module` lines."""
    wanted = {}
    for line in path.read_text().splitlines():
        spec, _, comment = line.partition("#")
        if not spec.strip():
            continue
        req = Requirement(spec.strip())
        pins = [s for s in req.specifier if s.operator == "=="]
        module = comment.strip().removeprefix("import ").strip()
        if len(pins) != 1 or len(req.specifier) != 1 or not comment.strip().startswith("import ") or not module:
            raise ValueError(f"{path.name}: expected 'name==version  # import module', got {line!r}")
        wanted[canonicalize_name(req.name)] = (Version(pins[0].version), module)
    return wanted


def metadata(wheel: Path):
    """The wheel's METADATA (an email.message.Message: Name, Version, Requires-Python, Requires-Dist...)."""
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        return Parser().parsestr(z.read(name).decode())


def device_environment() -> dict[str, str]:
    """Marker values of the device's interpreter (`python_version` and friends)."""
    env = default_environment()
    env.update(python_version="3.12", python_full_version=DEVICE_PYTHON, implementation_version=DEVICE_PYTHON,
               sys_platform="linux", platform_system="Linux", platform_machine="x86_64", os_name="posix",
               implementation_name="cpython", platform_python_implementation="CPython")
    return env


def check_folder(folder: Path, wanted: dict[str, tuple[Version, str]]) -> tuple[list[str], dict[str, Path]]:
    """(problems, {name: wheel}): exactly the listed wheels, installable on the device."""
    problems, found = [], {}
    tags = {*cpython_tags((3, 12), platforms=DEVICE_PLATFORMS),
            *compatible_tags((3, 12), "cp312", platforms=DEVICE_PLATFORMS)}
    for wheel in sorted(folder.glob("*.whl")):
        name, version, _, wheel_tags = parse_wheel_filename(wheel.name)
        if name not in wanted or version != wanted[name][0]:
            problems.append(f"{wheel.name}: not in {WHEEL_LIST.name} (gpu.sh installs every wheel of the folder)")
            continue
        if name in found:
            problems.append(f"{wheel.name}: a second wheel of {name}")
        elif not tags & set(wheel_tags):
            problems.append(f"{wheel.name}: its tags do not match CPython 3.12 on manylinux x86_64")
        elif not SpecifierSet(metadata(wheel).get("Requires-Python") or "").contains(DEVICE_PYTHON):
            problems.append(f"{wheel.name}: Requires-Python {metadata(wheel)['Requires-Python']} excludes "
                            f"{DEVICE_PYTHON}")
        found.setdefault(name, wheel)
    problems += [f"{name}=={v}: no wheel in {folder}" for name, (v, _) in wanted.items() if name not in found]
    return problems, found


def requirements(wheels: dict[str, Path], pyproject: Path | None) -> list[tuple[str, Requirement]]:
    """(who needs it, requirement) for every Requires-Dist of the wheels and the project's own needs."""
    out = [(f"{name} {metadata(w)['Version']}", Requirement(r)) for name, w in wheels.items()
           for r in metadata(w).get_all("Requires-Dist") or []]
    if pyproject is not None:
        import tomllib  # Python >= 3.11 (the device has 3.12)

        project = tomllib.loads(pyproject.read_text())["project"]
        out += [("gbsd (pyproject)", Requirement(r))
                for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    return out


def installed_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def check_requirements(reqs: list[tuple[str, Requirement]], carried: dict[str, Version],
                       installed: bool) -> tuple[list[str], list[str]]:
    """(problems, notes): each requirement against the carried wheels, then the device's packages (or, `installed`,
    what the running interpreter has)."""
    env = default_environment() if installed else device_environment()
    problems, notes = [], []
    for who, req in reqs:
        name = canonicalize_name(req.name)
        if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
            continue  # an extra's requirement, or not for this Python
        where, version = "carried", carried.get(name)
        if version is None and installed:
            where, version = "installed", installed_version(name)
        elif version is None:
            where, version = "device", DEVICE_VERSIONS.get(name)
        line = f"{who} needs {req}: "
        if version is not None and req.specifier.contains(version, prereleases=True):
            notes.append(line + f"{where} {version}")
        elif version is not None:
            problems.append(line + f"{where} has {version}")
        elif not installed and name in DEVICE_PACKAGES:
            notes.append(line + "on the device (no version recorded here; the device's run prints it)")
        elif name in NOT_NEEDED:
            notes.append(line + f"not needed: {NOT_NEEDED[name]}")
        else:
            problems.append(line + ("not installed" if installed else "neither carried nor on the device"))
    return problems, notes


IMPORT_CHECK = r"""
import importlib, json, sys
from importlib.metadata import version
wanted, uses = json.loads(sys.argv[1]), json.loads(sys.argv[2])
out = {}
for dist, module in wanted.items():
    mod = importlib.import_module(module)
    exec(uses.get(module, ""))
    out[dist] = [version(dist), getattr(mod, "__file__", None) or ""]
import torch
out["torch"] = [torch.__version__, torch.__file__]
print(json.dumps(out))
"""


def check_imports(wanted: dict[str, tuple[Version, str]], site: Path) -> tuple[list[str], list[str]]:
    """Import each listed module (and what the bench uses of it) in a fresh interpreter with `site` first on the
    path; each must come from `site`, at its pinned version."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")]))
    modules = {name: module for name, (_, module) in wanted.items()}
    proc = subprocess.run([sys.executable, "-c", IMPORT_CHECK, json.dumps(modules), json.dumps(USES)], env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode:
        return [f"import failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"], []
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    problems = [f"{name}: imported {got[name][0]} from {got[name][1]}, not {v} from {site}"
                for name, (v, _) in wanted.items()
                if Version(got[name][0]) != v or not Path(got[name][1]).resolve().is_relative_to(site.resolve())]
    notes = ["imports: " + ", ".join(f"{module} {got[name][0]}" for name, (_, module) in wanted.items())
             + f" (beside torch {got['torch'][0]})"]
    return problems, notes


def download(folder: Path, wanted: dict[str, tuple[Version, str]]) -> None:
    """pip download of exactly the listed wheels for the device's Python and platform (no dependencies: those are
    checked, not fetched); wheels of other names or versions are removed from the folder."""
    platforms = [arg for p in DEVICE_PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    "3.12", "--implementation", "cp", *platforms, "-d", str(folder),
                    *[f"{name}=={v}" for name, (v, _) in wanted.items()]], check=True)
    for wheel in folder.glob("*.whl"):
        name, version, _, _ = parse_wheel_filename(wheel.name)
        if name not in wanted or version != wanted[name][0]:
            print(f"removing {wheel.name} (not in {WHEEL_LIST.name})")
            wheel.unlink()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.wheels", description=__doc__.split("\n")[0])
    ap.add_argument("--folder", type=Path, default=WHEEL_DIR, help="where the wheels go (.whl/, carried to the device)")
    ap.add_argument("--list", type=Path, default=WHEEL_LIST, dest="wheel_list")
    ap.add_argument("--pyproject", type=Path, default=REPO / "pyproject.toml",
                    help="also check the project's dependencies and test extra ('none': skip)")
    ap.add_argument("--no-download", action="store_true", help="check the folder as it is")
    ap.add_argument("--installed", type=Path, default=None, metavar="SITE",
                    help="on the device: the wheels are installed in SITE; check against what is installed there")
    args = ap.parse_args(argv)
    wanted = read_list(args.wheel_list)
    if args.installed is None and not args.no_download:
        args.folder.mkdir(exist_ok=True)
        download(args.folder, wanted)
    problems, wheels = check_folder(args.folder, wanted)
    carried = {name: parse_wheel_filename(w.name)[1] for name, w in wheels.items()}
    size = sum(w.stat().st_size for w in wheels.values())
    notes = [f"{args.folder}: {len(wheels)} wheels, {size / 2**20:.1f} MiB (a device call carries at most 64 MiB)"]
    pyproject = None if str(args.pyproject) == "none" else args.pyproject
    more_problems, more_notes = check_requirements(requirements(wheels, pyproject), carried, args.installed is not None)
    problems, notes = problems + more_problems, notes + more_notes
    if not problems:
        if args.installed is not None:
            more_problems, more_notes = check_imports(wanted, args.installed)
        else:
            with tempfile.TemporaryDirectory(prefix="gbsd-wheels-") as tmp:
                subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                                "--target", tmp, *map(str, wheels.values())], check=True)
                more_problems, more_notes = check_imports(wanted, Path(tmp))
        problems, notes = problems + more_problems, notes + more_notes
    for line in notes:
        print(f"ok    {line}")
    for line in problems:
        print(f"FAIL  {line}")
    print("wheels: " + ("ready for bench/gpu.sh" if not problems else f"{len(problems)} problem(s), see FAIL above"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
